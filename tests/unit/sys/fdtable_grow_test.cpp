// fdtable_grow_test.cpp: growing a running process's fd table in one thread before a restore's stop
// (sys/fdtable_grow.hpp). The kernel fact it stands on (dup3 of a closed fd grows the table and
// installs nothing) checked on this kernel; then real children with threads: the table grows, no fd
// is added, the thread used comes back whole (vector registers, mask, altstack) and the syscall it
// was blocked in restarts, while another thread keeps running; and a grower SIGKILLed at random
// moments leaves the child as it was. Real children, real ptrace; every child is killed and reaped.
#include <fcntl.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "sys/fdtable_grow.hpp"
#include "sys/syscalls.hpp"
#include "unit/sys/child_helpers.hpp"
#include "unit/sys/vector_helpers.hpp"

namespace pipecr::sys {
namespace {

using testing::own_state;
using testing::syscall_holding_vectors;
using testing::unusual_state;
using testing::VectorSyscall;

// SigBlk of a thread (/proc/PID/task/TID/status): its signal mask as the kernel holds it.
std::string sig_blocked(pid_t pid, pid_t tid) {
  std::ifstream in(fmt::format("/proc/{}/task/{}/status", pid, tid));
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("SigBlk:", 0) == 0) return line;
  return "?";
}

uint32_t slots_of(pid_t pid) {
  auto s = fd_table_slots(pid, pid);
  return s ? *s : 0;
}

// The soft RLIMIT_NOFILE, raised to the hard one first (the children inherit it).
uint64_t soft_nofile() {
  rlimit rl{};
  ::getrlimit(RLIMIT_NOFILE, &rl);
  if (rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &rl);
  }
  return rl.rlim_cur;
}

// The kernel fact, in a child of its own (with a second thread, as in the targets that matter):
// dup3(<closed>, 1000, 0) fails with EBADF, the table holds 1000 afterwards, fd 1000 is not open;
// with newfd at or above RLIMIT_NOFILE it fails before growing anything.
// The table's slots as the kernel counts them (FDSize), and a thread that is gone named as such
// (Errc::gone), whether its process lives on (an exited thread) or not.
TEST(FdTableGrow, SlotsOfATableAndOfAGoneThread) {
  auto mine = fd_table_slots(::getpid(), static_cast<pid_t>(::syscall(SYS_gettid)));
  ASSERT_TRUE(mine) << mine.error().what;
  EXPECT_GE(*mine, 64u);
  const int high = static_cast<int>(*mine) + 10;
  ASSERT_GE(::dup2(0, high), 0);  // grows this process's table past `high`
  auto grown = fd_table_slots(::getpid(), ::getpid());
  ::close(high);
  ASSERT_TRUE(grown) << grown.error().what;
  EXPECT_GT(*grown, static_cast<uint32_t>(high));
  pid_t tid = 0;
  std::thread([&] { tid = static_cast<pid_t>(::syscall(SYS_gettid)); }).join();
  auto gone = fd_table_slots(::getpid(), tid);
  ASSERT_FALSE(gone);
  EXPECT_EQ(gone.error().kind, Errc::gone) << gone.error().what;
  EXPECT_NE(gone.error().what.find("does not exist"), std::string::npos) << gone.error().what;
}

TEST(FdTableGrow, Dup3OfAClosedFdGrowsTheTableOnly) {
  PipePair report = *make_pipe(0);
  const int out = report.write.get();
  Child child = spawn([out] {
    std::atomic<bool> stop{false};
    std::thread other([&] {
      while (!stop) ::usleep(1000);
    });
    auto slots = [] {
      std::ifstream in("/proc/self/status");
      std::string line;
      while (std::getline(in, line))
        if (line.rfind("FDSize:", 0) == 0) return std::stoul(line.substr(7));
      return 0ul;
    };
    const unsigned long before = slots();
    rlimit rl{};
    ::getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = 2048;
    ::setrlimit(RLIMIT_NOFILE, &rl);
    errno = 0;
    const int over = ::dup3(INT_MAX, 3000, 0);
    const int over_errno = errno;
    const unsigned long after_over = slots();
    errno = 0;
    const int r = ::dup3(INT_MAX, 1000, 0);
    const int e = errno;
    const unsigned long after = slots();
    const bool open = ::fcntl(1000, F_GETFD) >= 0;
    stop = true;
    other.join();
    std::string m = fmt::format("before<=1000 {} over {} {} {} grow {} {} after>1000 {} open {}", before <= 1000, over,
                                over_errno == EBADF ? "EBADF" : std::strerror(over_errno), after_over == before,
                                r, e == EBADF ? "EBADF" : std::strerror(e), after > 1000, open);
    (void)!::write(out, m.data(), m.size());
  });
  report.write.reset();
  const std::string got = read_report(report.read.get());
  EXPECT_EQ(got, "before<=1000 true over -1 EBADF true grow -1 EBADF after>1000 true open false");
}

// What a test victim does: its main thread blocked in `call` (read of fd 5, epoll_wait on fd 6 for the
// read end of `ev`, or sigwaitinfo for SIGUSR1) holding known vector registers with an unusual mask and
// altstack, reporting each return on its report pipe and blocking again; a second thread spins on a
// counter. It opens nothing above the table it inherits (64 slots under ctest).
struct Victim {
  Child child;
  PipePair input, report, ev;
  SharedCounter spins;
  long call;
};

std::unique_ptr<Victim> start_victim(long call) {
  auto v = std::make_unique<Victim>();
  v->call = call;
  v->input = *make_pipe(0);
  v->report = *make_pipe(0);
  v->ev = *make_pipe(0);
  const int in = v->input.read.get(), out = v->report.write.get(), evr = v->ev.read.get();
  std::atomic<long>* spins = v->spins.value;
  v->child = spawn([in0 = in, out0 = out, evr0 = evr, spins, call] {
    // Out of the way of 5, 6, 7 first (below 64: the table keeps its size).
    const int in = ::fcntl(in0, F_DUPFD, 20), out = ::fcntl(out0, F_DUPFD, 20), evr = ::fcntl(evr0, F_DUPFD, 20);
    ::dup2(in, 5);
    const int ep = ::epoll_create1(0);
    ::dup2(ep, 6);
    epoll_event e{};
    e.events = EPOLLIN;
    e.data.u64 = 77;
    ::epoll_ctl(6, EPOLL_CTL_ADD, evr, &e);
    ::dup2(out, 7);
    std::thread([spins] {
      for (;;) spins->fetch_add(1, std::memory_order_relaxed);
    }).detach();
    unusual_state();
    const std::string before = own_state();
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    for (;;) {
      char buf[8] = {};
      epoll_event got{};
      VectorSyscall r = call == SYS_read ? syscall_holding_vectors(SYS_read, 5, reinterpret_cast<long>(buf), sizeof buf, 0)
                        : call == SYS_epoll_wait
                            ? syscall_holding_vectors(SYS_epoll_wait, 6, reinterpret_cast<long>(&got), 1, -1)
                            : syscall_holding_vectors(SYS_rt_sigtimedwait, reinterpret_cast<long>(&set), 0, 0, 8);
      if (call == SYS_epoll_wait && r.ret == 1) {
        char c;
        (void)!::read(evr, &c, 1);
      }
      const std::string after = own_state();
      std::string m = fmt::format("ret {} vectors {} state {}", r.ret, r.same ? "same" : "CHANGED",
                                  before == after ? "same" : before + " -> " + after);
      (void)!::write(7, m.data(), m.size());
    }
  });
  v->input.read.reset();
  v->report.write.reset();
  return v;
}

bool victim_blocked(const Victim& v) {
  std::ifstream in(fmt::format("/proc/{}/syscall", v.child.pid));
  long n = -1;
  return (in >> n) && n == v.call && state_of(v.child.pid, v.child.pid) == 'S' && v.spins.get() > 1000;
}

// Ends the victim's blocking call once (write, event or signal) and returns its report.
std::string poke(Victim& v) {
  if (v.call == SYS_read)
    EXPECT_TRUE(write_all(v.input.write.get(), std::as_bytes(std::span("go", 2))));
  else if (v.call == SYS_epoll_wait)
    EXPECT_TRUE(write_all(v.ev.write.get(), std::as_bytes(std::span("e", 1))));
  else
    EXPECT_EQ(::kill(v.child.pid, SIGUSR1), 0);
  return read_report(v.report.read.get());
}

std::string expected_report(long call) {
  return fmt::format("ret {} vectors same state same", call == SYS_read ? 2 : call == SYS_epoll_wait ? 1 : SIGUSR1);
}

// The table grows to hold fd 3000 (4096 slots), by the blocked main thread (preferred to the running
// one), no fd is added, nothing is left traced or mapped, and the main thread's read, epoll_wait or
// sigwaitinfo goes on and returns only what the test sends, with its vector registers, mask and
// altstack as they were.
TEST(FdTableGrow, GrowsInTheBlockedThreadWhichComesBackWhole) {
  for (long call : {long{SYS_read}, long{SYS_epoll_wait}, long{SYS_rt_sigtimedwait}}) {
    SCOPED_TRACE(call);
    ASSERT_GT(soft_nofile(), 3000u);
    auto v = start_victim(call);
    const pid_t pid = v->child.pid;
    ASSERT_TRUE(eventually([&] { return victim_blocked(*v); }));
    const auto fds = fd_table(pid);
    const std::string maps = maps_without_stack(pid);
    const uint32_t before = slots_of(pid);
    const std::string mask = sig_blocked(pid, pid);
    ASSERT_LE(before, 3000u);
    auto g = pregrow_fd_table(pid, 0, 3000, soft_nofile(), find_agent_gadgets(pid));
    ASSERT_TRUE(g) << g.error().what;
    EXPECT_EQ(g->outcome, FdTableGrowth::Outcome::grown) << g->why;
    EXPECT_EQ(g->tid, pid);  // asleep in its syscall: chosen over the spinning thread
    EXPECT_EQ(g->before, before);
    EXPECT_GT(g->after, 3000u);
    EXPECT_EQ(slots_of(pid), g->after);
    EXPECT_EQ(fd_table(pid), fds);
    EXPECT_EQ(maps_without_stack(pid), maps);
    EXPECT_EQ(tracer_of(pid), 0);
    for (pid_t tid : tasks_of(pid)) EXPECT_NE(state_of(pid, tid), 't');
    // Once it is back in its call (sigwaitinfo unblocks what it waits for only while it waits).
    EXPECT_TRUE(eventually([&] { return victim_blocked(*v) && sig_blocked(pid, pid) == mask; }))
        << sig_blocked(pid, pid) << " against " << mask;
    std::this_thread::sleep_for(50ms);  // a wrong EINTR or return would come now
    EXPECT_EQ(poke(*v), expected_report(call));
    // Big enough now: nothing to do.
    auto again = pregrow_fd_table(pid, 0, 3000, soft_nofile(), find_agent_gadgets(pid));
    ASSERT_TRUE(again);
    EXPECT_EQ(again->outcome, FdTableGrowth::Outcome::big_enough);
  }
}

// While the main thread is traced and runs the dup3 (its grace period), the spinning thread goes on:
// a sampler sees its counter advance while the main thread has a tracer. The grace period takes a few
// milliseconds; a grow too quick for the sampler to see is tried again on a fresh child (at most 5).
TEST(FdTableGrow, OtherThreadsRunMeanwhile) {
  if (soft_nofile() <= 15000) GTEST_SKIP() << "the hard RLIMIT_NOFILE is below 15001";
  bool seen = false;
  for (int attempt = 0; attempt < 5 && !seen; ++attempt) {
    auto v = start_victim(SYS_read);
    const pid_t pid = v->child.pid;
    ASSERT_TRUE(eventually([&] { return victim_blocked(*v); }));
    std::atomic<bool> done{false};
    std::atomic<bool> advanced{false};
    std::thread sampler([&] {
      long first = -1;
      while (!done) {
        const long now = v->spins.get();
        if (tracer_of(pid) <= 0) {
          first = -1;
          continue;
        }
        if (first < 0)
          first = now;
        else if (now > first && tracer_of(pid) > 0)
          advanced = true;
      }
    });
    auto g = pregrow_fd_table(pid, 0, 15000, soft_nofile(), find_agent_gadgets(pid));
    done = true;
    sampler.join();
    ASSERT_TRUE(g) << g.error().what;
    ASSERT_EQ(g->outcome, FdTableGrowth::Outcome::grown) << g->why;
    seen = advanced;
    EXPECT_EQ(poke(*v), expected_report(SYS_read));
  }
  EXPECT_TRUE(seen) << "the spinning thread was never seen advancing while the main thread was stopped";
}

// A table only one task uses grows without a grace period: left to the stop, nothing done.
TEST(FdTableGrow, SingleThreadedTableIsLeftToTheStop) {
  PipePair input = *make_pipe(0);
  const int in = input.read.get();
  Child child = spawn([in] {
    char c;
    (void)!::read(in, &c, 1);
  });
  input.read.reset();
  ASSERT_TRUE(eventually([&] { return blocked_in(child.pid, child.pid, SYS_read, in); }));
  const uint32_t before = slots_of(child.pid);
  ASSERT_LE(before, 3000u);
  auto g = pregrow_fd_table(child.pid, 0, 3000, soft_nofile(), find_agent_gadgets(child.pid));
  ASSERT_TRUE(g) << g.error().what;
  EXPECT_EQ(g->outcome, FdTableGrowth::Outcome::single_thread);
  EXPECT_EQ(slots_of(child.pid), before);
}

// Without gadgets nothing is done (the caller's restore grows the table in its stop as before).
TEST(FdTableGrow, NoGadgetLeavesItToTheStop) {
  auto v = start_victim(SYS_read);
  const pid_t pid = v->child.pid;
  ASSERT_TRUE(eventually([&] { return victim_blocked(*v); }));
  const uint32_t before = slots_of(pid);
  ASSERT_LE(before, 3000u);
  auto g = pregrow_fd_table(pid, 0, 3000, soft_nofile(), AgentGadgets{});
  ASSERT_TRUE(g) << g.error().what;
  EXPECT_EQ(g->outcome, FdTableGrowth::Outcome::no_gadget);
  EXPECT_EQ(slots_of(pid), before);
  EXPECT_EQ(tracer_of(pid), 0);
  EXPECT_EQ(poke(*v), expected_report(SYS_read));
}

// A grower process SIGKILLed at random moments of its loop of dup3_in_thread() (seize of one thread,
// frame, dup3 at the gadget, re-park, registers back, detach), PIPECR_KILLS times (default 30;
// scripts/kill_loop.sh runs 200): each time the victim is
// untraced, back in its read, its fds, mappings (nothing is ever mapped) and signal mask as they
// were, and its read returns only what the test writes, with vector registers and altstack intact.
// The moments are drawn from up to three times one cycle as this machine runs it (timed first,
// here, on fd 0, which grows nothing), at least 8 ms: under ASan on a loaded machine a fixed range
// could end before the first dup3 did, every round.
TEST(FdTableGrow, KilledAtRandomMomentsLeavesTheTargetAsItWas) {
  const uint64_t nofile = soft_nofile();  // raised before the victim's fork: its limit too
  auto v = start_victim(SYS_read);
  const pid_t pid = v->child.pid;
  ASSERT_TRUE(eventually([&] { return victim_blocked(*v); }));
  const auto fds = fd_table(pid);
  const std::string maps = maps_without_stack(pid);
  const uint32_t slots_before = slots_of(pid);
  const std::string mask = sig_blocked(pid, pid);
  const AgentGadgets gadgets = find_agent_gadgets(pid);
  const auto t0 = std::chrono::steady_clock::now();
  auto timed = dup3_in_thread(pid, pid, INT_MAX, 0, gadgets);
  ASSERT_TRUE(timed) << timed.error().what;
  ASSERT_EQ(*timed, -EBADF);
  const auto cycle = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0);
  const int window_us = std::max(8000, static_cast<int>(3 * cycle.count()));
  ASSERT_TRUE(eventually([&] { return victim_blocked(*v); }));
  std::mt19937 rng(std::random_device{}());
  SharedCounter cycles;
  const char* env = std::getenv("PIPECR_KILLS");
  const int rounds = env ? std::max(1, std::atoi(env)) : 30;
  for (int round = 0; round < rounds; ++round) {
    Child grower = spawn([&] {
      // Growing numbers: some rounds grow the table, the others run the dup3 on a big one.
      for (int n = 100 + (round % 40) * 500;; n += 97) {
        auto r = dup3_in_thread(pid, pid, INT_MAX, static_cast<int>(n % std::min<uint64_t>(nofile, 200000)), gadgets);
        if (!r) ::_exit(10);
        if (*r != -EBADF) ::_exit(11);
        cycles.value->fetch_add(1);
      }
    });
    std::this_thread::sleep_for(std::chrono::microseconds(std::uniform_int_distribution<int>(0, window_us)(rng)));
    const auto status = grower.kill_and_reap();
    ASSERT_TRUE(status);
    ASSERT_TRUE(WIFSIGNALED(*status)) << "the grower failed on its own: exit " << WEXITSTATUS(*status);
    ASSERT_TRUE(eventually([&] { return tracer_of(pid) == 0; }));
    ASSERT_TRUE(eventually([&] { return victim_blocked(*v); })) << "round " << round;
    EXPECT_EQ(fd_table(pid), fds);
    EXPECT_EQ(maps_without_stack(pid), maps);
    EXPECT_EQ(sig_blocked(pid, pid), mask);
    EXPECT_EQ(poke(*v), expected_report(SYS_read)) << "round " << round;
    if (HasFailure()) break;
  }
  RecordProperty("dup3_completed", static_cast<int>(cycles.get()));
  RecordProperty("slots_after", static_cast<int>(slots_of(pid)));
  EXPECT_GT(cycles.get(), 0) << "no dup3 ever completed: the kills proved nothing";
  EXPECT_GT(slots_of(pid), slots_before);
}

}  // namespace
}  // namespace pipecr::sys
