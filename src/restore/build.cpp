// restore/build.cpp: stage 2 of a restore into processes: every planned pipe, made in this process.
//
// Each open file description of the image (FileRecord) becomes one fd here, so that passing the same
// fd to several targets later makes them share it, as dup() and fork() had them share it:
//   - an anonymous pipe: pipe2(); the first read-only file gets the read end and the first write-only
//     file the write end (a file without O_LARGEFILE is preferred: only pipe2() ends lack it, open()
//     adds it), every further file and every O_RDWR file is a new open of /proc/self/fd/<end> with
//     its access mode: a separate open file description with its own flags, on the same pipe;
//   - a FIFO: restore/fifo.cpp (its path, its open order).
// Ends of an anonymous pipe that no restored fd holds are closed as soon as the pipe is built: a
// dropped writer gives the reader EOF after the data, a dropped reader gives the writer EPIPE, which
// is the state the restore ends in anyway, and 10,000 pipes then need 10,000 fds here, not 20,000.
// Order per pipe (restore/pipe.hpp): capacity, refill, inode owner, per-file flags, owner, signal.
// O_ASYNC is not set here: it is set at the final fd number (stage 3).
#include <dirent.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <unordered_set>

#include <fmt/format.h>

#include "restore/fifo.hpp"
#include "restore/plan.hpp"
#include "sys/syscalls.hpp"

namespace pipecr::restore {
namespace {

int accmode(const FileRecord& f) { return static_cast<int>(f.flags) & O_ACCMODE; }

// The file (index into plan.files) that gets the end pipe2() made for mode, or SIZE_MAX.
size_t pick_original(const Plan& plan, const PlannedPipe& pp, int mode) {
  size_t first = SIZE_MAX;
  for (size_t i : pp.files) {
    const FileRecord& f = plan.files[i].rec;
    if (accmode(f) != mode) continue;
    if (!(f.flags & O_LARGEFILE)) return i;
    if (first == SIZE_MAX) first = i;
  }
  return first;
}

Error for_pipe(const PipeRecord& p, const Error& e) {
  std::string name = p.kind == PipeKind::fifo ? fmt::format("FIFO {}", p.unlinked ? p.path + " (deleted)" : p.path)
                                              : fmt::format("pipe {} (pipe:[{}])", p.id, p.inode);
  return Error{e.kind, e.err, fmt::format("{}: {}", name, e.what)};
}

Expected<void> build_anonymous(const Plan& plan, const PlannedPipe& pp, const ProcessRestoreOptions& opts, Built& built) {
  const PipeRecord& p = *pp.pipe;
  auto ends = sys::make_pipe(O_CLOEXEC);
  if (!ends) return tl::unexpected(ends.error());
  if (auto ok = fill(ends->write.get(), p, opts.refill); !ok) return ok;
  if (auto ok = set_inode_owner(ends->read.get(), p); !ok) return ok;
  const size_t orig_r = pick_original(plan, pp, O_RDONLY), orig_w = pick_original(plan, pp, O_WRONLY);
  std::vector<std::pair<size_t, sys::UniqueFd>> made;
  for (size_t i : pp.files) {
    const FileRecord& f = plan.files[i].rec;
    if (i == orig_r || i == orig_w) continue;
    auto fd = reopen(accmode(f) == O_WRONLY ? ends->write.get() : ends->read.get(), accmode(f));
    if (!fd) return tl::unexpected(fd.error());
    made.emplace_back(i, std::move(*fd));
  }
  // An end no restored file takes is closed when `ends` goes out of scope (see the top of the file).
  if (orig_r != SIZE_MAX) made.emplace_back(orig_r, std::move(ends->read));
  if (orig_w != SIZE_MAX) made.emplace_back(orig_w, std::move(ends->write));
  for (auto& [i, fd] : made) {
    if (auto ok = apply_file_state(fd.get(), plan.files[i].rec, built.notes); !ok) return ok;
    built.files[plan.files[i].rec.id] = std::move(fd);
  }
  return {};
}

// The fds open in this process now (entries of /proc/self/fd, less the one listing it).
Expected<size_t> open_fd_count() {
  DIR* dir = ::opendir("/proc/self/fd");
  if (!dir) return tl::unexpected(sys::call_error("opendir", "/proc/self/fd"));
  size_t n = 0;
  while (dirent* d = ::readdir(dir))
    if (d->d_name[0] != '.') ++n;
  ::closedir(dir);
  return n > 0 ? n - 1 : 0;
}

}  // namespace

size_t fds_needed(const Plan& plan) {
  // The files built: those of the --exec process stay until it has them at their numbers; the
  // others (and the in-place reopens) are queued to their targets a chunk at a time (kBuildChunk,
  // plus the files of the pipe that crosses the mark) and closed.
  std::unordered_set<uint64_t> exec_files;
  for (const Holder& h : plan.holders)
    if (h.exec)
      for (const PlannedFd& f : h.fds) exec_files.insert(f.rec->file_id);
  size_t widest = 0;
  for (const PlannedPipe& pp : plan.pipes) widest = std::max(widest, pp.files.size());
  const size_t others = plan.files.size() - std::min(plan.files.size(), exec_files.size());
  size_t n = exec_files.size() + std::min(others, kBuildChunk + widest) + kFdSlack;
  for (const PlannedPipe& pp : plan.pipes) {
    if (pp.choice.in_place) n += in_place_fds(pp, pp.choice.kept);  // copies, scratch, holding, own ends
    else n += replaced_fds(pp);  // a FIFO: the read-write open or the temporary reader, kept (and its staging)
  }
  bool targets = false;
  for (const Holder& h : plan.holders) {
    if (h.exec) n += 2 * h.fds.size();  // at the recorded numbers, and a copy of what was there
    else {
      targets = true;
      n += 4;  // its files queue (both ends until the agent takes one), and the queue its old files are parked in
    }
  }
  if (targets) n += kStashChunk;  // the targets' old files, handed back at the commit, one message at a time
  return n;
}

namespace {

// Whether files in flight in unix sockets are unlimited for this process (CAP_SYS_ADMIN or
// CAP_SYS_RESOURCE, effective); without, the kernel refuses to queue more than RLIMIT_NOFILE of
// them per user (ETOOMANYREFS).
bool inflight_unlimited() {
  sys::UniqueFd in(::open("/proc/self/status", O_RDONLY | O_CLOEXEC));
  if (!in) return false;
  char buf[4096];
  ssize_t n = ::read(in.get(), buf, sizeof buf - 1);
  if (n <= 0) return false;
  buf[n] = 0;
  const char* at = std::strstr(buf, "CapEff:");
  if (!at) return false;
  const unsigned long long eff = std::strtoull(at + 7, nullptr, 16);
  return (eff >> 21 & 1) || (eff >> 24 & 1);  // CAP_SYS_ADMIN, CAP_SYS_RESOURCE
}

}  // namespace

Expected<void> check_fd_room(const Plan& plan) {
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) < 0) return tl::unexpected(sys::call_error("getrlimit", "RLIMIT_NOFILE"));
  auto open_now = open_fd_count();
  if (!open_now) return tl::unexpected(open_now.error());
  const size_t need = fds_needed(plan);
  size_t inflight = 0;  // files queued to the targets, all in flight at once before the stop
  for (const Holder& h : plan.holders)
    if (!h.exec)
      for (const PlannedFd& f : h.fds) inflight += !f.keep;
  if (rl.rlim_cur != RLIM_INFINITY && inflight > rl.rlim_cur && !inflight_unlimited())
    return fail(Errc::system, ETOOMANYREFS,
                fmt::format("this restore parks {} files in flight (unix sockets) before it stops the targets, and "
                            "without CAP_SYS_ADMIN or CAP_SYS_RESOURCE the kernel allows a user only its "
                            "RLIMIT_NOFILE ({}) of them: raise it, e.g. prlimit --pid {} --nofile={}:{}, or restore "
                            "fewer processes at once",
                            inflight, rl.rlim_cur, ::getpid(), inflight + kBuildChunk + 1024,
                            inflight + kBuildChunk + 1024));
  if (rl.rlim_cur == RLIM_INFINITY || *open_now + need <= rl.rlim_cur) return {};
  return fail(Errc::system, EMFILE,
              fmt::format("this restore needs about {} fds open in pipecr at once ({} open files of {} pipes, "
                          "plus temporaries) and pipecr holds {} already, but its RLIMIT_NOFILE is {} (hard {}): "
                          "raise it, e.g. prlimit --nofile={}:{} pipecr restore ... (as root), or restore fewer "
                          "processes at once",
                          need, plan.files.size(), plan.pipes.size(), *open_now, rl.rlim_cur, rl.rlim_max,
                          *open_now + need + 64, *open_now + need + 64));
}

Expected<Built> build(const Plan& plan, const ProcessRestoreOptions& opts, const Flush& flush) {
  if (auto ok = check_fd_room(plan); !ok) return tl::unexpected(ok.error());
  Built built;
  const FdsByPipe index = index_fds_by_pipe(plan);
  size_t mark = kBuildChunk;  // flush when built.files reaches it (what stays after a flush, plus a chunk)
  for (const PlannedPipe& pp : plan.pipes) {
    auto ok = pp.choice.in_place           ? build_in_place(plan, pp, opts, built, &index)
              : pp.pipe->kind == PipeKind::fifo ? build_fifo(plan, pp, opts, built)
                                                : build_anonymous(plan, pp, opts, built);
    if (!ok) {
      remove_created_fifos(built);
      return tl::unexpected(for_pipe(*pp.pipe, ok.error()));
    }
    if (flush && built.files.size() >= mark) {
      if (auto f = flush(built); !f) {
        remove_created_fifos(built);
        return tl::unexpected(f.error());
      }
      mark = built.files.size() + kBuildChunk;
    }
  }
  if (flush)
    if (auto f = flush(built); !f) {
      remove_created_fifos(built);
      return tl::unexpected(f.error());
    }
  return built;
}

FdsByPipe index_fds_by_pipe(const Plan& plan) {
  FdsByPipe out;
  for (const Holder& h : plan.holders)
    for (const PlannedFd& f : h.fds) out[plan.files[plan.file_index.at(f.rec->file_id)].pipe].emplace_back(&h, &f);
  return out;
}

void remove_created_fifos(Built& built) {
  for (const std::string& path : built.created_fifos) ::unlink(path.c_str());
  built.created_fifos.clear();
}

}  // namespace pipecr::restore
