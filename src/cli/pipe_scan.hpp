// pipe_scan.hpp: the machine's live pipes and FIFOs, who holds each end, how full each is and who
// is blocked on it: what `pipecr ls` shows as a table, a graph (ls_graph.hpp) or live (--watch).
//
// Sources, none of which stops or disturbs a process:
//   - /proc/PID/fd (readlink "pipe:[ino]", or a path whose stat is S_IFIFO) and fdinfo (flags);
//   - capacity (F_GETPIPE_SZ) and bytes queued (FIONREAD) through a pidfd_getfd copy of one end,
//     closed right after (both work on either end; the copy is the same open file description);
//   - /proc/PID/task/TID/syscall: a thread blocked in read*/write* shows the syscall and its fd
//     argument without ptrace; wchan says pipe_read / pipe_write / wait_for_partner. A thread in
//     wait_for_partner is inside open() of a FIFO with no partner yet: it holds no fd, so its path
//     is read from its memory (process_vm_readv) and matched to the FIFO by device and inode;
//   - kcmp via sys::open_file_ids, so that fds sharing one open file description (dup, fork)
//     show as one end with several holders.
// Processes we may not inspect are skipped silently unless named as targets.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "pipecr/error.hpp"
#include "sys/proc.hpp"

namespace pipecr::cli {

struct Holder {
  pid_t pid = 0;
  int fd = -1;    // -1: an end in flight (sock_fd says where)
  int flags = 0;  // fdinfo flags (O_CLOEXEC there is this fd's FD_CLOEXEC)
  int sock_fd = -1;      // an end in flight: queued in the unix socket at this fd of pid
  uint32_t message = 0;  // its message (sys::PeekedMessage::index)
  int copy = -1;         // an end in flight: pipecr's copy, during the scan only
};

struct End {  // one open file description
  std::vector<Holder> holders;
};

struct Stuck {  // a thread blocked on the pipe
  pid_t pid = 0, tid = 0;
  int fd = -1;  // -1: in open() of the FIFO
  Blocked dir = Blocked::none;  // for open(): the access asked for (reading, writing, none = O_RDWR)
  std::string wchan;
  std::string call;  // the syscall it is blocked in: "read", "splice", "open", ...
};

struct PipeView {
  dev_t dev = 0;
  ino_t ino = 0;
  bool fifo = false;
  std::string path;
  std::optional<int> capacity, bytes;
  std::vector<Holder> fds;
  std::vector<End> ends;
  std::vector<Stuck> stuck;
};

using PipeKey = std::pair<dev_t, ino_t>;

struct Scan {
  std::map<PipeKey, PipeView> pipes;
  std::map<pid_t, std::string> comms;
  std::set<std::pair<pid_t, int>> pipe_fds;
  size_t skipped = 0;
};

// Every pipe and FIFO of the given processes (all processes when targets is empty). A named
// target that cannot be inspected is an error; unnamed ones are counted in Scan::skipped.
// With in_flight, the queues of the unix sockets of those processes are peeked too (as `dump`
// does, sys/unix_peek.hpp) and each pipe end queued there is a Holder with fd -1: the socket's
// SO_PEEK_OFF moves for the walk and is put back, so a socket whose peek offset is in use, or one
// of a process in other net_cls/net_prio groups than pipecr's (taking it would re-tag it), is left
// alone.
[[nodiscard]] Expected<Scan> scan_system(const std::vector<pid_t>& targets, bool in_flight = false);

// "r", "w" or "rw" for fdinfo flags.
[[nodiscard]] const char* access_of(int flags);
// The status flags worth showing (O_NONBLOCK, O_DIRECT, ...), by name.
[[nodiscard]] std::vector<std::string> flag_names(int flags);
// Short codes for the state of a pipe, most alarming first: writer_blocked, reader_blocked,
// open_waiting, no_reader, no_writer, full, empty (docs/json.md).
[[nodiscard]] std::vector<std::string> states(const PipeView& p);
// A FIFO's path without the " (deleted)" the kernel appends to an unlinked one.
[[nodiscard]] std::string strip_deleted(std::string s);

}  // namespace pipecr::cli
