// restore/inplace.hpp: refill in place, the first choice of a restore into processes.
//
// When the targets still hold the very pipe the image recorded, and nobody else holds it, pipecr
// does not put a new pipe at the recorded numbers: it empties and refills the pipe they hold, and
// sets status flags, owner and signal on the open files that are there. Every link the processes
// have to that pipe survives by construction: epoll watches, ends in flight in unix sockets, fds the
// image does not cover, descriptions shared with the rest of the process. Replacement (build.cpp,
// process.cpp) remains for the rest; the choice is made per pipe, in the plan, and reported.
//
// "The very pipe", checked, not just an inode number:
//   - an anonymous pipe: the pipefs inode number AND the boot the image was made in (INFO.boot_id):
//     pipefs numbers are only unique within one boot;
//   - a FIFO: device and inode of what the recorded path names in the target's mount namespace
//     (/proc/TARGET/root/PATH) equal the recorded ones, and a target holds that inode (an unlinked
//     FIFO: device and inode of a held end, in the same boot).
// "Nobody else": every process whose fd table holds the pipe (a scan of /proc/*/fd at plan time)
// is a target of this restore (--into; not the --exec process, which gets new pipes). A target's
// threads with fd tables of their own (unshare(CLONE_FILES)) are read too, through /proc/TID/fd:
// an fd recorded in such a table is kept only where that table holds the recorded file.
//
// Stages, as for a replacement (process.hpp):
//   plan     choose_in_place(): per pipe, in place or replaced and why; per restored fd whether the
//            target still holds the recorded file there (kept) or gets one installed there.
//   build    build_in_place(): before any target is stopped. The recorded content is built in a
//            scratch pipe of pipecr's (capacity and refill as for a new pipe), a copy of every end
//            the targets hold is taken (pidfd_getfd: the same open file description), and every
//            recorded file the targets no longer hold is opened again on the live pipe (an open of
//            /proc/self/fd/<copy>: a new description on the same pipe), or is a copy of a kept
//            description of the same recorded file.
//   install swap_in_place(), all targets stopped: the live buffers move out into a holding pipe
//            (splice pipe->pipe moves buffers, no bytes are copied), the capacity is set, the
//            scratch buffers move in (measured on 6.18: a moved buffer keeps its packet and
//            mergeable flags, so the slot layout is exactly the one refill built), then status
//            flags (not O_ASYNC: set at the target's number by its agent, see process.cpp, and
//            cleared by clear_async_in_place() once committed), owner and signal go onto the kept
//            descriptions through pipecr's copies. The stop does not grow with the bytes: each
//            move is a few splice() calls.
//   undo     undo_in_place(): the new buffers are dropped, the old capacity set, the old buffers
//            moved back, the old flags, owner and signal put back.
//   commit   the holding pipe, the scratch pipe and the copies are closed, once the targets run again
//            (freeing the old buffers costs no stop).
// A replaced FIFO that a target holds goes through the same swap and undo, with no kept
// descriptions (stage_replaced_fifo()): its new descriptions are installed as for any replacement,
// but its content and capacity are the target's FIFO's, so they change only inside the stop.
#pragma once

#include <fcntl.h>
#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "pipecr/error.hpp"
#include "pipecr/image.hpp"
#include "sys/unique_fd.hpp"

namespace pipecr::restore {

struct Plan;
struct PlannedPipe;
struct Built;
struct ProcessRestoreOptions;

// An fd of a target on the live pipe, found by the plan's scan.
struct LiveEnd {
  pid_t pid = -1;
  pid_t tid = 0;  // not 0: the fd is in the own fd table of this thread of pid (FdRecord::tid)
  int fd = -1;
  int accmode = O_RDONLY;
  int flags = 0;         // status flags (fdinfo), without O_CLOEXEC
  bool cloexec = false;  // FD_CLOEXEC of that fd
};

// The plan's choice for one pipe.
struct PipeChoice {
  bool in_place = false;
  std::string why;             // replaced: the reason; in place: empty
  std::vector<LiveEnd> held;   // in place: every fd of every target on the live pipe
  size_t kept = 0;             // in place: restored fds the targets hold already (mark_kept)
  std::vector<pid_t> strangers;  // processes holding it now that are not targets (ascending)
  // A target holds it now (the scan), in place or not: a replaced FIFO a target holds gets its
  // content and capacity inside the stop (stage_replaced_fifo()), not at the build.
  bool target_holds = false;
};

struct Holder;
struct PlannedFd;

// Decides, for every pipe of the image that a restored process holds, in place or replaced, and
// why (pipe id -> choice). Reads the image and /proc only. force_replace: --replace.
[[nodiscard]] std::unordered_map<uint64_t, PipeChoice> choose_in_place(const Image& img,
                                                                      const std::vector<Holder>& holders,
                                                                      bool force_replace);

// Marks the restored fds of in-place pipes that the target still holds, with the recorded access
// mode, at the recorded number (PlannedFd::keep): nothing is installed there.
void mark_kept(Plan& plan);

// Replaces pipes planned in place, last first, until what pipecr holds at once (fds_needed()) fits
// under `limit` fds beside the `open_now` it holds: 10,000 pipes refilled in place at once need more
// fds than replacing them (copies, scratch and holding pipes until the commit).
void fit_fd_limit(Plan& plan, size_t limit, size_t open_now);

// A kept open file description: pipecr's copy, and what it had before, for the undo.
struct KeptFile {
  const FileRecord* rec = nullptr;
  sys::UniqueFd copy;
  bool saved = false;
  int old_fl = 0;
  int old_owner_type = 0;
  pid_t old_owner_pid = 0;
  int old_sig = 0;
};

// One pipe refilled in place: what build made, and what install did so far (for the undo).
struct InPlacePipe {
  const PipeRecord* pipe = nullptr;
  std::vector<sys::UniqueFd> held;   // copies of the targets' ends (index as PipeChoice::held)
  sys::UniqueFd reader, writer;      // pipecr's own ends on the live pipe, opened when needed
  sys::UniqueFd scratch_r, scratch_w;  // the recorded content, built beforehand
  sys::UniqueFd hold_r, hold_w;      // the live content while the restore can be undone
  std::vector<KeptFile> kept;
  int old_cap = 0;
  bool emptied = false, capacity_set = false, filled = false;
  // A replaced FIFO a target holds (stage_replaced_fifo()): no kept descriptions, and it must still
  // be empty at the swap (its new descriptions would read bytes written since before the recorded ones).
  bool replacing = false;
};

// Stage 2 for one in-place pipe: scratch content, copies, reopened files (into built.files).
// index: index_fds_by_pipe(plan), made once by the caller (made here when not given).
[[nodiscard]] Expected<void> build_in_place(const Plan& plan, const PlannedPipe& pp, const ProcessRestoreOptions& opts,
                                            Built& built, const std::unordered_map<const PipeRecord*, std::vector<std::pair<const Holder*, const PlannedFd*>>>* index = nullptr);

// Stage 2 for a FIFO that is replaced (a new open file description at every recorded fd) while a
// target holds it (PipeChoice::target_holds): a FIFO keeps one buffer while anyone has it open, so
// the target's FIFO is the one being refilled, and filling it before the stop would change the
// target however the restore ends. The recorded content is built in a scratch pipe instead (the
// capacity checked there), and swap_in_place() sets the capacity and moves the content in with the
// targets stopped; undo_in_place() takes both back. `live` is an open of the FIFO (empty; copied).
[[nodiscard]] Expected<void> stage_replaced_fifo(int live, const PipeRecord& p, const ProcessRestoreOptions& opts,
                                                 Built& built);

// The most fds pipecr holds for one in-place pipe until the commit, with `kept` kept descriptions.
[[nodiscard]] size_t in_place_fds(const PlannedPipe& pp, size_t kept);

// The most fds pipecr holds for one replaced pipe until the commit besides its files: for a FIFO the
// open that keeps its buffer, and for one a target holds, what stage_replaced_fifo() adds.
[[nodiscard]] size_t replaced_fds(const PlannedPipe& pp);

// Stage 3, all targets stopped: swap the content, set the state of the kept descriptions.
[[nodiscard]] Expected<void> swap_in_place(InPlacePipe& p, const ProcessRestoreOptions& opts);

// Past the commit store, the targets still stopped: O_ASYNC cleared on each kept description whose
// file does not record it. Clearing goes through any fd of the description (pipecr's copy; it drops
// the description's fasync entry whatever number set it); it is not done in swap_in_place() because
// an undo could not set it again at the target's number (si_fd would name pipecr's copy).
[[nodiscard]] Expected<void> clear_async_in_place(InPlacePipe& p);

// Undo what swap_in_place() did, as far as it got. Best effort: errors cannot be reported better
// than the one that caused the rollback.
void undo_in_place(InPlacePipe& p);

}  // namespace pipecr::restore
