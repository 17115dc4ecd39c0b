// arch/x86_64.cpp: see x86_64.hpp.
#include "sys/arch/x86_64.hpp"

#include <sys/ptrace.h>
#include <sys/syscall.h>

#include <cerrno>

#include <fmt/format.h>

namespace pipecr::sys::arch {

void Regs::set_syscall(long nr, const std::array<unsigned long, 6>& a, uint64_t insn) {
  raw.rax = static_cast<unsigned long>(nr);
  raw.rdi = a[0];
  raw.rsi = a[1];
  raw.rdx = a[2];
  raw.r10 = a[3];
  raw.r8 = a[4];
  raw.r9 = a[5];
  raw.rip = insn;
  clear_syscall_nr();
}

void Regs::set_call(uint64_t entry, uint64_t sp, uint64_t arg0) {
  raw.rip = entry;
  raw.rsp = sp;
  raw.rdi = arg0;
  raw.rax = 0;
  clear_syscall_nr();
}

Expected<Regs> get_regs(pid_t tid) {
  Regs r;
  if (::ptrace(PTRACE_GETREGS, tid, nullptr, &r.raw) < 0)
    return fail_errno(errno, fmt::format("ptrace(PTRACE_GETREGS, tid={})", tid));
  return r;
}

Expected<void> set_regs(pid_t tid, const Regs& r) {
  if (::ptrace(PTRACE_SETREGS, tid, nullptr, &r.raw) < 0)
    return fail_errno(errno, fmt::format("ptrace(PTRACE_SETREGS, tid={})", tid));
  return {};
}

bool is_restart_code(long v) {
  return v == kErestartSys || v == kErestartNoIntr || v == kErestartNoHand || v == kErestartRestartBlock;
}

bool restart_on_eintr(long nr) {
  return nr == SYS_epoll_wait || nr == SYS_epoll_pwait || nr == SYS_epoll_pwait2 || nr == SYS_rt_sigtimedwait;
}

PipeIoArgs pipe_io_args(long nr) {
  switch (nr) {
    case SYS_read: return {0, -1, "read"};
    case SYS_pread64: return {0, -1, "pread64"};
    case SYS_readv: return {0, -1, "readv"};
    case SYS_preadv: return {0, -1, "preadv"};
    case SYS_preadv2: return {0, -1, "preadv2"};
    case SYS_write: return {-1, 0, "write"};
    case SYS_pwrite64: return {-1, 0, "pwrite64"};
    case SYS_writev: return {-1, 0, "writev"};
    case SYS_pwritev: return {-1, 0, "pwritev"};
    case SYS_pwritev2: return {-1, 0, "pwritev2"};
    case SYS_sendfile: return {-1, 0, "sendfile"};
    case SYS_splice: return {0, 2, "splice"};
    case SYS_tee: return {0, 1, "tee"};
    case SYS_vmsplice: return {0, 0, "vmsplice"};
    default: return {};
  }
}

Regs as_restarted(const Regs& r, bool restart_eintr) {
  Regs out = r;
  const long nr = r.syscall_nr();
  if (nr < 0) return out;
  const long ret = r.ret();
  if (ret == kErestartSys || ret == kErestartNoIntr || ret == kErestartNoHand ||
      (restart_eintr && ret == -EINTR && restart_on_eintr(nr))) {
    out.set_ret(nr);
  } else if (ret == kErestartRestartBlock) {
    out.set_ret(SYS_restart_syscall);
  } else {
    return out;
  }
  out.set_ip(r.ip() - kSyscallInsnLen);
  out.clear_syscall_nr();
  return out;
}

std::array<uint64_t, kReturnWords> return_block(const Regs& r) {
  const user_regs_struct& g = r.raw;
  return {g.r15, g.r14, g.r13, g.r12, g.r11, g.r10, g.r9, g.r8, g.rdi,
          g.rsi, g.rbp, g.rbx, g.rdx, g.rcx, g.rax, g.eflags, g.rip};
}

}  // namespace pipecr::sys::arch
