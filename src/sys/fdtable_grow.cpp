// fdtable_grow.cpp: grow a target's fd table in one thread before the all-thread stop (see
// fdtable_grow.hpp for the kernel fact and the kill-safe way the dup3 runs).
#include "sys/fdtable_grow.hpp"

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "sys/arch.hpp"
#include "sys/proc.hpp"
#include "sys/ptrace.hpp"
#include "sys/syscalls.hpp"

namespace pipecr::sys {
namespace {

std::atomic<bool> g_enabled{true};

// An fd number above every table (fs.nr_open is at most about 2^30): dup3 finds nothing there.
constexpr int kNeverOpen = INT_MAX;

// Whether tasks a and b use the same fd table: 1 yes, 0 no, -1 unknown (kcmp refused or missing).
int same_table(pid_t a, pid_t b) {
  if (a == b) return 1;
  auto c = kcmp_files(a, b);
  return c ? *c == 0 : -1;
}

Error frame_error(pid_t pid, pid_t tid, const std::string& what) {
  return Error{Errc::unsupported, ENOTSUP, fmt::format("pid {} (thread {}): {}", pid, tid, what)};
}

// Once the dup3 ran (thread in its syscall-exit-stop, registers at the gadget, rsp at the frame):
// re-park it in an interrupt stop, then its mask and registers back. Each step leaves a thread that
// pipecr's death lets go whole: until the registers are back it returns through the frame.
Expected<void> put_back(StoppedProcess& p, pid_t tid, const Regs& saved, uint64_t mask) {
  if (auto ok = p.repark(tid); !ok) return ok;
  if (auto ok = p.set_signal_mask(tid, mask); !ok) return ok;
  return p.set_regs(tid, saved);
}

}  // namespace

void set_fd_table_pregrow(bool enabled) { g_enabled = enabled; }

Expected<uint32_t> fd_table_slots(pid_t pid, pid_t tid) {
  auto st = read_status(pid, tid);
  if (!st && (st.error().kind == Errc::gone || st.error().err == ENOENT || st.error().err == ESRCH))
    return fail(Errc::gone, ESRCH, fmt::format("thread {} of process {} does not exist", tid, pid));
  if (!st) return tl::unexpected(st.error());
  if (!st->fd_size)
    return fail(Errc::gone, ESRCH, fmt::format("/proc/{}/task/{}/status: no FDSize line (the thread has exited)", pid, tid));
  return *st->fd_size;
}

Expected<long> dup3_in_thread(pid_t pid, pid_t tid, int oldfd, int newfd, const AgentGadgets& g) {
  if (!g.syscall_ret || !g.restorer)
    return tl::unexpected(frame_error(pid, tid, "no `syscall; ret` or rt_sigreturn restorer in its code"));
  if (!arch::frame_return_allowed(pid, tid))
    return tl::unexpected(frame_error(pid, tid, "the thread runs with a shadow stack (CET)"));
  auto seized = StoppedProcess::seize_thread(pid, tid);
  if (!seized) return tl::unexpected(seized.error());
  StoppedProcess& p = **seized;  // its destructor detaches the thread on every path below
  if (auto ok = p.may_run_code(tid); !ok) return tl::unexpected(ok.error());  // its seccomp filters
  if (!agent_gadgets_still_there(pid, g))
    return tl::unexpected(frame_error(pid, tid, "its `syscall; ret` or restorer is gone (code unmapped since)"));
  auto saved = p.regs(tid);
  if (!saved) return tl::unexpected(saved.error());
  auto mask = p.signal_mask(tid);
  if (!mask) return tl::unexpected(mask.error());
  auto fpu = arch::fpu_state(tid);
  if (!fpu) return tl::unexpected(fpu.error());
  const bool no_signal = !p.signal_pending(tid);
  const arch::SigFrame frame =
      arch::build_sigframe(arch::as_resumed_by_sigreturn(*saved, no_signal), *mask, *fpu, g.restorer);
  if (auto ok = write_remote(pid, frame.frame, frame.bytes.data(), frame.bytes.size()); !ok)
    return tl::unexpected(Error{ok.error().kind, ok.error().err,
                                fmt::format("pid {} (thread {}): no room for the signal frame on its stack: {}", pid,
                                            tid, ok.error().what)});
  // From here pipecr's death at any moment returns the thread through the frame: the registers
  // point at the gadget first (a death now runs the dup3 and returns), then every signal is blocked
  // (the frame holds the real mask, which rt_sigreturn restores).
  Regs call = *saved;
  call.set_syscall(SYS_dup3, {static_cast<unsigned long>(static_cast<unsigned>(oldfd)),
                              static_cast<unsigned long>(static_cast<unsigned>(newfd)), 0, 0, 0, 0},
                   g.syscall_ret);
  call.set_sp(frame.frame);
  if (auto ok = p.set_regs(tid, call); !ok) {
    (void)p.set_regs(tid, *saved);
    return tl::unexpected(ok.error());
  }
  if (auto ok = p.set_signal_mask(tid, ~uint64_t{0}); !ok) {
    (void)p.set_regs(tid, *saved);
    return tl::unexpected(ok.error());
  }
  auto ran = p.run_syscall(tid, SYS_dup3);
  if (!ran) {
    // Not done within the bound (or a ptrace failure): stop the thread wherever it got to, still
    // with registers of the gadget and the frame, and put it back; a dead one needs nothing.
    if (ran.error().kind != Errc::gone || ran.error().err == ETIMEDOUT)
      if (p.interrupt(tid)) (void)put_back(p, tid, *saved, *mask);
    return tl::unexpected(ran.error());
  }
  auto after = p.regs(tid);
  if (!after) return tl::unexpected(after.error());
  const long ret = after->ret();
  if (auto ok = put_back(p, tid, *saved, *mask); !ok) return tl::unexpected(ok.error());
  if (auto ok = p.resume(); !ok) return tl::unexpected(ok.error());
  return ret;
}

Expected<FdTableGrowth> pregrow_fd_table(pid_t pid, pid_t owner, int want, uint64_t nofile,
                                         const AgentGadgets& gadgets) {
  FdTableGrowth g;
  if (!g_enabled) {
    g.outcome = FdTableGrowth::Outcome::turned_off;
    return g;
  }
  if (owner <= 0) owner = pid;
  if (nofile == 0) {
    g.outcome = FdTableGrowth::Outcome::failed;
    g.why = "its RLIMIT_NOFILE is 0";
    return g;
  }
  want = static_cast<int>(std::min<uint64_t>(static_cast<uint64_t>(std::max(want, 0)), std::min<uint64_t>(nofile - 1, INT_MAX - 1)));
  auto before = fd_table_slots(pid, owner);
  if (!before) return tl::unexpected(before.error());
  g.before = g.after = *before;
  if (*before > static_cast<uint32_t>(want)) {
    g.outcome = FdTableGrowth::Outcome::big_enough;
    return g;
  }
  if (task_state(pid, pid) == 'T') {
    g.outcome = FdTableGrowth::Outcome::stopped;
    return g;
  }
  // The tasks using the table; which of them runs the dup3: one asleep in a syscall (S) costs
  // nothing that runs; a running one (R) next. Not one in an uninterruptible sleep (D: a vfork
  // parent, or the stop would wait), stopped or dead.
  size_t sharers = 0;
  pid_t sleeping = 0, running = 0;
  for (pid_t tid : list_threads(pid).value_or(std::vector<pid_t>{})) {
    const int same = same_table(owner, tid);
    if (same == 0) continue;
    if (same < 0 && tid != owner && owner != pid) continue;  // unknown, and the holder has a table of its own
    const char st = task_state(pid, tid).value_or(0);  // 0: gone
    if (st == 0 || st == 'Z' || st == 'X' || st == 'x') continue;
    ++sharers;
    if (st == 'S' && !sleeping) sleeping = tid;
    if (st == 'R' && !running) running = tid;
  }
  if (sharers < 2) {
    g.outcome = FdTableGrowth::Outcome::single_thread;
    return g;
  }
  g.tid = sleeping ? sleeping : running;
  if (!g.tid) {
    g.why = "no thread using its fd table is asleep or running";
    return g;
  }
  auto r = dup3_in_thread(pid, g.tid, kNeverOpen, want, gadgets);
  if (!r) {
    if (r.error().kind == Errc::unsupported) {
      g.outcome = FdTableGrowth::Outcome::no_gadget;
      g.why = r.error().what;
      return g;
    }
    // Only the process's end stops the restore: a thread that exited alone leaves the rest to the stop.
    if (r.error().kind == Errc::gone && !task_state(pid, pid)) return tl::unexpected(r.error());
    g.why = r.error().what;
    return g;
  }
  if (auto now = fd_table_slots(pid, owner)) g.after = *now;
  if (*r != -EBADF)
    g.why = fmt::format("dup3({}, {}, 0) returned {} (expected -EBADF)", kNeverOpen, want, *r);
  else if (g.after <= static_cast<uint32_t>(want))
    g.why = fmt::format("dup3({}, {}, 0) left FDSize at {}", kNeverOpen, want, g.after);
  else
    g.outcome = FdTableGrowth::Outcome::grown;
  return g;
}

}  // namespace pipecr::sys
