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
// on different inodes never share an open file description), and kcmp runs only inside a bucket.
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

// Group fds by open file description. Groups come in the order of their first member in `fds`;
// members in input order. Duplicate (pid, fd) entries land in the same group. Errors: the first
// failing comparison (e.g. Errc::gone when a process exited, Errc::permission without ptrace rights).
[[nodiscard]] Expected<std::vector<FdGroup>> group_by_open_file(std::span<const FdRef> fds,
                                                                const FileCompare& cmp = kcmp_compare());

}  // namespace pipecr::sys
