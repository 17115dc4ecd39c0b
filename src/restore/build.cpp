// restore/build.cpp: stage 2 of a restore into processes: every planned pipe, made in this process.
//
// Each open file description of the image (FileRecord) becomes one fd here, so that passing the same
// fd to several targets later makes them share it, as dup() and fork() had them share it:
//   - an anonymous pipe: pipe2(); the first read-only file gets the read end and the first write-only
//     file the write end (a file without O_LARGEFILE is preferred: only pipe2() ends lack it, open()
//     adds it), every further file and every O_RDWR file is a new open of /proc/self/fd/<end> with
//     its access mode: a separate open file description with its own flags, on the same pipe;
//   - a FIFO: its recorded path is checked (lstat: a symlink or a non-FIFO is refused, a missing one
//     created only when asked) and opened once, O_RDWR|O_NOFOLLOW; that open refills it and keeps its
//     buffer alive until every end is installed; every file is then a new open of /proc/self/fd/<that
//     open>, never of the path again, so nothing can swap the path in between. An unlinked FIFO is a
//     FIFO made in a private directory, opened and unlinked again.
// A FIFO reader opened O_RDONLY|O_NONBLOCK remembers the writer counter at its open (kernel-facts.md,
// FIFOs): readers that had seen a writer are opened before a writer is opened and closed; readers
// that had not ("no_writer_yet") are opened after every writer, so poll() hides POLLHUP for them
// exactly as before.
// Order per pipe (restore/pipe.hpp): capacity, refill, inode owner, per-file flags, owner, signal.
// O_ASYNC is not set here: it is set at the final fd number (stage 3).
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>

#include <fmt/format.h>

#include "restore/plan.hpp"
#include "sys/syscalls.hpp"

namespace pipecr::restore {
namespace {

int accmode(const FileRecord& f) { return static_cast<int>(f.flags) & O_ACCMODE; }

Expected<sys::UniqueFd> reopen(int fd, int mode) {
  std::string self = fmt::format("/proc/self/fd/{}", fd);
  sys::UniqueFd out(::open(self.c_str(), mode | O_NONBLOCK | O_CLOEXEC));
  if (!out) return tl::unexpected(sys::call_error("open", fmt::format("{}, {}", self, mode == O_RDONLY ? "O_RDONLY" : mode == O_WRONLY ? "O_WRONLY" : "O_RDWR")));
  return out;
}

// Flags, owner and signal; an owner that cannot be set is a note, not a failure.
Expected<void> apply_state(int fd, const FileRecord& f, Built& built) {
  auto ok = set_file_state(fd, f);
  if (ok || f.owner.pid == 0) return ok;
  FileRecord no_owner = f;
  no_owner.owner = Owner{};
  if (auto again = set_file_state(fd, no_owner); !again) return again;
  built.notes.push_back(fmt::format("pipe {} file {}: signal owner not set: {}", f.pipe_id, f.id, ok.error().what));
  return {};
}

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

Expected<void> fill(int fd, const PipeRecord& p, const ProcessRestoreOptions& opts) {
  auto cap = set_capacity(fd, p, opts.refill);
  if (!cap) return tl::unexpected(cap.error());
  return refill(fd, p, opts.refill);
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
  if (auto ok = fill(ends->write.get(), p, opts); !ok) return ok;
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
  if (orig_r != SIZE_MAX) made.emplace_back(orig_r, std::move(ends->read));
  else built.keep.push_back(std::move(ends->read));
  if (orig_w != SIZE_MAX) made.emplace_back(orig_w, std::move(ends->write));
  else built.keep.push_back(std::move(ends->write));
  for (auto& [i, fd] : made) {
    if (auto ok = apply_state(fd.get(), plan.files[i].rec, built); !ok) return ok;
    built.files[plan.files[i].rec.id] = std::move(fd);
  }
  return {};
}

// A FIFO with no name: made in a private directory, opened, and its name removed again.
Expected<sys::UniqueFd> open_unlinked_fifo(const PipeRecord& p) {
  const char* tmp = std::getenv("TMPDIR");
  std::string templ = fmt::format("{}/pipecr-fifo-XXXXXX", tmp && *tmp ? tmp : "/tmp");
  if (!::mkdtemp(templ.data())) return tl::unexpected(sys::call_error("mkdtemp", templ));
  std::string path = templ + "/fifo";
  sys::UniqueFd fd;
  if (::mkfifo(path.c_str(), 0600) == 0) fd.reset(::open(path.c_str(), O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOFOLLOW));
  Error e = sys::call_error(fd ? "open" : "mkfifo", path);
  ::unlink(path.c_str());
  ::rmdir(templ.c_str());
  if (!fd) return tl::unexpected(e);
  (void)p;
  return fd;
}

// The recorded path, checked and opened O_RDWR. created: we made it (--create-fifos).
Expected<sys::UniqueFd> open_named_fifo(const PipeRecord& p, const ProcessRestoreOptions& opts, Built& built, bool& created) {
  struct stat st {};
  if (::lstat(p.path.c_str(), &st) < 0) {
    if (errno != ENOENT) return tl::unexpected(sys::call_error("lstat", p.path));
    if (!opts.create_fifos)
      return fail(Errc::not_found, ENOENT, fmt::format("FIFO {} does not exist (give --create-fifos to create it)", p.path));
    if (::mkfifo(p.path.c_str(), p.mode ? p.mode : 0600) < 0)
      return tl::unexpected(sys::call_error("mkfifo", fmt::format("{}, {:#o}", p.path, p.mode)));
    built.created_fifos.push_back(p.path);
    created = true;
  } else if (S_ISLNK(st.st_mode)) {
    return fail(Errc::unsupported, ELOOP, fmt::format("FIFO {} is now a symbolic link: not followed", p.path));
  } else if (!S_ISFIFO(st.st_mode)) {
    return fail(Errc::unsupported, ENOTSUP, fmt::format("{} exists but is not a FIFO: refused", p.path));
  }
  sys::UniqueFd fd(::open(p.path.c_str(), O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOFOLLOW));
  if (!fd) return tl::unexpected(sys::call_error("open", fmt::format("{}, O_RDWR|O_NOFOLLOW", p.path)));
  if (::fstat(fd.get(), &st) < 0) return tl::unexpected(sys::call_error("fstat", p.path));
  if (!S_ISFIFO(st.st_mode)) return fail(Errc::unsupported, ENOTSUP, fmt::format("{} is not a FIFO: refused", p.path));
  return fd;
}

// Open order that keeps each reader's view of "a writer has been here" (see the top of the file).
int open_rank(const FileRecord& f) {
  if (accmode(f) != O_RDONLY) return 1;
  return f.fifo_reader == FifoReaderState::no_writer_yet ? 2 : 0;
}

Expected<void> build_fifo(const Plan& plan, const PlannedPipe& pp, const ProcessRestoreOptions& opts, Built& built) {
  const PipeRecord& p = *pp.pipe;
  bool created = p.unlinked;
  auto keep = p.unlinked ? open_unlinked_fifo(p) : open_named_fifo(p, opts, built, created);
  if (!keep) return tl::unexpected(keep.error());
  auto queued = sys::bytes_queued(keep->get());
  if (!queued) return tl::unexpected(queued.error());
  if (*queued != 0)
    return fail(Errc::unsupported, EBUSY,
                fmt::format("it already holds {} bytes: another process has it open with data", *queued));
  if (auto ok = fill(keep->get(), p, opts); !ok) return ok;
  if (created)
    if (auto ok = set_inode_owner(keep->get(), p); !ok) return ok;
  for (int rank = 0; rank <= 2; ++rank) {
    if (rank == 1) {  // a writer comes and goes: readers opened so far have seen one
      auto bump = reopen(keep->get(), O_WRONLY);
      if (!bump) return tl::unexpected(bump.error());
    }
    for (size_t i : pp.files) {
      const FileRecord& f = plan.files[i].rec;
      if (open_rank(f) != rank) continue;
      auto fd = reopen(keep->get(), accmode(f));
      if (!fd) return tl::unexpected(fd.error());
      if (auto ok = apply_state(fd->get(), f, built); !ok) return ok;
      built.files[f.id] = std::move(*fd);
    }
  }
  built.keep.push_back(std::move(*keep));
  return {};
}

// Room for the fds we are about to hold: raise the soft limit (never above the hard one).
void ensure_fd_room(size_t needed) {
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) < 0) return;
  rlim_t want = static_cast<rlim_t>(needed) + 256;
  if (rl.rlim_cur >= want) return;
  rl.rlim_cur = rl.rlim_max == RLIM_INFINITY ? want : std::min(want, rl.rlim_max);
  (void)::setrlimit(RLIMIT_NOFILE, &rl);
}

}  // namespace

Expected<Built> build(const Plan& plan, const ProcessRestoreOptions& opts) {
  Built built;
  size_t needed = 0;
  for (const PlannedPipe& pp : plan.pipes) needed += pp.files.size() + 2;
  ensure_fd_room(needed);
  built.files.reserve(plan.files.size());
  for (const PlannedPipe& pp : plan.pipes) {
    auto ok = pp.pipe->kind == PipeKind::fifo ? build_fifo(plan, pp, opts, built) : build_anonymous(plan, pp, opts, built);
    if (!ok) {
      remove_created_fifos(built);
      return tl::unexpected(for_pipe(*pp.pipe, ok.error()));
    }
  }
  return built;
}

void remove_created_fifos(Built& built) {
  for (const std::string& path : built.created_fifos) ::unlink(path.c_str());
  built.created_fifos.clear();
}

}  // namespace pipecr::restore
