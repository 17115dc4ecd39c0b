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

// The slot layout of a snapshot: each buffer's length and packet mark, head first. The snapshot
// itself is not consumed.
[[nodiscard]] Expected<std::vector<Slot>> layout(const Snapshot& snap);

// Read the snapshot's bytes out in chunks, head first, passing each to `sink`; consumes the snapshot.
// `slots` is its layout(): reads ask for whole slots only, since a read() that ends inside a
// packet drops the rest of the packet. Returns the bytes passed to sink.
using ChunkSink = std::function<Expected<void>(std::span<const std::byte>)>;
[[nodiscard]] Expected<uint64_t> stream(Snapshot& snap, std::span<const Slot> slots, const ChunkSink& sink);

// The state of the open file description behind fd: access mode and status flags, signal owner
// (F_GETOWN_EX, F_GETOWNER_UIDS where the kernel has it) and signal (F_GETSIG). id and pipe_id are
// left 0 for the caller to fill in.
[[nodiscard]] Expected<FileRecord> file_state(int fd);

}  // namespace pipecr::dump
