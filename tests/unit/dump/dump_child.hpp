// dump_child.hpp: helpers shared by the dump tests: a forked child that builds some state and
// waits, a dump into memory, and the checks that nothing is left stopped or traced.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "dump/process.hpp"
#include "image/image_io.hpp"

namespace pipecr::testing {

// A forked child running `body(ready_fd)`; it closes ready_fd when its state is built. Killed and
// reaped on every path.
class DumpChild {
 public:
  explicit DumpChild(const std::function<int(int ready_fd)>& body) {
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0) return;
    pid_ = fork();
    if (pid_ == 0) {
      int null = open("/dev/null", O_RDWR);
      for (int fd = 0; fd < 3; ++fd) dup2(null, fd);
      dup2(p[1], 3);
      syscall(SYS_close_range, 4, ~0U, 0);
      _exit(body(3));
    }
    close(p[1]);
    char c;
    ready_ = read(p[0], &c, 1) == 0 && kill(pid_, 0) == 0;
    close(p[0]);
  }
  ~DumpChild() {
    if (pid_ > 0 && !reaped_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  DumpChild(const DumpChild&) = delete;
  DumpChild& operator=(const DumpChild&) = delete;
  pid_t pid() const { return pid_; }
  bool ready() const { return ready_; }
  // Sends SIGUSR1 and returns the exit status (-1 on a signal death).
  int finish() {
    kill(pid_, SIGUSR1);
    return reap();
  }
  int reap() {
    int st = 0;
    waitpid(pid_, &st, 0);
    reaped_ = true;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  }

 private:
  pid_t pid_ = -1;
  bool ready_ = false;
  bool reaped_ = false;
};

inline void block_usr1() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR1);
  sigprocmask(SIG_BLOCK, &set, nullptr);
}

inline void wait_usr1() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR1);
  int sig;
  sigwait(&set, &sig);
}

inline void raise_nofile(rlim_t to = RLIM_INFINITY) {
  rlimit rl{};
  getrlimit(RLIMIT_NOFILE, &rl);
  if (to != RLIM_INFINITY) rl.rlim_max = to;
  rl.rlim_cur = rl.rlim_max;
  setrlimit(RLIMIT_NOFILE, &rl);
}

inline std::pair<char, int> state_of(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  char state = '?';
  int tracer = -1;
  while (std::getline(f, line)) {
    if (line.rfind("State:", 0) == 0) state = line[7];
    if (line.rfind("TracerPid:", 0) == 0) tracer = std::stoi(line.substr(10));
  }
  return {state, tracer};
}

inline void expect_running(pid_t pid) {
  auto [state, tracer] = state_of(pid);
  EXPECT_NE(state, 'T') << pid;
  EXPECT_NE(state, 't') << pid;
  EXPECT_EQ(tracer, 0) << pid;
}

// Dumps into memory and parses the image back (as a reader would see it).
inline Expected<Image> dump_image(std::vector<pid_t> pids, std::vector<std::byte>& bytes,
                                  dump::DumpStats* stats = nullptr, bool agent_tees = true) {
  image::MemorySink sink;
  dump::DumpOptions opts{.pids = std::move(pids)};
  opts.agent_tees = agent_tees;
  auto st = dump::dump_processes(opts, sink);
  if (!st) return tl::unexpected(st.error());
  if (stats) *stats = *st;
  bytes = std::move(sink.bytes());
  return image::parse(bytes);
}

}  // namespace pipecr::testing
