// restore/process.hpp: restore the pipes of an image into running processes and into a new command.
//
// Three stages, in this order, so that a failure changes nothing anywhere (docs/restore.md):
//   1. plan   (plan.cpp)    read the image and the command line only: which recorded process goes
//                           where, which fds, open files and pipes that needs, which ends are dropped.
//   2. build  (build.cpp)   make every pipe and every open file description inside this process:
//                           pipe2 / FIFO opens, capacity, refill (the bytes stream from the image),
//                           inode owner, status flags, signal owner; a chunk at a time, each chunk
//                           parked in flight in the files queue of every target taking it
//                           (sys::FileQueue) and closed here. No target is touched yet, so the
//                           time spent here (which grows with the bytes) costs the targets nothing.
//   3. install (process.cpp) stop every target (ptrace), start an agent in each (sys/agent.hpp) and
//                           hand it its files queue (one message); one store commits every target at
//                           once, then each agent puts its files at their numbers and sets O_ASYNC,
//                           and every target is let go. Any failure (or pipecr's death) before that
//                           store: the agents drop what they were sent, every target runs on
//                           unchanged, the error is returned. --exec then puts the exec process's fds
//                           in place in this process and execs the command.
// The soft RLIMIT_NOFILE of this process is raised to the hard one during the call; the fds it needs
// (one chunk of files, the --exec process's files, in-place copies) are counted before anything is
// made, and so is each target's room (its fd table is read before the stop).
// The library never prints: notes (dropped ends, owners that cannot be mapped) go to a callback,
// once the restore has succeeded.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "pipecr/error.hpp"
#include "pipecr/image.hpp"
#include "restore/pipe.hpp"

namespace pipecr::restore {

// `--into TARGET[=RECORDED]`: the running process `target` gets the fds the recorded process held.
// No recorded pid: the image must record exactly one process (or none: an in-process image, pid 0).
struct IntoSpec {
  pid_t target = -1;
  std::optional<int32_t> recorded;
};

// `--exec RECORDED -- COMMAND [ARG...]`: this process takes RECORDED's fds and execs argv (PATH searched).
struct ExecSpec {
  int32_t recorded = 0;
  std::vector<std::string> argv;
};

// The calling process itself (the in-process API, restore_pipe()): it takes RECORDED's fds in its own
// fd table, as --exec does, and the call returns. An FdRecord::fd of -1 asks for any free number.
struct CallerSpec {
  int32_t recorded = 0;
};

struct ProcessRestoreRequest {
  std::vector<IntoSpec> into;
  std::optional<ExecSpec> exec;
  std::optional<CallerSpec> caller;  // not with exec: both are this process
};

// Points where a test may act (kill a target, look at it). Called in this order.
enum class Stage {
  planned,    // the plan is made; nothing is created yet
  built,      // every pipe is built in this process; no target is stopped yet
  seized,     // every target is stopped
  stashed,    // every target has its agent running (limits checked); no file handed over yet
  installed,  // every agent has its files and is prepared; nothing of any target changed yet: the
              // commit comes next
  committed,  // every agent has installed its files and is parked; the threads are not taken back yet
  resumed,    // every target is let go (the end of the time they stand stopped)
};

struct ProcessRestoreOptions {
  RefillOptions refill;
  bool create_fifos = false;                               // mkfifo a recorded FIFO path that is missing
  bool replace = false;                                    // --replace: a new pipe for every pipe, none in place
  bool allow_outside_fifo_holders = false;                 // restore a FIFO that processes outside the restore hold
  // One line per dropped end / unmapped owner, called only once the restore has succeeded (with
  // an exec: just before it), never on a failed one: the notes describe what was done.
  std::function<void(const std::string&)> note;
  std::function<void(Stage)> hook;                         // tests only
};

// An fd of the image that is not restored, because its process is not restored.
struct DroppedEnd {
  uint64_t pipe_id = 0;
  uint64_t file_id = 0;
  int32_t recorded_pid = 0;
  int32_t fd = -1;
  bool write_side = false;
};

// How one pipe was restored: refilled in place (the targets keep the pipe they hold) or replaced.
struct PipeOutcome {
  uint64_t pipe_id = 0;
  std::string name;          // "pipe:[123]" or "FIFO /path"
  bool in_place = false;
  std::string why;           // replaced: why it could not be done in place
  size_t kept = 0;           // in place: restored fds that were already there
};

struct ProcessRestoreSummary {
  size_t pipes = 0;          // pipes built (replaced) or refilled in place
  size_t in_place = 0;       // of which refilled in place
  std::vector<PipeOutcome> outcomes;  // one per pipe, plan order
  size_t files = 0;          // open file descriptions built
  size_t fds = 0;            // fds restored (installed, or kept in place), over every target (and the exec process)
  std::vector<DroppedEnd> dropped;
  std::vector<std::string> notes;  // everything also passed to options.note
  struct CallerFd {
    uint64_t file_id = 0;
    int fd = -1;
  };
  std::vector<CallerFd> caller_fds;  // request.caller: where each of its fds ended, its plan order
  // Targets whose agent had to return through the fallback register block: no `syscall; ret` or
  // rt_sigreturn restorer in their code (docs/design.md section 8). A kill of pipecr during their
  // bootstrap or take-back could have harmed them; the others could not be harmed that way.
  std::vector<pid_t> register_block_return;
  size_t epoll_readded = 0;  // epoll watches added again on replaced ends (restore/epoll.hpp)
  // One line per target whose fd table was too small for the restore and shared by threads: grown
  // before the stop by one thread (sys/fdtable_grow.hpp), or why it was left to the stop (restore -v).
  std::vector<std::string> fd_table_growth;
};

// Restores `request` from img (whose PipeRecord::data views memory that stays mapped during the
// call). With request.exec, returns only on failure (on success this process is the command).
// Errors, each one line naming the process, fd or file:
//   Errc::invalid_argument  a recorded pid not in the image or used twice, a target named twice,
//                           the command not found or not executable (checked before anything is done);
//   Errc::gone              a target does not exist or exited;
//   Errc::permission        not allowed to ptrace a target;
//   Errc::not_found         a recorded FIFO path is missing (without create_fifos);
//   Errc::unsupported       a FIFO path that is not a FIFO, or a FIFO that already holds data, or
//                           one that processes outside the restore hold (unless allowed), or
//                           targets holding one FIFO in different mount namespaces;
//   Errc::capacity          a pipe capacity this kernel refuses;
//   Errc::system            anything else, e.g. a target's RLIMIT_NOFILE below a recorded fd, or more
//                           fds needed in this process than its hard RLIMIT_NOFILE allows (EMFILE).
// A SIGINT, SIGTERM, SIGHUP or SIGQUIT that reaches pipecr during the transaction makes it roll back
// (Errc::system, EINTR) and is delivered when every target is whole again.
// On any error before exec, every target holds exactly the fds it held before and is running (or
// group-stopped, if it was) and untraced.
[[nodiscard]] Expected<ProcessRestoreSummary> restore_processes(const Image& img, const ProcessRestoreRequest& request,
                                                                const ProcessRestoreOptions& options = {});

// The text of one dropped end, as notes print it.
[[nodiscard]] std::string describe(const DroppedEnd& d, const Image& img);

}  // namespace pipecr::restore
