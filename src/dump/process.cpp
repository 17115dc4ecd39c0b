// dump/process.cpp: the dump of a set of running processes (see process.hpp).
//
// Three identities are collected separately, as the kernel keeps them: fd slots (from
// /proc/PID/task/TID/fd), open file descriptions (fd slots grouped with kcmp(KCMP_FILE), one
// pidfd_getfd() copy each, which is the same description and fires no events), and pipes (open
// file descriptions grouped by device and inode). Fd slots belong to fd *tables*: a process has
// one, shared by its threads, except for threads that called unshare(CLONE_FILES), and two
// processes made with clone(CLONE_FILES) share one; kcmp(KCMP_FILES) tells them apart.
//
// The work is split by what must be one moment and what may come after (docs/design.md, section
// 7). While the targets are stopped: per fd, one fstatat() through /proc (is it a pipe or FIFO,
// which inode) and one pidfd_getfd(); per pipe, one tee() into a shared scratch pipe
// (SnapshotPacker; FIONREAD only when the tee linked bytes). After they run again, from pipecr's
// own copies: the grouping into open file descriptions (F_DUPFD_QUERY, or kcmp, between the
// copies), the flags and FD_CLOEXEC (fdinfo), owner and signal, capacity, the copies closed in
// runs (close_range), and the slot walk. When pipecr's fd limit cannot hold a copy of every pipe fd at once,
// the copies are taken in batches and closed, and what needs a copy is read while stopped.
#include "dump/process.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <map>
#include <optional>
#include <set>
#include <unordered_map>

#include <fmt/format.h>

#include "dump/epoll.hpp"
#include "dump/pipe.hpp"
#include "dump/unix_queue.hpp"
#include "image/info.hpp"
#include "sys/agent.hpp"
#include "sys/file_kind.hpp"
#include "sys/fdgroup.hpp"
#include "sys/proc.hpp"
#include "sys/ptrace.hpp"
#include "sys/syscalls.hpp"
#include "sys/unix_peek.hpp"

#ifndef PIDFD_THREAD
#define PIDFD_THREAD O_EXCL
#endif

namespace pipecr::dump {
namespace {

constexpr std::string_view kDeleted = " (deleted)";

uint64_t now_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

// Adds "pid N" context to an error and names the kernel feature when the kernel lacks a call.
Error in_process(Error e, pid_t pid) {
  if (e.err == ENOSYS) {
    e.kind = Errc::unsupported;
    e.what += " (this kernel lacks it: pipecr dump needs pidfd_getfd (Linux 5.6+) and kcmp "
              "(CONFIG_KCMP); run `pipecr check`)";
  } else if (e.kind == Errc::gone && e.what.find(std::to_string(pid)) == std::string::npos) {
    e.what = fmt::format("process {}: {}", pid, e.what);
  }
  return e;
}

// A pidfd of one thread (PIDFD_THREAD, Linux 6.9+) or of a process: pidfd_getfd() takes the fd
// from the fd table of the task the pidfd names.
Expected<sys::UniqueFd> pidfd_of(pid_t pid, pid_t tid) {
  if (tid == pid) return sys::pidfd_open(pid);
  long fd = ::syscall(SYS_pidfd_open, tid, PIDFD_THREAD);
  if (fd < 0) {
    Error e = sys::call_error("pidfd_open", fmt::format("pid={}, PIDFD_THREAD", tid));
    if (e.err == EINVAL) {
      e.kind = Errc::unsupported;
      e.what += fmt::format(" (thread {} of process {} has its own fd table; reading it needs PIDFD_THREAD, "
                            "Linux 6.9+)",
                            tid, pid);
    } else if (e.err == ESRCH) {
      e.kind = Errc::gone;
    }
    return tl::unexpected(e);
  }
  return sys::UniqueFd(static_cast<int>(fd));
}

// RLIMIT_NOFILE raised to its hard limit for the dump's duration, and set back after.
class NofileRaise {
 public:
  NofileRaise() {
    if (::getrlimit(RLIMIT_NOFILE, &old_) != 0) return;
    rlimit up = old_;
    up.rlim_cur = old_.rlim_max;
    raised_ = up.rlim_cur != old_.rlim_cur && ::setrlimit(RLIMIT_NOFILE, &up) == 0;
  }
  ~NofileRaise() {
    if (raised_) ::setrlimit(RLIMIT_NOFILE, &old_);
  }
  NofileRaise(const NofileRaise&) = delete;
  NofileRaise& operator=(const NofileRaise&) = delete;
  [[nodiscard]] uint64_t soft() const {
    rlimit now{};
    ::getrlimit(RLIMIT_NOFILE, &now);
    return now.rlim_cur;
  }
  [[nodiscard]] uint64_t hard() const { return old_.rlim_max; }

 private:
  rlimit old_{};
  bool raised_ = false;
};

size_t open_fds_of_self() {
  auto fds = sys::list_fds(::getpid(), false);
  return fds ? fds->size() : 64;
}

struct Table {             // one fd table
  size_t proc = 0;         // index into procs_ of the process it belongs to
  pid_t pid = 0;           // that process
  pid_t tid = 0;           // a thread using it (the leader when the leader does)
  bool own = false;        // a thread's own table (unshare(CLONE_FILES)), not the process's
  sys::UniqueFd pidfd;     // of tid (PIDFD_THREAD when tid is not the leader)
  uint32_t max_fds = 0;    // FDSize: slots in the table, above every open fd
  uint32_t open_fds = 0;   // fds open in it (st_size of /proc/PID/task/TID/fd, Linux 6.2); 0: not known
};

struct Holder {            // one fd slot
  size_t table = 0;        // index into tables_
  int fd = -1;
  uint64_t ino = 0;
  dev_t dev = 0;           // FIFOs: the device of the inode (anonymous pipes: pipefs)
  PipeKind kind = PipeKind::anonymous;
  uint32_t uid = 0, gid = 0, mode = 0;  // of the inode
  std::string target;      // FIFO: readlink of the fd
  int flags = 0;           // fdinfo flags: F_GETFL of the open file, without O_CLOEXEC
  int access = -1;         // O_ACCMODE when known before the grouping (-1: not yet; group_files)
  bool cloexec = false;
  bool cloexec_known = false;  // cloexec read while stopped (the agent's survey): no fdinfo after the resume
  Blocked blocked = Blocked::none;
  size_t file = SIZE_MAX;  // index into files_
  size_t pipe = SIZE_MAX;  // index into pipes_
  sys::UniqueFd copy;      // pidfd_getfd() copy, while held (in flight: the peeked copy, kept to the end)
  size_t in_flight = SIZE_MAX;  // an end in flight (into in_flight_), not an fd: fd is -1
  Owner owner;             // batched mode: read from the copy before it was closed
  int32_t signal = 0;
  bool state_read = false;
};

struct OpenFile {          // one open file description
  FileRecord rec;
  size_t first_holder = 0;
  bool pollhup = false;    // FIFO read side: poll() showed POLLHUP when dumped
  bool state_read = false; // owner and signal read (batched mode: while stopped)
};

struct PipeState {
  PipeRecord rec;
  dev_t dev = 0;
  std::vector<size_t> holders;  // into holders_, in listing order
  SnapshotPacker::Piece piece;
  uint64_t seq = 0;        // order of the snapshot: pieces are read back in this order
  bool snapped = false;
  bool has_writer_file = false;
  bool capacity_read = false;
  // Whether a writer was open at the snapshot (an empty pipe's tee says so; SnapshotPacker::Writers):
  // for a FIFO reader without POLLHUP and no dumped writer, this replaces the outside scan.
  SnapshotPacker::Writers writers = SnapshotPacker::Writers::unknown;
};

class Dumper {
 public:
  explicit Dumper(const DumpOptions& opts) : opts_(opts) {}

  // The calling process as the one target (dump_self_pipe): no stop, no ptrace, no pidfd. Its fd
  // table is read by the same steps as a target's, with dup() for pidfd_getfd() and the fds asked
  // for (probe_self) instead of the whole table. What follows the probe is the path of run():
  // snapshots, grouping by kcmp, fdinfo, owner, signal, capacity, records, writer.
  Expected<DumpStats> run_self(int fd, image::Sink& sink, Image* records) {
    self_ = true;
    pid_t pid = ::getpid();
    pids_.push_back(pid);
    tables_.push_back(Table{.proc = 0, .pid = pid, .tid = static_cast<pid_t>(::gettid()), .own = false, .pidfd = {}});
    stats_.tables = 1;
    base_fds_ = open_fds_of_self();
    rlimit rl{};
    limit_ = ::getrlimit(RLIMIT_NOFILE, &rl) == 0 ? rl.rlim_cur : 1024;
    batch_ = SIZE_MAX;
    if (auto r = probe_self(fd); !r) return tl::unexpected(r.error());
    if (auto r = finish_snapshots(); !r) return tl::unexpected(r.error());
    if (auto r = packer_.settle(); !r) return tl::unexpected(r.error());
    packer_.seal();
    if (auto r = after_resume(); !r) return tl::unexpected(r.error());
    mark_outside_holders(true);
    return write(sink, records);
  }

  Expected<DumpStats> run(image::Sink& sink, Image* records) {
    const uint64_t start = now_ns();
    if (auto r = collect_processes(); !r) return tl::unexpected(r.error());
    NofileRaise nofile;
    base_fds_ = open_fds_of_self();
    // The code the survey agents return through, found while the targets still run (a scan of their
    // executable mappings: most of a millisecond each, kept out of the stop). Not for a process
    // holding too few fds for an agent to pay (counted now; the stop counts again): it is read
    // without one.
    if (opts_.survey_agent && !opts_.leave_stopped) {
      size_t spares = 0;
      for (pid_t pid : pids_) {
        const uint32_t fds = sys::open_fd_count(pid);
        if (fds != 0 && fds < kSurveyMinFds) {
          no_agent_.insert(pid);
        } else {
          gadgets_[pid] = sys::find_agent_gadgets(pid);
          spares += agent_scratch(fds) / 2;
        }
      }
      if (auto cp = sys::CommitPoint::create()) survey_commit_.emplace(std::move(*cp));  // else each agent makes one
      // Half the agents' scratch pipes made now (5-6 us each, for pipes that may hold nothing), the
      // rest while pipecr waits in the stop: only the first few messages leave it time for any.
      if (opts_.agent_tees && lend_ok()) packer_.make_spares(spares);
      base_fds_ += 2 * packer_.spares();
    }
    check_copies_harmless();  // /proc reads kept out of the stop (--tree adds the descendants found in it)
    stop_start_ = now_ns();
    stats_.before_stop_ns = stop_start_ - start;
    Expected<void> taken = stop_all();
    stats_.seize_ns = now_ns() - stop_start_;
    if (taken) taken = find_tables();
    if (taken) taken = read_fd_tables(nofile);
    if (taken) taken = finish_snapshots();
    if (taken) taken = packer_.settle();  // while the pipes still hold what they held at their tee
    if (taken && !epolls_after_resume()) taken = read_epolls(false);  // from the targets' fds, while stopped
    if (taken) mark_blocked();
    if (taken) {
      taken = check_alive();
    } else if (auto alive = check_alive(); !alive) {
      taken = alive;  // a target killed meanwhile explains the failure (EBADF, ESRCH...): exit 75
    }
    // Resume before anything else: from here on only pipecr's copies and scratch pipes are read.
    Expected<void> resumed = resume_all();
    stats_.stopped_ns = now_ns() - stop_start_;
    packer_.seal();
    if (!taken) return tl::unexpected(taken.error());
    if (!resumed) return tl::unexpected(resumed.error());
    const uint64_t resumed_at = now_ns();
    if (auto r = after_resume(); !r) return tl::unexpected(r.error());
    mark_outside_holders(!opts_.outside_holders);
    const uint64_t write_start = now_ns();
    stats_.after_resume_ns = write_start - resumed_at;
    auto written = write(sink, records);
    if (written) written->write_ns = now_ns() - write_start;
    return written;
  }

 private:
  Expected<void> add_process(pid_t pid) {
    if (std::find(pids_.begin(), pids_.end(), pid) != pids_.end()) return {};
    auto st = sys::read_stat(pid);
    if (!st) return tl::unexpected(in_process(st.error(), pid));
    if (st->state == 'Z' || st->state == 'X')
      return fail(Errc::gone, ESRCH, fmt::format("process {} ({}) has exited", pid, st->comm));
    ProcessRecord p{.pid = pid, .ppid = st->ppid, .comm = st->comm, .argv = {}};
    if (auto argv = sys::read_cmdline(pid)) p.argv = std::move(*argv);
    pids_.push_back(pid);
    procs_.push_back(std::move(p));
    return {};
  }

  Expected<void> collect_processes() {
    if (opts_.pids.empty()) return fail(Errc::invalid_argument, EINVAL, "no process to dump");
    for (pid_t pid : opts_.pids) {
      if (pid <= 0) return fail(Errc::invalid_argument, EINVAL, fmt::format("{} is not a process id", pid));
      if (pid == ::getpid()) return fail(Errc::invalid_argument, EINVAL, "pipecr cannot dump itself");
      if (auto r = add_process(pid); !r) return r;
    }
    return {};
  }

  // pidfd_getfd() of a socket re-tags it with the taker's cgroup v1 net_cls class id and net_prio
  // index (sys::socket_tagging_groups). Where pipecr and the target are in the same groups (always,
  // without those v1 controllers) that changes nothing, and pipecr may take every fd (and peek its
  // sockets' queues: a file received there is re-tagged as the target's own receive would); else it
  // takes pipes only, found through /proc.
  void check_copies_harmless() {
    if (harmless_.size() == pids_.size()) return;
    if (!my_groups_) my_groups_ = sys::socket_tagging_groups(::getpid());
    for (size_t i = harmless_.size(); i < pids_.size(); ++i)
      harmless_.push_back(sys::socket_tagging_groups(pids_[i]) == *my_groups_);
  }

  // Seizes every process; with --tree, goes on until no new descendant appeared (a stopped
  // process cannot fork, so this ends).
  Expected<void> stop_all() {
    for (size_t done = 0;;) {
      for (; done < pids_.size(); ++done) {
        auto s = sys::StoppedProcess::seize(pids_[done]);
        if (!s) return tl::unexpected(in_process(s.error(), pids_[done]));
        stopped_.push_back(std::move(*s));
      }
      if (!opts_.tree) return {};
      size_t before = pids_.size();
      for (size_t i = 0; i < before; ++i) {
        auto kids = sys::descendants(pids_[i]);
        if (!kids) continue;
        for (pid_t k : *kids)
          if (k != ::getpid())
            if (auto r = add_process(k); !r && r.error().kind != Errc::gone) return r;
      }
      if (pids_.size() == before) return {};
    }
  }

  // The fd tables: per process, the table of its first thread, plus one per thread whose table
  // differs (kcmp(KCMP_FILES) against the first: one call per thread). Then processes whose first
  // tables are one table (clone(CLONE_FILES) without CLONE_THREAD): grouped with the kcmp sort of
  // fdgroup.hpp, and listed once, under the first of them.
  Expected<void> find_tables() {
    for (size_t i = 0; i < stopped_.size(); ++i) {
      const std::vector<pid_t>& tids = stopped_[i]->threads();
      pid_t first = tids.front();
      tables_.push_back(Table{.proc = i, .pid = pids_[i], .tid = first, .own = false, .pidfd = {}});
      std::vector<pid_t> others;  // first threads of the extra tables
      for (size_t k = 1; k < tids.size(); ++k) {
        auto c = sys::kcmp_files(first, tids[k]);
        if (!c) {
          if (c.error().kind == Errc::gone) continue;  // that thread exited
          return tl::unexpected(in_process(c.error(), pids_[i]));
        }
        if (*c == 0) continue;
        bool known = false;
        for (pid_t o : others) {
          auto c2 = sys::kcmp_files(o, tids[k]);
          if (c2 && *c2 == 0) known = true;
        }
        if (known) continue;
        others.push_back(tids[k]);
        tables_.push_back(Table{.proc = i, .pid = pids_[i], .tid = tids[k], .own = true, .pidfd = {}});
      }
    }
    if (pids_.size() > 1) {
      std::vector<sys::FdRef> firsts;
      std::vector<size_t> table_of;
      for (size_t t = 0; t < tables_.size(); ++t)
        if (!tables_[t].own) {
          firsts.push_back(sys::FdRef{tables_[t].tid, 0, 0});
          table_of.push_back(t);
        }
      auto groups = sys::group_by_open_file(
          firsts, [](const sys::FdRef& a, const sys::FdRef& b) { return sys::kcmp_files(a.pid, b.pid); });
      if (!groups) return tl::unexpected(groups.error());
      std::vector<bool> drop(tables_.size(), false);
      for (const sys::FdGroup& g : *groups)
        for (size_t m = 1; m < g.members.size(); ++m) {
          auto at = std::find(firsts.begin(), firsts.end(), g.members[m]) - firsts.begin();
          size_t t = table_of[static_cast<size_t>(at)];
          pid_t sharer = tables_[t].pid;
          pid_t owner = tables_[table_of[static_cast<size_t>(
                                   std::find(firsts.begin(), firsts.end(), g.members[0]) - firsts.begin())]]
                            .pid;
          shared_.push_back(SharedFdTable{.pid = sharer, .with_pid = owner});
          drop[t] = true;
        }
      std::vector<Table> kept;
      for (size_t t = 0; t < tables_.size(); ++t)
        if (!drop[t]) kept.push_back(std::move(tables_[t]));
      tables_ = std::move(kept);
    }
    for (Table& t : tables_) {
      auto pfd = pidfd_of(t.pid, t.tid);
      if (!pfd) return tl::unexpected(in_process(pfd.error(), t.pid));
      t.pidfd = std::move(*pfd);
    }
    stats_.tables = tables_.size();
    return {};
  }

  // One fd table, slow path: its fd numbers (getdents), then one fstatat() per fd through the
  // /proc link, which says whether it is a pipe or FIFO and which inode. Each /proc lookup costs
  // several microseconds here (getdents instantiates a dentry per fd), which is why the fast path
  // below avoids them. Fds at or above `from` only.
  Expected<void> list_fd_table(size_t ti, int from) {
    const Table& t = tables_[ti];
    sys::UniqueFd dir;
    auto fds = sys::list_task_fds(t.pid, t.tid, dir);
    if (!fds) return tl::unexpected(in_process(fds.error(), t.pid));
    std::sort(fds->begin(), fds->end());
    char name[16];
    for (int fd : *fds) {
      if (fd < from) continue;
      *fmt::format_to_n(name, sizeof name - 1, "{}", fd).out = '\0';
      struct stat st {};
      if (::fstatat(dir.get(), name, &st, 0) < 0) continue;  // gone meanwhile
      if (!S_ISFIFO(st.st_mode)) {
        if ((st.st_mode & S_IFMT) == 0 && is_epoll_link(dir.get(), name))
          epolls_.found(ti, t.pid, t.tid, fd, t.own, sys::UniqueFd());
        continue;
      }
      Holder h;
      h.table = ti;
      h.fd = fd;
      set_inode(h, st);
      if (h.kind == PipeKind::fifo) {
        char link[PATH_MAX];
        ssize_t n = ::readlinkat(dir.get(), name, link, sizeof link);
        if (n < 0) continue;
        h.target.assign(link, static_cast<size_t>(n));
      }
      if (auto r = added(std::move(h)); !r) return r;
    }
    return {};
  }

  // An anonymous inode found through /proc: an epoll when its link says so (file_kind.hpp).
  static bool is_epoll_link(int dir, const char* name) {
    char link[64];
    ssize_t n = ::readlinkat(dir, name, link, sizeof link);
    constexpr std::string_view kEpoll = "anon_inode:[eventpoll]";
    return n == static_cast<ssize_t>(kEpoll.size()) && std::string_view(link, kEpoll.size()) == kEpoll;
  }

  // The epolls' watches can be read after the resume, from pipecr's copies, when it holds a copy of
  // every epoll and of every pipe end (the fast path); else they are read while stopped.
  bool epolls_after_resume() const { return !batched_ && epolls_.all_copied(); }

  // The watches of every epoll (dump/epoll.hpp), attributed to the pipe ends at their fd numbers.
  Expected<void> read_epolls(bool copies) {
    if (epolls_.empty()) return {};
    std::map<std::pair<size_t, int>, size_t> at;                   // (table, fd) -> holder
    std::map<std::pair<size_t, uint64_t>, std::vector<size_t>> ends;  // (table, inode) -> holders
    for (size_t i = 0; i < holders_.size(); ++i)
      if ((!copies || holders_[i].copy) && holders_[i].in_flight == SIZE_MAX) {  // an end in flight has no fd
        at.emplace(std::pair(holders_[i].table, holders_[i].fd), i);
        ends[{holders_[i].table, holders_[i].ino}].push_back(i);
      }
    pid_t self = ::getpid();
    auto r = epolls_.read(
        copies,
        [&](size_t table, int fd) {
          auto it = at.find({table, fd});
          return it == at.end() ? SIZE_MAX : it->second;
        },
        [&](size_t table, uint64_t ino) {
          auto it = ends.find({table, ino});
          return it == ends.end() ? std::vector<size_t>() : it->second;
        },
        [&](size_t h) {
          return copies ? FdAt{self, holders_[h].copy.get()} : FdAt{tables_[holders_[h].table].tid, holders_[h].fd};
        });
    epolls_.drop_copies();
    if (!r) return r;
    const EpollDumpStats& es = epolls_.stats();
    stats_.epolls = es.epolls;
    stats_.epoll_watches = es.watches;
    stats_.epoll_unattributed = es.unattributed;
    stats_.epoll_other = es.other;
    for (std::string& n : epolls_.notes()) stats_.notes.push_back(std::move(n));
    return {};
  }

  static void set_inode(Holder& h, const struct stat& st) {
    h.ino = st.st_ino;
    h.dev = st.st_dev;
    h.uid = st.st_uid;
    h.gid = st.st_gid;
    h.mode = st.st_mode & 07777;
    h.kind = st.st_dev == sys::pipefs_dev() ? PipeKind::anonymous : PipeKind::fifo;
  }

  // One fd table, fast path: pidfd_getfd() of every number below the table's size (FDSize) and
  // an fstat() of each copy; copies that are not pipes are closed at once. No /proc lookup per fd.
  // A table much larger than the fds in it (a lone high fd) would waste probes: after 4,096 more
  // misses than hits the rest is listed the slow way.
  Expected<void> probe_fd_table(size_t ti) {
    if (auto surveyed = survey_fd_table(ti); !surveyed || *surveyed)
      return surveyed ? Expected<void>{} : tl::unexpected(surveyed.error());
    const Table& t = tables_[ti];
    if (sparse(t)) return take_listed_fds(ti);
    size_t hits = 0, misses = 0;
    for (int fd = 0; fd < static_cast<int>(t.max_fds); ++fd) {
      if (misses > hits + 4096) return list_fd_table(ti, fd);
      auto copy = take_fd(t, fd);
      if (!copy) return tl::unexpected(copy.error());
      if (!*copy) {
        ++misses;
        continue;
      }
      ++hits;
      if (auto ok = take_copy(ti, fd, std::move(*copy), -1); !ok) return ok;
    }
    return {};
  }

  // A sparse table (sparse()), fast path: its fd numbers listed (one getdents of
  // /proc/PID/task/TID/fd) and a pidfd_getfd() of each, instead of one of every slot.
  Expected<void> take_listed_fds(size_t ti) {
    const Table& t = tables_[ti];
    sys::UniqueFd dir;
    auto fds = sys::list_task_fds(t.pid, t.tid, dir);
    if (!fds) return tl::unexpected(in_process(fds.error(), t.pid));
    std::sort(fds->begin(), fds->end());
    ++stats_.listed_tables;
    for (int fd : *fds) {
      auto copy = take_fd(t, fd);
      if (!copy) return tl::unexpected(copy.error());
      if (*copy)
        if (auto ok = take_copy(ti, fd, std::move(*copy), -1); !ok) return ok;
    }
    return {};
  }

  // pidfd_getfd() of fd in table t; an empty fd when it is not open.
  Expected<sys::UniqueFd> take_fd(const Table& t, int fd) {
    long r = ::syscall(SYS_pidfd_getfd, t.pidfd.get(), fd, 0);
    if (r >= 0) return sys::UniqueFd(static_cast<int>(r));
    if (errno == EBADF) return sys::UniqueFd();
    Error e = sys::call_error("pidfd_getfd", fmt::format("pid={}, fd={}", t.tid, fd));
    if (e.err == ESRCH) e.kind = Errc::gone;
    if (e.err == EPERM) e.kind = Errc::permission;
    return tl::unexpected(in_process(e, t.pid));
  }

  // A copy of the file at fd of table ti (pidfd_getfd, or received from the agent's survey): kept
  // when it is a pipe or FIFO (a holder), a unix socket (its queue is peeked later) or an epoll;
  // closed otherwise. cloexec: FD_CLOEXEC when known (the survey), else -1 (fdinfo after the resume).
  Expected<void> take_copy(size_t ti, int fd, sys::UniqueFd copy, int cloexec, const struct stat* known = nullptr) {
    const Table& t = tables_[ti];
    struct stat st {};
    if (known)
      st = *known;
    else if (::fstat(copy.get(), &st) < 0)
      return {};
    switch (sys::classify(copy.get(), st)) {  // each kind goes to its own code
      case sys::FileKind::pipe:
      case sys::FileKind::fifo: break;
      case sys::FileKind::unix_socket:  // its queue is peeked once every table is read (add_in_flight)
        sockets_.push_back(HeldSocket{.table = ti, .pid = t.pid, .fd = fd, .ino = st.st_ino, .copy = std::move(copy)});
        return {};
      case sys::FileKind::epoll: epolls_.found(ti, t.pid, t.tid, fd, t.own, std::move(copy)); return {};
      case sys::FileKind::other: return {};
    }
    Holder h;
    h.table = ti;
    h.fd = fd;
    h.cloexec = cloexec > 0;
    h.cloexec_known = cloexec >= 0;
    set_inode(h, st);
    if (h.kind == PipeKind::fifo) {
      char link[PATH_MAX];
      ssize_t n = ::readlink(fmt::format("/proc/self/fd/{}", copy.get()).c_str(), link, sizeof link);
      if (n < 0) return {};
      h.target.assign(link, static_cast<size_t>(n));
    }
    h.copy = std::move(copy);
    return added(std::move(h));
  }

  // One fd table through an agent in the target (sys::Agent::survey, docs/design.md section 8): the
  // agent reads which numbers are open and their FD_CLOEXEC with one fcntl() each and sends every
  // file over SCM_RIGHTS, 253 a message (about 0.2 us a file against pidfd_getfd's 0.9), then
  // returns untouched; FD_CLOEXEC then needs no fdinfo read after the resume. True when done; false
  // when this table is read by pidfd_getfd instead: a thread's own table (the agent runs in the
  // process's first thread), --leave-stopped and a process in a group stop (the agent's thread
  // must run to return, and a stopped one would stop inside the agent), a thread whose seccomp
  // filters would not allow every call the agent makes (sys/seccomp.hpp: its start refuses, and the
  // note says why), copies taken in batches, too few fds for the agent's start to pay (kSurveyMinFds: counted where the
  // kernel counts them, else the table's slots), a sparse table (sparse(): the agent walks every
  // number) or one too large to walk (kSurveyMaxFds), DumpOptions::survey_agent off, or an agent
  // that could not start or survey (the target is then as it was, and the fallback reads it).
  // The kernel's smallest table (64 slots) is read without the agent: measured (BM_Dump/20/0, 40
  // pipe fds) the agent saved no CPU there and its start (0.3-0.7 ms) only lengthened the stop; at
  // 100 pipes (256 slots) it already saved a third of the dump's CPU.
  static constexpr uint32_t kSurveyMinFds = 65;
  static constexpr uint32_t kSurveyMaxFds = 1u << 16;
  // Slots per open fd above which a table is sparse: the agent's F_GETFD of every number (0.25 us
  // each here) then costs the stop more than a listing and a pidfd_getfd per fd (about 2 us a fd).
  static constexpr uint32_t kSparse = 8;
  // Scratch pipes for an agent to tee into: one per 64 open fds, which at 64 KiB a pipe (16
  // buffers) is about half of what that table's pipes need, the agent's share when it keeps up
  // with pipecr; none for fds not counted (a kernel before 6.2).
  static size_t agent_scratch(uint32_t fds) { return std::min<size_t>(sys::kSurveyScratchMax, fds / 64); }
  // Only where pipecr's pipes are exempt from the user's pipe quota: else each lent pipe would take
  // 256 slots of pipe-user-pages-soft, which pipecr's own scratch pipes and the targets' pipes share.
  static bool lend_ok() { return sys::pipe_quota_exempt(); }
  Expected<bool> survey_fd_table(size_t ti) {
    const Table& t = tables_[ti];
    const uint32_t fds = t.open_fds != 0 ? t.open_fds : t.max_fds;
    if (self_ || !opts_.survey_agent || t.own || opts_.leave_stopped || batch_ != SIZE_MAX ||
        fds < kSurveyMinFds || sparse(t) || t.max_fds > kSurveyMaxFds)
      return false;
    if (no_agent_.count(t.pid)) return false;  // too few fds before the stop: no gadgets were found
    auto known = gadgets_.find(t.pid);
    // A process that uses this very table and is not dumped runs on, and could close or replace the
    // numbers the agent takes in it (its sockets, the scratch pipes lent): read it without the agent.
    if (known != gadgets_.end())
      for (pid_t other : known->second.files_sharers)
        if (std::find(pids_.begin(), pids_.end(), other) == pids_.end()) {
          stats_.notes.push_back(fmt::format(
              "process {}: process {} uses the same fd table (clone(CLONE_FILES)) and is not dumped: the table was "
              "read without the agent, and what that process changed in it meanwhile may show; dump both (--tree, "
              "or -t for each)",
              t.pid, other));
          return false;
        }
    sys::StoppedProcess& sp = *stopped_[t.proc];
    if (sp.was_stopped()) return false;  // the agent would go into the group stop before it returned
    // The syscall the thread stands in, for mark_blocked(): once the agent ran, its registers are the
    // agent's until the resume.
    auto before = sp.syscall_state(t.tid);
    if (!before) return tl::unexpected(in_process(before.error(), t.pid));
    agent_threads_.emplace(t.tid, *before);
    uint64_t t0 = now_ns();
    auto agent = sys::Agent::start_survey(sp, t.tid, 0, known != gadgets_.end() ? &known->second : nullptr,
                                          survey_commit_ ? &*survey_commit_ : nullptr);
    uint64_t t1 = now_ns();
    stats_.agent_start_ns += t1 - t0;
    if (!agent) {  // the target is as it was: the fallback reads it (and fails if it is gone)
      if (agent.error().err == ENOTSUP) return false;  // no rt_sigframe return there: not worth a note
      stats_.notes.push_back(fmt::format("process {}: no agent ({}); its fds were taken one by one", t.pid,
                                         agent.error().what));
      return false;
    }
    // Each message is taken in (and its pipes tee'd) while the agent surveys the next fds. A failure
    // of pipecr's own (not the agent's) ends the dump; the fds taken so far are dropped either way.
    std::optional<Error> ours;
    bool taken = false;  // some message was taken in: a failure then cannot fall back cleanly
    holders_.reserve(holders_.size() + t.max_fds);
    // Scratch pipes it tees into while pipecr is busy: they take free numbers of the target's table
    // for the survey, never so many that the table would have to grow (a grace period, section 8).
    const size_t free_slots = t.open_fds != 0 && t.max_fds > t.open_fds + 16 ? t.max_fds - t.open_fds - 16 : 0;
    std::vector<uint32_t> lent;      // the packer's numbers of the scratch pipes lent, in order
    std::vector<sys::UniqueFd> ends;  // their write ends, closed once the agent has its own copies
    sys::SurveyScratch scratch;
    if (opts_.agent_tees && lend_ok()) {
      scratch.want = std::min(free_slots, agent_scratch(t.open_fds));
      scratch.always = opts_.agent_tees_always;
      scratch.ready = packer_.spares();
      scratch.make = [&]() -> int {
        uint32_t index = 0;
        const bool spare = packer_.spares() > 0;  // made before the stop: both ends in base_fds_
        auto w = packer_.lend(&index);
        if (!w) return -1;  // the fd limit: pipecr tees the rest
        lent.push_back(index);
        ends.push_back(std::move(*w));
        ++stats_.lent_scratch_pipes;
        // The fd budget (check_scratch_room): the read end is one of the packer's scratch pipes
        // now; base_fds_ keeps the write end until the survey is over.
        if (spare) --base_fds_;
        else ++base_fds_;
        return ends.back().get();
      };
    }
    auto seen = (*agent)->survey(
        t.max_fds,
        [&](std::span<sys::SurveyedFd> batch) -> Expected<void> {
          taken = true;
          uint64_t b0 = now_ns();
          auto r = take_survey_batch(ti, batch, lent);
          stats_.survey_take_ns += now_ns() - b0;
          if (!r) ours = r.error();
          return r;
        },
        scratch);
    base_fds_ -= ends.size();
    ends.clear();
    uint64_t t2 = now_ns();
    stats_.agent_survey_ns += t2 - t1;
    auto back = (*agent)->restore();  // it returns by itself once the thread is let go (resume)
    stats_.agent_return_ns += now_ns() - t2;
    ++stats_.agents;  // sp owns the agent: its resume() waits for the agent's own return
    if (!back) return tl::unexpected(in_process(back.error(), t.pid));
    if (ours) return tl::unexpected(*ours);
    if (!seen) {
      if (taken) return tl::unexpected(in_process(seen.error(), t.pid));  // the target is whole: a retry works
      stats_.notes.push_back(fmt::format("process {}: the agent's survey failed ({}); its fds were taken one by one",
                                         t.pid, seen.error().what));
      return false;
    }
    return true;
  }

  // One message of a survey: each file taken (take_copy, with the fstat the agent made), then the
  // pipes first seen in it tee'd, so that the stop's per-pipe work overlaps the agent's. A pipe
  // the agent tee'd itself (into the scratch pipes `lent`, by their packer numbers) has its piece; a
  // second piece of the same pipe, or one of a file not kept, is skipped when read back.
  Expected<void> take_survey_batch(size_t ti, std::span<sys::SurveyedFd> batch, std::span<const uint32_t> lent) {
    const Table& t = tables_[ti];
    for (sys::SurveyedFd& f : batch) {
      const size_t before = holders_.size();
      const SnapshotPacker::Piece teed{f.teed != 0 ? lent[f.scratch] : 0, f.teed};
      if (!f.file && f.teed == 0) {  // a file SCM_RIGHTS may not carry: taken directly, or left out
        if (auto copy = take_fd(t, f.fd); copy && *copy) {
          f.file = std::move(*copy);
          f.stat_known = false;
        }
      }
      if (f.file)
        if (auto r = take_copy(ti, f.fd, std::move(f.file), f.cloexec ? 1 : 0, f.stat_known ? &f.st : nullptr); !r)
          return r;
      if (teed.bytes == 0) continue;
      ++stats_.agent_tees;
      PipeState* p = holders_.size() > before ? &pipes_[holders_.back().pipe] : nullptr;
      if (p && !p->snapped)
        mark_snapped(*p, teed);
      else
        unused_pieces_.push_back({seq_++, teed});
    }
    return flush(false);
  }

  // The self source: fd, and the first fd of the other end of its pipe that the caller holds (pipe()
  // gave it both: that end's flags, O_DIRECT on a packet pipe's write end, come back too). A copy is
  // an F_DUPFD_CLOEXEC of the fd: the very open file description, as pidfd_getfd() gives it.
  Expected<void> probe_self(int fd) {
    sys::UniqueFd copy(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
    if (!copy) return tl::unexpected(sys::call_error("fcntl", fmt::format("fd={}, F_DUPFD_CLOEXEC", fd)));
    struct stat st {};
    if (::fstat(copy.get(), &st) < 0) return tl::unexpected(sys::call_error("fstat", fmt::format("fd={}", fd)));
    sys::FileKind kind = sys::classify(copy.get(), st);
    if (kind != sys::FileKind::pipe && kind != sys::FileKind::fifo)
      return fail(Errc::unsupported, ENOTSUP,
                  fmt::format("fd {} is not a pipe or FIFO (it is {})", fd, sys::file_kind_name(kind)));
    if (is_notification_pipe(copy.get()))
      return fail(Errc::unsupported, ENOTSUP,
                  fmt::format("fd {} is a notification pipe (O_NOTIFICATION_PIPE): its messages cannot be read "
                              "without consuming them",
                              fd));
    int access = ::fcntl(fd, F_GETFL) & O_ACCMODE;
    if (auto r = add_self_holder(fd, std::move(copy), st); !r) return r;
    if (access == O_RDWR) return {};
    const int want = access == O_WRONLY ? O_RDONLY : O_WRONLY;
    auto fds = sys::list_fds(::getpid(), false);
    if (!fds) return {};  // the other end is optional
    for (const sys::FdEntry& e : *fds) {
      if (e.fd == fd) continue;
      struct stat other {};
      if (::fstat(e.fd, &other) < 0 || other.st_ino != st.st_ino || other.st_dev != st.st_dev) continue;
      int fl = ::fcntl(e.fd, F_GETFL);
      if (fl < 0 || (fl & O_ACCMODE) != want) continue;
      sys::UniqueFd peer(::fcntl(e.fd, F_DUPFD_CLOEXEC, 0));
      if (!peer) continue;
      return add_self_holder(e.fd, std::move(peer), other);
    }
    return {};
  }

  Expected<void> add_self_holder(int fd, sys::UniqueFd copy, const struct stat& st) {
    Holder h;
    h.table = 0;
    h.fd = fd;
    set_inode(h, st);
    if (h.kind == PipeKind::fifo) {
      char link[PATH_MAX];
      ssize_t n = ::readlink(fmt::format("/proc/self/fd/{}", copy.get()).c_str(), link, sizeof link);
      if (n < 0) return tl::unexpected(sys::call_error("readlink", fmt::format("/proc/self/fd/{}", fd)));
      h.target.assign(link, static_cast<size_t>(n));
    }
    h.copy = std::move(copy);
    return added(std::move(h));
  }

  // FDSize of a table: the number of fd slots it has, above every open fd.
  Expected<uint32_t> table_size(Table& t) {
    auto st = sys::read_status(t.pid, t.tid);
    if (!st) return tl::unexpected(in_process(st.error(), t.pid));
    if (!st->fd_size) return fail(Errc::system, 0, fmt::format("no FDSize in /proc/{}/status", t.tid));
    t.open_fds = sys::open_fd_count(t.pid, t.tid);
    return *st->fd_size;
  }

  // Copies one table may need at once: its open fds, with room for a few opened meanwhile by a
  // process that shares the table and is not stopped, when the count is known; else every slot.
  static uint64_t copies_needed(const Table& t) {
    return t.open_fds != 0 ? std::min<uint64_t>(t.max_fds, uint64_t{t.open_fds} + 64) : t.max_fds;
  }

  // A table whose slots are mostly empty (a process that once held many more fds): reading it
  // number by number, by the agent's F_GETFD or by pidfd_getfd, costs more than listing its fds.
  static bool sparse(const Table& t) { return t.open_fds != 0 && uint64_t{t.open_fds} * kSparse < t.max_fds; }

  // Every table: the fast path (probe_fd_table) where taking a socket changes nothing (see
  // check_copies_harmless), else the slow path (list_fd_table). When pipecr cannot hold a copy of
  // every fd the tables can have (the sum of their sizes) at once, the copies are taken and
  // closed in batches of half what is free (flush).
  Expected<void> read_fd_tables(const NofileRaise& nofile) {
    uint64_t slots = 0;
    for (Table& t : tables_) {
      auto n = table_size(t);
      if (!n) return tl::unexpected(n.error());
      t.max_fds = *n;
      slots += copies_needed(t);
    }
    limit_ = nofile.soft();
    uint64_t reserve = base_fds_ + 64;
    if (slots + slots / 64 + reserve <= limit_) {
      batch_ = SIZE_MAX;
    } else {
      batch_ = static_cast<size_t>((limit_ > reserve ? limit_ - reserve : 0) / 2);
      if (batch_ < 16) return fd_limit_error(reserve + 2 * 16 + 16);
    }
    check_copies_harmless();
    for (size_t i = 0; i < tables_.size(); ++i)
      if (auto r = harmless_[tables_[i].proc] ? probe_fd_table(i) : list_fd_table(i, 0); !r) return r;
    return add_in_flight();
  }

  // The pipe ends in flight in the queues of the sockets the probe kept (dump/unix_queue.hpp),
  // while the targets are stopped: each is one more holder, with its peeked copy. Sockets of a
  // process whose fds are read the slow way (check_copies_harmless) were not taken: not peeked.
  Expected<void> add_in_flight() {
    for (size_t i = 0; i < pids_.size(); ++i)
      if (!harmless_[i])
        stats_.notes.push_back(fmt::format("process {}: its unix sockets were not examined for ends in flight (its "
                                           "net_cls/net_prio groups differ from pipecr's)",
                                           pids_[i]));
    if (sockets_.empty()) return {};
    auto scan = scan_unix_queues(sockets_);
    if (!scan) return tl::unexpected(scan.error());
    stats_.other_in_flight = scan->other_files;
    for (std::string& n : scan->notes) stats_.notes.push_back(std::move(n));
    for (InFlightEnd& e : scan->ends) {
      const HeldSocket& s = sockets_[e.socket];
      Holder h;
      h.table = s.table;
      h.fd = -1;
      set_inode(h, e.st);
      if (h.kind == PipeKind::fifo) {
        char link[PATH_MAX];
        ssize_t n = ::readlink(fmt::format("/proc/self/fd/{}", e.copy.get()).c_str(), link, sizeof link);
        if (n < 0) continue;
        h.target.assign(link, static_cast<size_t>(n));
      }
      h.copy = std::move(e.copy);
      h.in_flight = in_flight_.size();
      in_flight_.push_back(InFlightRecord{.file_id = 0, .pid = s.pid, .sock_fd = s.fd, .sock_ino = s.ino,
                                          .msg = e.msg, .slot = e.slot, .end = e.end});
      if (auto r = added(std::move(h)); !r) return r;
    }
    sockets_.clear();  // the socket copies are not needed any more
    return {};
  }

  // The pipe of holder i, made on first sight (pipes in order of first sight).
  void assign_pipe(size_t i) {
    Holder& h = holders_[i];
    auto [it, fresh] = pipe_index_.emplace(std::pair(h.dev, h.ino), pipes_.size());
    if (fresh) {
      PipeState p;
      p.dev = h.dev;
      p.rec.id = pipes_.size() + 1;
      p.rec.kind = h.kind;
      p.rec.inode = h.ino;
      p.rec.uid = h.uid;
      p.rec.gid = h.gid;
      p.rec.mode = h.mode;
      if (h.kind == PipeKind::fifo) {
        p.rec.dev = h.dev;  // restore in place checks it is the same FIFO (restore/inplace.hpp)
        p.rec.path = h.target;
        if (p.rec.path.ends_with(kDeleted)) {
          p.rec.path.resize(p.rec.path.size() - kDeleted.size());
          p.rec.unlinked = true;
        }
      }
      pipes_.push_back(std::move(p));
    }
    h.pipe = it->second;
    pipes_[h.pipe].holders.push_back(i);
  }

  // A holder found: its pipe, and a flush when the copies held reach the batch size.
  Expected<void> added(Holder&& h) {
    bool copied = static_cast<bool>(h.copy);
    holders_.push_back(std::move(h));
    assign_pipe(holders_.size() - 1);
    if (copied && ++held_ >= batch_) return flush(true);
    return {};
  }

  // Snapshots the pipes of the holders not flushed yet, through their copies; with `close`, also
  // reads what needs a copy (owner, signal, capacity) and closes the copies: a batch.
  Expected<void> flush(bool close) {
    if (close) return flush_upto(holders_.size());
    const size_t lo = std::max(flushed_, snapped_upto_), hi = holders_.size();
    snapped_upto_ = hi;
    return snapshot_range(lo, hi);
  }

  // Snapshots the pipes of the holders in [lo, hi) not snapped yet, and polls the FIFO readers
  // among them (each holder is in one range only).
  Expected<void> snapshot_range(size_t lo, size_t hi) {
    for (size_t i = lo; i < hi; ++i) {
      Holder& h = holders_[i];
      if (!h.copy) continue;
      PipeState& p = pipes_[h.pipe];
      if (p.rec.kind == PipeKind::fifo) fifo_poll(h);
      if (p.snapped) continue;
      if (auto r = snapshot_pipe(p, lo, hi); !r) return r;
    }
    return {};
  }

  // After the tables: copies for the holders found through /proc (in batches), the last batch,
  // the grouping when batched (kcmp between the targets' own fds: the copies are gone), and the
  // pipes no copy could be tee'd from.
  Expected<void> finish_snapshots() {
    for (size_t i = flushed_; i < holders_.size(); ++i) {
      Holder& h = holders_[i];
      if (h.copy) continue;
      const Table& t = tables_[h.table];
      auto fd = sys::pidfd_getfd(t.pidfd.get(), h.fd, t.tid);
      if (!fd) {
        if (fd.error().err == EBADF) continue;  // closed by a process sharing the table that is not stopped
        return tl::unexpected(in_process(fd.error(), t.pid));
      }
      h.copy = std::move(*fd);
      if (++held_ >= batch_)
        if (auto r = flush_upto(i + 1); !r) return r;
    }
    if (auto r = flush(batched_); !r) return r;
    if (batched_) {
      if (auto g = group_files(false); !g) return g;
      for (OpenFile& f : files_)
        for (size_t i : pipes_[holders_[f.first_holder].pipe].holders) {
          const Holder& h = holders_[i];
          if (h.file != static_cast<size_t>(&f - files_.data()) || !h.state_read) continue;
          f.rec.owner = h.owner;
          f.rec.signal = h.signal;
          f.state_read = true;
          break;
        }
    } else {
      stats_.batches = 1;
    }
    for (PipeState& p : pipes_)
      if (!p.snapped)
        if (auto r = snapshot_write_only(p); !r) return r;
    return {};
  }

  // flush(true) of the holders before `end` only.
  Expected<void> flush_upto(size_t end) {
    size_t lo = flushed_;
    if (auto r = snapshot_range(lo, end); !r) return r;
    if (auto r = packer_.settle(); !r) return r;  // before the copies it may need close
    for (size_t i = lo; i < end; ++i) {
      Holder& h = holders_[i];
      if (!h.copy) continue;
      if (auto r = holder_state(h); !r) return r;
      if (h.in_flight == SIZE_MAX) h.copy.reset();  // an end in flight has no other way in
    }
    flushed_ = end;
    held_ = 0;
    batched_ = true;
    ++stats_.batches;
    return {};
  }

  // Owner and signal of the open file behind a holder's copy; a notification pipe is refused.
  Expected<FileRecord> owner_and_signal(const Holder& h) {
    if (is_notification_pipe(h.copy.get()))
      return fail(Errc::unsupported, ENOTSUP,
                  fmt::format("pid {} fd {} is a notification pipe (O_NOTIFICATION_PIPE): its messages cannot be "
                              "read without consuming them",
                              tables_[h.table].pid, h.fd));
    return file_state(h.copy.get(), false);
  }

  // Owner and signal of a holder's open file and its pipe's capacity, from its copy.
  Expected<void> holder_state(Holder& h) {
    auto state = owner_and_signal(h);
    if (!state) return tl::unexpected(state.error());
    h.owner = state->owner;
    h.signal = state->signal;
    h.state_read = true;
    return read_capacity(pipes_[h.pipe], h.copy.get());
  }

  // F_GETPIPE_SZ of a pipe, once, through any copy of one of its files.
  static Expected<void> read_capacity(PipeState& p, int fd) {
    if (p.capacity_read) return {};
    auto cap = sys::get_pipe_size(fd);
    if (!cap) return tl::unexpected(cap.error());
    p.rec.capacity = static_cast<uint32_t>(*cap);
    p.capacity_read = true;
    return {};
  }

  // The soft limit is the hard one by now (NofileRaise): only a higher hard limit helps.
  tl::unexpected<Error> fd_limit_error(uint64_t needed) const {
    return fail(Errc::capacity, EMFILE,
                fmt::format("pipecr needs about {} open files for this dump but its RLIMIT_NOFILE (hard) is {}: run it "
                            "with a higher limit, e.g. `prlimit --nofile={}:{} pipecr dump ...` (as root), or dump "
                            "fewer processes at once; nothing was changed",
                            needed, limit_, needed, needed));
  }

  // The pipe's queued bytes: a tee through the first of its holders in [lo, hi) open for reading
  // (SnapshotPacker::add_unknown: an empty pipe costs that one tee, no FIONREAD). A pipe held there
  // only for writing gets FIONREAD on a write end: empty, or left for a later range (its reader may
  // come in the next survey message) or snapshot_write_only().
  Expected<void> snapshot_pipe(PipeState& p, size_t lo, size_t hi) {
    const Holder* writer = nullptr;
    for (size_t i : p.holders) {
      if (i < lo || i >= hi || !holders_[i].copy) continue;
      Holder& h = holders_[i];
      auto piece = packer_.add_unknown(h.copy.get(), &p.writers);
      if (!piece) {
        if (piece.error().err != EBADF) return tl::unexpected(piece.error());
        writer = &h;  // a write end
        continue;
      }
      mark_snapped(p, *piece);
      if (piece->bytes > 0)
        if (auto r = check_scratch_room(); !r) return r;
      return {};
    }
    if (!p.snapped && writer) {
      auto q = sys::bytes_queued(writer->copy.get());
      if (!q) return tl::unexpected(q.error());
      if (*q == 0) mark_snapped(p, SnapshotPacker::Piece{});
    }
    return {};
  }

  void mark_snapped(PipeState& p, SnapshotPacker::Piece piece) {
    p.piece = piece;
    p.seq = seq_++;
    p.snapped = true;
  }

  Expected<void> check_scratch_room() {
    uint64_t in_use = base_fds_ + held_ + packer_.scratch_pipes() + 1;
    if (in_use + 16 > limit_) return fd_limit_error(in_use + 16 + pipes_.size() / 256);
    return {};
  }

  // A FIFO reader: POLLHUP now says it has seen a writer (the "no writer yet" latch, section 7).
  // No F_GETFL first: pipe_poll() gives POLLHUP only to a file open for reading while no writer is
  // open, and an O_RDWR file is a writer itself, so POLLHUP comes only to O_RDONLY readers.
  void fifo_poll(Holder& h) {
    pollfd pfd{h.copy.get(), POLLIN, 0};
    if (::poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLHUP)) pollhup_.insert(static_cast<size_t>(&h - holders_.data()));
  }

  // A pipe no copy could be tee'd from: a read end from /proc/PID/task/TID/fd/N, held only for
  // the tee, while the holders are stopped.
  Expected<void> snapshot_write_only(PipeState& p) {
    const Holder* w = nullptr;
    for (size_t i : p.holders) {
      w = &holders_[i];
      break;
    }
    if (!w) return {};
    const Table& t = tables_[w->table];
    std::string link = w->in_flight != SIZE_MAX ? fmt::format("/proc/self/fd/{}", w->copy.get())
                                                : fmt::format("/proc/{}/task/{}/fd/{}", t.pid, t.tid, w->fd);
    sys::UniqueFd rd(::open(link.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC));
    if (!rd) return tl::unexpected(in_process(sys::call_error("open", link + ", O_RDONLY"), t.pid));
    auto q = sys::bytes_queued(rd.get());
    if (!q) return tl::unexpected(q.error());
    auto piece = packer_.add(rd.get(), static_cast<uint32_t>(*q));
    if (!piece) return tl::unexpected(piece.error());
    mark_snapped(p, *piece);
    return check_scratch_room();
  }

  // Owner and signal of a holder's open file, and its pipe's capacity, from a copy (batched mode,
  // while stopped; the fast path reads the same after the resume).
  Expected<void> read_with_copy(size_t i) {
    Holder& h = holders_[i];
    if (!h.copy) return {};
    OpenFile& f = files_[h.file];
    if (!f.state_read) {
      if (auto r = file_state_from(f, h); !r) return r;
    }
    return read_capacity(pipes_[h.pipe], h.copy.get());
  }

  Expected<void> file_state_from(OpenFile& f, const Holder& h) {
    auto state = owner_and_signal(h);
    if (!state) return tl::unexpected(state.error());
    f.rec.owner = state->owner;
    f.rec.signal = state->signal;
    f.state_read = true;
    return {};
  }

  // Groups fds into open file descriptions: between pipecr's copies (after the resume) with
  // F_DUPFD_QUERY where the kernel has it, else kcmp (sys/fdgroup.hpp), or kcmp between the
  // targets' fds (batched mode, while they are stopped). Only fds of one inode, and of one access
  // mode where the holders' modes are known already, are compared.
  Expected<void> group_files(bool copies) {
    std::vector<sys::FdRef> refs;
    std::vector<size_t> who;
    refs.reserve(holders_.size());
    who.reserve(holders_.size());
    pid_t self = ::getpid();
    for (size_t i = 0; i < holders_.size(); ++i) {
      const Holder& h = holders_[i];
      if (copies && !h.copy) continue;
      bool own = copies || h.in_flight != SIZE_MAX;  // an end in flight is reached through pipecr's copy
      refs.push_back(own ? sys::FdRef{self, h.copy.get(), h.ino, h.access}
                         : sys::FdRef{tables_[h.table].tid, h.fd, h.ino, h.access});
      who.push_back(i);
    }
    auto ids = sys::open_file_ids(refs, sys::kcmp_compare(), copies ? sys::own_file_equal() : sys::FileEqual());
    if (!ids) return tl::unexpected(ids.error());
    const size_t base = files_.size();
    for (size_t k = 0; k < refs.size(); ++k) {
      const size_t file = base + (*ids)[k];
      if (file == files_.size()) {  // the first fd of a new open file description
        OpenFile f;
        f.rec.id = file + 1;
        f.first_holder = who[k];
        files_.push_back(std::move(f));
      }
      holders_[who[k]].file = file;
    }
    return {};
  }

  void mark_blocked() {
    std::map<std::pair<pid_t, int>, Blocked> blocked;  // (table's tid, fd)
    for (const auto& sp : stopped_)
      for (const sys::StoppedProcess& s = *sp; pid_t tid : s.threads()) {
        auto known = agent_threads_.find(tid);  // an agent ran there: its state from before
        auto st = known != agent_threads_.end() ? Expected<sys::SyscallState>(known->second) : s.syscall_state(tid);
        if (!st || !st->in_syscall) continue;
        sys::TaskSyscall ts;
        ts.tid = tid;
        ts.nr = st->nr;
        for (int i = 0; i < 6; ++i) ts.args[i] = st->args[i];
        if (auto io = sys::blocked_io(ts)) blocked[{table_tid_of(s.pid(), tid), io->fd}] = io->dir;
      }
    for (Holder& h : holders_)
      if (auto it = blocked.find({tables_[h.table].tid, h.fd}); it != blocked.end()) h.blocked = it->second;
  }

  // The tid naming the table a thread uses (among the listed tables of its process).
  pid_t table_tid_of(pid_t pid, pid_t tid) const {
    pid_t main = 0;
    for (const Table& t : tables_) {
      if (t.pid != pid) continue;
      if (t.tid == tid) return tid;
      if (!t.own) main = t.tid;
    }
    for (const Table& t : tables_)
      if (t.pid == pid && t.own) {
        auto c = sys::kcmp_files(t.tid, tid);
        if (c && *c == 0) return t.tid;
      }
    return main;
  }

  // A target killed while stopped leaves its ptrace stop and loses its fd table on the way out:
  // what was read of it may be empty or partial. Every target must still stand in its stop here.
  Expected<void> check_alive() {
    for (const auto& sp : stopped_) {
      const sys::StoppedProcess& s = *sp;
      auto st = sys::read_task_stat(s.pid(), s.threads().front());
      if (!st || (st->state != 't' && st->state != 'T'))
        return fail(Errc::gone, ESRCH,
                    fmt::format("process {} exited during the dump (state {}); no image written", s.pid(),
                                st ? std::string(1, st->state) : std::string("gone")));
    }
    return {};
  }

  Expected<void> resume_all() {
    Expected<void> first;
    uint64_t t0 = now_ns();
    for (auto& s : stopped_)
      if (auto r = s->resume(opts_.leave_stopped); !r && first) first = r;
    stats_.resume_ns = now_ns() - t0;
    return first;
  }

  // After the resume: grouping (fast path), flags and FD_CLOEXEC from fdinfo, owner, signal and
  // capacity from the copies, which are then closed.
  Expected<void> after_resume() {
    if (!batched_) {
      // The status flags of every copy first: with the access modes known, a pipe's read ends and
      // write ends are never compared (no F_DUPFD_QUERY between them), and the flags are needed anyway.
      for (Holder& h : holders_) {
        if (!h.copy) continue;
        auto fl = sys::get_fl(h.copy.get());
        if (!fl) return tl::unexpected(fl.error());
        h.flags = *fl & ~O_CLOEXEC;
        h.access = *fl & O_ACCMODE;
      }
      if (auto g = group_files(true); !g) return g;
    }
    std::vector<sys::UniqueFd> info_dirs(tables_.size());
    for (size_t i = 0; i < holders_.size(); ++i) {
      Holder& h = holders_[i];
      if (h.file == SIZE_MAX) continue;  // closed before its copy was taken
      if (h.in_flight != SIZE_MAX || h.cloexec_known) {
        // No fd (an end in flight), or FD_CLOEXEC from the survey in the stop: the status flags of
        // the description, from the copy (read above unless batched).
        if (h.access < 0) {
          auto fl = sys::get_fl(h.copy.get());
          if (!fl) return tl::unexpected(fl.error());
          h.flags = *fl & ~O_CLOEXEC;
        }
        if (auto r = read_with_copy(i); !r) return r;
        continue;
      }
      const Table& t = tables_[h.table];
      if (!info_dirs[h.table]) info_dirs[h.table].reset(::open(fmt::format("/proc/{}/task/{}/fdinfo", t.pid, t.tid).c_str(),
                                                             O_RDONLY | O_DIRECTORY | O_CLOEXEC));
      // Read after the resume: a program that changed FD_CLOEXEC or the status flags since, or closed
      // the fd, shows its newer state (ino tells a slot reused for another pipe; section 7).
      std::optional<sys::FdInfo> info;
      if (info_dirs[h.table]) {
        auto r = read_fdinfo_at(info_dirs[h.table].get(), h.fd);
        if (r && (r->ino == 0 || r->ino == h.ino)) info = *r;
      }
      if (info) {
        h.cloexec = (info->flags & O_CLOEXEC) != 0;
        h.flags = info->flags & ~O_CLOEXEC;
      } else if (h.copy) {
        auto fl = sys::get_fl(h.copy.get());
        if (fl) h.flags = *fl & ~O_CLOEXEC;
        ++stats_.changed_after_resume;
      } else {
        ++stats_.changed_after_resume;
      }
      if (auto r = read_with_copy(i); !r) return r;
    }
    if (epolls_after_resume())
      if (auto r = read_epolls(true); !r) return r;
    for (OpenFile& f : files_) {
      const Holder& h = holders_[f.first_holder];
      f.rec.flags = static_cast<uint32_t>(h.flags);
      f.rec.pipe_id = pipes_[h.pipe].rec.id;
      f.pollhup = pollhup_.count(f.first_holder) > 0;
      for (size_t i : pipes_[h.pipe].holders)
        if (holders_[i].file == h.file) f.pollhup = f.pollhup || pollhup_.count(i) > 0;
      int access = static_cast<int>(f.rec.flags) & O_ACCMODE;
      if (access != O_RDONLY) pipes_[h.pipe].has_writer_file = true;
    }
    close_copies();
    return {};
  }

  // Closes every copy pipecr holds: they were taken one after another, so their numbers are mostly
  // runs that hold nothing else, one close_range() each (sys::close_fds).
  void close_copies() {
    std::vector<int> fds;
    fds.reserve(holders_.size());
    for (Holder& h : holders_)
      if (h.copy) fds.push_back(h.copy.release());
    sys::close_fds(fds);
  }

  static Expected<sys::FdInfo> read_fdinfo_at(int dir, int fd) {
    char name[16];
    *fmt::format_to_n(name, sizeof name - 1, "{}", fd).out = '\0';
    sys::UniqueFd f(::openat(dir, name, O_RDONLY | O_CLOEXEC));
    if (!f) return tl::unexpected(sys::call_error("open", fmt::format("fdinfo/{}", fd)));
    char buf[512];
    ssize_t n = ::read(f.get(), buf, sizeof buf);
    if (n < 0) return tl::unexpected(sys::call_error("read", fmt::format("fdinfo/{}", fd)));
    return sys::parse_fdinfo(std::string_view(buf, static_cast<size_t>(n)));
  }

  // Which pipes have holders outside the dumped set: every other process's fd table, read once.
  // This costs time in proportion to every fd on the machine, so by default it is done only for
  // FIFOs whose reader state depends on it (fifo_only); DumpOptions::outside_holders asks for all.
  // Such a FIFO was empty at its snapshot, as a rule (a reader that never saw a writer has read
  // nothing), and then its tee said whether a writer was open: with no dumped writer, that writer
  // is an outside holder, and without one no process holds it for writing, which is all the
  // reader state needs. Only FIFOs whose tee could not tell are scanned for.
  void mark_outside_holders(bool fifo_only) {
    std::unordered_map<uint64_t, size_t> anon;
    std::unordered_map<std::string, size_t> fifos;
    for (size_t i = 0; i < pipes_.size(); ++i) {
      PipeState& p = pipes_[i];
      const PipeRecord& r = p.rec;
      if (fifo_only && (r.kind != PipeKind::fifo || p.has_writer_file || !has_unseen_reader(i))) continue;
      if (fifo_only && p.writers != SnapshotPacker::Writers::unknown) {
        ++stats_.fifo_writers_from_tee;
        p.rec.outside_holders = p.writers == SnapshotPacker::Writers::some;
        continue;
      }
      if (r.kind == PipeKind::anonymous)
        anon.emplace(r.inode, i);
      else
        fifos.emplace(r.unlinked ? r.path + std::string(kDeleted) : r.path, i);
    }
    if (anon.empty() && fifos.empty()) return;
    auto all = sys::list_pids();
    if (!all) return;
    ++stats_.outside_scans;
    std::set<pid_t> mine(pids_.begin(), pids_.end());
    mine.insert(::getpid());
    for (pid_t pid : *all) {
      if (mine.count(pid)) continue;
      auto fds = sys::list_fds(pid, true);
      if (!fds) continue;
      for (const sys::FdEntry& e : *fds) {
        auto ino = sys::pipe_inode_from_link(e.target);
        size_t hit = SIZE_MAX;
        if (ino) {
          if (auto it = anon.find(*ino); it != anon.end()) hit = it->second;
        } else if (auto it = fifos.find(e.target); it != fifos.end()) {
          hit = it->second;
        }
        if (hit != SIZE_MAX) pipes_[hit].rec.outside_holders = true;
      }
    }
  }

  // A read-only description of FIFO pipe i without POLLHUP: its latch state needs the outside scan.
  bool has_unseen_reader(size_t pi) const {
    for (const OpenFile& f : files_)
      if (holders_[f.first_holder].pipe == pi && (f.rec.flags & O_ACCMODE) == O_RDONLY && !f.pollhup) return true;
    return false;
  }

  FifoReaderState fifo_reader_state(const OpenFile& f) const {
    const PipeState& p = pipes_[holders_[f.first_holder].pipe];
    if (p.rec.kind != PipeKind::fifo || (f.rec.flags & O_ACCMODE) != O_RDONLY) return FifoReaderState::unknown;
    if (f.pollhup) return FifoReaderState::seen_writer;
    // No POLLHUP: either a writer is open, or this reader has not seen one yet.
    if (!p.has_writer_file && !p.rec.outside_holders) return FifoReaderState::no_writer_yet;
    return FifoReaderState::unknown;
  }

  Expected<DumpStats> write(image::Sink& sink, Image* records) {
    image::Writer w(sink);
    SnapshotReader reader;
    std::vector<std::byte> bytes;
    Expected<void> ok = w.begin(image::current_info());
    for (const ProcessRecord& p : procs_)
      if (ok) ok = w.add(p);
    for (const SharedFdTable& s : shared_)
      if (ok) ok = w.add(s);
    // Pipes in the order their snapshots were packed, the agents' unused pieces among them (skipped):
    // each piece is then at the head of its scratch pipe, since each scratch pipe (pipecr's own, or
    // one lent to an agent) was filled in that order. A scratch pipe is closed once its last piece
    // is read.
    struct Item {
      uint64_t seq;
      size_t pipe;  // SIZE_MAX: an unused piece, unused_pieces_[unused]
      size_t unused;
    };
    std::vector<Item> order;
    order.reserve(pipes_.size() + unused_pieces_.size());
    std::vector<uint32_t> pieces_left(packer_.scratch_pipes());
    for (size_t i = 0; i < pipes_.size(); ++i) {
      order.push_back({pipes_[i].seq, i, 0});
      if (const SnapshotPacker::Piece piece = packer_.where(pipes_[i].piece); piece.bytes > 0) ++pieces_left[piece.scratch];
    }
    for (size_t i = 0; i < unused_pieces_.size(); ++i) {
      order.push_back({unused_pieces_[i].first, SIZE_MAX, i});
      ++pieces_left[unused_pieces_[i].second.scratch];
    }
    std::stable_sort(order.begin(), order.end(), [](const Item& a, const Item& b) { return a.seq < b.seq; });
    auto piece_read = [&](uint32_t scratch) {
      if (--pieces_left[scratch] == 0) packer_.release(scratch);
    };
    for (const Item& item : order) {
      if (!ok) break;
      if (item.pipe == SIZE_MAX) {
        const SnapshotPacker::Piece piece = unused_pieces_[item.unused].second;
        if (auto r = reader.skip_head(packer_.scratch_fd(piece.scratch), piece.bytes); !r) return tl::unexpected(r.error());
        piece_read(piece.scratch);
        continue;
      }
      PipeState& p = pipes_[item.pipe];
      const SnapshotPacker::Piece piece = packer_.where(p.piece);
      if (piece.bytes > 0) {
        auto slots = reader.read_head(packer_.scratch_fd(piece.scratch), piece.bytes, bytes);
        if (!slots) return tl::unexpected(slots.error());
        piece_read(piece.scratch);
        p.rec.slots = std::move(*slots);
      } else {
        p.rec.slots.clear();
        bytes.clear();
      }
      ok = w.add(p.rec);
      if (!ok || p.rec.slots.empty()) continue;
      ok = w.begin_data(p.rec.id, bytes.size());
      if (ok) ok = w.data(bytes);
      if (ok) ok = w.end_data();
      stats_.bytes += bytes.size();
    }
    for (OpenFile& f : files_) {
      f.rec.fifo_reader = fifo_reader_state(f);
      if (ok) ok = w.add(f.rec);
    }
    std::vector<FdRecord> fds;
    for (const Holder& h : holders_) {
      if (h.file == SIZE_MAX || h.in_flight != SIZE_MAX) continue;
      const Table& t = tables_[h.table];
      fds.push_back(FdRecord{.pid = self_ ? 0 : t.pid, .fd = h.fd, .file_id = files_[h.file].rec.id, .cloexec = h.cloexec,
                             .blocked = h.blocked, .tid = t.own ? t.tid : 0});
      if (ok) ok = w.add(fds.back());
    }
    for (const Holder& h : holders_) {
      if (h.file == SIZE_MAX || h.in_flight == SIZE_MAX) continue;
      InFlightRecord& r = in_flight_[h.in_flight];
      r.file_id = files_[h.file].rec.id;
      if (ok) ok = w.add(r);
    }
    std::vector<EpollWatch> watches = epolls_.records(
        [&](size_t h) { return holders_[h].file == SIZE_MAX ? uint64_t{0} : files_[holders_[h].file].rec.id; });
    for (const EpollWatch& e : watches)
      if (ok) ok = w.add(e);
    if (ok) ok = w.finish();
    if (!ok) return tl::unexpected(ok.error());
    stats_.in_flight = in_flight_.size();
    stats_.pipes = pipes_.size();
    stats_.files = files_.size();
    stats_.fds = fds.size();
    stats_.scratch_pipes = packer_.scratch_pipes() - stats_.lent_scratch_pipes;
    if (records) {
      records->info = image::current_info();
      records->processes = procs_;
      records->shared_tables = shared_;
      for (const Item& item : order)
        if (item.pipe != SIZE_MAX) records->pipes.push_back(pipes_[item.pipe].rec);
      for (const OpenFile& f : files_) records->files.push_back(f.rec);
      records->fds = std::move(fds);
      records->in_flight = in_flight_;
      records->epoll_watches = std::move(watches);
    }
    return stats_;
  }

  const DumpOptions& opts_;
  std::vector<pid_t> pids_;
  std::vector<ProcessRecord> procs_;
  std::vector<std::unique_ptr<sys::StoppedProcess>> stopped_;
  std::map<pid_t, sys::SyscallState> agent_threads_;  // threads an agent ran in: their syscall state before it
  std::map<pid_t, sys::AgentGadgets> gadgets_;  // per process, found before the stop
  std::set<pid_t> no_agent_;  // processes holding too few fds before the stop for an agent
  std::vector<Table> tables_;
  std::vector<SharedFdTable> shared_;
  std::vector<Holder> holders_;
  std::vector<OpenFile> files_;
  std::vector<PipeState> pipes_;
  std::vector<HeldSocket> sockets_;          // the probe's copies of unix sockets
  std::vector<InFlightRecord> in_flight_;    // per end in flight (file_id set when written)
  EpollDump epolls_;          // the epolls the tables hold, and their watches on pipe ends
  std::set<size_t> pollhup_;  // holders whose FIFO read end showed POLLHUP
  SnapshotPacker packer_;
  size_t batch_ = 0;             // copies held at most at once (SIZE_MAX: all)
  size_t held_ = 0;              // copies held now
  size_t flushed_ = 0;           // holders before this are snapshotted (and, batched, closed)
  size_t snapped_upto_ = 0;      // holders before this were given to snapshot_range() (flush(false))
  bool batched_ = false;         // some copies were closed while stopped
  bool self_ = false;            // the calling process (run_self): no process record, fds of pid 0
  struct InodeHash {
    size_t operator()(const std::pair<dev_t, uint64_t>& k) const noexcept {
      return std::hash<uint64_t>()(k.second * 0x9e3779b97f4a7c15ull ^ static_cast<uint64_t>(k.first));
    }
  };
  std::unordered_map<std::pair<dev_t, uint64_t>, size_t, InodeHash> pipe_index_;
  std::vector<bool> harmless_;  // per process: taking its sockets changes nothing
  std::optional<std::string> my_groups_;  // pipecr's own net_cls/net_prio groups (check_copies_harmless)
  std::optional<sys::CommitPoint> survey_commit_;  // shared by the survey agents, made before the stop
  uint64_t limit_ = 0;
  size_t base_fds_ = 0;
  uint64_t seq_ = 0;
  // Pieces the agents tee'd that no pipe takes (a pipe tee'd twice, a file not kept), in the
  // order of seq_: read back they are skipped.
  std::vector<std::pair<uint64_t, SnapshotPacker::Piece>> unused_pieces_;
  uint64_t stop_start_ = 0;
  DumpStats stats_;
};

}  // namespace

Expected<DumpStats> dump_processes(const DumpOptions& opts, image::Sink& sink, Image* records) {
  Dumper d(opts);
  return d.run(sink, records);
}

Expected<DumpStats> dump_self_pipe(int fd, image::Sink& sink, Image* records) {
  if (fd < 0) return fail(Errc::system, EBADF, fmt::format("fd {} is not open", fd));
  static const DumpOptions kNone;
  Dumper d(kNone);
  return d.run_self(fd, sink, records);
}

}  // namespace pipecr::dump
