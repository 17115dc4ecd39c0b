// restore/links.cpp: what a replacement cuts off, said rather than done in silence.
//
// The kernel drops an epoll watch when the watched file is released, so a target whose epoll
// instance watches a file that the restore replaces stops hearing from it, unless the restore adds
// the watch again (epoll.hpp: the watches the image records). The plan names every other one: for
// every replaced fd of a target's fd table, the epoll instances of that table (fds whose link is
// anon_inode:[eventpoll]; a thread's own table is /proc/PID/task/TID) are read from its fdinfo
// ("tfd: N events: E data: D ... ino: I"),
// and a watch on that fd number whose inode is the inode the target holds there now, and that is
// not re-added, is a watch the restore cuts (the image does not record it: made by an older pipecr,
// or added after the dump).
#include "restore/links.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string_view>
#include <unordered_map>
#include <unordered_set>

#include <fmt/format.h>

#include "restore/epoll.hpp"
#include "restore/plan.hpp"
#include "sys/proc.hpp"

namespace pipecr::restore {
namespace {

struct Watch {
  int tfd = -1;
  uint64_t ino = 0;
};

// The watches of one epoll instance, from its fdinfo text.
std::vector<Watch> parse_watches(const std::string& text) {
  std::vector<Watch> out;
  size_t at = 0;
  while ((at = text.find("tfd:", at)) != std::string::npos) {
    Watch w;
    const char* p = text.c_str() + at + 4;
    w.tfd = static_cast<int>(std::strtol(p, nullptr, 10));
    size_t eol = text.find('\n', at);
    size_t ino = text.find("ino:", at);
    if (ino != std::string::npos && (eol == std::string::npos || ino < eol))
      w.ino = std::strtoull(text.c_str() + ino + 4, nullptr, 16);
    out.push_back(w);
    at += 4;
  }
  return out;
}

}  // namespace

std::vector<std::string> cut_links_notes(const Plan& plan) {
  std::vector<std::string> notes;
  for (const Holder& h : plan.holders) {
    if (h.exec) continue;
    std::unordered_set<int> replaced;
    for (const PlannedFd& f : h.fds)
      if (!f.keep) replaced.insert(f.rec->fd);
    if (replaced.empty()) continue;
    // The holder's table: the process's, or the own table of h.thread (/proc/PID/task/TID).
    const std::string dir =
        h.thread ? fmt::format("/proc/{}/task/{}", h.target, h.thread) : fmt::format("/proc/{}", h.target);
    sys::UniqueFd fd_dir;
    auto fds = sys::list_task_fds(h.target, h.thread ? h.thread : h.target, fd_dir);
    if (!fds) continue;
    for (int fd : *fds) {
      char link[64];
      const ssize_t n = ::readlinkat(fd_dir.get(), fmt::format("{}", fd).c_str(), link, sizeof link);
      if (std::string_view(link, n > 0 ? static_cast<size_t>(n) : 0) != "anon_inode:[eventpoll]") continue;
      auto info = sys::read_proc_file(fmt::format("{}/fdinfo/{}", dir, fd));
      if (!info) continue;
      for (const Watch& w : parse_watches(*info)) {
        if (!replaced.count(w.tfd)) continue;
        struct stat st {};
        if (::stat(fmt::format("{}/fd/{}", dir, w.tfd).c_str(), &st) < 0 || st.st_ino != w.ino) continue;
        if (epoll_watch_readded(plan, h, fd, w.tfd)) continue;
        notes.push_back(fmt::format("fd {} of {} is watched by its epoll fd {}, a watch the image does not "
                                    "record: it stays on the file being replaced, so the {} will not hear from "
                                    "the restored pipe there",
                                    w.tfd, table_name(h), fd, h.thread ? "thread" : "process"));
      }
    }
  }
  return notes;
}

}  // namespace pipecr::restore
