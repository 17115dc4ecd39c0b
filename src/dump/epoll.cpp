// dump/epoll.cpp: see epoll.hpp.
#include "dump/epoll.hpp"

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <map>
#include <optional>

#include <fmt/format.h>

#include "sys/fdgroup.hpp"
#include "sys/proc.hpp"
#include "sys/syscalls.hpp"

#ifndef KCMP_EPOLL_TFD
#define KCMP_EPOLL_TFD 7
#endif

namespace pipecr::dump {
namespace {

// The argument of kcmp(KCMP_EPOLL_TFD) (include/uapi/linux/kcmp.h).
struct KcmpEpollSlot {
  uint32_t efd;
  uint32_t tfd;
  uint32_t toff;
};

// The number after `key` in line, parsed in `base`; false when key is missing or no digit follows.
template <typename T>
bool field(std::string_view line, std::string_view key, int base, T& out) {
  size_t at = line.find(key);
  if (at == std::string_view::npos) return false;
  std::string rest(line.substr(at + key.size()));
  const char* p = rest.c_str();
  while (*p == ' ' || *p == '\t') ++p;
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(p, &end, base);
  if (end == p || errno != 0) return false;
  out = static_cast<T>(v);
  return true;
}

// kcmp(KCMP_EPOLL_TFD): whether the file at fd `file` of `file_at.pid` is the file watched at
// (tfd, toff) by the epoll at `epoll`. nullopt: no such watch (removed meanwhile).
Expected<std::optional<bool>> same_as_watched(FdAt file_at, FdAt epoll, int tfd, uint32_t toff) {
  KcmpEpollSlot slot{static_cast<uint32_t>(epoll.fd), static_cast<uint32_t>(tfd), toff};
  long r = ::syscall(SYS_kcmp, file_at.pid, epoll.pid, KCMP_EPOLL_TFD, file_at.fd, &slot);
  if (r >= 0) return std::optional<bool>(r == 0);
  if (errno == ENOENT) return std::optional<bool>();
  Error e = sys::call_error("kcmp", fmt::format("pid1={}, pid2={}, KCMP_EPOLL_TFD, fd={}, epoll fd={}, tfd={}",
                                                file_at.pid, epoll.pid, file_at.fd, epoll.fd, tfd));
  if (e.err == ESRCH) e.kind = Errc::gone;
  if (e.err == EOPNOTSUPP || e.err == ENOSYS) {
    e.kind = Errc::unsupported;
    e.what += " (this kernel lacks KCMP_EPOLL_TFD: CONFIG_CHECKPOINT_RESTORE)";
  }
  return tl::unexpected(e);
}

}  // namespace

Expected<std::vector<EpollFdinfoEntry>> parse_epoll_fdinfo(std::string_view text) {
  std::vector<EpollFdinfoEntry> out;
  size_t at = 0;
  while (at < text.size()) {
    size_t eol = text.find('\n', at);
    if (eol == std::string_view::npos) eol = text.size();
    std::string_view line = text.substr(at, eol - at);
    at = eol + 1;
    if (!line.starts_with("tfd:")) continue;
    EpollFdinfoEntry e;
    long long tfd = -1;
    if (!field(line, "tfd:", 10, tfd) || tfd < 0 || tfd > INT32_MAX || !field(line, "events:", 16, e.events) ||
        !field(line, "data:", 16, e.data))
      return fail(Errc::system, EIO, fmt::format("epoll fdinfo: cannot read the watch \"{}\"", line));
    e.tfd = static_cast<int>(tfd);
    (void)field(line, "ino:", 16, e.ino);
    out.push_back(e);
  }
  return out;
}

void EpollDump::found(size_t table, pid_t pid, pid_t tid, int fd, bool own, sys::UniqueFd copy) {
  epolls_.push_back(Epoll{table, pid, tid, fd, own, std::move(copy), 0});
}

bool EpollDump::all_copied() const {
  return std::all_of(epolls_.begin(), epolls_.end(), [](const Epoll& e) { return static_cast<bool>(e.copy); });
}

void EpollDump::drop_copies() {
  for (Epoll& e : epolls_) e.copy.reset();
}

// One id per epoll instance: the fds are grouped with kcmp(KCMP_FILE) (every epoll shares the one
// anon inode, so only kcmp tells instances apart).
Expected<void> EpollDump::group(bool copies) {
  std::vector<sys::FdRef> refs;
  pid_t self = ::getpid();
  for (const Epoll& e : epolls_) refs.push_back(copies ? sys::FdRef{self, e.copy.get(), 0} : sys::FdRef{e.tid, e.fd, 0});
  auto ids = sys::open_file_ids(refs);  // numbered by first fd, from 0
  if (!ids) return tl::unexpected(ids.error());
  stats_.epolls = 0;
  for (size_t i = 0; i < epolls_.size(); ++i) {
    epolls_[i].id = (*ids)[i] + 1;
    stats_.epolls = std::max(stats_.epolls, epolls_[i].id);
  }
  return {};
}

Expected<void> EpollDump::read(bool copies, const std::function<size_t(size_t, int)>& holder_at,
                               const std::function<std::vector<size_t>(size_t, uint64_t)>& same_inode,
                               const std::function<FdAt(size_t)>& reach) {
  if (epolls_.empty()) return {};
  if (auto g = group(copies); !g) return g;
  for (size_t e = 0; e < epolls_.size(); ++e)
    if (auto r = read_one(e, copies, holder_at, same_inode, reach); !r) return r;
  // A watch no table could attribute is lost; one instance held in two tables (a thread's copy of
  // the process's table) shows each table the watches added through the other too.
  std::map<size_t, uint64_t> lost;  // epoll fd -> watches lost
  for (const Miss& m : misses_)
    if (!attributed_.count({epolls_[m.epoll].id, m.tfd, m.toff})) ++lost[m.epoll];
  for (const auto& [ei, n] : lost) {
    const Epoll& e = epolls_[ei];
    stats_.unattributed += n;
    lost_.push_back(fmt::format("epoll fd {} of {}: {} not recorded: the {} no longer holds the watched pipe end at "
                                "any fd",
                                e.fd, e.own ? fmt::format("thread {} of process {}", e.tid, e.pid)
                                            : fmt::format("process {}", e.pid),
                                n == 1 ? "1 watch" : fmt::format("{} watches", n),
                                e.own ? "thread's own fd table" : "process"));
  }
  return {};
}

Expected<void> EpollDump::read_one(size_t ei, bool copies, const std::function<size_t(size_t, int)>& holder_at,
                                   const std::function<std::vector<size_t>(size_t, uint64_t)>& same_inode,
                                   const std::function<FdAt(size_t)>& reach) {
  const Epoll& e = epolls_[ei];
  const FdAt epoll = copies ? FdAt{::getpid(), e.copy.get()} : FdAt{e.tid, e.fd};
  const std::string path = copies ? fmt::format("/proc/self/fdinfo/{}", e.copy.get())
                                  : fmt::format("/proc/{}/task/{}/fdinfo/{}", e.pid, e.tid, e.fd);
  auto text = sys::read_proc_file(path, size_t{64} << 20);
  if (!text) {
    if (text.error().err == ENOENT && !copies) return {};  // closed meanwhile (a sharer of the table runs)
    return tl::unexpected(text.error());
  }
  auto entries = parse_epoll_fdinfo(*text);
  if (!entries) return tl::unexpected(entries.error());
  // Counted once per instance and table, not per fd of it.
  bool first = true;
  for (size_t k = 0; k < ei; ++k)
    if (epolls_[k].id == e.id && epolls_[k].table == e.table) first = false;
  std::map<int, uint32_t> seen;  // tfd -> watches with that number so far (KCMP_EPOLL_TFD's toff)
  uint64_t other = 0;
  for (const EpollFdinfoEntry& w : *entries) {
    uint32_t toff = seen[w.tfd]++;
    // First the pipe end at the watch's own number; then the other ends of that inode in the table
    // (the fd the watch was added with may have been closed, the file staying at another number).
    size_t at_fd = holder_at(e.table, w.tfd);
    std::vector<size_t> tries;
    if (at_fd != SIZE_MAX) tries.push_back(at_fd);
    for (size_t h : same_inode(e.table, w.ino))
      if (h != at_fd) tries.push_back(h);
    if (tries.empty()) {
      ++other;
      continue;
    }
    std::optional<size_t> found;
    bool gone = false;
    for (size_t h : tries) {
      auto same = same_as_watched(reach(h), epoll, w.tfd, toff);
      if (!same) return tl::unexpected(same.error());
      if (!*same) {
        gone = true;  // removed meanwhile
        break;
      }
      if (**same) {
        found = h;
        break;
      }
    }
    if (gone) continue;
    if (!found) {
      if (first) misses_.push_back(Miss{ei, w.tfd, toff});
      continue;
    }
    attributed_.insert({e.id, w.tfd, toff});
    watches_.push_back(Watch{ei, *found, w.tfd, w.events, w.data});
  }
  if (first) {
    stats_.watches += static_cast<uint64_t>(std::count_if(watches_.begin(), watches_.end(),
                                                          [&](const Watch& w) { return w.epoll == ei; }));
    stats_.other += other;
  }
  return {};
}

std::vector<EpollWatch> EpollDump::records(const std::function<uint64_t(size_t)>& file_of) const {
  std::vector<EpollWatch> out;
  for (const Watch& w : watches_) {
    const Epoll& e = epolls_[w.epoll];
    uint64_t file = file_of(w.holder);
    if (file == 0) continue;
    out.push_back(EpollWatch{e.id, e.pid, e.fd, file, w.fd, w.events, w.data, e.own ? e.tid : 0});
  }
  return out;
}

std::vector<std::string> EpollDump::notes() const { return lost_; }

}  // namespace pipecr::dump
