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

#include "dump/open_file.hpp"  // the per-file state every kind shares
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

// Snapshots of many pipes packed back to back into a few scratch pipes, so that a dump of 100,000
// pipes does not hold 100,000 scratch pipes (and fds). tee() links whole buffers into any pipe with
// free slots, and tee'd buffers never merge, so each pipe's snapshot keeps its own slots and is
// told apart from its neighbours by its byte count alone. A scratch pipe is made as large as
// /proc/sys/fs/pipe-max-size allows (256 slots at 1 MiB), so it holds at least one source whole.
// When a tee comes up short (the scratch ran out of slots, or a reader outside the stopped set took
// bytes meanwhile) what it linked is left as dead weight at the tail of that scratch pipe, which
// takes no more pieces, and the source is tee'd again into a fresh one.
class SnapshotPacker {
 public:
  // Where one pipe's snapshot is: `bytes` bytes in scratch pipe `scratch`, right after the pieces
  // added before it to the same scratch pipe. bytes == 0: the pipe was empty, nothing linked.
  struct Piece {
    uint32_t scratch = 0;
    uint32_t bytes = 0;
    uint32_t id = UINT32_MAX;  // add_unknown()'s pieces with bytes: where() may have moved them
  };

  SnapshotPacker() = default;
  SnapshotPacker(const SnapshotPacker&) = delete;
  SnapshotPacker& operator=(const SnapshotPacker&) = delete;

  // Links the queued buffers of the pipe behind read_end (`queued` bytes by FIONREAD, its capacity
  // `capacity`, 0 if not known yet) into the current scratch pipe. EBADF from tee (read_end is not
  // open for reading) comes back as Errc::invalid_argument with err EBADF, for callers that try
  // the ends of a pipe in turn.
  [[nodiscard]] Expected<Piece> add(int read_end, uint32_t queued, uint32_t capacity = 0);
  // The same without knowing the queued bytes: the tee comes first, and its answer says "empty"
  // (0: no writer; EAGAIN into a scratch pipe that has taken nothing yet, so cannot be full), which
  // for an empty pipe saves the FIONREAD (one tee instead of FIONREAD + tee). A tee that linked
  // bytes took every buffer of its source unless it ran out of scratch slots; it is not asked at
  // once: the next tee that links bytes into the same scratch pipe proves there was room, so the
  // earlier one ended with its source. Only the last such piece of a scratch pipe is checked
  // (FIONREAD), when that scratch pipe turns out full or at settle(); if it was cut short, its
  // bytes stay as dead weight and it goes whole into a fresh scratch pipe (where() tells). An
  // EAGAIN into a used scratch pipe (empty, or the scratch full?) asks poll() on the scratch pipe,
  // and FIONREAD only when it is full. EBADF as add() (a write end).
  // An empty pipe's tee also says whether a writer is open (pipe_read's rule: 0 with none, EAGAIN
  // with one), which *writers receives: none or some where the tee's answer is sure (a tee into a
  // scratch pipe that has taken nothing, so cannot be full), else unknown (bytes were queued, or
  // the answer was ambiguous). The dump uses it for FIFO readers instead of scanning /proc.
  enum class Writers : uint8_t { unknown, none, some };
  [[nodiscard]] Expected<Piece> add_unknown(int read_end, Writers* writers = nullptr);
  // Checks the last piece add_unknown() has not proven whole (see there), while its source still
  // holds what it held at the tee: call it before the sources may change (the targets resume, or
  // the source fds close). Idempotent.
  [[nodiscard]] Expected<void> settle();
  // Where a piece is now: settle() and later adds may have moved a piece cut short to a fresh
  // scratch pipe (always the last piece with bytes at that moment: reading back in the order the
  // pieces were added stays right).
  [[nodiscard]] Piece where(const Piece& p) const { return p.id < placed_.size() ? placed_[p.id] : p; }
  // FIONREAD calls made by add_unknown() and settle() so far (tests and the bench count them).
  [[nodiscard]] size_t fionread_calls() const { return fionread_calls_; }
  // Scratch pipes made so far (each holds one fd once sealed).
  [[nodiscard]] size_t scratch_pipes() const { return scratch_.size(); }
  // A scratch pipe for someone else to tee into (the survey agent, docs/design.md section 8),
  // made now as scratch pipe *index of this packer (the current one stays current): its write end,
  // to hand over. What is linked into it is the caller's to account for, as pieces in the order
  // they were linked, each one read back or skipped (SnapshotReader::skip_head).
  [[nodiscard]] Expected<sys::UniqueFd> lend(uint32_t* index);
  // Makes up to n scratch pipes for lend() ahead (before the stop), fewer when the kernel refuses.
  void make_spares(size_t n);
  [[nodiscard]] size_t spares() const { return spares_.size(); }
  // Closes the write ends: after the stop, nothing is added any more.
  void seal();
  // The read end of scratch pipe i; its pieces are at its head in the order they were added.
  [[nodiscard]] int scratch_fd(uint32_t i) const { return scratch_[i].get(); }
  // Closes scratch pipe i (its pieces are read).
  void release(uint32_t i) { scratch_[i].reset(); }

 private:
  Expected<void> fresh(uint32_t capacity);
  Expected<Piece> add_from(int read_end, uint32_t queued, uint32_t capacity, int attempt);
  Expected<ssize_t> tee(int read_end);
  Expected<bool> scratch_full() const;
  std::vector<sys::UniqueFd> scratch_;  // read ends
  sys::UniqueFd write_;                 // write end of scratch_[cur_]
  uint32_t cur_ = 0;
  std::vector<std::pair<sys::UniqueFd, sys::UniqueFd>> spares_;  // made ahead for lend(): read, write
  uint32_t write_cap_ = 0;
  bool write_used_ = false;             // some tee linked bytes into scratch_.back()
  size_t fionread_calls_ = 0;
  std::vector<Piece> placed_;           // add_unknown()'s pieces with bytes, by id (where they are now)
  struct Unproven {                     // the last of them in scratch_.back(), not proven whole yet
    int read_end = -1;
    uint32_t id = UINT32_MAX;
  } unproven_;
};

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
  // The same for the `total` bytes at the head of the scratch pipe `scratch` (a piece of a
  // SnapshotPacker, slot-aligned): consumed from it, the rest left in place.
  [[nodiscard]] Expected<std::vector<Slot>> read_head(int scratch, uint64_t total, std::vector<std::byte>& bytes);
  // Drops the `total` bytes at the head of the scratch pipe `scratch` (a piece nobody needs).
  [[nodiscard]] Expected<void> skip_head(int scratch, uint64_t total);

  struct Tools;  // the reader's own pipes (pipe.cpp)

 private:
  Tools* tools_;
};

// The slot layout of a snapshot, leaving the snapshot whole (a copy of it is read).
[[nodiscard]] Expected<std::vector<Slot>> layout(const Snapshot& snap);

}  // namespace pipecr::dump
