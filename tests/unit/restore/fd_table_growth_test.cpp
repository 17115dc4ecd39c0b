// fd_table_growth_test.cpp: a restore into a process with threads whose fd table is too small grows
// the table before it stops the process (sys/fdtable_grow.hpp, called from restore/process.cpp): by
// the time every thread is stopped the table already holds every number the agent uses, so the
// stop waits for no RCU grace period. With the growth turned off the table is still small at that
// moment (the agent's PREPARE grows it, as before). Real children, real ptrace; each is reaped.
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <string>
#include <thread>

#include <gtest/gtest.h>

#include "restore/process.hpp"
#include "restore_helpers.hpp"
#include "sys/fdtable_grow.hpp"
#include "sys/syscalls.hpp"

namespace pipecr::restore {
namespace {

using testing::ImageBuilder;

constexpr int32_t kRec = 4242;
constexpr int kPipes = 300;

struct Kid {
  pid_t pid = -1;
  sys::PipePair block;  // its second thread reads the read end; the write end stays open here
  ~Kid() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }
};

uint32_t slots(pid_t pid) {
  auto s = sys::fd_table_slots(pid, pid);
  return s ? *s : 0;
}

// A child with two threads: the main one in pause(), the other blocked in read() on a pipe the test
// holds the write end of; it opens nothing above what it inherits.
void threaded_child(Kid& k, int& ready_fd) {
  k.block = *sys::make_pipe(0);
  sys::PipePair ready = *sys::make_pipe(0);
  const int in = k.block.read.get(), out = ready.write.get();
  k.pid = ::fork();
  if (k.pid == 0) {
    std::thread([in] {
      char c;
      (void)!::read(in, &c, 1);
    }).detach();
    (void)!::write(out, "r", 1);
    for (;;) ::pause();
  }
  ready_fd = ::dup(ready.read.get());
}

struct Outcome {
  uint32_t at_stop = 0;  // FDSize when every thread is stopped (Stage::seized)
  uint32_t after = 0;
  std::vector<std::string> growth;
  size_t restored = 0;   // pipes at kFirst.. afterwards
};

Outcome restore_into_threaded_child() {
  rlimit rl{};
  ::getrlimit(RLIMIT_NOFILE, &rl);
  rl.rlim_cur = rl.rlim_max;
  ::setrlimit(RLIMIT_NOFILE, &rl);
  ImageBuilder b;
  b.process(kRec);
  for (int i = 0; i < kPipes; ++i) b.fd(kRec, 100 + i, b.file(b.pipe({{"x", false}}), O_RDONLY));
  Image img = b.parsed();
  int ready = -1;
  Kid kid;
  threaded_child(kid, ready);
  char c;
  EXPECT_EQ(::read(ready, &c, 1), 1);
  ::close(ready);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // both threads asleep
  Outcome o;
  ProcessRestoreOptions opts;
  opts.hook = [&](Stage s) {
    if (s == Stage::seized) o.at_stop = slots(kid.pid);
  };
  const uint32_t before = slots(kid.pid);
  EXPECT_LT(before, 100u + kPipes);
  auto sum = restore_processes(img, {{{kid.pid, kRec}}, std::nullopt}, opts);
  EXPECT_TRUE(sum) << sum.error().what;
  if (!sum) return o;
  o.after = slots(kid.pid);
  o.growth = sum->fd_table_growth;
  for (int i = 0; i < kPipes; ++i) {
    char link[64] = {};
    std::string path = "/proc/" + std::to_string(kid.pid) + "/fd/" + std::to_string(100 + i);
    if (::readlink(path.c_str(), link, sizeof link - 1) > 0 && std::string(link).rfind("pipe:", 0) == 0) ++o.restored;
  }
  return o;
}

TEST(FdTableGrowth, GrownBeforeTheStop) {
  Outcome o = restore_into_threaded_child();
  EXPECT_GE(o.at_stop, 100u + kPipes) << "the table was not grown before the stop";
  EXPECT_EQ(o.after, o.at_stop);  // the stop grew nothing more
  ASSERT_EQ(o.growth.size(), 1u);
  EXPECT_NE(o.growth[0].find("fd table grown before the stop"), std::string::npos) << o.growth[0];
  EXPECT_EQ(o.restored, static_cast<size_t>(kPipes));
}

TEST(FdTableGrowth, TurnedOffTheStopGrowsIt) {
  sys::set_fd_table_pregrow(false);
  Outcome o = restore_into_threaded_child();
  sys::set_fd_table_pregrow(true);
  EXPECT_LT(o.at_stop, 100u + kPipes);
  EXPECT_GE(o.after, 100u + kPipes);
  EXPECT_TRUE(o.growth.empty());
  EXPECT_EQ(o.restored, static_cast<size_t>(kPipes));
}

}  // namespace
}  // namespace pipecr::restore
