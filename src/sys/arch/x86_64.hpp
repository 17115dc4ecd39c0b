// arch/x86_64.hpp: every x86-64 detail of the ptrace layer and the agent, in one place: the register
// set (Regs), where a syscall's number, arguments and result live, the syscall instruction, the
// kernel's restart codes and how a restart rewrites the registers, the rt_sigframe the agent returns
// through (with the byte patterns of a `syscall; ret` and a restorer) and the fallback register block
// (the agent's side of both is src/sys/agent/x86_64.S). Included through sys/arch.hpp; another
// architecture is one more pair of files with the same names (arch/aarch64.*): nothing else in src/
// knows register names.
#pragma once

#if !defined(__x86_64__)
#error "this is the x86-64 arch file"
#endif

#include <sys/types.h>
#include <sys/user.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "pipecr/error.hpp"

namespace pipecr::sys::arch {

// The kernel's internal "restart me" return values, seen in the result register of a thread stopped
// while it was blocked in a syscall (include/linux/errno.h; never returned to user space).
inline constexpr long kErestartSys = -512;
inline constexpr long kErestartNoIntr = -513;
inline constexpr long kErestartNoHand = -514;
inline constexpr long kErestartRestartBlock = -516;

// The syscall instruction, its length, and the number of restart_syscall.
inline constexpr std::array<unsigned char, 2> kSyscallInsn = {0x0f, 0x05};
inline constexpr uint64_t kSyscallInsnLen = 2;
// Bytes below the stack pointer that leaf code may use without moving it (the ABI's red zone).
inline constexpr uint64_t kRedZone = 128;
// seccomp_data.arch of this architecture's system calls (AUDIT_ARCH_X86_64 of <linux/audit.h>).
inline constexpr uint32_t kAuditArch = 0xc000003e;

// The general registers of one stopped thread.
struct Regs {
  user_regs_struct raw{};

  [[nodiscard]] uint64_t ip() const { return raw.rip; }
  void set_ip(uint64_t v) { raw.rip = v; }
  [[nodiscard]] uint64_t sp() const { return raw.rsp; }
  void set_sp(uint64_t v) { raw.rsp = v; }
  // The syscall the thread stopped in or just returned from (orig_rax), -1 when none.
  [[nodiscard]] long syscall_nr() const { return static_cast<long>(raw.orig_rax) >= 0 ? static_cast<long>(raw.orig_rax) : -1; }
  // "No syscall": the kernel applies no restart logic to these registers.
  void clear_syscall_nr() { raw.orig_rax = static_cast<unsigned long>(-1L); }
  // The syscall's result (or number, before it runs).
  [[nodiscard]] long ret() const { return static_cast<long>(raw.rax); }
  void set_ret(long v) { raw.rax = static_cast<unsigned long>(v); }
  [[nodiscard]] std::array<unsigned long, 6> args() const { return {raw.rdi, raw.rsi, raw.rdx, raw.r10, raw.r8, raw.r9}; }
  // Sets up syscall nr with args, to run from the syscall instruction at insn.
  void set_syscall(long nr, const std::array<unsigned long, 6>& a, uint64_t insn);
  // Sets up a call of a function at entry with one argument, on the stack sp.
  void set_call(uint64_t entry, uint64_t sp, uint64_t arg0);
};

[[nodiscard]] Expected<Regs> get_regs(pid_t tid);
[[nodiscard]] Expected<void> set_regs(pid_t tid, const Regs& r);

[[nodiscard]] bool is_restart_code(long v);

// The registers the thread would run with once the kernel restarted the syscall it was interrupted in
// (no handler in between): ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND re-run the same call,
// ERESTART_RESTARTBLOCK runs restart_syscall; both from the syscall instruction again (ip - 2). Also
// a call in restart_on_eintr() that failed with EINTR (pass it only when no signal was delivered).
// The syscall number is cleared, so the kernel adds no restart logic of its own. Other registers are
// returned unchanged.
[[nodiscard]] Regs as_restarted(const Regs& r, bool restart_eintr);

// Syscalls that return EINTR (not a restart code) when a ptrace stop interrupts them, although no
// signal was delivered: epoll_wait, epoll_pwait, epoll_pwait2, rt_sigtimedwait (sigwaitinfo,
// sigtimedwait). pipecr puts them back to restart (their timeout then starts again in full).
[[nodiscard]] bool restart_on_eintr(long nr);

// The fds a syscall may block on in a pipe, as argument indexes (-1: none): the one it reads from
// and the one it writes to. read/pread64/readv/preadv/preadv2 read their first argument,
// write/pwrite64/writev/pwritev/pwritev2 and sendfile write theirs; splice reads its first and
// writes its third, tee its first and second; vmsplice reads or writes its first (which one, the
// thread's wait channel says). Other syscalls: both -1.
struct PipeIoArgs {
  int read_arg = -1;
  int write_arg = -1;
  const char* name = nullptr;  // the call's name, "splice"
};
[[nodiscard]] PipeIoArgs pipe_io_args(long nr);

// The agent's return: the register block its epilogue pops (r15 ... rax, rflags, rip; 17 words), to
// be written at sp() - kRedZone - sizeof block, so that after `ret $128` rsp is sp() again.
inline constexpr size_t kReturnWords = 17;
[[nodiscard]] std::array<uint64_t, kReturnWords> return_block(const Regs& r);
[[nodiscard]] inline uint64_t return_block_address(const Regs& r) {
  return r.sp() - kRedZone - kReturnWords * sizeof(uint64_t);
}

// ---- The return through rt_sigreturn (docs/design.md section 8) ----
//
// The agent's bootstrap and its exit run with rsp at an rt_sigframe that pipecr built on the thread's
// own stack (below the red zone) from the thread's context: its registers as they resume (below), its
// signal mask and its FPU/SSE/AVX state (PTRACE_GETREGSET NT_X86_XSTATE, with the magic words the
// kernel checks before it restores more than the legacy area). The frame's return address is a
// restorer of the target (`mov $15, %rax; syscall`, glibc's __restore_rt, Go's runtime.sigreturn);
// the syscall instruction used is one followed by `ret`. So a syscall run at that instruction returns
// into the restorer, and rt_sigreturn puts the whole context back: the thread needs pipecr for
// nothing, whenever pipecr dies.

// `syscall; ret`, and the two encodings of a restorer (`mov $15, %rax` and `mov $15, %eax`). Each
// holds the syscall instruction (kSyscallInsn) once: the search for them looks for it.
inline constexpr std::array<unsigned char, 3> kSyscallRet = {0x0f, 0x05, 0xc3};
inline constexpr std::array<unsigned char, 9> kRestorer = {0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05};
inline constexpr std::array<unsigned char, 7> kRestorerShort = {0xb8, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05};

// False when the thread runs with a user shadow stack (CET, x86_Thread_features: shstk): a `ret`
// into the restorer would not match it.
[[nodiscard]] bool frame_return_allowed(pid_t pid, pid_t tid);

// The thread's FPU/SSE/AVX... state in the signal frame's format: PTRACE_GETREGSET NT_X86_XSTATE
// (the kernel fills the software bytes: magic1, sizes, features) followed by magic2; the legacy
// 512-byte area (NT_PRFPREG) without magic when the CPU has no XSAVE (the kernel then restores
// x87/SSE only, which is all there is).
[[nodiscard]] Expected<std::vector<unsigned char>> fpu_state(pid_t tid);

// The registers the thread resumes with after rt_sigreturn: as_restarted(r, restart_eintr), except
// that a syscall interrupted with ERESTART_RESTARTBLOCK (nanosleep, clock_nanosleep with a relative
// time, futex with a timeout, poll) is re-run with its own arguments instead of restart_syscall:
// rt_sigreturn resets the thread's restart block (as after any signal handler), so restart_syscall
// would return EINTR. Such a syscall starts its timeout again in full.
[[nodiscard]] Regs as_resumed_by_sigreturn(const Regs& r, bool restart_eintr);

// An rt_sigframe to be written at `frame` .. frame + bytes.size() (fpstate 64-byte aligned inside):
// rsp = frame when the `syscall; ret` runs.
struct SigFrame {
  uint64_t frame = 0;
  std::vector<unsigned char> bytes;
};
// Built for a thread whose resuming registers are `back` (as_resumed_by_sigreturn), whose signal
// mask is `mask`, with its fpu_state(), returning through `restorer`. The frame sits below
// back.sp() - kRedZone. uc_stack carries an invalid mode, so rt_sigreturn leaves the thread's
// sigaltstack as it is (restore_altstack ignores the EINVAL). An empty fpu gives a frame without FPU
// state (fpstate NULL: its rt_sigreturn resets the FPU to its initial state), for a frame that returns
// into another one that carries it: the bootstrap's chain, whose first frame runs a munmap at the
// `syscall; ret` with rsp at the thread's own frame (docs/design.md section 8).
[[nodiscard]] SigFrame build_sigframe(const Regs& back, uint64_t mask, std::span<const unsigned char> fpu,
                                      uint64_t restorer);

}  // namespace pipecr::sys::arch

namespace pipecr::sys {
using arch::Regs;
}
