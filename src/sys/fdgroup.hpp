// fdgroup.hpp: which fds (of one or many processes) share one open file description.
//
// dup() and fork() share an open file description; a second open() of /proc/PID/fd/N makes a new
// one. Only kcmp(KCMP_FILE) can tell them apart from outside, and it also *orders* them (it
// compares the kernel's struct file pointers), so grouping is a sort with kcmp as the comparator
// followed by splitting runs of equal elements: O(n log n) kcmp calls instead of n^2. The sort is
// our own merge sort because a comparator that can fail cannot go into std::sort (an inconsistent
// comparator is undefined behaviour there); the first kcmp error stops it and is returned.
//
// When the caller knows each fd's pipe inode (FdRef::ino), fds are first bucketed by inode (two fds
// on different inodes never share an open file description), and kcmp runs only inside a bucket;
// when it knows every access mode in a bucket (FdRef::access), the bucket is split by it too (an
// open file description has one access mode, so a pipe's read and write ends are never compared).
//
// pipecr's own fds (its pidfd_getfd() copies) can be compared more cheaply: fcntl(F_DUPFD_QUERY)
// (Linux 6.10) says whether two fds of the caller are one open file, for about a fifth of what a
// kcmp costs (0.2 against 0.9 us here), but only equal or not, without an order. With an equality
// test (own_file_equal()), a bucket is grouped by comparing each fd with one member of each group
// found so far; a bucket that turns out to hold more than a few descriptions (the many opens of one
// FIFO) is sorted with kcmp instead, so the cost stays O(n log n) in the worst case.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "pipecr/error.hpp"

namespace pipecr::sys {

struct FdRef {
  pid_t pid = 0;
  int fd = -1;
  uint64_t ino = 0;  // pipe inode when known (0 = unknown): only fds with equal ino are compared
  int access = -1;   // O_ACCMODE of the fd when known (-1 = unknown): only equal modes are compared
  friend bool operator==(const FdRef& a, const FdRef& b) { return a.pid == b.pid && a.fd == b.fd; }
};

// One open file description and the fds that refer to it, in input order.
struct FdGroup {
  std::vector<FdRef> members;
};

// Orders two fds like kcmp(KCMP_FILE): <0, 0, >0. The default is sys::kcmp_file; tests pass a
// counting wrapper.
using FileCompare = std::function<Expected<int>(const FdRef&, const FdRef&)>;
[[nodiscard]] FileCompare kcmp_compare();

// Whether two fds are one open file description, without an order (F_DUPFD_QUERY).
using FileEqual = std::function<Expected<bool>(const FdRef&, const FdRef&)>;

// The equality test for the caller's own fds: F_DUPFD_QUERY where this kernel has it (probed once,
// sys::dupfd_query_works()), kcmp(KCMP_FILE) == 0 for a pair that is not both the caller's. Empty
// (no equality test: group_by_open_file sorts with kcmp) where the kernel lacks F_DUPFD_QUERY.
[[nodiscard]] FileEqual own_file_equal();

// F_DUPFD_QUERY of two of the caller's fds: true when they are one open file description.
[[nodiscard]] Expected<bool> same_open_file(int fd1, int fd2);

// Group fds by open file description. Groups come in the order of their first member in `fds`;
// members in input order. Duplicate (pid, fd) entries land in the same group. With `eq`, small
// buckets are grouped by equality (see above) and `cmp` sorts the rest. Errors: the first failing
// comparison (e.g. Errc::gone when a process exited, Errc::permission without ptrace rights).
[[nodiscard]] Expected<std::vector<FdGroup>> group_by_open_file(std::span<const FdRef> fds,
                                                                const FileCompare& cmp = kcmp_compare(),
                                                                const FileEqual& eq = {});

// The same grouping as one number per fd: ids[i] is the open file description of fds[i], numbered
// 0, 1, ... in the order of their first members (the index of its group in group_by_open_file's
// answer). For callers that keep their own per-fd records: nothing is allocated per description.
[[nodiscard]] Expected<std::vector<size_t>> open_file_ids(std::span<const FdRef> fds,
                                                          const FileCompare& cmp = kcmp_compare(),
                                                          const FileEqual& eq = {});

// Closes the caller's fds `fds` (each open, no duplicates; the vector is sorted in place): one
// close_range() per run of consecutive numbers (Linux 5.9; a run holds only fds of the list, so
// nothing else is closed), close() where a run is one fd or close_range is missing. Returns the
// number of calls made.
size_t close_fds(std::vector<int>& fds);

}  // namespace pipecr::sys
