// ptrace.cpp: seize, stop and release all threads of a process (see ptrace.hpp for the technique).
//
// Stops are told apart by waitpid's status (ptrace(2), "Stopped states"):
//   status >> 16 == PTRACE_EVENT_STOP          interrupt stop (WSTOPSIG SIGTRAP) or group stop
//                                              (WSTOPSIG = the stop signal) of a seized thread;
//   WSTOPSIG == SIGTRAP | 0x80                 syscall entry/exit stop (PTRACE_O_TRACESYSGOOD);
//   anything else without an event             signal-delivery-stop: the signal is WSTOPSIG.
#include "sys/ptrace.hpp"

#include "sys/proc.hpp"
#include "sys/seccomp.hpp"
#include "sys/remote.hpp"

#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <fstream>
#include <optional>
#include <string>
#include <thread>

#include <fmt/format.h>

namespace pipecr::sys {
namespace {

constexpr int kSyscallStopSig = SIGTRAP | 0x80;

std::atomic<long long> g_wait_timeout_ms{kDefaultWaitTimeout.count()};

using arch::is_restart_code;

bool is_stop_signal(int sig) { return sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU; }

// A vfork parent waits for its child to exec or exit in an uninterruptible sleep that no ptrace stop
// can end (wait_for_vfork_done, inlined into kernel_clone: /proc wchan shows kernel_clone).
bool in_vfork_wait(pid_t pid, pid_t tid) {
  if (task_state(pid, tid) != 'D') return false;
  std::ifstream in(fmt::format("/proc/{}/task/{}/wchan", pid, tid));
  std::string w;
  std::getline(in, w);
  return w == "kernel_clone" || w == "wait_for_vfork_done";
}

bool is_dead_state(std::optional<char> s) { return !s || *s == 'Z' || *s == 'X' || *s == 'x'; }

// Threads listed in /proc/PID/task (sys::list_threads), with the error a seize names: the process
// does not exist (Errc::gone).
Expected<std::vector<pid_t>> list_tasks(pid_t pid) {
  auto tids = list_threads(pid);
  if (!tids && tids.error().kind == Errc::gone) return fail(Errc::gone, ESRCH, fmt::format("process {} does not exist", pid));
  return tids;
}

// The kernel's count of the threads of pid (signal->nr_threads), from /proc/PID/status.
Expected<size_t> thread_count(pid_t pid) {
  auto st = read_status(pid);
  if (!st || st->threads == 0) return fail(Errc::gone, ESRCH, fmt::format("read /proc/{}/status: the process has exited", pid));
  return size_t{st->threads};
}

Error ptrace_error(int err, const char* req, pid_t pid, pid_t tid) {
  return errno_error(err, fmt::format("ptrace({}, pid={}, tid={})", req, pid, tid));
}

// waitpid for one traced thread, retrying EINTR, bounded by wait_timeout(): polls with WNOHANG,
// yielding the CPU for the first 20 ms, then sleeping a little longer each time (50 us up to 1 ms).
Expected<int> wait_thread(pid_t pid, pid_t tid) {
  using namespace std::chrono;
  const auto limit = wait_timeout();
  const auto deadline = steady_clock::now() + limit;
  const auto spin_until = steady_clock::now() + milliseconds(20);
  auto nap = microseconds(50);
  for (;;) {
    int status = 0;
    pid_t got = ::waitpid(tid, &status, __WALL | WNOHANG);
    if (got == tid) return status;
    if (got < 0 && errno != EINTR) return fail_errno(errno, fmt::format("waitpid(pid={}, tid={}, __WALL)", pid, tid));
    if (got == 0) {
      // A stop comes within microseconds when the thread gets a CPU: yield it ours rather than
      // sleep (a sleep costs a timer tick on a busy machine), then back off.
      if (steady_clock::now() < spin_until) {
        std::this_thread::yield();
        continue;
      }
      if (steady_clock::now() > deadline)
        return fail(Errc::gone, ETIMEDOUT,
                    fmt::format("thread {} of process {} did not reach a ptrace stop within {} ms (blocked where "
                                "ptrace cannot stop it, e.g. a vfork parent whose child has not exec'd yet; "
                                "--timeout sets the bound)",
                                tid, pid, limit.count()));
      std::this_thread::sleep_for(nap);
      nap = std::min(nap * 2, duration_cast<microseconds>(milliseconds(1)));
    }
  }
}

// "TracerPid:" of /proc/PID/status and the tracer's comm, or 0.
std::pair<pid_t, std::string> tracer_of(pid_t pid) {
  auto st = read_status(pid);
  const pid_t tracer = st ? st->tracer : 0;
  if (tracer <= 0) return {0, {}};
  const std::string comm = read_comm(tracer).value_or("");
  std::string safe;
  for (char ch : comm) safe += (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f) ? '?' : ch;
  return {tracer, safe};
}

// A signal is pending for tid and not blocked by it (SigPnd/ShdPnd against SigBlk of its status).
bool unblocked_signal_pending(pid_t pid, pid_t tid) {
  auto st = read_status(pid, tid);
  return st && (st->pending & ~st->blocked) != 0;
}

bool died(int status) { return WIFEXITED(status) || WIFSIGNALED(status); }

// A SIGCONT is pending for pid (ShdPnd or the leader's SigPnd in /proc/PID/status). While a process
// is traced, a SIGCONT is queued instead of being ignored (kernel/signal.c, sig_ignored), and on its
// way it ended the group stop (prepare_signal clears SIGNAL_STOP_STOPPED): the detach then lets the
// process run.
bool sigcont_pending(pid_t pid) {
  auto st = read_status(pid);
  return st && (st->pending & (1ull << (SIGCONT - 1))) != 0;
}

Error thread_died(pid_t pid, pid_t tid) {
  return Error{Errc::gone, ESRCH, fmt::format("thread {} of process {} exited while traced", tid, pid)};
}

}  // namespace

namespace {
std::atomic<std::atomic<uint64_t>*> g_window_count{nullptr};
std::atomic<std::atomic<uint64_t>*> g_window_ns{nullptr};
std::atomic<std::atomic<uint64_t>*> g_leak_count{nullptr};
}  // namespace

void set_harm_window(HarmWindow w) {
  g_window_count = w.count;
  g_window_ns = w.ns;
  g_leak_count = w.leak_count;
}

LeakWindowScope::LeakWindowScope() {
  if (auto* c = g_leak_count.load()) {
    c->fetch_add(1);
    open_ = true;
  }
}

void LeakWindowScope::close() {
  if (!open_) return;
  open_ = false;
  if (auto* c = g_leak_count.load()) c->fetch_add(1);
}

HarmWindowScope::HarmWindowScope() {
  if (auto* c = g_window_count.load()) {
    c->fetch_add(1);
    open_ = true;
    start_ = std::chrono::steady_clock::now();
  }
}

void HarmWindowScope::close() {
  if (!open_) return;
  open_ = false;
  if (auto* ns = g_window_ns.load())
    ns->fetch_add(static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start_).count()));
  if (auto* c = g_window_count.load()) c->fetch_add(1);
}

void set_wait_timeout(std::chrono::milliseconds t) { g_wait_timeout_ms = std::max<long long>(1, t.count()); }
std::chrono::milliseconds wait_timeout() { return std::chrono::milliseconds(g_wait_timeout_ms.load()); }

void Injector::link(StoppedProcess* p) {
  process_ = p;
  if (p) p->injectors_.push_back(this);
}

void Injector::unlink() {
  if (!process_) return;
  auto& v = process_->injectors_;
  v.erase(std::remove(v.begin(), v.end(), this), v.end());
  process_ = nullptr;
}

SyscallState syscall_state_of(const Regs& regs) {
  SyscallState s;
  s.nr = regs.syscall_nr();
  s.ret = regs.ret();
  s.in_syscall = s.nr >= 0 && is_restart_code(s.ret);
  auto a = regs.args();
  std::copy(a.begin(), a.end(), s.args);
  return s;
}

Expected<std::unique_ptr<StoppedProcess>> StoppedProcess::seize(pid_t pid) {
  if (pid <= 0) return fail(Errc::invalid_argument, EINVAL, fmt::format("seize(pid={}): not a process id", pid));
  auto state = task_state(pid, pid);
  if (!state) return fail(Errc::gone, ESRCH, fmt::format("seize(pid={}): no such process", pid));
  // A zombie leader with live threads (it called pthread_exit) is a live process: stop the others.
  if (is_dead_state(state)) {
    auto n = thread_count(pid);
    if (!n || *n <= 1) return fail(Errc::gone, ESRCH, fmt::format("seize(pid={}): the process has exited", pid));
  }
  std::unique_ptr<StoppedProcess> owned(new StoppedProcess(pid));
  StoppedProcess& sp = *owned;
  sp.was_stopped_ = *state == 'T';
  // Re-list until a listing brings no new thread: every listed thread is stopped then, and a
  // stopped thread creates no threads. But a listing can miss live threads while others exit
  // (readdir of /proc/PID/task resumes by position), so the end is also checked against the
  // kernel's own count (Threads: in /proc/PID/status). Measured: a child whose threads create
  // and end threads nonstop made a bare listing miss one in about 1 of 1000 seizes here.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  for (;;) {
    size_t dead_listed = 0;
    auto grew = sp.seize_new_threads(dead_listed);
    if (!grew) return tl::unexpected(grew.error());  // ~StoppedProcess detaches what was seized
    if (*grew) continue;
    auto counted = thread_count(pid);
    if (!counted) return tl::unexpected(counted.error());
    if (*counted <= sp.threads_.size() + dead_listed) break;
    if (std::chrono::steady_clock::now() > deadline)
      return fail(Errc::system, 0,
                  fmt::format("seize(pid={}): {} threads counted but only {} found to stop within 2 s", pid, *counted,
                              sp.threads_.size()));
  }
  if (sp.threads_.empty()) return fail(Errc::gone, ESRCH, fmt::format("seize(pid={}): the process has exited", pid));
  auto leader = std::find(sp.threads_.begin(), sp.threads_.end(), pid);
  if (leader != sp.threads_.end()) std::rotate(sp.threads_.begin(), leader, leader + 1);
  return owned;
}

Expected<std::unique_ptr<StoppedProcess>> StoppedProcess::seize_thread(pid_t pid, pid_t tid) {
  if (pid <= 0 || tid <= 0)
    return fail(Errc::invalid_argument, EINVAL, fmt::format("seize_thread(pid={}, tid={}): not a process id", pid, tid));
  auto state = task_state(pid, tid);
  if (is_dead_state(state)) return fail(Errc::gone, ESRCH, fmt::format("seize_thread(pid={}, tid={}): no such thread", pid, tid));
  if (in_vfork_wait(pid, tid))  // seized, it would stay traced until pipecr exits
    return fail(Errc::gone, EBUSY,
                fmt::format("thread {} of process {} is a vfork parent waiting for its child: no ptrace stop can reach it",
                            tid, pid));
  std::unique_ptr<StoppedProcess> owned(new StoppedProcess(pid));
  owned->was_stopped_ = task_state(pid, pid) == 'T';
  HarmWindowScope window;  // as in seize_new_threads(): from the interrupt to the stop
  if (::ptrace(PTRACE_SEIZE, tid, nullptr, reinterpret_cast<void*>(PTRACE_O_TRACESYSGOOD)) < 0) {
    const int e = errno;
    if (e == ESRCH) return fail(Errc::gone, ESRCH, fmt::format("seize_thread(pid={}, tid={}): the thread has exited", pid, tid));
    Error err = ptrace_error(e, "PTRACE_SEIZE", pid, tid);
    if (e == EPERM) {
      auto [tracer, comm] = tracer_of(tid);
      if (tracer > 0) err.what += fmt::format(" (already traced by {} ({}))", tracer, comm);
      err.kind = Errc::permission;
    }
    return tl::unexpected(err);
  }
  std::optional<Error> error;
  if (::ptrace(PTRACE_INTERRUPT, tid, nullptr, nullptr) < 0 && errno != ESRCH)
    error = ptrace_error(errno, "PTRACE_INTERRUPT", pid, tid);
  auto stopped = owned->wait_first_stop(tid);
  window.close();
  if (stopped && *stopped) owned->threads_.push_back(tid);  // detached by ~StoppedProcess from here
  if (error) return tl::unexpected(*error);
  if (!stopped) return tl::unexpected(stopped.error());
  if (!*stopped) return fail(Errc::gone, ESRCH, fmt::format("seize_thread(pid={}, tid={}): the thread has exited", pid, tid));
  return owned;
}

// Seizes and interrupts every listed thread not yet stopped, then waits for all of them (even after
// an error, so that no seized thread is left running: PTRACE_DETACH needs a stopped tracee). Returns
// whether any thread was seized (threads that exited or are zombies are skipped, so this ends).
Expected<bool> StoppedProcess::seize_new_threads(size_t& dead_listed) {
  auto tids = list_tasks(pid_);
  if (!tids) return tl::unexpected(tids.error());
  std::vector<pid_t> fresh;
  std::optional<Error> error;
  // From a thread's PTRACE_INTERRUPT to its stop (and the EINTR put back), pipecr's death would let
  // an epoll_wait or sigtimedwait it interrupted return EINTR.
  HarmWindowScope window;
  for (pid_t tid : *tids) {
    if (std::find(threads_.begin(), threads_.end(), tid) != threads_.end()) continue;
    if (in_vfork_wait(pid_, tid)) {  // seized, it would stay traced until pipecr exits
      error = Error{Errc::gone, EBUSY,
                    fmt::format("thread {} of process {} is a vfork parent waiting for its child to exec or exit: "
                                "no ptrace stop can reach it; try again once the child has exec'd",
                                tid, pid_)};
      break;
    }
    if (::ptrace(PTRACE_SEIZE, tid, nullptr, reinterpret_cast<void*>(PTRACE_O_TRACESYSGOOD)) < 0) {
      int e = errno;
      if (e == ESRCH) continue;  // the thread exited since the listing
      if (e == EPERM && is_dead_state(task_state(pid_, tid))) {  // a zombie thread: nothing to stop
        ++dead_listed;
        continue;
      }
      Error err = ptrace_error(e, "PTRACE_SEIZE", pid_, tid);
      if (e == EPERM) {
        auto [tracer, comm] = tracer_of(tid == pid_ ? pid_ : tid);
        if (tracer > 0)
          err.what += fmt::format(" (already traced by {} ({}): a process has one tracer at a time)", tracer, comm);
        else
          err.what += " (not dumpable, or owned by another user)";
      }
      error = std::move(err);
      break;
    }
    fresh.push_back(tid);
    if (::ptrace(PTRACE_INTERRUPT, tid, nullptr, nullptr) < 0 && errno != ESRCH && !error)
      error = ptrace_error(errno, "PTRACE_INTERRUPT", pid_, tid);
  }
  for (pid_t tid : fresh) {
    auto stopped = wait_first_stop(tid);
    if (!stopped && !error) error = stopped.error();
    if (stopped && *stopped) threads_.push_back(tid);
  }
  window.close();
  if (error) return tl::unexpected(*error);
  return !fresh.empty();
}

// Waits for tid's first stop after PTRACE_INTERRUPT. A signal-delivery-stop on the way is passed on
// at once (nothing in the process has been changed yet, so its handler may run). Returns false if
// the thread died.
Expected<bool> StoppedProcess::wait_first_stop(pid_t tid) {
  for (;;) {
    auto status = wait_thread(pid_, tid);
    if (!status) return status.error().err == ECHILD ? Expected<bool>(false) : tl::unexpected(status.error());
    if (died(*status)) return false;
    if (!WIFSTOPPED(*status)) continue;
    int event = *status >> 16, sig = WSTOPSIG(*status);
    if (event == PTRACE_EVENT_STOP) {
      if (is_stop_signal(sig)) {
        was_stopped_ = true;  // a group stop: keep it on detach
      } else {
        // Our stop made epoll_wait / sigtimedwait fail with EINTR: put it back to restart at once,
        // so that even if pipecr dies now the program never sees that EINTR.
        auto r = regs(tid);
        if (r && r->syscall_nr() >= 0 && r->ret() == -EINTR && arch::restart_on_eintr(r->syscall_nr()) &&
            !unblocked_signal_pending(pid_, tid))
          (void)set_regs(tid, arch::as_restarted(*r, true));
      }
      return true;
    }
    int deliver = event == 0 ? sig : 0;
    if (::ptrace(PTRACE_CONT, tid, nullptr, reinterpret_cast<void*>(static_cast<long>(deliver))) < 0) {
      if (errno == ESRCH) continue;  // killed meanwhile: waitpid reports it
      return tl::unexpected(ptrace_error(errno, "PTRACE_CONT", pid_, tid));
    }
  }
}

StoppedProcess::~StoppedProcess() {
  (void)resume();
  for (Injector* r : injectors_) r->process_ = nullptr;
  injectors_.clear();
  owned_.clear();  // each one's restore() has nothing left to do
}

Expected<void> StoppedProcess::discard(Injector* injector) {
  auto it = std::find_if(owned_.begin(), owned_.end(), [injector](const auto& o) { return o.get() == injector; });
  if (it == owned_.end())
    return fail(Errc::invalid_argument, EINVAL, fmt::format("pid {}: discard() of an injector it does not own", pid_));
  auto ok = injector->restore();
  owned_.erase(it);
  return ok;
}

void StoppedProcess::forget_thread(pid_t tid) {
  threads_.erase(std::remove(threads_.begin(), threads_.end(), tid), threads_.end());
  running_.erase(std::remove(running_.begin(), running_.end(), tid), running_.end());
}

Expected<Regs> StoppedProcess::regs(pid_t tid) const {
  auto r = arch::get_regs(tid);
  if (!r) return tl::unexpected(ptrace_error(r.error().err, "PTRACE_GETREGS", pid_, tid));
  return r;
}

Expected<void> StoppedProcess::set_regs(pid_t tid, const Regs& regs) {
  auto ok = arch::set_regs(tid, regs);
  if (!ok) return tl::unexpected(ptrace_error(ok.error().err, "PTRACE_SETREGS", pid_, tid));
  return {};
}

Expected<uint64_t> StoppedProcess::signal_mask(pid_t tid) const {
  uint64_t mask = 0;
  if (::ptrace(PTRACE_GETSIGMASK, tid, reinterpret_cast<void*>(sizeof mask), &mask) < 0)
    return tl::unexpected(ptrace_error(errno, "PTRACE_GETSIGMASK", pid_, tid));
  return mask;
}

Expected<void> StoppedProcess::set_signal_mask(pid_t tid, uint64_t mask) {
  if (::ptrace(PTRACE_SETSIGMASK, tid, reinterpret_cast<void*>(sizeof mask), &mask) < 0)
    return tl::unexpected(ptrace_error(errno, "PTRACE_SETSIGMASK", pid_, tid));
  return {};
}

bool StoppedProcess::signal_pending(pid_t tid) const {
  if (std::any_of(held_signals_.begin(), held_signals_.end(), [tid](auto& h) { return h.first == tid; })) return true;
  return unblocked_signal_pending(pid_, tid);
}

Expected<void> StoppedProcess::may_run_code(pid_t tid) {
  for (const auto& [t, answer] : code_allowed_)
    if (t == tid) return answer;
  code_allowed_.emplace_back(tid, seccomp_allows(pid_, tid, injected_syscalls()));
  return code_allowed_.back().second;
}

Expected<void> StoppedProcess::let_run(pid_t tid) {
  if (auto ok = may_run_code(tid); !ok) return ok;  // asked before by each injector: a last guard
  if (::ptrace(PTRACE_CONT, tid, nullptr, nullptr) < 0) return tl::unexpected(ptrace_error(errno, "PTRACE_CONT", pid_, tid));
  running_.push_back(tid);
  return {};
}

Expected<void> StoppedProcess::check_running(pid_t tid) {
  for (;;) {
    int status = 0;
    pid_t got = ::waitpid(tid, &status, __WALL | WNOHANG);
    if (got == 0) return {};
    if (got < 0) {
      if (errno == EINTR) continue;
      if (errno == ECHILD) {
        forget_thread(tid);
        return tl::unexpected(thread_died(pid_, tid));
      }
      return fail_errno(errno, fmt::format("waitpid(pid={}, tid={}, WNOHANG)", pid_, tid));
    }
    if (died(status)) {
      forget_thread(tid);
      return tl::unexpected(thread_died(pid_, tid));
    }
    if (!WIFSTOPPED(status)) continue;
    int event = status >> 16, sig = WSTOPSIG(status);
    if (event == 0 && sig != kSyscallStopSig) held_signals_.emplace_back(tid, sig);
    if (::ptrace(PTRACE_CONT, tid, nullptr, nullptr) < 0 && errno != ESRCH)
      return tl::unexpected(ptrace_error(errno, "PTRACE_CONT", pid_, tid));
  }
}

Expected<void> StoppedProcess::interrupt(pid_t tid) {
  if (::ptrace(PTRACE_INTERRUPT, tid, nullptr, nullptr) < 0)
    return tl::unexpected(ptrace_error(errno, "PTRACE_INTERRUPT", pid_, tid));
  for (;;) {
    auto status = wait_thread(pid_, tid);
    if (!status) {
      if (status.error().err == ECHILD) {
        forget_thread(tid);
        return tl::unexpected(thread_died(pid_, tid));
      }
      return tl::unexpected(status.error());
    }
    if (died(*status)) {
      forget_thread(tid);
      return tl::unexpected(thread_died(pid_, tid));
    }
    if (!WIFSTOPPED(*status)) continue;
    int event = *status >> 16, sig = WSTOPSIG(*status);
    if (event == PTRACE_EVENT_STOP) {
      running_.erase(std::remove(running_.begin(), running_.end(), tid), running_.end());
      return {};
    }
    if (event == 0 && sig != kSyscallStopSig) held_signals_.emplace_back(tid, sig);
    if (::ptrace(PTRACE_CONT, tid, nullptr, nullptr) < 0 && errno != ESRCH)
      return tl::unexpected(ptrace_error(errno, "PTRACE_CONT", pid_, tid));
  }
}

Expected<SyscallState> StoppedProcess::syscall_state(pid_t tid) const {
  auto r = regs(tid);
  if (!r) return tl::unexpected(r.error());
  return syscall_state_of(*r);
}

Expected<void> StoppedProcess::run_syscall(pid_t tid, long nr) {
  if (auto ok = may_run_code(tid); !ok) return ok;  // asked before by each injector: a last guard
  bool entered = false;
  long request = PTRACE_SYSCALL;
  int deliver = 0;
  for (;;) {
    if (::ptrace(static_cast<__ptrace_request>(request), tid, nullptr, reinterpret_cast<void*>(static_cast<long>(deliver))) < 0)
      return tl::unexpected(ptrace_error(errno, "PTRACE_SYSCALL", pid_, tid));
    auto status = wait_thread(pid_, tid);
    if (!status) return tl::unexpected(status.error());
    if (died(*status)) {
      forget_thread(tid);
      return tl::unexpected(thread_died(pid_, tid));
    }
    if (!WIFSTOPPED(*status)) continue;
    int event = *status >> 16, sig = WSTOPSIG(*status);
    if (sig == kSyscallStopSig) {
      __ptrace_syscall_info info{};
      if (::ptrace(PTRACE_GET_SYSCALL_INFO, tid, reinterpret_cast<void*>(sizeof info), &info) < 0)
        return tl::unexpected(ptrace_error(errno, "PTRACE_GET_SYSCALL_INFO", pid_, tid));
      if (info.op == PTRACE_SYSCALL_INFO_ENTRY && static_cast<long>(info.entry.nr) == nr) entered = true;
      if (info.op == PTRACE_SYSCALL_INFO_EXIT && entered) return {};
      continue;
    }
    // A signal for a thread that runs our code: hold it back, send it again before detaching.
    if (event == 0) held_signals_.emplace_back(tid, sig);
  }
}

Expected<void> StoppedProcess::repark(pid_t tid) {
  if (::ptrace(PTRACE_INTERRUPT, tid, nullptr, nullptr) < 0)
    return tl::unexpected(ptrace_error(errno, "PTRACE_INTERRUPT", pid_, tid));
  for (;;) {
    if (::ptrace(PTRACE_CONT, tid, nullptr, nullptr) < 0) return tl::unexpected(ptrace_error(errno, "PTRACE_CONT", pid_, tid));
    auto status = wait_thread(pid_, tid);
    if (!status) return tl::unexpected(status.error());
    if (died(*status)) {
      forget_thread(tid);
      return tl::unexpected(thread_died(pid_, tid));
    }
    if (!WIFSTOPPED(*status)) continue;
    int event = *status >> 16, sig = WSTOPSIG(*status);
    if (event == PTRACE_EVENT_STOP) return {};
    if (event == 0 && sig != kSyscallStopSig) held_signals_.emplace_back(tid, sig);
  }
}

Expected<void> StoppedProcess::resume(bool leave_stopped) {
  if (threads_.empty()) return {};
  std::optional<Error> error;
  for (Injector* r : std::vector<Injector*>(injectors_)) {
    auto ok = r->restore();
    if (!ok && !error) error = ok.error();
  }
  // An injector that could not take its thread back leaves it running: stop it for the detach.
  for (pid_t tid : std::vector<pid_t>(running_)) (void)interrupt(tid);
  // A syscall our stop made fail with EINTR, with no signal to explain it, restarts instead.
  for (pid_t tid : threads_) {
    auto r = regs(tid);
    if (!r || r->syscall_nr() < 0 || r->ret() != -EINTR || !arch::restart_on_eintr(r->syscall_nr())) continue;
    if (unblocked_signal_pending(pid_, tid)) continue;
    if (std::any_of(held_signals_.begin(), held_signals_.end(), [tid](auto& h) { return h.first == tid; })) continue;
    (void)set_regs(tid, arch::as_restarted(*r, true));
  }
  // Queued now, acted on once detached: the first thread to look at its signals starts the group
  // stop, and a thread still traced then is put in it when detached (__ptrace_unlink).
  if (leave_stopped && ::kill(pid_, SIGSTOP) < 0 && errno != ESRCH)
    error = errno_error(errno, fmt::format("kill(pid={}, SIGSTOP)", pid_));
  for (auto [tid, sig] : held_signals_) ::syscall(SYS_tgkill, pid_, tid, sig);  // ESRCH: thread gone
  held_signals_.clear();
  // A process that was group-stopped is put back into its stop by the kernel after the detach
  // (__ptrace_unlink sets JOBCTL_STOP_PENDING), not at once: each thread shows 'R' until it gets
  // there. Wait for it as for leave_stopped, unless a SIGCONT came meanwhile (no stop will come).
  const bool restop = !leave_stopped && was_stopped_ && !sigcont_pending(pid_);
  for (pid_t tid : threads_) {
    if (::ptrace(PTRACE_DETACH, tid, nullptr, nullptr) < 0 && errno != ESRCH && !error)
      error = ptrace_error(errno, "PTRACE_DETACH", pid_, tid);
  }
  threads_.clear();
  for (Injector* r : std::vector<Injector*>(injectors_)) r->after_detach();
  if (error) return tl::unexpected(*error);
  if (leave_stopped) return wait_stopped_state();
  // Not reaching T here means a SIGCONT after the check above, or the process died: both fine.
  if (restop) (void)wait_stopped_state();
  return {};
}

// After detach with a SIGSTOP queued: every live thread must reach state T.
Expected<void> StoppedProcess::wait_stopped_state() {
  using namespace std::chrono;
  auto deadline = steady_clock::now() + seconds(2);
  for (;;) {
    auto tids = list_tasks(pid_);
    if (!tids) return tl::unexpected(tids.error());
    bool all = true;
    for (pid_t tid : *tids) {
      auto s = task_state(pid_, tid);
      if (!is_dead_state(s) && *s != 'T') all = false;
    }
    if (all) return {};
    if (steady_clock::now() > deadline)
      return fail(Errc::system, 0, fmt::format("resume(pid={}, leave_stopped): the process did not stop within 2 s", pid_));
    std::this_thread::sleep_for(milliseconds(1));
  }
}

}  // namespace pipecr::sys
