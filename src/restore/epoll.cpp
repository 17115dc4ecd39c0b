// restore/epoll.cpp: see epoll.hpp.
#include "restore/epoll.hpp"

#include <sys/epoll.h>
#include <unistd.h>

#include <map>
#include <set>
#include <tuple>
#include <unordered_map>

#include <fmt/format.h>

#include "restore/plan.hpp"
#include "sys/file_kind.hpp"
#include "sys/syscalls.hpp"

namespace pipecr::restore {
namespace {

// fd of h's table in /proc: the process's table, or the own table of h.thread.
std::string fd_path(const Holder& h, int fd) {
  return h.thread ? fmt::format("/proc/{}/task/{}/fd/{}", h.target, h.thread, fd)
                  : fmt::format("/proc/{}/fd/{}", h.target, fd);
}

// Whether fd of h's table is an epoll now (its /proc link).
bool is_epoll_now(const Holder& h, int fd) {
  char link[64];
  ssize_t n = ::readlink(fd_path(h, fd).c_str(), link, sizeof link);
  constexpr std::string_view kEpoll = "anon_inode:[eventpoll]";
  return n == static_cast<ssize_t>(kEpoll.size()) && std::string_view(link, kEpoll.size()) == kEpoll;
}

// Whether fd of h's table is free now (nothing open at that number).
bool free_now(const Holder& h, int fd) {
  struct stat st {};
  return ::lstat(fd_path(h, fd).c_str(), &st) < 0 && errno == ENOENT;
}

const PlannedFd* planned_at(const Holder& h, int fd) {
  for (const PlannedFd& f : h.fds)
    if (f.rec->fd == fd) return &f;
  return nullptr;
}

// Whether the holder receives file anew at some fd.
bool installs(const Holder& h, uint64_t file) {
  for (const PlannedFd& f : h.fds)
    if (!f.keep && f.rec->file_id == file) return true;
  return false;
}

std::string fd_list(const std::vector<int>& fds) {
  constexpr size_t kShown = 8;
  std::string s;
  for (size_t i = 0; i < fds.size() && i < kShown; ++i) s += fmt::format("{}{}", i ? ", " : "", fds[i]);
  if (fds.size() > kShown) s += fmt::format(" and {} more", fds.size() - kShown);
  return s;
}

}  // namespace

void plan_epoll(const Image& img, Plan& plan) {
  if (img.epoll_watches.empty()) return;
  std::map<std::pair<int32_t, int32_t>, size_t> holder_of;  // (recorded pid, tid or 0) -> its table's holder
  for (size_t i = 0; i < plan.holders.size(); ++i) {
    const Holder& h = plan.holders[i];
    if (!h.exec) holder_of.emplace(std::pair(h.recorded, h.thread), i);
  }
  std::set<uint64_t> replaced;  // files some target receives anew
  for (const Holder& h : plan.holders)
    if (!h.exec)
      for (const PlannedFd& f : h.fds)
        if (!f.keep) replaced.insert(f.rec->file_id);
  using Key = std::tuple<uint64_t, uint64_t, int>;  // (epoll instance, file, fd): one watch
  std::map<Key, std::string> missed;                // watches not re-added (yet), and why
  std::map<std::pair<size_t, int>, std::vector<int>> readded;  // (holder, epoll fd) -> fds
  std::map<std::pair<size_t, int>, bool> epoll_now;
  for (const EpollWatch& w : img.epoll_watches) {
    if (!replaced.count(w.file_id)) continue;  // kept in place (the watch stands), or not restored
    const Key key{w.epoll_id, w.file_id, w.fd};
    if (plan.epoll.readded.count(key)) continue;  // through another fd of that epoll
    auto hi = holder_of.find({w.pid, w.tid});
    if (hi == holder_of.end()) {
      missed.emplace(key, fmt::format("epoll fd {} of recorded {} watched fd {} (file {}): that {} is not restored, so "
                                      "the watch cannot follow the restored pipe",
                                      w.epoll_fd,
                                      w.tid ? fmt::format("thread {} of process {}", w.tid, w.pid)
                                            : fmt::format("process {}", w.pid),
                                      w.fd, w.file_id, w.tid ? "thread's fd table" : "process"));
      continue;
    }
    const Holder& h = plan.holders[hi->second];
    const PlannedFd* f = planned_at(h, w.fd);
    const bool direct = f && !f->keep && f->rec->file_id == w.file_id;
    const bool through = !direct && f && !f->keep && installs(h, w.file_id);
    // The watch was added through an fd closed since (zdtm epoll's fd 999), and that number is free
    // in the target now and stays so: the agent puts the watched file there for the ADD, then closes
    // it again. The watch stays while the file lives at its own numbers.
    const bool closed_since = !f && installs(h, w.file_id) && free_now(h, w.fd);
    if (!direct && !through && !closed_since) {
      const char* why = !f        ? (installs(h, w.file_id) ? "leaves empty but is in use in the target now"
                                                            : "leaves empty while the process receives none of the watched file")
                        : f->keep ? "keeps as it is"
                                  : "gives another file while the process receives none of the watched one";
      missed.emplace(key, fmt::format("epoll fd {} of {} watched file {} through fd {}, which this restore "
                                      "{}: the watch is not re-added",
                                      w.epoll_fd, table_name(h), w.file_id, w.fd, why));
      continue;
    }
    auto [it, fresh] = epoll_now.emplace(std::pair(hi->second, w.epoll_fd), false);
    if (fresh) it->second = is_epoll_now(h, w.epoll_fd);
    if (!it->second) {
      missed.emplace(key, fmt::format("epoll fd {} of {} is closed or no longer an epoll: its watch of fd {} "
                                      "is not re-added",
                                      w.epoll_fd, table_name(h), w.fd));
      continue;
    }
    plan.epoll.readded.insert(key);
    missed.erase(key);
    EpollReAdd add{hi->second, w.epoll_fd, w.fd, w.events, w.data, w.file_id, w.epoll_id};
    if (through) {
      add.final_file = f->rec->file_id;
      add.final_cloexec = f->rec->cloexec;
    }
    add.close_after = closed_since;
    plan.epoll.adds.push_back(add);
    readded[{hi->second, w.epoll_fd}].push_back(w.fd);
  }
  for (auto& [at, fds] : readded)
    plan.notes.push_back(fmt::format("epoll fd {} of {}: {} re-added on the restored pipe ends (fd {})", at.second,
                                     table_name(plan.holders[at.first]),
                                     fds.size() == 1 ? std::string("1 watch") : fmt::format("{} watches", fds.size()),
                                     fd_list(fds)));
  for (auto& [key, why] : missed)
    if (!plan.epoll.readded.count(key)) plan.notes.push_back(why);
}

bool epoll_watch_readded(const Plan& plan, const Holder& h, int epoll_fd, int fd) {
  if (plan.img == nullptr) return false;
  for (const EpollWatch& w : plan.img->epoll_watches)
    if (w.pid == h.recorded && w.tid == h.thread && w.epoll_fd == epoll_fd && w.fd == fd &&
        plan.epoll.readded.count({w.epoll_id, w.file_id, w.fd}))
      return true;
  return false;
}

Expected<std::vector<sys::AgentOp>> epoll_ops(const Plan& plan, const Built& built, size_t holder_index) {
  std::vector<sys::AgentOp> ops;
  const Holder& h = plan.holders[holder_index];
  sys::UniqueFd pidfd, trial;
  std::set<int> checked;
  for (const EpollReAdd& a : plan.epoll.adds) {
    if (a.holder != holder_index) continue;
    if (!pidfd) {
      auto p = sys::pidfd_open(h.thread ? h.thread : h.target);  // a thread's pidfd reads its own table
      if (!p) return tl::unexpected(p.error());
      pidfd = std::move(*p);
      trial.reset(::epoll_create1(EPOLL_CLOEXEC));
      if (!trial) return tl::unexpected(sys::call_error("epoll_create1", "EPOLL_CLOEXEC"));
    }
    // The target is stopped: what its fd holds now is what the agent will find at the commit.
    if (checked.insert(a.epoll_fd).second) {
      auto copy = sys::pidfd_getfd(pidfd.get(), a.epoll_fd, h.target);
      if (!copy || sys::classify(copy->get()) != sys::FileKind::epoll)
        return fail(Errc::gone, ESTALE,
                    fmt::format("fd {} of the target is no longer an epoll (closed or replaced since the plan), so "
                                "its watch of fd {} cannot be re-added; nothing was changed: run the restore again",
                                a.epoll_fd, a.fd));
    }
    // The kernel's checks of this watch, on the very file the agent installs, in an epoll of pipecr's.
    if (auto it = built.files.find(a.file_id); it != built.files.end()) {
      epoll_event ev{};
      ev.events = a.events;
      ev.data.u64 = a.data;
      if (::epoll_ctl(trial.get(), EPOLL_CTL_ADD, it->second.get(), &ev) < 0)
        return tl::unexpected(sys::call_error(
            "epoll_ctl", fmt::format("EPOLL_CTL_ADD, events {:#x}: the watch of fd {} by epoll fd {} cannot be re-added "
                                     "on the restored pipe; nothing was changed",
                                     a.events, a.fd, a.epoll_fd)));
      (void)::epoll_ctl(trial.get(), EPOLL_CTL_DEL, it->second.get(), nullptr);
    }
    if (a.close_after) {
      // The number must still be free (the target is stopped: what it holds now is what the agent
      // finds at the commit); the watched file goes there for the ADD and the number is closed again.
      if (auto probe = sys::pidfd_getfd(pidfd.get(), a.fd, h.target); probe || probe.error().err != EBADF)
        return fail(Errc::gone, ESTALE,
                    fmt::format("fd {} of the target is in use now (it was closed at the dump), so the watch of epoll "
                                "fd {} keyed by it cannot be re-added; nothing was changed: run the restore again",
                                a.fd, a.epoll_fd));
      auto watched = built.files.find(a.file_id);
      if (watched == built.files.end())
        return fail(Errc::system, EINVAL, fmt::format("epoll fd {}: file {} of fd {} was not built", a.epoll_fd,
                                                      a.file_id, a.fd));
      ops.push_back(sys::AgentOp{sys::AgentOp::install, a.fd, 0, 0, 0, watched->second.get()});
      ops.push_back(sys::AgentOp{sys::AgentOp::epoll_add, a.fd, a.epoll_fd, a.events, a.data, -1});
      ops.push_back(sys::AgentOp{sys::AgentOp::close_fd, a.fd, 0, 0, 0, -1});
      continue;
    }
    if (a.final_file == 0) {
      ops.push_back(sys::AgentOp{sys::AgentOp::epoll_add, a.fd, a.epoll_fd, a.events, a.data, -1});
      continue;
    }
    // The watched file at fd for the ADD, then the file fd ends up with, back (both are files this
    // target receives: built, and sent with its other files).
    auto watched = built.files.find(a.file_id), final = built.files.find(a.final_file);
    if (watched == built.files.end() || final == built.files.end())
      return fail(Errc::system, EINVAL, fmt::format("epoll fd {}: file {} or {} of fd {} was not built", a.epoll_fd,
                                                    a.file_id, a.final_file, a.fd));
    ops.push_back(sys::AgentOp{sys::AgentOp::install, a.fd, 0, 0, 0, watched->second.get()});
    ops.push_back(sys::AgentOp{sys::AgentOp::epoll_add, a.fd, a.epoll_fd, a.events, a.data, -1});
    ops.push_back(sys::AgentOp{sys::AgentOp::install, a.fd, a.final_cloexec ? 1 : 0, 0, 0, final->second.get()});
  }
  return ops;
}

}  // namespace pipecr::restore
