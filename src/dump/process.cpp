// dump/process.cpp: the dump of a set of running processes (see process.hpp).
//
// Three identities are collected separately, as the kernel keeps them: fd slots (from
// /proc/PID/fd and fdinfo), open file descriptions (fd slots grouped with kcmp(KCMP_FILE), one
// pidfd_getfd() copy each, which is the same description and fires no events), and pipes (open
// file descriptions grouped by device and inode). A pipe's buffers are snapshotted through its
// first readable description; a pipe whose dumped holders can only write it is read through a
// reopen of /proc/PID/fd/N, held only while the holders are stopped.
#include "dump/process.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <map>
#include <set>
#include <unordered_map>

#include <fmt/format.h>

#include "dump/pipe.hpp"
#include "image/info.hpp"
#include "sys/fdgroup.hpp"
#include "sys/proc.hpp"
#include "sys/ptrace.hpp"
#include "sys/syscalls.hpp"

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

struct Holder {          // one fd slot
  pid_t pid = 0;
  int fd = -1;
  std::string target;    // readlink of the fd
  uint64_t ino = 0;
  dev_t dev = 0;         // FIFOs: the device of the inode (anonymous pipes: 0, all on pipefs)
  PipeKind kind = PipeKind::anonymous;
  int flags = 0;         // fdinfo flags: F_GETFL of the open file, without O_CLOEXEC
  bool cloexec = false;
  Blocked blocked = Blocked::none;
  size_t file = 0;       // index into files_
};

struct OpenFile {        // one open file description
  FileRecord rec;
  size_t first_holder = 0;
  size_t pipe = 0;       // index into pipes_
  bool pollhup = false;  // FIFO read side: poll() showed POLLHUP when dumped
};

struct PipeState {
  PipeRecord rec;
  dev_t dev = 0;
  Snapshot snap;
  bool snapped = false;
  size_t write_holder = SIZE_MAX;  // a holder of a write-only description, for the /proc reopen
  bool has_writer_file = false;
};

class Dumper {
 public:
  explicit Dumper(const DumpOptions& opts) : opts_(opts) {}

  Expected<DumpStats> run(image::Sink& sink, Image* records) {
    if (auto r = collect_processes(); !r) return tl::unexpected(r.error());
    stop_start_ = now_ns();
    if (auto r = stop_all(); !r) return tl::unexpected(r.error());
    Expected<void> taken = read_fd_tables();
    if (taken) taken = group_files();
    if (taken) taken = read_files();
    if (taken) taken = snapshot_write_only_pipes();
    if (taken) mark_blocked();
    // Resume before anything else: from here on only our scratch pipes are read.
    Expected<void> resumed = resume_all();
    stats_.stopped_ns = now_ns() - stop_start_;
    if (!taken) return tl::unexpected(taken.error());
    if (!resumed) return tl::unexpected(resumed.error());
    mark_outside_holders();
    return write(sink, records);
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

  // Seizes every process; with --tree, goes on until no new descendant appeared (a stopped
  // process cannot fork, so this ends).
  Expected<void> stop_all() {
    for (size_t done = 0;;) {
      for (; done < pids_.size(); ++done) {
        auto s = sys::StoppedProcess::seize(pids_[done]);
        if (!s) return tl::unexpected(in_process(s.error(), pids_[done]));
        stopped_.push_back(std::move(*s));
        auto pfd = sys::pidfd_open(pids_[done]);
        if (!pfd) return tl::unexpected(in_process(pfd.error(), pids_[done]));
        pidfds_.push_back(std::move(*pfd));
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

  // One fd table: readlink of every fd (in list_fds), then fdinfo of the pipe fds, both relative to
  // directory fds (each path walk through /proc costs as much as the read itself here).
  Expected<void> read_fd_table(size_t pi) {
    pid_t pid = pids_[pi];
    auto fds = sys::list_fds(pid, true);
    if (!fds) return tl::unexpected(in_process(fds.error(), pid));
    std::string base = fmt::format("/proc/{}/", pid);
    sys::UniqueFd fd_dir(::open((base + "fd").c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    sys::UniqueFd info_dir(::open((base + "fdinfo").c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!fd_dir || !info_dir) return tl::unexpected(in_process(sys::call_error("open", base + "fdinfo"), pid));
    for (sys::FdEntry& e : *fds) {
      Holder h{.pid = pid, .fd = e.fd, .target = std::move(e.target)};
      std::string name = std::to_string(e.fd);
      if (auto ino = sys::pipe_inode_from_link(h.target)) {
        h.ino = *ino;
      } else if (!h.target.empty() && h.target[0] == '/') {
        struct stat st {};
        if (::fstatat(fd_dir.get(), name.c_str(), &st, 0) < 0 || !S_ISFIFO(st.st_mode)) continue;
        h.ino = st.st_ino;
        h.dev = st.st_dev;
        h.kind = PipeKind::fifo;
      } else {
        continue;  // sockets, anon inodes, ...
      }
      auto info = read_fdinfo_at(info_dir.get(), name);
      if (!info) {
        if (info.error().kind == Errc::not_found) continue;  // closed meanwhile by another holder of the table
        return tl::unexpected(in_process(info.error(), pid));
      }
      h.cloexec = (info->flags & O_CLOEXEC) != 0;
      h.flags = info->flags & ~O_CLOEXEC;
      holders_.push_back(std::move(h));
    }
    return {};
  }

  static Expected<sys::FdInfo> read_fdinfo_at(int dir, const std::string& name) {
    sys::UniqueFd f(::openat(dir, name.c_str(), O_RDONLY | O_CLOEXEC));
    if (!f) return tl::unexpected(sys::call_error("open", "fdinfo/" + name));
    char buf[512];
    ssize_t n = ::read(f.get(), buf, sizeof buf);
    if (n < 0) return tl::unexpected(sys::call_error("read", "fdinfo/" + name));
    return sys::parse_fdinfo(std::string_view(buf, static_cast<size_t>(n)));
  }

  Expected<void> read_fd_tables() {
    for (size_t i = 0; i < pids_.size(); ++i)
      if (auto r = read_fd_table(i); !r) return r;
    return {};
  }

  static uint64_t key(pid_t pid, int fd) {
    return (static_cast<uint64_t>(pid) << 32) | static_cast<uint32_t>(fd);
  }

  Expected<void> group_files() {
    std::vector<sys::FdRef> refs;
    refs.reserve(holders_.size());
    std::unordered_map<uint64_t, size_t> index;
    for (size_t i = 0; i < holders_.size(); ++i) {
      refs.push_back(sys::FdRef{holders_[i].pid, holders_[i].fd, holders_[i].ino});
      index[key(holders_[i].pid, holders_[i].fd)] = i;
    }
    auto groups = sys::group_by_open_file(refs);
    if (!groups) return tl::unexpected(groups.error());
    for (const sys::FdGroup& g : *groups) {
      OpenFile f;
      f.rec.id = files_.size() + 1;
      for (const sys::FdRef& m : g.members)
        holders_[index.at(key(m.pid, m.fd))].file = files_.size();
      f.first_holder = index.at(key(g.members[0].pid, g.members[0].fd));
      files_.push_back(std::move(f));
    }
    return {};
  }

  size_t pid_index(pid_t pid) const {
    return static_cast<size_t>(std::find(pids_.begin(), pids_.end(), pid) - pids_.begin());
  }

  // The pipe a description belongs to, made on first sight (one fstat and one F_GETPIPE_SZ per pipe).
  Expected<size_t> pipe_of(int fd, const Holder& h) {
    auto key = std::pair<dev_t, uint64_t>(h.dev, h.ino);
    if (auto it = pipe_index_.find(key); it != pipe_index_.end()) return it->second;
    struct stat st {};
    if (::fstat(fd, &st) < 0) return tl::unexpected(sys::call_error("fstat", fmt::format("pid {} fd {}", h.pid, h.fd)));
    PipeState p;
    p.rec.id = pipes_.size() + 1;
    p.rec.kind = h.kind;
    p.rec.inode = h.ino;
    p.rec.uid = st.st_uid;
    p.rec.gid = st.st_gid;
    p.rec.mode = st.st_mode & 07777;
    auto cap = sys::get_pipe_size(fd);
    if (!cap) return tl::unexpected(cap.error());
    p.rec.capacity = static_cast<uint32_t>(*cap);
    if (h.kind == PipeKind::fifo) {
      p.rec.dev = st.st_dev;  // restore in place checks it is the same FIFO (restore/inplace.hpp)
      p.rec.path = h.target;
      if (p.rec.path.ends_with(kDeleted)) {
        p.rec.path.resize(p.rec.path.size() - kDeleted.size());
        p.rec.unlinked = true;
      }
    }
    pipes_.push_back(std::move(p));
    pipe_index_.emplace(key, pipes_.size() - 1);
    return pipes_.size() - 1;
  }

  Expected<void> read_file(OpenFile& f) {
    const Holder& h = holders_[f.first_holder];
    auto fd = sys::pidfd_getfd(pidfds_[pid_index(h.pid)].get(), h.fd, h.pid);
    if (!fd) return tl::unexpected(in_process(fd.error(), h.pid));
    if (is_notification_pipe(fd->get()))
      return fail(Errc::unsupported, ENOTSUP,
                  fmt::format("pid {} fd {} is a notification pipe (O_NOTIFICATION_PIPE): its messages cannot be "
                              "read without consuming them",
                              h.pid, h.fd));
    auto state = file_state(fd->get(), false);
    if (!state) return tl::unexpected(state.error());
    auto pi = pipe_of(fd->get(), h);
    if (!pi) return tl::unexpected(pi.error());
    f.pipe = *pi;
    f.rec.flags = static_cast<uint32_t>(h.flags);
    f.rec.owner = state->owner;
    f.rec.signal = state->signal;
    PipeState& p = pipes_[*pi];
    f.rec.pipe_id = p.rec.id;
    int access = static_cast<int>(f.rec.flags) & O_ACCMODE;
    if (access != O_RDONLY) p.has_writer_file = true;
    if (access == O_WRONLY) {
      if (p.write_holder == SIZE_MAX) p.write_holder = f.first_holder;
      return {};
    }
    if (p.rec.kind == PipeKind::fifo && access == O_RDONLY) {
      pollfd pfd{fd->get(), POLLIN, 0};
      f.pollhup = ::poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLHUP);
    }
    if (!p.snapped) {
      auto snap = snapshot(fd->get(), p.rec.capacity);
      if (!snap) return tl::unexpected(snap.error());
      p.snap = std::move(*snap);
      p.snapped = true;
    }
    return {};
  }

  Expected<void> read_files() {
    for (OpenFile& f : files_)
      if (auto r = read_file(f); !r) return r;
    return {};
  }

  // Pipes the dumped processes can only write: a read end from /proc/PID/fd/N, held for the tee only.
  Expected<void> snapshot_write_only_pipes() {
    for (PipeState& p : pipes_) {
      if (p.snapped) continue;
      const Holder& h = holders_[p.write_holder];
      std::string link = fmt::format("/proc/{}/fd/{}", h.pid, h.fd);
      sys::UniqueFd rd(::open(link.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC));
      if (!rd) return tl::unexpected(in_process(sys::call_error("open", link + ", O_RDONLY"), h.pid));
      auto snap = snapshot(rd.get(), p.rec.capacity);
      if (!snap) return tl::unexpected(snap.error());
      p.snap = std::move(*snap);
      p.snapped = true;
    }
    return {};
  }

  void mark_blocked() {
    std::map<std::pair<pid_t, int>, Blocked> blocked;
    for (const sys::StoppedProcess& s : stopped_)
      for (pid_t tid : s.threads()) {
        auto st = s.syscall_state(tid);
        if (!st || !st->in_syscall) continue;
        sys::TaskSyscall ts;
        ts.tid = tid;
        ts.nr = st->nr;
        for (int i = 0; i < 6; ++i) ts.args[i] = st->args[i];
        if (auto io = sys::blocked_io(ts)) blocked[{s.pid(), io->fd}] = io->dir;
      }
    for (Holder& h : holders_)
      if (auto it = blocked.find({h.pid, h.fd}); it != blocked.end()) h.blocked = it->second;
  }

  Expected<void> resume_all() {
    Expected<void> first;
    for (sys::StoppedProcess& s : stopped_)
      if (auto r = s.resume(opts_.leave_stopped); !r && first) first = r;
    return first;
  }

  // Which pipes have holders outside the dumped set: every other process's fd table, read once.
  void mark_outside_holders() {
    std::unordered_map<uint64_t, size_t> anon;
    std::unordered_map<std::string, size_t> fifos;
    for (size_t i = 0; i < pipes_.size(); ++i) {
      const PipeRecord& r = pipes_[i].rec;
      if (r.kind == PipeKind::anonymous)
        anon.emplace(r.inode, i);
      else
        fifos.emplace(r.unlinked ? r.path + std::string(kDeleted) : r.path, i);
    }
    auto all = sys::list_pids();
    if (!all) return;
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

  FifoReaderState fifo_reader_state(const OpenFile& f) const {
    const PipeState& p = pipes_[f.pipe];
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
    for (PipeState& p : pipes_) {
      if (!ok) break;
      auto slots = reader.read(p.snap, bytes);
      if (!slots) return tl::unexpected(slots.error());
      p.rec.slots = std::move(*slots);
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
      fds.push_back(FdRecord{.pid = h.pid, .fd = h.fd, .file_id = files_[h.file].rec.id, .cloexec = h.cloexec,
                             .blocked = h.blocked});
      if (ok) ok = w.add(fds.back());
    }
    if (ok) ok = w.finish();
    if (!ok) return tl::unexpected(ok.error());
    stats_.pipes = pipes_.size();
    stats_.files = files_.size();
    stats_.fds = holders_.size();
    if (records) {
      records->info = image::current_info();
      records->processes = procs_;
      for (const PipeState& p : pipes_) records->pipes.push_back(p.rec);
      for (const OpenFile& f : files_) records->files.push_back(f.rec);
      records->fds = std::move(fds);
    }
    return stats_;
  }

  const DumpOptions& opts_;
  std::vector<pid_t> pids_;
  std::vector<ProcessRecord> procs_;
  std::vector<sys::StoppedProcess> stopped_;
  std::vector<sys::UniqueFd> pidfds_;
  std::vector<Holder> holders_;
  std::vector<OpenFile> files_;
  std::vector<PipeState> pipes_;
  std::map<std::pair<dev_t, uint64_t>, size_t> pipe_index_;
  uint64_t stop_start_ = 0;
  DumpStats stats_;
};

}  // namespace

Expected<DumpStats> dump_processes(const DumpOptions& opts, image::Sink& sink, Image* records) {
  Dumper d(opts);
  return d.run(sink, records);
}

}  // namespace pipecr::dump
