// dump/epoll.hpp: the epoll watches on pipe ends that the dumped processes hold (record EPOLL_WATCH).
//
// The probe of each fd table (process.cpp) hands every fd that sys::classify() calls an epoll here,
// with pipecr's pidfd_getfd() copy of it when it took one. Each epoll's watches come from its fdinfo
// ("tfd: N events: E data: D ... ino: I"); the watched open file is identified exactly with
// kcmp(KCMP_EPOLL_TFD), which compares an fd with the file a watch holds: first the pipe end at the
// watch's own fd number, then the other dumped ends of that inode in the same table (a program may
// have added the watch through a dup and closed it since: the watch stays, keyed by that number,
// while the file lives at another one; CRIU's zdtm epoll and epoll01 do this). An instance in two
// tables (a thread's copy of the process's table) shows each the watches of both: each table
// records those it can attribute. A watch on a pipe inode the table holds whose very file no table
// holding that epoll holds is counted as not attributable and said in the dump's notes, per epoll
// fd; one whose fd number and inode match no dumped pipe end is on another kind of file and is
// counted apart (DumpStats::epoll_other).
//
// When pipecr holds copies of the epolls and of the pipe ends (the fast path), the watches are read
// after the targets run again, from the copies (the same epoll, the same files): a program that
// changed a watch in between shows its newer state, as for the status flags (docs/design.md,
// section 7), but no watch can be attributed to the wrong file. Otherwise (batched copies, fds found
// through /proc) they are read while the targets are stopped, from the targets' own fds.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <set>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "pipecr/error.hpp"
#include "pipecr/image.hpp"
#include "sys/unique_fd.hpp"

namespace pipecr::dump {

// One line of an epoll fd's fdinfo.
struct EpollFdinfoEntry {
  int tfd = -1;
  uint32_t events = 0;
  uint64_t data = 0;
  uint64_t ino = 0;  // the watched file's inode (informational: every anon inode shares one)
  friend bool operator==(const EpollFdinfoEntry&, const EpollFdinfoEntry&) = default;
};

// The watches in the text of /proc/PID/fdinfo/EPFD, in the kernel's order (the order
// KCMP_EPOLL_TFD's toff counts in). Lines that are not "tfd:" lines are skipped; a "tfd:" line
// without a well-formed tfd, events and data is an error naming it.
[[nodiscard]] Expected<std::vector<EpollFdinfoEntry>> parse_epoll_fdinfo(std::string_view text);

// Where an fd can be reached for kcmp and fdinfo: a target's (thread, fd), or pipecr's own copy.
struct FdAt {
  pid_t pid = 0;  // a thread id; getpid() for pipecr's copies
  int fd = -1;
};

struct EpollDumpStats {
  uint64_t epolls = 0;          // epoll instances held by the dumped processes
  uint64_t watches = 0;         // watches on dumped pipe ends, attributed (records: per holding fd)
  uint64_t unattributed = 0;    // watches on a dumped inode whose very file no table holding the epoll holds
  uint64_t other = 0;           // watches on fds that hold no dumped pipe end
};

class EpollDump {
 public:
  // An epoll fd: `fd` in fd table `table` (process pid, reached through thread tid); `own`: tid's
  // own table (its watches are recorded with that tid: THREAD_EPOLL_WATCH).
  // `copy`: pipecr's pidfd_getfd() copy, or empty.
  void found(size_t table, pid_t pid, pid_t tid, int fd, bool own, sys::UniqueFd copy);
  [[nodiscard]] bool empty() const { return epolls_.empty(); }
  // Whether every epoll has a copy (then read() may run after the resume, with copies).
  [[nodiscard]] bool all_copied() const;

  // Reads every epoll's watches and attributes them. holder_at(table, fd): the index of the dumped
  // pipe end at that fd of that table, SIZE_MAX if none; same_inode(table, ino): the dumped ends of
  // that pipe inode in that table; reach(holder): how to reach it (its copy when `copies`, else the
  // target's fd). Errors: the epoll's fdinfo unreadable or malformed, kcmp failing for another
  // reason than a watch gone meanwhile (Errc::unsupported without KCMP_EPOLL_TFD: the message says so).
  [[nodiscard]] Expected<void> read(bool copies, const std::function<size_t(size_t, int)>& holder_at,
                                    const std::function<std::vector<size_t>(size_t, uint64_t)>& same_inode,
                                    const std::function<FdAt(size_t)>& reach);
  // Closes the copies.
  void drop_copies();

  // The records, one per attributed watch and per fd holding its epoll; file_of(holder) gives the
  // FILE id of a holder (0: the holder has none: left out).
  [[nodiscard]] std::vector<EpollWatch> records(const std::function<uint64_t(size_t)>& file_of) const;
  [[nodiscard]] const EpollDumpStats& stats() const { return stats_; }
  // What was not recorded, in sentences for the dump's notes.
  [[nodiscard]] std::vector<std::string> notes() const;

 private:
  struct Epoll {
    size_t table = 0;
    pid_t pid = 0;
    pid_t tid = 0;
    int fd = -1;
    bool own = false;
    sys::UniqueFd copy;
    uint64_t id = 0;  // the instance (kcmp(KCMP_FILE) groups), from 1
  };
  struct Watch {
    size_t epoll = 0;   // index into epolls_
    size_t holder = 0;  // a dumped pipe end holding the watched file (at fd, or at another number)
    int fd = -1;        // the fd number the watch was added with
    uint32_t events = 0;
    uint64_t data = 0;
  };
  [[nodiscard]] Expected<void> group(bool copies);
  [[nodiscard]] Expected<void> read_one(size_t e, bool copies, const std::function<size_t(size_t, int)>& holder_at,
                                        const std::function<std::vector<size_t>(size_t, uint64_t)>& same_inode,
                                        const std::function<FdAt(size_t)>& reach);

  struct Miss {  // a watch the table of `epoll` could not attribute (it may be another table's)
    size_t epoll = 0;
    int tfd = -1;
    uint32_t toff = 0;
  };
  std::vector<Epoll> epolls_;
  std::vector<Watch> watches_;
  std::vector<Miss> misses_;  // of the first fd of each instance in each table
  std::set<std::tuple<uint64_t, int, uint32_t>> attributed_;  // (instance, tfd, toff) of each watch attributed
  std::vector<std::string> lost_;  // one sentence per epoll fd with watches not recorded
  EpollDumpStats stats_;
};

}  // namespace pipecr::dump
