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
// Immovable RAII (held through std::unique_ptr): injectors keep a pointer to it. Whatever fails half
// way, and whenever the object dies without resume(), every thread seized so far is detached.
//
// Every wait on a thread is bounded (wait_timeout(), `--timeout`): a thread that cannot reach a
// ptrace stop (a vfork parent whose child never execs) is an error (Errc::gone, ETIMEDOUT), not a hang.
// A syscall that a stop made fail with EINTR although no signal was delivered (epoll_wait,
// sigtimedwait..., arch::restart_on_eintr) is put back to restart when the thread is let go.
//
// Architecture details (registers, restart codes) are in sys/arch/ (x86_64 today).
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "pipecr/error.hpp"
#include "sys/arch.hpp"

namespace pipecr::sys {

class StoppedProcess;

// Something that runs code inside a stopped process (remote syscalls, the agent) and must put the
// thread it uses back before the process is let go. Injectors are made and owned by their
// StoppedProcess (StoppedProcess::inject). resume() calls restore() on every injector still open, in
// order, before any thread is detached, and after_detach() once they are.
class Injector {
 public:
  virtual ~Injector() = default;
  [[nodiscard]] virtual Expected<void> restore() = 0;
  // Called by StoppedProcess::resume() once every thread is detached, for injectors still
  // registered then: one that finishes inside the target by itself (the agent's rt_sigframe return)
  // waits for that here, so that resume() returns with the target whole.
  virtual void after_detach() {}

 protected:
  friend class StoppedProcess;
  StoppedProcess* process_ = nullptr;  // null once the process is gone (or resumed)
  void link(StoppedProcess* p);
  void unlink();
};

// The bound on every wait for a target thread (a stop, a syscall, the agent). Default 10 s; the CLI
// sets it from --timeout. Process-wide.
void set_wait_timeout(std::chrono::milliseconds t);
[[nodiscard]] std::chrono::milliseconds wait_timeout();
inline constexpr std::chrono::milliseconds kDefaultWaitTimeout{10'000};

// The steps during which pipecr's death could still harm a target (docs/design.md section 9):
// a remote syscall of the agent's bootstrap or takeover, and a thread between PTRACE_INTERRUPT and
// its first stop. When set (tests, benchmarks), `count` is incremented on entering and on leaving
// each (odd: inside one) and `ns` adds the time spent inside. Process-wide; pass nullptr to stop.
struct HarmWindow {
  std::atomic<uint64_t>* count = nullptr;
  std::atomic<uint64_t>* ns = nullptr;
  // The steps during which pipecr's death leaves an (unnamed, anonymous) mapping in a target but
  // harms nothing else: the agent's bootstrap from its mmap until rsp points at the chain that
  // unmaps it, only where another process shares the target's address space (agent.hpp). Counted the
  // same way.
  std::atomic<uint64_t>* leak_count = nullptr;
};
void set_harm_window(HarmWindow w);
// RAII: one window, from construction to destruction (or close()).
class HarmWindowScope {
 public:
  HarmWindowScope();
  ~HarmWindowScope() { close(); }
  HarmWindowScope(const HarmWindowScope&) = delete;
  HarmWindowScope& operator=(const HarmWindowScope&) = delete;
  void close();

 private:
  bool open_ = false;
  std::chrono::steady_clock::time_point start_;
};

// RAII: one leak window (HarmWindow::leak_count).
class LeakWindowScope {
 public:
  LeakWindowScope();
  ~LeakWindowScope() { close(); }
  LeakWindowScope(const LeakWindowScope&) = delete;
  LeakWindowScope& operator=(const LeakWindowScope&) = delete;
  void close();

 private:
  bool open_ = false;
};

using arch::kErestartNoHand;
using arch::kErestartNoIntr;
using arch::kErestartRestartBlock;
using arch::kErestartSys;

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
[[nodiscard]] SyscallState syscall_state_of(const Regs& regs);

class StoppedProcess {
 public:
  // Seizes and stops every thread of pid. Errors:
  //   Errc::gone        no such process, a zombie, or it exited while being stopped (ESRCH);
  //   Errc::permission  ptrace refused (EPERM): "... already traced by PID (COMM)" when it has a
  //                     tracer, else "... (not dumpable, or owned by another user)";
  //   Errc::gone        also (err ETIMEDOUT) when a thread did not reach its stop within wait_timeout();
  //   Errc::system      anything else.
  // On error every thread already seized has been detached again.
  [[nodiscard]] static Expected<std::unique_ptr<StoppedProcess>> seize(pid_t pid);
  // Seizes and stops one thread of pid only (tid), the others running on: threads() is {tid}, and
  // everything below works on it as on a thread of seize() (sys/fdtable_grow.hpp runs one syscall in
  // it). Same errors; Errc::gone (EBUSY) for a vfork parent waiting for its child.
  [[nodiscard]] static Expected<std::unique_ptr<StoppedProcess>> seize_thread(pid_t pid, pid_t tid);

  StoppedProcess(StoppedProcess&&) = delete;
  StoppedProcess& operator=(StoppedProcess&&) = delete;
  StoppedProcess(const StoppedProcess&) = delete;
  StoppedProcess& operator=(const StoppedProcess&) = delete;
  // Calls resume() if it was not called (errors ignored: nothing to report them to).
  ~StoppedProcess();

  [[nodiscard]] pid_t pid() const { return pid_; }
  // The stopped threads (tids), the thread-group leader first when it is alive.
  [[nodiscard]] const std::vector<pid_t>& threads() const { return threads_; }
  // The process was in a group stop (SIGSTOP, SIGTSTP...) when seized; it is left stopped.
  [[nodiscard]] bool was_stopped() const { return was_stopped_; }
  // False once resume() ran.
  [[nodiscard]] bool attached() const { return !threads_.empty(); }

  [[nodiscard]] Expected<Regs> regs(pid_t tid) const;
  [[nodiscard]] Expected<void> set_regs(pid_t tid, const Regs& regs);
  [[nodiscard]] Expected<SyscallState> syscall_state(pid_t tid) const;
  // The signal mask of a stopped thread (PTRACE_GETSIGMASK / SETSIGMASK).
  [[nodiscard]] Expected<uint64_t> signal_mask(pid_t tid) const;
  [[nodiscard]] Expected<void> set_signal_mask(pid_t tid, uint64_t mask);
  // A signal is pending for tid that it does not block (/proc status), or held back by us for it.
  [[nodiscard]] bool signal_pending(pid_t tid) const;
  // Whether code of pipecr's may run as thread tid under its seccomp filters: every call it may
  // make there allowed by each of them (sys/seccomp.hpp). Asked by each injector before it changes
  // anything; found once per thread.
  [[nodiscard]] Expected<void> may_run_code(pid_t tid);

  // Runs code in this process through an injector it makes and owns: T::create(*this, args...) (a
  // private factory: RemoteSyscalls, Agent), kept until discard() or until this process is destroyed,
  // so an injector can never outlive the process it works in nor be let go with a thread half done.
  // The pointer returned stays valid until then.
  template <class T, class... A>
  [[nodiscard]] Expected<T*> inject(A&&... args) {
    auto made = T::create(*this, std::forward<A>(args)...);
    if (!made) return tl::unexpected(made.error());
    T* raw = made->get();
    owned_.push_back(std::move(*made));
    return raw;
  }
  // Puts an injector's thread back (restore(): nothing when done already) and destroys it now.
  Expected<void> discard(Injector* injector);

  // Detaches every thread. Any Injector still open on this process is restore()d first, so a
  // thread is never let go with injected registers or code. Held-back signals are sent again. With leave_stopped the process
  // is put in an ordinary group stop (SIGSTOP before detaching) that its parent's
  // waitpid(WUNTRACED) sees and SIGCONT ends; resume() then waits (up to 2 s) until every thread
  // shows state T in /proc and fails if one does not. A process that was_stopped() is likewise
  // left stopped, and waited for the same way, except that a SIGCONT arriving meanwhile ends the
  // wait without an error. Idempotent; threads that died meanwhile are skipped.
  [[nodiscard]] Expected<void> resume(bool leave_stopped = false);

  // --- Used by injectors (remote.hpp, agent.hpp) to run a thread; not needed otherwise. ---

  // Lets a stopped tid run (PTRACE_CONT, no signal) while it stays traced: it runs injected code
  // that needs no tracer (the agent). If pipecr dies meanwhile, the kernel detaches it and it runs on.
  [[nodiscard]] Expected<void> let_run(pid_t tid);
  // Checks, without blocking, on a thread let_run() let go: a signal-delivery-stop is held back (sent
  // again before detach) and the thread continued. Errc::gone if it died.
  [[nodiscard]] Expected<void> check_running(pid_t tid);
  // Stops a thread let_run() let go again: PTRACE_INTERRUPT, then wait (bounded) for the interrupt
  // stop. Errc::gone if it died or (ETIMEDOUT) did not stop.
  [[nodiscard]] Expected<void> interrupt(pid_t tid);

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
  friend class Injector;  // registers itself in injectors_
  explicit StoppedProcess(pid_t pid) : pid_(pid) {}
  [[nodiscard]] Expected<bool> seize_new_threads(size_t& dead_listed);
  [[nodiscard]] Expected<bool> wait_first_stop(pid_t tid);
  void forget_thread(pid_t tid);
  [[nodiscard]] Expected<void> wait_stopped_state();

  pid_t pid_ = -1;
  std::vector<pid_t> threads_;                     // seized and stopped
  std::vector<std::pair<pid_t, int>> held_signals_;  // (tid, signo) to send again before detach
  bool was_stopped_ = false;
  std::vector<Injector*> injectors_;                // open on this process (remote syscalls, agents)
  std::vector<std::unique_ptr<Injector>> owned_;    // every injector made by inject(), destroyed last
  std::vector<pid_t> running_;                      // let_run() and not yet interrupt()ed
  std::vector<std::pair<pid_t, Expected<void>>> code_allowed_;  // may_run_code(), per thread
};

}  // namespace pipecr::sys
