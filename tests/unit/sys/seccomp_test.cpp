// seccomp_test.cpp: pipecr reads a stopped thread's seccomp filters and runs them over every call it
// would make there before it runs any code in it (sys/seccomp.hpp).
//
// The interpreter is checked on filters written here (what real ones do: the arch check, lists of
// numbers, an argument compared, an errno, the instruction pointer), then on real processes: a
// child whose filter kills on socketpair() (the agent's first call) must be refused by the agent's
// start and live on untouched, one whose filter allows all must get the agent. Real filters, real
// ptrace; every child is killed and reaped.
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <vector>

#include <gtest/gtest.h>

#include "sys/agent.hpp"
#include "sys/arch.hpp"
#include "sys/ptrace.hpp"
#include "sys/seccomp.hpp"
#include "unit/sys/child_helpers.hpp"

namespace pipecr::sys {
namespace {

constexpr uint32_t kNr = offsetof(seccomp_data, nr), kArch = offsetof(seccomp_data, arch);
constexpr uint32_t kIp = offsetof(seccomp_data, instruction_pointer);
constexpr uint32_t arg_lo(int i) { return offsetof(seccomp_data, args) + 8 * static_cast<uint32_t>(i); }

std::array<uint32_t, 2> stmt(uint16_t code, uint32_t k) { return {code, k}; }
std::array<uint32_t, 2> jump(uint16_t code, uint32_t k, uint8_t jt, uint8_t jf) {
  return {static_cast<uint32_t>(code) | static_cast<uint32_t>(jt) << 16 | static_cast<uint32_t>(jf) << 24, k};
}

// nr == `nr`: `then`; else ALLOW. The arch is checked first (another arch: kill), as filters do.
SeccompProgram deny(int nr, uint32_t then) {
  return {stmt(BPF_LD | BPF_W | BPF_ABS, kArch), jump(BPF_JMP | BPF_JEQ | BPF_K, arch::kAuditArch, 1, 0),
          stmt(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS), stmt(BPF_LD | BPF_W | BPF_ABS, kNr),
          jump(BPF_JMP | BPF_JEQ | BPF_K, static_cast<uint32_t>(nr), 0, 1), stmt(BPF_RET | BPF_K, then),
          stmt(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
}

SyscallCase call(int nr, std::optional<uint64_t> a0 = std::nullopt) { return SyscallCase{nr, {a0}}; }

TEST(SeccompVerdict, NumbersArchArgumentsAndWhatCannotBeKnown) {
  const SeccompProgram kill_socketpair = deny(SYS_socketpair, SECCOMP_RET_KILL_PROCESS);
  EXPECT_EQ(seccomp_verdict(kill_socketpair, call(SYS_socketpair, AF_UNIX), arch::kAuditArch), SECCOMP_RET_KILL_PROCESS);
  EXPECT_EQ(seccomp_verdict(kill_socketpair, call(SYS_close), arch::kAuditArch), SECCOMP_RET_ALLOW);
  EXPECT_EQ(seccomp_verdict(kill_socketpair, call(SYS_close), AUDIT_ARCH_I386), SECCOMP_RET_KILL_PROCESS);
  EXPECT_EQ(seccomp_verdict(deny(SYS_mprotect, SECCOMP_RET_ERRNO | EPERM), call(SYS_mprotect), arch::kAuditArch),
            SECCOMP_RET_ERRNO | EPERM);
  // socketpair allowed for AF_UNIX only: known for the agent's call, not for an unknown domain.
  const SeccompProgram unix_only = {
      stmt(BPF_LD | BPF_W | BPF_ABS, kNr), jump(BPF_JMP | BPF_JEQ | BPF_K, SYS_socketpair, 0, 3),
      stmt(BPF_LD | BPF_W | BPF_ABS, arg_lo(0)), jump(BPF_JMP | BPF_JEQ | BPF_K, AF_UNIX, 0, 1),
      stmt(BPF_RET | BPF_K, SECCOMP_RET_ALLOW), stmt(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS)};
  EXPECT_EQ(seccomp_verdict(unix_only, call(SYS_socketpair, AF_UNIX), arch::kAuditArch), SECCOMP_RET_ALLOW);
  EXPECT_EQ(seccomp_verdict(unix_only, call(SYS_socketpair, AF_INET), arch::kAuditArch), SECCOMP_RET_KILL_PROCESS);
  EXPECT_EQ(seccomp_verdict(unix_only, call(SYS_socketpair), arch::kAuditArch), std::nullopt);
  // Through the scratch memory and X, and an ALU mask: the high bits of nr (x32) cleared.
  const SeccompProgram via_mem = {
      stmt(BPF_LD | BPF_W | BPF_ABS, kNr), stmt(BPF_ALU | BPF_AND | BPF_K, 0x3fffffff), stmt(BPF_ST, 3),
      stmt(BPF_LDX | BPF_W | BPF_MEM, 3), stmt(BPF_MISC | BPF_TXA, 0),
      jump(BPF_JMP | BPF_JGE | BPF_K, 400, 0, 1), stmt(BPF_RET | BPF_K, SECCOMP_RET_TRAP),
      stmt(BPF_RET | BPF_A, 0)};
  EXPECT_EQ(seccomp_verdict(via_mem, call(SYS_read), arch::kAuditArch), static_cast<uint32_t>(SYS_read));
  EXPECT_EQ(seccomp_verdict(via_mem, call(450), arch::kAuditArch), SECCOMP_RET_TRAP);
  // The instruction pointer is never known; a jump past the end is no verdict.
  const SeccompProgram on_ip = {stmt(BPF_LD | BPF_W | BPF_ABS, kIp), jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 1),
                                stmt(BPF_RET | BPF_K, SECCOMP_RET_ALLOW), stmt(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
  EXPECT_EQ(seccomp_verdict(on_ip, call(SYS_close), arch::kAuditArch), std::nullopt);
  EXPECT_EQ(seccomp_verdict({jump(BPF_JMP | BPF_JA, 5, 0, 0)}, call(SYS_close), arch::kAuditArch), std::nullopt);
  // Every call pipecr makes in a target is in the list the filters are asked about.
  std::vector<int> listed;
  for (const SyscallCase& c : injected_syscalls()) listed.push_back(c.nr);
  for (int nr : {SYS_socketpair, SYS_mmap, SYS_mprotect, SYS_munmap, SYS_rt_sigreturn, SYS_sendmsg, SYS_recvmsg,
                 SYS_dup3, SYS_fcntl, SYS_tee, SYS_ppoll, SYS_close_range})
    EXPECT_NE(std::find(listed.begin(), listed.end(), nr), listed.end()) << nr;
}

// A child holding a pipe with bytes under a filter (after PR_SET_NO_NEW_PRIVS) that does `then` on
// syscall nr; it reports through `report` what it finds once woken (a byte on `wake`).
Child filtered_child(int nr, uint32_t then, int wake_r, int report_w) {
  return spawn([=] {
    int p[2];
    if (::pipe(p) < 0 || ::write(p[1], "bytes", 5) != 5) ::_exit(2);
    std::vector<sock_filter> f;
    for (const auto& [code, k] : deny(nr, then))
      f.push_back(sock_filter{static_cast<uint16_t>(code & 0xffff), static_cast<uint8_t>(code >> 16),
                              static_cast<uint8_t>(code >> 24), k});
    sock_fprog prog{static_cast<unsigned short>(f.size()), f.data()};
    if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 || ::syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0)
      ::_exit(3);
    char c;
    if (::read(wake_r, &c, 1) != 1) ::_exit(4);
    int q = -1;
    const char* verdict = ::ioctl(p[0], FIONREAD, &q) == 0 && q == 5 ? "ok" : "bytes";
    (void)!::write(report_w, verdict, 2);
    ::_exit(0);
  });
}

// The agent's start refuses a thread whose filter would kill it for socketpair() (or fail its
// mprotect), before it changes anything: the child lives on with its pipe and is not traced. A
// filter that allows every call the agent makes lets it run and return.
TEST(SeccompAgent, RefusedWhereTheFilterWouldStopAnAgentCallAllowedElse) {
  struct Case {
    int nr;
    uint32_t then;
    bool allowed;
  };
  for (const Case& k : {Case{SYS_socketpair, SECCOMP_RET_KILL_PROCESS, false},
                        Case{SYS_mprotect, SECCOMP_RET_ERRNO | EPERM, false},
                        Case{SYS_getppid, SECCOMP_RET_KILL_PROCESS, true}}) {
    SCOPED_TRACE(k.nr);
    int wake[2], report[2];
    ASSERT_EQ(::pipe2(wake, O_CLOEXEC), 0);
    ASSERT_EQ(::pipe2(report, O_CLOEXEC), 0);
    Child child = filtered_child(k.nr, k.then, wake[0], report[1]);
    ::close(report[1]);
    ASSERT_TRUE(eventually([&] { return blocked_in(child.pid, child.pid, SYS_read, wake[0]); }));  // filtered by now
    {
      auto sp = StoppedProcess::seize(child.pid);
      ASSERT_TRUE(sp) << sp.error().what;
      auto agent = Agent::start_survey(**sp, child.pid);
      if (k.allowed) {
        ASSERT_TRUE(agent) << agent.error().what;
        ASSERT_TRUE((*agent)->restore());
      } else {
        ASSERT_FALSE(agent);
        EXPECT_EQ(agent.error().kind, Errc::unsupported);
        EXPECT_NE(agent.error().what.find("seccomp filter would"), std::string::npos) << agent.error().what;
      }
      ASSERT_TRUE((*sp)->resume());
    }
    EXPECT_EQ(tracer_of(child.pid), 0);
    ASSERT_EQ(::write(wake[1], "w", 1), 1);
    EXPECT_EQ(read_report(report[0]), "ok");
    int status = 0;
    ASSERT_EQ(::waitpid(child.pid, &status, 0), child.pid);
    child.pid = -1;
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "the child died: status " << status;
    ::close(wake[0]);
    ::close(wake[1]);
    ::close(report[0]);
  }
}

}  // namespace
}  // namespace pipecr::sys
