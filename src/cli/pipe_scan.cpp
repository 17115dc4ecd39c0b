// pipe_scan.cpp: see pipe_scan.hpp.
#include "cli/pipe_scan.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <set>

#include <fmt/format.h>

#include "sys/fdgroup.hpp"
#include "sys/file_kind.hpp"
#include "sys/syscalls.hpp"
#include "sys/unix_peek.hpp"

namespace pipecr::cli {
namespace {

constexpr int kKernelLargefile = 0100000;  // glibc's O_LARGEFILE is 0 on 64-bit


// Adds pid's pipe and FIFO fds to the scan.
Expected<void> scan_fds(pid_t pid, Scan& scan) {
  auto fds = sys::list_fds(pid);
  if (!fds) return tl::unexpected(fds.error());
  for (const sys::FdEntry& e : *fds) {
    bool anon = sys::pipe_inode_from_link(e.target).has_value();
    if (!anon && (e.target.empty() || e.target[0] != '/')) continue;
    struct stat st {};
    if (::stat(fmt::format("/proc/{}/fd/{}", pid, e.fd).c_str(), &st) < 0 || !S_ISFIFO(st.st_mode)) continue;
    auto info = sys::read_fdinfo(pid, e.fd);
    if (!info) continue;  // closed meanwhile
    PipeView& p = scan.pipes[PipeKey{st.st_dev, st.st_ino}];
    p.dev = st.st_dev;
    p.ino = st.st_ino;
    p.fifo = !anon;
    if (!anon) p.path = e.target;
    p.fds.push_back(Holder{pid, e.fd, info->flags});
    scan.pipe_fds.insert({pid, e.fd});
  }
  return {};
}

// The path a thread passed to open()/openat() while it waits in wait_for_partner, resolved
// against its cwd or dirfd; nullopt when it cannot be read.
std::optional<std::string> open_path(pid_t pid, const sys::TaskSyscall& s) {
  uint64_t addr = 0, dirfd = static_cast<uint64_t>(AT_FDCWD);
  if (s.nr == 2) addr = s.args[0];                               // open(path, flags)
  else if (s.nr == 257 || s.nr == 437) addr = s.args[1], dirfd = s.args[0];  // openat, openat2
  else return std::nullopt;
  char buf[PATH_MAX];
  iovec local{buf, sizeof buf - 1};
  iovec remote{reinterpret_cast<void*>(addr), sizeof buf - 1};
  ssize_t n = ::process_vm_readv(pid, &local, 1, &remote, 1, 0);
  if (n <= 0) return std::nullopt;
  std::string path(buf, strnlen(buf, static_cast<size_t>(n)));
  if (path.empty() || path[0] == '/') return path;
  int dfd = static_cast<int>(dirfd);
  std::string base = dfd == AT_FDCWD ? fmt::format("/proc/{}/cwd", pid) : fmt::format("/proc/{}/fd/{}", pid, dfd);
  return base + "/" + path;
}

// Threads of pid with an fd table of their own (unshare(CLONE_FILES)): kcmp(KCMP_FILES) against
// the leader and against the tables already found. Their fds are scanned as "TID:FD" (/proc/TID
// shows the thread's own table; sys::pidfd_open gives a thread pidfd for it).
std::vector<pid_t> own_table_threads(pid_t pid) {
  std::vector<pid_t> own;
  auto tids = sys::list_threads(pid);
  if (!tids || tids->size() < 2) return own;
  auto same = [](pid_t a, pid_t b) { return ::syscall(SYS_kcmp, a, b, 2 /* KCMP_FILES */, 0, 0) == 0; };
  for (pid_t tid : *tids) {
    if (tid == pid || same(pid, tid)) continue;
    if (std::none_of(own.begin(), own.end(), [&](pid_t o) { return same(o, tid); })) own.push_back(tid);
  }
  return own;
}

// Records every thread of pid blocked in read/write on a pipe fd, or in open() of a FIFO.
void scan_tasks(pid_t pid, Scan& scan, std::map<std::pair<pid_t, int>, std::vector<Stuck>>& by_fd) {
  auto tids = sys::list_threads(pid);
  if (!tids) return;
  for (pid_t tid : *tids) {
    auto s = sys::read_task_syscall(pid, tid);
    if (!s) continue;
    if (auto b = sys::blocked_io(*s)) {
      if (scan.pipe_fds.count({pid, b->fd}))
        by_fd[{pid, b->fd}].push_back(Stuck{pid, tid, b->fd, b->dir, b->wchan, b->call});
      continue;
    }
    if (s->wchan != "wait_for_partner") continue;
    auto path = open_path(pid, *s);
    struct stat st {};
    if (!path || ::stat(path->c_str(), &st) < 0 || !S_ISFIFO(st.st_mode)) continue;
    PipeView& p = scan.pipes[PipeKey{st.st_dev, st.st_ino}];
    p.dev = st.st_dev;
    p.ino = st.st_ino;
    p.fifo = true;
    if (p.path.empty()) {
      auto real = path->rfind("/proc/", 0) == 0 ? std::optional<std::string>() : path;
      p.path = real ? *real : *path;
    }
    scan.comms.emplace(pid, sys::read_comm(pid).value_or("?"));
    uint64_t oflags = s->nr == 2 ? s->args[1] : s->nr == 257 ? s->args[2] : O_RDWR;
    Blocked want = (oflags & O_ACCMODE) == O_RDONLY ? Blocked::reading
                   : (oflags & O_ACCMODE) == O_WRONLY ? Blocked::writing : Blocked::none;
    p.stuck.push_back(Stuck{pid, tid, -1, want, s->wchan, "open"});
  }
}

// Capacity and bytes queued through a copy of one end; the copy is closed right away.
void measure(PipeView& p, std::map<pid_t, sys::UniqueFd>& pidfds) {
  for (const Holder& h : p.fds) {
    if (h.fd < 0) {  // an end in flight: pipecr holds a copy
      auto cap = sys::get_pipe_size(h.copy);
      auto q = sys::bytes_queued(h.copy);
      if (cap) p.capacity = *cap;
      if (q) p.bytes = *q;
      return;
    }
    auto it = pidfds.find(h.pid);
    if (it == pidfds.end()) {
      auto pidfd = sys::pidfd_open(h.pid);
      if (!pidfd) continue;
      it = pidfds.emplace(h.pid, std::move(*pidfd)).first;
    }
    auto copy = sys::pidfd_getfd(it->second.get(), h.fd, h.pid);
    if (!copy) continue;
    auto cap = sys::get_pipe_size(copy->get());
    auto q = sys::bytes_queued(copy->get());
    if (cap) p.capacity = *cap;
    if (q) p.bytes = *q;
    return;
  }
}

// The pipe ends queued in the unix sockets of pid (pipe_scan.hpp): holders with fd -1, whose
// copies go into `keep` until the ends are grouped.
void scan_in_flight(pid_t pid, Scan& scan, std::set<uint64_t>& sockets, std::vector<sys::UniqueFd>& keep) {
  static const std::string mine = sys::socket_tagging_groups(::getpid());
  if (pid == ::getpid() || sys::socket_tagging_groups(pid) != mine) return;
  auto fds = sys::list_fds(pid, true);
  if (!fds) return;
  sys::UniqueFd pidfd;
  for (const sys::FdEntry& e : *fds) {
    if (e.target.rfind("socket:[", 0) != 0) continue;
    if (!pidfd) {
      auto p = sys::pidfd_open(pid);
      if (!p) return;
      pidfd = std::move(*p);
    }
    auto sock = sys::pidfd_getfd(pidfd.get(), e.fd, pid);
    if (!sock) continue;
    struct stat st {};
    if (::fstat(sock->get(), &st) < 0 || sys::classify(sock->get(), st) != sys::FileKind::unix_socket) continue;
    if (!sockets.insert(st.st_ino).second) continue;  // one queue per socket
    int off = 0;
    socklen_t len = sizeof off;
    if (::getsockopt(sock->get(), SOL_SOCKET, SO_PEEK_OFF, &off, &len) < 0 || off != -1) continue;
    auto q = sys::peek_unix_queue(sock->get());
    if (!q) continue;
    for (sys::PeekedMessage& m : q->with_files)
      for (sys::UniqueFd& f : m.fds) {
        struct stat fst {};
        if (::fstat(f.get(), &fst) < 0) continue;
        sys::FileKind kind = sys::classify(f.get(), fst);
        if (kind != sys::FileKind::pipe && kind != sys::FileKind::fifo) continue;
        int fl = ::fcntl(f.get(), F_GETFL);
        PipeView& p = scan.pipes[PipeKey{fst.st_dev, fst.st_ino}];
        p.dev = fst.st_dev;
        p.ino = fst.st_ino;
        p.fifo = kind == sys::FileKind::fifo;
        if (p.fifo && p.path.empty()) {
          char link[PATH_MAX];
          ssize_t n = ::readlink(fmt::format("/proc/self/fd/{}", f.get()).c_str(), link, sizeof link);
          if (n > 0) p.path.assign(link, static_cast<size_t>(n));
        }
        p.fds.push_back(Holder{pid, -1, fl < 0 ? 0 : fl & ~O_CLOEXEC, e.fd, m.index, f.get()});
        keep.push_back(std::move(f));
      }
  }
}

void group_ends(PipeView& p) {
  std::vector<sys::FdRef> refs;
  const pid_t self = ::getpid();
  for (const Holder& h : p.fds)
    refs.push_back(h.fd < 0 ? sys::FdRef{self, h.copy, p.ino} : sys::FdRef{h.pid, h.fd, p.ino});
  auto ids = sys::open_file_ids(refs);  // numbered by first fd: the ends in the order of their first holder
  if (!ids) {  // kcmp refused: one end per fd
    for (const Holder& h : p.fds) p.ends.push_back(End{{h}});
    return;
  }
  for (size_t k = 0; k < p.fds.size(); ++k) {
    const size_t end = (*ids)[k];
    if (end == p.ends.size()) p.ends.emplace_back();
    p.ends[end].holders.push_back(p.fds[k]);
  }
}

}  // namespace

std::string strip_deleted(std::string s) {
  constexpr std::string_view kDel = " (deleted)";
  if (s.size() > kDel.size() && s.compare(s.size() - kDel.size(), kDel.size(), kDel) == 0)
    s.resize(s.size() - kDel.size());
  return s;
}

Expected<Scan> scan_system(const std::vector<pid_t>& targets, bool in_flight) {
  Scan scan;
  bool named = !targets.empty();
  std::vector<pid_t> pids = targets;
  if (!named) {
    auto all = sys::list_pids();
    if (!all) return tl::unexpected(all.error());
    pids = std::move(*all);
  }
  std::vector<pid_t> seen;
  for (pid_t pid : pids) {
    auto r = scan_fds(pid, scan);
    if (!r) {
      if (named) return tl::unexpected(r.error());
      ++scan.skipped;
      continue;
    }
    seen.push_back(pid);
    scan.comms.emplace(pid, sys::read_comm(pid).value_or("?"));
    for (pid_t tid : own_table_threads(pid))
      if (scan_fds(tid, scan)) scan.comms.emplace(tid, sys::read_comm(pid).value_or("?"));
  }
  std::vector<sys::UniqueFd> copies;  // of the ends in flight, until they are grouped
  std::set<uint64_t> sockets;
  if (in_flight)
    for (pid_t pid : seen) scan_in_flight(pid, scan, sockets, copies);
  std::map<std::pair<pid_t, int>, std::vector<Stuck>> by_fd;
  for (pid_t pid : seen) scan_tasks(pid, scan, by_fd);
  std::map<pid_t, sys::UniqueFd> pidfds;
  for (auto& [key, p] : scan.pipes) {
    measure(p, pidfds);
    group_ends(p);
    for (const Holder& h : p.fds) {
      auto it = by_fd.find({h.pid, h.fd});
      if (it != by_fd.end()) p.stuck.insert(p.stuck.end(), it->second.begin(), it->second.end());
    }
    for (Holder& h : p.fds) h.copy = -1;
    for (End& e : p.ends)
      for (Holder& h : e.holders) h.copy = -1;
  }
  return scan;
}

const char* access_of(int flags) {
  switch (flags & O_ACCMODE) {
    case O_RDONLY: return "r";
    case O_WRONLY: return "w";
    default: return "rw";
  }
}

std::vector<std::string> flag_names(int flags) {
  std::vector<std::string> out;
  if (flags & O_NONBLOCK) out.emplace_back("O_NONBLOCK");
  if (flags & O_DIRECT) out.emplace_back("O_DIRECT");
  if (flags & O_ASYNC) out.emplace_back("O_ASYNC");
  if (flags & kKernelLargefile) out.emplace_back("O_LARGEFILE");
  if (flags & O_APPEND) out.emplace_back("O_APPEND");
  return out;
}

// Short codes for the state of a pipe, most alarming first.
std::vector<std::string> states(const PipeView& p) {
  bool readers = false, writers = false, wblocked = false, rblocked = false;
  for (const Holder& h : p.fds) {
    int acc = h.flags & O_ACCMODE;
    readers |= acc != O_WRONLY;
    writers |= acc != O_RDONLY;
  }
  for (const Stuck& s : p.stuck) {
    if (s.fd < 0) continue;  // in open(): not yet an end
    wblocked |= s.dir == Blocked::writing;
    rblocked |= s.dir == Blocked::reading;
  }
  std::vector<std::string> st;
  if (wblocked) st.emplace_back("writer_blocked");
  if (rblocked) st.emplace_back("reader_blocked");
  bool opening = std::any_of(p.stuck.begin(), p.stuck.end(), [](const Stuck& s) { return s.fd < 0; });
  if (opening) st.emplace_back("open_waiting");
  if (!readers && !p.fds.empty()) st.emplace_back("no_reader");
  if (!writers && !p.fds.empty()) st.emplace_back("no_writer");
  if (p.bytes && p.capacity && *p.bytes >= *p.capacity) st.emplace_back("full");
  if (p.bytes && *p.bytes == 0) st.emplace_back("empty");
  return st;
}

}  // namespace pipecr::cli
