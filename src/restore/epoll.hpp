// restore/epoll.hpp: epoll watches follow a replaced pipe end (issue 7, item 2).
//
// The kernel keys an epoll watch by (open file, fd number) and drops it when that open file is
// released. Refill in place keeps the open files, so every watch survives; a replaced end is a new
// open file, and the watches the image recorded on it (records EPOLL_WATCH, dump/epoll.hpp) are
// added again, in the same transaction, by the agent of the target that holds the epoll: an
// epoll_ctl(EPOLL_CTL_ADD) with the recorded events (EPOLLET, EPOLLONESHOT, EPOLLEXCLUSIVE and
// EPOLLWAKEUP included) and data, after the install of that fd, at the commit.
//
//   plan     plan_epoll(): for each recorded watch on a file that a target receives anew, in the
//            target that holds the epoll at the recorded number (an epoll held at several fds, or by
//            several targets, is one instance: re-added once, through its first holder in
//            command-line order). The watch is keyed by (file, fd number it was added with): where
//            the target receives the file at that number, the ADD follows the install; where that
//            number receives another file of the image (the program added the watch through a dup
//            it closed since, then reused the number: CRIU's zdtm epoll01), the agent puts the
//            watched file there for the ADD and the final file back; where the number was closed
//            at the dump and is free in the target (zdtm epoll's fd 999), the agent puts the
//            watched file there for the ADD and closes it again. The target's fd there must be
//            an epoll now (/proc); one it closed since the dump, an epoll held by a process that is
//            not restored, and a watch keyed by a number this restore keeps, or that was closed at
//            the dump and is in use in the target now, are notes.
//   install epoll_ops(), with the targets stopped: the agent operations of one target. Each epoll
//            fd is checked again (a pidfd_getfd() copy must be an epoll), and each watch is first
//            added to a private epoll of pipecr's on the very file being installed (events that
//            the kernel refuses, EINVAL for EPOLLEXCLUSIVE with EPOLLONESHOT, ENOSPC past
//            max_user_watches, fail here). A failure is an error of the transaction, which rolls
//            every target back with nothing changed. At the commit only an ENOMEM can still make
//            an ADD fail; the agent then reports it and the other operations have run.
//   undo     nothing: before the commit no operation has run.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "pipecr/error.hpp"
#include "pipecr/image.hpp"
#include "sys/agent.hpp"

namespace pipecr::restore {

struct Plan;
struct Built;
struct Holder;

// One watch to add again.
struct EpollReAdd {
  size_t holder = 0;     // index into Plan::holders: the target whose agent adds it
  int epoll_fd = -1;     // the epoll's fd in that target
  int fd = -1;           // the restored fd it is added with (installed by the same agent, before)
  uint32_t events = 0;
  uint64_t data = 0;
  uint64_t file_id = 0;  // the watched recorded file
  uint64_t epoll_id = 0; // the recorded epoll instance
  // Not 0: fd ends up holding this other recorded file (the watch was added through a dup closed
  // since, and fd reused): the agent installs file_id at fd, adds the watch, and installs this file
  // at fd again (with final_cloexec). The watch stays: it is keyed by (file, fd), and the file lives on
  // at its own numbers.
  uint64_t final_file = 0;
  bool final_cloexec = false;
  // fd ends up empty, as it was at the dump (the watch was added through a dup closed since): the
  // agent installs file_id at fd, adds the watch and closes fd again.
  bool close_after = false;
};

// What the plan re-adds.
struct EpollPlan {
  std::vector<EpollReAdd> adds;  // in image order
  std::set<std::tuple<uint64_t, uint64_t, int>> readded;  // (epoll instance, file, fd) of each
};

// Stage 1 (after the fds are selected and marked kept): fills plan.epoll_adds, and plan.notes with
// one line per epoll fd of a target that re-adds watches and one per watch that cannot be carried
// over. Reads the image and /proc only.
void plan_epoll(const Image& img, Plan& plan);

// Whether the watch of fd by epoll_fd in holder h (its recorded numbers) is among those re-added
// (links.cpp names the others).
[[nodiscard]] bool epoll_watch_readded(const Plan& plan, const Holder& h, int epoll_fd, int fd);

// Stage 3, target holder_index stopped: the agent operations that re-add its watches, to run after
// its installs. Errors (the transaction rolls back): the epoll fd is no longer an epoll
// (Errc::gone), the kernel refuses the watch on the new file (the epoll_ctl error).
[[nodiscard]] Expected<std::vector<sys::AgentOp>> epoll_ops(const Plan& plan, const Built& built, size_t holder_index);

}  // namespace pipecr::restore
