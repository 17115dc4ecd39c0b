// dump/unix_queue.hpp: pipe ends in flight in the unix sockets of the dumped processes.
//
// A pipe end sent with SCM_RIGHTS and not received yet is in no fd table, only in the queue of
// the socket it was sent to. The dump's probe of each fd table (process.cpp) keeps its copies of
// the unix sockets it meets; while the targets are still stopped, scan_unix_queues() peeks each
// socket's queue once (sys/unix_peek.hpp: nothing is consumed, SO_PEEK_OFF is put back) and
// returns a copy of every pipe or FIFO end found in it, with where it waits: socket (holder
// process, fd, inode), message, place in the message. The dump then treats each such copy as one
// more holder of its pipe (snapshot, open file grouping, flags, owner), recorded by an IN_FLIGHT
// record instead of an FD record (docs/image-format.md). Files in flight that are not pipes are
// counted and dropped.
#pragma once

#include <sys/stat.h>
#include <sys/types.h>

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "pipecr/error.hpp"
#include "sys/file_kind.hpp"
#include "sys/unique_fd.hpp"

namespace pipecr::dump {

// A unix socket held by a dumped process: the probe's copy of it.
struct HeldSocket {
  size_t table = 0;     // the caller's index of the fd table holding it
  pid_t pid = 0;
  int fd = -1;
  uint64_t ino = 0;     // the socket's inode (sockfs): one queue per inode
  sys::UniqueFd copy;
};

// A pipe or FIFO end found in a queue.
struct InFlightEnd {
  size_t socket = 0;    // index into the sockets given to scan_unix_queues()
  uint32_t msg = 0;     // sys::PeekedMessage::index
  uint32_t slot = 0;    // place of the file among the message's files
  uint64_t end = 0;     // sys::PeekedMessage::end
  sys::FileKind kind = sys::FileKind::pipe;
  struct stat st {};
  sys::UniqueFd copy;   // the very open file description
};

struct QueueScan {
  std::vector<InFlightEnd> ends;
  uint64_t sockets = 0;       // queues peeked (a socket held at several fds counts once)
  uint64_t messages = 0;      // messages stepped over
  uint64_t other_files = 0;   // files in flight that are not pipes or FIFOs (not recorded)
  std::vector<std::string> notes;  // queues not read to the end, files that could not be taken
};

// Peeks the queue of each socket once (sockets sharing an inode: the first). The targets must be
// stopped. Errors: Errc::system from the peek (sys::peek_unix_queue), naming the process and fd.
[[nodiscard]] Expected<QueueScan> scan_unix_queues(std::span<const HeldSocket> sockets);

}  // namespace pipecr::dump
