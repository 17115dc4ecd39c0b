// agent_return_test.cpp: how the agent gives a thread back. With an rt_sigframe (the usual case) the
// agent unmaps itself and rt_sigreturn restores the thread: its general registers, its xmm/ymm
// registers (a real xstate area), its signal mask and sigaltstack, and the syscall it was blocked in
// restarts (read, nanosleep through its restart block, sigwaitinfo, epoll_wait). The fallback (a
// register block, pipecr's take-back munmap) is run on the same child for comparison. Real children,
// real ptrace; every child is killed and reaped by its guard.
#include <fcntl.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "sys/agent.hpp"
#include "sys/proc.hpp"
#include "sys/syscalls.hpp"
#include "unit/sys/child_helpers.hpp"
#include "unit/sys/vector_helpers.hpp"

namespace pipecr::sys {
namespace {

using testing::own_state;
using testing::read_and_report;
using testing::syscall_holding_vectors;
using testing::unusual_state;
using testing::VectorSyscall;

// Seizes pid, runs an agent in tid that installs `gift` at fd 10, commits, gives the thread back.
// Returns whether the agent returned through its frame.
bool install_through_agent(pid_t pid, pid_t tid, int gift) {
  auto sp = StoppedProcess::seize(pid);
  EXPECT_TRUE(sp) << sp.error().what;
  if (!sp) return false;
  auto process = std::move(*sp);
  auto cp = CommitPoint::create();
  EXPECT_TRUE(cp);
  std::vector<AgentOp> ops = {{AgentOp::install, 10, 0, 0, 0, gift}};
  auto agent = process->inject<Agent>(tid, *cp, ops, 11);
  EXPECT_TRUE(agent) << agent.error().what;
  if (!agent) return false;
  const bool framed = (*agent)->returns_by_sigreturn();
  EXPECT_TRUE((*agent)->send_files());
  EXPECT_TRUE((*agent)->prepare());
  EXPECT_TRUE(cp->commit());
  auto done = (*agent)->decide();
  EXPECT_TRUE(done && *done);
  EXPECT_TRUE((*agent)->restore());
  EXPECT_TRUE(process->resume());  // waits for the agent's own return
  return framed;
}

struct ModeGuard {
  explicit ModeGuard(bool frame) { set_agent_sigreturn(frame); }
  ~ModeGuard() { set_agent_sigreturn(true); }
};

class AgentReturn : public ::testing::TestWithParam<bool> {};

// A thread blocked in read(5) holding known vector registers, with an unusual mask and altstack:
// after the agent installed fd 10 and gave it back, the read goes on and returns what is written,
// every vector register, the mask and the altstack are as they were, and no mapping is left.
TEST_P(AgentReturn, ReadHoldingVectorsComesBackWhole) {
  const bool frame = GetParam();
  ModeGuard mode(frame);
  PipePair input = *make_pipe(0), report = *make_pipe(0);
  int in = input.read.get(), out = report.write.get();
  Child child = spawn([in, out] {
    int in_hi = ::fcntl(in, F_DUPFD, 100), out_hi = ::fcntl(out, F_DUPFD, 100);
    ::dup2(in_hi, 5);
    ::close(10);
    read_and_report(5, out_hi);
  });
  input.read.reset();
  report.write.reset();
  ASSERT_TRUE(eventually([&] { return blocked_in(child.pid, child.pid, SYS_read, 5); }));
  const std::string maps_before = maps_without_stack(child.pid);
  PipePair gift = *make_pipe(0);
  EXPECT_EQ(install_through_agent(child.pid, child.pid, gift.read.get()), frame);
  EXPECT_EQ(maps_without_stack(child.pid), maps_before);  // resume() waited for the agent's return
  ASSERT_TRUE(write_all(input.write.get(), std::as_bytes(std::span("go", 2))));
  EXPECT_EQ(read_report(report.read.get()), "read 2 vectors same state same");
}

// nanosleep is restarted through its restart block by the kernel; after rt_sigreturn it runs again
// with its own arguments (the frame mode): it still returns 0, never EINTR, after at least its time.
TEST_P(AgentReturn, NanosleepReturnsZeroAfterItsTime) {
  const bool frame = GetParam();
  ModeGuard mode(frame);
  PipePair report = *make_pipe(0);
  int out = report.write.get();
  Child child = spawn([out] {
    int out_hi = ::fcntl(out, F_DUPFD, 100);
    ::close(10);
    auto t0 = std::chrono::steady_clock::now();
    timespec ts{0, 400'000'000};
    VectorSyscall r = syscall_holding_vectors(SYS_nanosleep, reinterpret_cast<long>(&ts), 0, 0, 0);
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
    std::string m = fmt::format("nanosleep {} vectors {} long enough {}", r.ret, r.same ? "same" : "CHANGED", ms >= 400);
    (void)!::write(out_hi, m.data(), m.size());
  });
  report.write.reset();
  ASSERT_TRUE(eventually([&] { return state_of(child.pid, child.pid) == 'S'; }));
  std::this_thread::sleep_for(50ms);
  PipePair gift = *make_pipe(0);
  EXPECT_EQ(install_through_agent(child.pid, child.pid, gift.read.get()), frame);
  EXPECT_EQ(read_report(report.read.get()), "nanosleep 0 vectors same long enough true");
}

// sigwaitinfo and epoll_wait return EINTR when a ptrace stop interrupts them; pipecr puts them back
// to restart, in both modes: they return only the signal, or the event, the test sends.
TEST_P(AgentReturn, SigwaitinfoAndEpollWaitReturnOnlyWhatIsSent) {
  const bool frame = GetParam();
  ModeGuard mode(frame);
  for (long nr : {long{SYS_rt_sigtimedwait}, long{SYS_epoll_wait}}) {
    SCOPED_TRACE(nr);
    PipePair report = *make_pipe(0), ev = *make_pipe(0);
    int out = report.write.get(), evr = ev.read.get();
    Child child = spawn([out, evr, nr] {
      int out_hi = ::fcntl(out, F_DUPFD, 100);
      ::close(10);
      unusual_state();
      const std::string before = own_state();
      sigset_t set;
      sigemptyset(&set);
      sigaddset(&set, SIGUSR1);
      int ep = ::epoll_create1(0);
      epoll_event e{};
      e.events = EPOLLIN;
      e.data.u64 = 77;
      ::epoll_ctl(ep, EPOLL_CTL_ADD, evr, &e);
      epoll_event got{};
      VectorSyscall r = nr == SYS_rt_sigtimedwait
                            ? syscall_holding_vectors(SYS_rt_sigtimedwait, reinterpret_cast<long>(&set), 0, 0, 8)
                            : syscall_holding_vectors(SYS_epoll_wait, ep, reinterpret_cast<long>(&got), 1, -1);
      const std::string after = own_state();
      std::string m = fmt::format("ret {} vectors {} state {}", r.ret, r.same ? "same" : "CHANGED",
                                  before == after ? "same" : before + " -> " + after);
      (void)!::write(out_hi, m.data(), m.size());
    });
    report.write.reset();
    ASSERT_TRUE(eventually([&] {
      std::ifstream in(fmt::format("/proc/{}/syscall", child.pid));
      long n = -1;
      return (in >> n) && n == nr && state_of(child.pid, child.pid) == 'S';
    }));
    PipePair gift = *make_pipe(0);
    EXPECT_EQ(install_through_agent(child.pid, child.pid, gift.read.get()), frame);
    std::this_thread::sleep_for(100ms);  // a wrong EINTR would come now
    if (nr == SYS_rt_sigtimedwait) {
      ASSERT_EQ(::kill(child.pid, SIGUSR1), 0);
      EXPECT_EQ(read_report(report.read.get()), fmt::format("ret {} vectors same state same", SIGUSR1));
    } else {
      ASSERT_TRUE(write_all(ev.write.get(), std::as_bytes(std::span("e", 1))));
      EXPECT_EQ(read_report(report.read.get()), "ret 1 vectors same state same");
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, AgentReturn, ::testing::Values(true, false),
                         [](const auto& info) { return info.param ? "Sigframe" : "RegisterBlock"; });

}  // namespace
}  // namespace pipecr::sys

namespace pipecr::sys {
namespace {

// Holds `pattern` at `at` in pid's memory.
template <size_t N>
bool holds(pid_t pid, uint64_t at, const std::array<unsigned char, N>& pattern) {
  unsigned char got[N];
  iovec local{got, N};
  iovec remote{reinterpret_cast<void*>(at), N};
  return at && ::process_vm_readv(pid, &local, 1, &remote, 1, 0) == static_cast<ssize_t>(N) &&
         std::memcmp(got, pattern.data(), N) == 0;
}

// The gadgets found in one process are remembered as offsets into the file that holds them; a second
// process mapping that file elsewhere (its own ASLR base, or exec'd afresh) gets addresses that hold
// them in its own memory, and so does a third that maps it at yet another place.
TEST(AgentGadgets, FoundInOneProcessServeAnotherOfTheSameLibcAtItsOwnAddresses) {
  std::vector<Child> kids;
  std::vector<AgentGadgets> found;
  for (int i = 0; i < 3; ++i) {
    kids.push_back(spawn([] { ::execl("/bin/sleep", "sleep", "30", static_cast<char*>(nullptr)); }));
    ASSERT_GT(kids.back().pid, 0);
  }
  size_t scans = 0;
  for (Child& k : kids) {
    ASSERT_TRUE(eventually([&] { return state_of(k.pid, k.pid) == 'S'; }));  // exec'd and asleep
    const size_t before = agent_gadget_scans();
    found.push_back(find_agent_gadgets(k.pid));
    scans += agent_gadget_scans() - before;
  }
  EXPECT_LE(scans, 1u) << "the second and third processes were scanned again";
  // With ASLR (randomize_va_space), each sleep maps libc elsewhere: the offsets were translated.
  RecordProperty("same_address", found[0].syscall_ret == found[1].syscall_ret ? 1 : 0);
  for (size_t i = 0; i < kids.size(); ++i) {
    EXPECT_TRUE(holds(kids[i].pid, found[i].syscall_ret, arch::kSyscallRet)) << "process " << i;
    EXPECT_TRUE(holds(kids[i].pid, found[i].restorer, arch::kRestorer) ||
                holds(kids[i].pid, found[i].restorer, arch::kRestorerShort))
        << "process " << i;
  }
}

// The scan finds the first `syscall; ret` and the first restorer of the target's libc, as a plain
// search of its whole text (read back from the process) finds them: its one pass for the syscall
// instruction misses none of the three gadgets, within a chunk or across two.
TEST(AgentGadgets, TheScanFindsTheFirstOfEachInLibcAsAPlainSearchDoes) {
  Child k = spawn([] { ::execl("/bin/sleep", "sleep", "30", static_cast<char*>(nullptr)); });
  ASSERT_GT(k.pid, 0);
  ASSERT_TRUE(eventually([&] { return state_of(k.pid, k.pid) == 'S'; }));
  uint64_t lo = 0, hi = 0;
  for (const ExecMapping& m : executable_mappings(k.pid))
    if (m.name.find("/libc") != std::string::npos) {
      lo = m.start;
      hi = m.end;
      break;
    }
  ASSERT_NE(hi, 0u) << "/bin/sleep maps no glibc";
  std::vector<unsigned char> text(hi - lo);
  iovec local{text.data(), text.size()}, remote{reinterpret_cast<void*>(lo), text.size()};
  ASSERT_EQ(::process_vm_readv(k.pid, &local, 1, &remote, 1, 0), static_cast<ssize_t>(text.size()));
  auto first = [&](const auto& pattern) -> uint64_t {
    auto it = std::search(text.begin(), text.end(), pattern.begin(), pattern.end());
    return it == text.end() ? UINT64_MAX : lo + static_cast<uint64_t>(it - text.begin());
  };
  const uint64_t want_ret = first(arch::kSyscallRet);
  const uint64_t want_restorer = std::min(first(arch::kRestorer), first(arch::kRestorerShort));
  ASSERT_NE(want_ret, UINT64_MAX) << "no `syscall; ret` in glibc";
  ASSERT_NE(want_restorer, UINT64_MAX) << "no restorer in glibc";
  const AgentGadgets g = scan_return_gadgets(k.pid);
  EXPECT_EQ(g.syscall_ret, want_ret);
  EXPECT_EQ(g.restorer, want_restorer);
}

}  // namespace
}  // namespace pipecr::sys
