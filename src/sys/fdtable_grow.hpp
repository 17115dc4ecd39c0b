// fdtable_grow.hpp: grow a running process's fd table before a restore stops all its threads, so that
// the RCU grace period a shared table's growth waits for (fs/file.c, expand_fdtable: synchronize_rcu()
// when more than one task uses the table) is paid by one thread while the others run, not by the
// whole process standing stopped (docs/design.md section 8, "The fd table, grown before the stop").
//
// The kernel fact used (fs/file.c, ksys_dup3): dup3(oldfd, newfd, 0) runs expand_files(files, newfd)
// before it looks oldfd up; with an oldfd that is open nowhere (a number above every table) it grows
// the table to hold newfd and returns EBADF, installing nothing. newfd must be below the process's
// RLIMIT_NOFILE (else EBADF before the expand). Verified on the running kernel by
// sys.FdTableGrow.Dup3OfAClosedFdGrowsTheTableOnly.
//
// How the dup3 runs (the agent's bootstrap way, sys/agent.hpp): ONE thread is seized and interrupted
// (StoppedProcess::seize_thread; the others run on), preferably one blocked in a syscall; an
// rt_sigframe of its context (registers as it resumes, signal mask, xstate) goes on its stack below
// the red zone; the dup3 runs at the target's own `syscall; ret` with rsp at that frame and every
// signal blocked. Were pipecr to die at any moment, the thread finishes the dup3, returns into the
// target's restorer and rt_sigreturn puts its context back: nothing is left but a bigger table. When
// the dup3 is done, pipecr re-parks the thread in an interrupt stop (still at the gadget: a death
// there takes the same way back), puts its mask and registers back and detaches it, so that a syscall
// it was blocked in restarts as the kernel restarts it (an epoll_wait or sigtimedwait the stop made
// fail with EINTR is put back to restart, as StoppedProcess does).
//
// It is an optimisation: whatever fails, nothing of the target changed but maybe its table size (no
// program sees that but /proc's FDSize), and the restore goes on; the all-thread stop then grows the
// table as before (the agent's grow_table). No ptrace stop is left behind: the thread is detached on
// every path (StoppedProcess's destructor).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

#include "pipecr/error.hpp"
#include "sys/agent.hpp"

namespace pipecr::sys {

// The slots of the fd table thread tid of pid uses (FDSize in /proc/PID/task/TID/status).
[[nodiscard]] Expected<uint32_t> fd_table_slots(pid_t pid, pid_t tid);

// Runs dup3(oldfd, newfd, 0) in thread tid of pid, alone stopped, the kill-safe way above, with the
// target's gadgets (find_agent_gadgets(), checked here). Returns the syscall's raw result (-EBADF for
// the growth). Errors: Errc::unsupported (ENOTSUP) when the thread cannot return through a frame (no
// gadget, or a CET shadow stack) — nothing was done; Errc::gone when the thread or process went away;
// else what the ptrace layer reports. On every path the thread is detached, its registers and mask
// as they were.
[[nodiscard]] Expected<long> dup3_in_thread(pid_t pid, pid_t tid, int oldfd, int newfd, const AgentGadgets& gadgets);

// What pregrow_fd_table() did.
struct FdTableGrowth {
  enum class Outcome {
    grown,          // the table holds `want` now; tid ran the dup3
    big_enough,     // it held `want` already
    single_thread,  // one task uses the table: its growth waits for no grace period, left to the stop
    stopped,        // the process is in a group stop: nothing runs meanwhile anyway
    no_gadget,      // no `syscall; ret` or restorer in the target (or a shadow stack): left to the stop
    failed,         // something else failed (why): left to the stop
    turned_off,     // set_fd_table_pregrow(false)
  };
  Outcome outcome = Outcome::failed;
  uint32_t before = 0, after = 0;  // slots, FDSize
  pid_t tid = 0;                   // the thread that ran the dup3 (grown, failed after the choice)
  std::string why;                 // one line, for notes
};

// Grows the fd table of `owner` (a thread of pid: the one whose table a restore installs into) so
// that it holds fd number `want`, when it is smaller and more than one task of pid uses it
// (kcmp(KCMP_FILES)), by dup3_in_thread(<a number above every table>, want) in one of those tasks: one
// blocked in a syscall (state S) rather than one running. `want` is clamped below `nofile` (the
// target's soft RLIMIT_NOFILE). Errc::gone when the process is gone; every other failure is an
// outcome (the restore goes on).
[[nodiscard]] Expected<FdTableGrowth> pregrow_fd_table(pid_t pid, pid_t owner, int want, uint64_t nofile,
                                                       const AgentGadgets& gadgets);

// Turns pregrow_fd_table() off (outcome turned_off) or on again, process-wide: benchmarks and tests
// measure the stop without it. On by default.
void set_fd_table_pregrow(bool enabled);

}  // namespace pipecr::sys
