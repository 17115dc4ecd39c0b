// ptrace.hpp: stop every thread of a running process, look at it, and let it go exactly as it was.
//
// Technique: PTRACE_SEIZE + PTRACE_INTERRUPT on every thread listed in /proc/PID/task, re-listing
// until a listing shows no thread we have not stopped (a stopped thread cannot create threads, so
// this ends). SEIZE rather than the cgroup freezer: if the tool dies, the kernel detaches its
// tracees and they run on, while a frozen task would stay frozen (kernel-facts.md, "Stopping
// processes"). Nothing is changed in the target by stopping it:
//   - a process already in a group stop (SIGSTOP) stays stopped: the kernel reinstates the group
//     stop when we detach (__ptrace_unlink), and resume() checks it;
//   - a signal that arrives while we stop the threads is re-injected at once (PTRACE_CONT with it);
//     one that arrives while a thread runs injected syscalls (remote.hpp) is held back and sent
//     again (tgkill) just before that thread is detached: no signal is eaten (its siginfo is: the
//     handler sees si_code SI_TKILL and our pid);
//   - a thread interrupted in a blocking syscall (read, write, nanosleep) is left in the kernel's
//     interrupt stop, so detaching lets the kernel run its own restart logic: the syscall is
//     re-entered as if nothing happened.
// Move-only RAII: whatever fails half way, and whenever the object dies without resume(), every
// thread seized so far is detached.
//
// x86_64 only (user_regs_struct layout, syscall numbers, restart codes).
#pragma once

#if !defined(__x86_64__)
#error "pipecr's ptrace layer supports x86_64 only"
#endif

#include <sys/types.h>
#include <sys/user.h>

#include <cstddef>
#include <utility>
#include <vector>

#include "pipecr/error.hpp"

namespace pipecr::sys {

class RemoteSyscalls;

// The kernel's internal "restart me" return values, seen in rax of a thread stopped while it was
// blocked in a syscall (include/linux/errno.h; never returned to user space).
inline constexpr long kErestartSys = -512;
inline constexpr long kErestartNoIntr = -513;
inline constexpr long kErestartNoHand = -514;
inline constexpr long kErestartRestartBlock = -516;

// What a stopped thread was doing, as far as system calls go.
struct SyscallState {
  // True when the thread was interrupted inside a system call that the kernel will restart when
  // the thread runs again (orig_rax >= 0 and rax is one of the kErestart* values): the thread was
  // blocked in it, e.g. read() on an empty pipe.
  bool in_syscall = false;
  long nr = -1;                  // orig_rax: the syscall the thread stopped in or just returned from; -1 if none
  unsigned long args[6] = {};    // rdi, rsi, rdx, r10, r8, r9 (meaningful when nr >= 0)
  long ret = 0;                  // rax
};

// Interpretation of registers; pure.
[[nodiscard]] SyscallState syscall_state_of(const user_regs_struct& regs);

class StoppedProcess {
 public:
  // Seizes and stops every thread of pid. Errors:
  //   Errc::gone        no such process, a zombie, or it exited while being stopped (ESRCH);
  //   Errc::permission  ptrace refused (EPERM): "... pid=N ...: Operation not permitted (not
  //                     dumpable, or owned by another user)";
  //   Errc::system      anything else.
  // On error every thread already seized has been detached again.
  [[nodiscard]] static Expected<StoppedProcess> seize(pid_t pid);

  StoppedProcess(StoppedProcess&& o) noexcept;
  StoppedProcess& operator=(StoppedProcess&& o) noexcept;
  StoppedProcess(const StoppedProcess&) = delete;
  StoppedProcess& operator=(const StoppedProcess&) = delete;
  // Calls resume() if it was not called (errors ignored: nothing to report them to).
  ~StoppedProcess();

  [[nodiscard]] pid_t pid() const { return pid_; }
  // The stopped threads (tids), the thread-group leader first when it is alive.
  [[nodiscard]] const std::vector<pid_t>& threads() const { return threads_; }
  // The process was in a group stop (SIGSTOP, SIGTSTP...) when seized; it is left stopped.
  [[nodiscard]] bool was_stopped() const { return was_stopped_; }
  // False once resume() ran (or after a move).
  [[nodiscard]] bool attached() const { return !threads_.empty(); }

  [[nodiscard]] Expected<user_regs_struct> regs(pid_t tid) const;
  [[nodiscard]] Expected<void> set_regs(pid_t tid, const user_regs_struct& regs);
  [[nodiscard]] Expected<SyscallState> syscall_state(pid_t tid) const;

  // Detaches every thread. Any RemoteSyscalls still open on this process is restore()d first, so a
  // thread is never let go with injected registers or code. Held-back signals are sent again. With leave_stopped the process
  // is put in an ordinary group stop (SIGSTOP before detaching) that its parent's
  // waitpid(WUNTRACED) sees and SIGCONT ends; resume() then waits (up to 2 s) until every thread
  // shows state T in /proc and fails if one does not. A process that was_stopped() is likewise
  // left stopped, and waited for the same way, except that a SIGCONT arriving meanwhile ends the
  // wait without an error. Idempotent; threads that died meanwhile are skipped.
  [[nodiscard]] Expected<void> resume(bool leave_stopped = false);

  // --- Used by remote.hpp to run a thread; not needed otherwise. ---

  // Lets tid run one injected syscall: PTRACE_SYSCALL until the syscall-exit-stop of a syscall
  // whose entry-stop was seen with number nr. Signals arriving meanwhile are held back (see
  // above). Errc::gone if the thread died.
  [[nodiscard]] Expected<void> run_syscall(pid_t tid, long nr);
  // Puts tid back into an interrupt stop (PTRACE_INTERRUPT + PTRACE_CONT, wait for the
  // PTRACE_EVENT_STOP) after run_syscall(): a thread whose registers were set back to "blocked in
  // read(), rax = -ERESTARTSYS" then gets the kernel's own restart when detached, exactly as if it
  // had never run (a detach from a syscall-exit-stop would return -512 to the program).
  [[nodiscard]] Expected<void> repark(pid_t tid);

 private:
  friend class RemoteSyscalls;  // registers itself in remotes_
  explicit StoppedProcess(pid_t pid) : pid_(pid) {}
  void adopt_remotes();
  [[nodiscard]] Expected<bool> seize_new_threads(size_t& dead_listed);
  [[nodiscard]] Expected<bool> wait_first_stop(pid_t tid);
  void forget_thread(pid_t tid);
  [[nodiscard]] Expected<void> wait_stopped_state();

  pid_t pid_ = -1;
  std::vector<pid_t> threads_;                     // seized and stopped
  std::vector<std::pair<pid_t, int>> held_signals_;  // (tid, signo) to send again before detach
  bool was_stopped_ = false;
  std::vector<RemoteSyscalls*> remotes_;            // open on this process; their process_ follows moves
};

}  // namespace pipecr::sys
