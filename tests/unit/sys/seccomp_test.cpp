// seccomp_test.cpp: pipecr reads a stopped thread's seccomp filters and runs them over every call it
// would make there before it runs any code in it (sys/seccomp.hpp).
//
// The interpreter is checked on filters written here (what real ones do: the arch check, lists of
// numbers, an argument compared, an errno, the instruction pointer) and on filters compiled by
// libseccomp, as systemd and container runtimes make them; then on real processes: a child whose
// filter kills on socketpair() (the agent's first call) must be refused by the agent's start and
// live on untouched, one whose filter allows every call the agent makes must get the agent. Real
// filters, real ptrace; every child is reaped.
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
#include <seccomp.h>

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

sock_filter stmt(uint16_t code, uint32_t k) { return BPF_STMT(code, k); }
sock_filter jump(uint16_t code, uint32_t k, uint8_t jt, uint8_t jf) { return BPF_JUMP(code, k, jt, jf); }

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

// A filter as container runtimes and systemd make them, compiled by libseccomp: a default of
// EPERM, a long allow list (its binary tree of JGE/JGT jumps, the x32 check), and rules on
// arguments (socket() for AF_UNIX only, personality(0), clone() without namespace flags). With
// every call pipecr makes in the list, the interpreter must say ALLOW for each; with tee() left
// out, EPERM for tee(); an AF_INET socketpair() is refused by the rule on its argument.
std::optional<SeccompProgram> compiled(bool with_tee, bool socketpair_unix_only) {
  scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ERRNO(EPERM));
  if (!ctx) return std::nullopt;
  std::vector<int> allow = {SYS_read, SYS_write, SYS_openat, SYS_close, SYS_fstat, SYS_mmap, SYS_mprotect,
                            SYS_munmap, SYS_brk, SYS_rt_sigaction, SYS_rt_sigprocmask, SYS_rt_sigreturn,
                            SYS_ioctl, SYS_pread64, SYS_readv, SYS_writev, SYS_sched_yield, SYS_dup3,
                            SYS_fcntl, SYS_getpid, SYS_sendmsg, SYS_recvmsg, SYS_exit, SYS_exit_group,
                            SYS_futex, SYS_ppoll, SYS_close_range, SYS_epoll_ctl, SYS_prctl, SYS_prlimit64,
                            SYS_rt_sigpending, SYS_rt_sigtimedwait, SYS_getcpu, SYS_nanosleep, SYS_wait4,
                            SYS_kill, SYS_getppid, SYS_pipe2, SYS_splice,
                            // what a sanitizer's runtime calls in the child (ASan before _exit)
                            SYS_sigaltstack, SYS_gettid, SYS_tgkill, SYS_madvise, SYS_sched_getaffinity};
  if (with_tee) allow.push_back(SYS_tee);
  bool ok = true;
  for (int nr : allow) ok = ok && seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0) == 0;
  if (socketpair_unix_only)
    ok = ok && seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SYS_socketpair, 1, SCMP_A0(SCMP_CMP_EQ, AF_UNIX)) == 0;
  else
    ok = ok && seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SYS_socketpair, 0) == 0;
  ok = ok && seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SYS_socket, 1, SCMP_A0(SCMP_CMP_EQ, AF_UNIX)) == 0;
  ok = ok && seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SYS_personality, 1, SCMP_A0(SCMP_CMP_EQ, 0)) == 0;
  ok = ok && seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SYS_clone, 1, SCMP_A0(SCMP_CMP_MASKED_EQ, 0x7e020000, 0)) == 0;
  int fds[2];
  std::optional<SeccompProgram> out;
  if (ok && ::pipe(fds) == 0) {
    if (seccomp_export_bpf(ctx, fds[1]) == 0) {
      ::close(fds[1]);
      fds[1] = -1;
      sock_filter f{};
      SeccompProgram prog;
      while (::read(fds[0], &f, sizeof f) == static_cast<ssize_t>(sizeof f)) prog.push_back(f);
      out = std::move(prog);
    }
    ::close(fds[0]);
    if (fds[1] >= 0) ::close(fds[1]);
  }
  seccomp_release(ctx);
  return out;
}

TEST(SeccompVerdict, WhatLibseccompCompiles) {
  auto full = compiled(true, true);
  ASSERT_TRUE(full);
  ASSERT_GT(full->size(), 40u);
  for (const SyscallCase& c : injected_syscalls())
    EXPECT_EQ(seccomp_verdict(*full, c, arch::kAuditArch), SECCOMP_RET_ALLOW) << "syscall " << c.nr;
  EXPECT_EQ(seccomp_verdict(*full, call(SYS_socketpair, AF_INET), arch::kAuditArch), SECCOMP_RET_ERRNO | EPERM);
  EXPECT_EQ(seccomp_verdict(*full, call(SYS_socketpair), arch::kAuditArch), std::nullopt);  // the domain unknown
  EXPECT_EQ(seccomp_verdict(*full, call(SYS_personality, 0), arch::kAuditArch), SECCOMP_RET_ALLOW);
  EXPECT_EQ(seccomp_verdict(*full, call(SYS_personality, 8), arch::kAuditArch), SECCOMP_RET_ERRNO | EPERM);
  EXPECT_EQ(seccomp_verdict(*full, call(SYS_mount), arch::kAuditArch), SECCOMP_RET_ERRNO | EPERM);
  EXPECT_EQ(seccomp_verdict(*full, call(SYS_close), AUDIT_ARCH_I386), SECCOMP_RET_KILL_THREAD);  // another arch
  auto no_tee = compiled(false, false);
  ASSERT_TRUE(no_tee);
  EXPECT_EQ(seccomp_verdict(*no_tee, call(SYS_tee), arch::kAuditArch), SECCOMP_RET_ERRNO | EPERM);
  EXPECT_EQ(seccomp_verdict(*no_tee, call(SYS_socketpair, AF_INET), arch::kAuditArch), SECCOMP_RET_ALLOW);
}

// A child holding a pipe with bytes under `filter` (after PR_SET_NO_NEW_PRIVS); it reports through `report` what it finds once woken (a byte on `wake`).
Child filtered_child(const SeccompProgram& filter, int wake_r, int report_w) {
  return spawn([=] {
    int p[2];
    if (::pipe(p) < 0 || ::write(p[1], "bytes", 5) != 5) ::_exit(2);
    SeccompProgram f = filter;  // the kernel's sock_fprog takes a non-const pointer
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
// mprotect, or tee() under a filter compiled by libseccomp), before it changes anything: the child
// lives on with its pipe and is not traced. A filter that allows every call the agent makes (one
// that kills only on getppid(), and libseccomp's full one) lets it run and return.
TEST(SeccompAgent, RefusedWhereTheFilterWouldStopAnAgentCallAllowedElse) {
  struct Case {
    const char* what;
    std::optional<SeccompProgram> filter;
    bool allowed;
  };
  const Case cases[] = {{"kill on socketpair", deny(SYS_socketpair, SECCOMP_RET_KILL_PROCESS), false},
                        {"EPERM on mprotect", deny(SYS_mprotect, SECCOMP_RET_ERRNO | EPERM), false},
                        {"kill on getppid", deny(SYS_getppid, SECCOMP_RET_KILL_PROCESS), true},
                        {"libseccomp, all", compiled(true, true), true},
                        {"libseccomp, no tee", compiled(false, true), false}};
  for (const Case& k : cases) {
    SCOPED_TRACE(k.what);
    ASSERT_TRUE(k.filter);
    int wake[2], report[2];
    ASSERT_EQ(::pipe2(wake, O_CLOEXEC), 0);
    ASSERT_EQ(::pipe2(report, O_CLOEXEC), 0);
    Child child = filtered_child(*k.filter, wake[0], report[1]);
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
    const std::string report_text = read_report(report[0]);
    EXPECT_EQ(report_text, "ok");
    int status = 0;
    if (report_text == "ok") {  // it exits right after its report
      ASSERT_EQ(::waitpid(child.pid, &status, 0), child.pid);
      child.pid = -1;
    } else {
      status = child.kill_and_reap().value_or(-1);
    }
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "the child died: status " << status;
    ::close(wake[0]);
    ::close(wake[1]);
    ::close(report[0]);
  }
}


}  // namespace
}  // namespace pipecr::sys
