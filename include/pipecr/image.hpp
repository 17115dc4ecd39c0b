// pipecr/image.hpp: what an image holds, as plain values.
//
// Three identities are kept apart, as the kernel keeps them apart:
//   - PipeRecord: the pipe itself (one inode): capacity, owner, its queued bytes and their slot layout;
//   - FileRecord: one open file description of a pipe end (what dup() and fork() share): access
//     mode, status flags, signal owner;
//   - FdRecord:   one fd slot of one process pointing at a FileRecord, with FD_CLOEXEC.
// ProcessRecord names the processes the fds belong to. An image of one pipe captured in-process
// (pipecr_ckpoint_pipe) is the same shape: one pipe, one file, one fd of the calling process.
// The on-disk encoding is in src/image/ and docs/image-format.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "pipecr/export.h"

namespace pipecr {

inline constexpr uint32_t kFormatVersion = 1;

enum class PipeKind : uint8_t { anonymous = 0, fifo = 1 };

// One pipe_buffer as a reader sees it: its length and whether it is a packet (written through an
// O_DIRECT end; a read() returns at most one packet and drops what it does not take).
struct Slot {
  uint32_t len = 0;
  bool packet = false;
  friend bool operator==(const Slot&, const Slot&) = default;
};

struct PipeRecord {
  uint64_t id = 0;            // unique within the image, > 0
  PipeKind kind = PipeKind::anonymous;
  uint64_t inode = 0;         // st_ino when dumped (informational: inodes do not survive a restore)
  uint32_t capacity = 0;      // F_GETPIPE_SZ, bytes
  uint32_t uid = 0, gid = 0;  // owner of the inode
  uint32_t mode = 0;          // st_mode & 07777
  std::string path;           // FIFO: its path as seen by the dumped process ("" for a pipe)
  uint64_t dev = 0;           // FIFO: st_dev of its inode when dumped (0: not recorded). With inode,
                              // path and the boot id it tells restore it is looking at the same FIFO
  bool unlinked = false;      // FIFO: the path was unlinked when dumped
  bool outside_holders = false;  // some end is held by a process outside the image
  std::vector<Slot> slots;    // queued buffers, head first
  // The queued bytes, sum(slots[i].len) of them. When read from an image this views the image's
  // memory; when writing, the data is passed to the writer separately.
  std::span<const std::byte> data;

  [[nodiscard]] uint64_t bytes() const {
    uint64_t n = 0;
    for (const Slot& s : slots) n += s.len;
    return n;
  }
  [[nodiscard]] bool packet_mode() const {
    for (const Slot& s : slots)
      if (s.packet) return true;
    return false;
  }
};

// F_GETOWN_EX / F_GETOWNER_UIDS of an open file description. pid 0 means no owner.
struct Owner {
  int32_t type = 0;      // F_OWNER_TID (0), F_OWNER_PID (1), F_OWNER_PGRP (2)
  int32_t pid = 0;
  bool has_uids = false; // the kernel told us uid/euid (F_GETOWNER_UIDS)
  uint32_t uid = 0, euid = 0;
  friend bool operator==(const Owner&, const Owner&) = default;
};

// State of a FIFO reader opened O_RDONLY|O_NONBLOCK before any writer: it has not seen a writer
// yet, so poll() hides POLLHUP until one comes and goes.
enum class FifoReaderState : uint8_t { unknown = 0, seen_writer = 1, no_writer_yet = 2 };

struct FileRecord {
  uint64_t id = 0;        // unique within the image, > 0
  uint64_t pipe_id = 0;
  uint32_t flags = 0;     // F_GETFL: O_ACCMODE | O_NONBLOCK | O_DIRECT | O_ASYNC | O_LARGEFILE ...
  Owner owner;
  int32_t signal = 0;     // F_GETSIG, 0 = SIGIO
  FifoReaderState fifo_reader = FifoReaderState::unknown;
};

enum class Blocked : uint8_t { none = 0, reading = 1, writing = 2 };

struct FdRecord {
  int32_t pid = 0;        // the process holding the fd (ProcessRecord::pid); 0 = the caller itself
  int32_t fd = -1;
  uint64_t file_id = 0;
  bool cloexec = false;
  Blocked blocked = Blocked::none;  // a thread of pid was blocked in read()/write() on this fd
  // 0: the fd is in the fd table of process pid. Otherwise the thread of pid with this id had an
  // fd table of its own (unshare(CLONE_FILES)) and the fd is in that table (record THREAD_FD).
  int32_t tid = 0;
};

// Process pid used the very fd table of process with_pid (clone(CLONE_FILES) without
// CLONE_THREAD): its fds are recorded once, under with_pid, and a restore installs them once.
struct SharedFdTable {
  int32_t pid = 0;
  int32_t with_pid = 0;
  friend bool operator==(const SharedFdTable&, const SharedFdTable&) = default;
};

// An open file (FileRecord) sent over a unix socket with SCM_RIGHTS and not received yet: it is
// in no fd table but in the receive queue of the socket at fd sock_fd of process pid (record
// IN_FLIGHT). It holds its pipe like an fd does.
struct InFlightRecord {
  uint64_t file_id = 0;
  int32_t pid = 0;        // the process holding the socket (a ProcessRecord)
  int32_t sock_fd = -1;   // the socket's fd in pid (the first, if pid holds it at several)
  uint64_t sock_ino = 0;  // the socket's inode (informational: it names the socket while it lives)
  uint32_t msg = 0;       // datagram/seqpacket: the message's position in the queue (0 = received
                          // next); stream: its position among the messages that carry files
  uint32_t slot = 0;      // the file's place among the files of its message
  uint64_t end = 0;       // bytes a receiver takes up to and including that message's data
  friend bool operator==(const InFlightRecord&, const InFlightRecord&) = default;
};

// One watch of an epoll instance, held by a dumped process, on a pipe or FIFO end (record
// EPOLL_WATCH). The kernel keys a watch by (open file, fd number given to EPOLL_CTL_ADD) and drops
// it when that open file is released, so a restore that replaces the file re-adds it (docs/restore.md).
// An instance held at several fds (dup, fork) has one record per watch and per fd holding it, all
// with one epoll_id; a restore re-adds each watch once per instance.
struct EpollWatch {
  uint64_t epoll_id = 0;  // the epoll instance, > 0; equal ids are one instance
  int32_t pid = 0;        // a process holding it (ProcessRecord::pid, > 0)
  int32_t epoll_fd = -1;  // its fd there
  uint64_t file_id = 0;   // the watched open file description (FileRecord::id)
  int32_t fd = -1;        // the fd number the watch was added with, in pid's fd table (an FD of file_id)
  uint32_t events = 0;    // EPOLLIN, EPOLLOUT, ... EPOLLET, EPOLLONESHOT, EPOLLEXCLUSIVE, EPOLLWAKEUP
  uint64_t data = 0;      // epoll_data as the program gave it
  // Not 0: the epoll and fd are in the own fd table of this thread of pid (THREAD_EPOLL_WATCH), as
  // FdRecord::tid; 0: in pid's table.
  int32_t tid = 0;
  friend bool operator==(const EpollWatch&, const EpollWatch&) = default;
};

struct ProcessRecord {
  int32_t pid = 0;
  int32_t ppid = 0;
  std::string comm;
  std::vector<std::string> argv;
};

// Facts about the machine the image was made on.
struct ImageInfo {
  uint32_t page_size = 4096;
  uint64_t created_unix_ns = 0;
  std::string kernel;     // uname -r
  std::string tool;       // "pipecr 0.1.0"
  std::string boot_id;    // /proc/sys/kernel/random/boot_id ("" if unknown): inode numbers are
                          // only comparable within one boot
};

struct Image {
  uint32_t format_version = kFormatVersion;
  ImageInfo info;
  std::vector<ProcessRecord> processes;
  std::vector<PipeRecord> pipes;
  std::vector<FileRecord> files;
  std::vector<FdRecord> fds;
  std::vector<SharedFdTable> shared_tables;
  std::vector<InFlightRecord> in_flight;  // ends in flight in unix sockets (IN_FLIGHT records)
  std::vector<EpollWatch> epoll_watches;  // record EPOLL_WATCH (optional; older images have none)

  [[nodiscard]] PIPECR_API const PipeRecord* find_pipe(uint64_t id) const;
  [[nodiscard]] PIPECR_API const FileRecord* find_file(uint64_t id) const;
};

}  // namespace pipecr
