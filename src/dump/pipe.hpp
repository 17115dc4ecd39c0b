// dump/pipe.hpp: reading one pipe's state without changing it.
//
// Capture happens in two stages so that a dump can keep its targets stopped for as short a time as
// possible: snapshot() links the queued buffers into a private scratch pipe with tee() (no copy, the
// source untouched) while the holders are stopped; layout() and stream() then learn the slot layout
// and read the bytes out of the scratch pipe at leisure, after the holders run again.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "pipecr/error.hpp"
#include "pipecr/image.hpp"
#include "sys/unique_fd.hpp"

namespace pipecr::dump {

// What kind of object a fd refers to, from fstat + fstatfs: an anonymous pipe (pipefs), a FIFO
// (S_IFIFO elsewhere), or neither (Errc::unsupported, "fd N is not a pipe or FIFO (<type>)").
// Notification pipes (O_NOTIFICATION_PIPE) are refused with Errc::unsupported too.
struct PipeIdentity {
  PipeKind kind = PipeKind::anonymous;
  dev_t dev = 0;
  ino_t ino = 0;
  uint32_t uid = 0, gid = 0, mode = 0;
};
[[nodiscard]] Expected<PipeIdentity> identify(int fd);

// True when the pipe behind fd is a notification pipe (its data cannot be read without consuming it).
// Costs one ioctl, and nothing on kernels that cannot make notification pipes at all (probed once).
[[nodiscard]] bool is_notification_pipe(int fd);

// The queued buffers of a pipe, linked into a scratch pipe of our own. Holds one fd.
struct Snapshot {
  sys::UniqueFd scratch;  // read end of the scratch pipe; its write end is closed
  uint32_t bytes = 0;     // bytes queued in the source when snapshot() ran
};

// Link the queued buffers of the pipe behind `read_end` (a fd open for reading on it) into a new
// scratch pipe. `capacity` is the source's F_GETPIPE_SZ: the scratch pipe is made at least that
// large so that every slot fits. The source pipe is not changed.
[[nodiscard]] Expected<Snapshot> snapshot(int read_end, uint32_t capacity);

// Reads snapshots out: their slot layout and their bytes. Keeps a few small pipes of its own
// between calls, so that a dump of many pipes makes them once.
class SnapshotReader {
 public:
  SnapshotReader();
  ~SnapshotReader();
  SnapshotReader(const SnapshotReader&) = delete;
  SnapshotReader& operator=(const SnapshotReader&) = delete;

  // The layout of snap (each buffer's length and packet mark, head first) and its bytes, read into
  // `bytes` (resized to snap.bytes: memory is bounded by one pipe's capacity). Consumes snap.
  [[nodiscard]] Expected<std::vector<Slot>> read(Snapshot& snap, std::vector<std::byte>& bytes);

  struct Tools;  // the reader's own pipes (pipe.cpp)

 private:
  Tools* tools_;
};

// The slot layout of a snapshot, leaving the snapshot whole (a copy of it is read).
[[nodiscard]] Expected<std::vector<Slot>> layout(const Snapshot& snap);

// The state of the open file description behind fd: access mode and status flags, signal owner
// (F_GETOWN_EX, F_GETOWNER_UIDS where the kernel has it) and signal (F_GETSIG). id and pipe_id are
// left 0 for the caller to fill in.
// with_flags=false skips F_GETFL (for callers that read the flags from /proc/PID/fdinfo already).
[[nodiscard]] Expected<FileRecord> file_state(int fd, bool with_flags = true);

}  // namespace pipecr::dump
