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
// A FIFO reader opened O_RDONLY|O_NONBLOCK remembers the writer counter at its open, and only when no
// writer is open at that moment (fs/pipe.c: fifo_open sets filp->f_pipe = pipe->w_counter only if
// !pipe->writers; pipe_poll shows EPOLLHUP when !pipe->writers && filp->f_pipe != pipe->w_counter).
// So a reader that had seen a writer is opened while the read-write open is there (f_pipe stays 0,
// w_counter is past 0: POLLHUP once the writers are gone), and a reader that had not
// ("no_writer_yet") is opened with NO writer open at all: a temporary reader takes over holding the
// buffer, the read-write open is closed, the reader is opened through the temporary reader, and no
// writer is opened after it. Opening it after the read-write open but while it is still open is not
// enough (measured: POLLHUP once it is closed), because writers != 0 then and f_pipe is not set.
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
#include <optional>

#include <fmt/format.h>

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
  // An end no restored file takes is closed when `ends` goes out of scope (see the top of the file).
  if (orig_r != SIZE_MAX) made.emplace_back(orig_r, std::move(ends->read));
  if (orig_w != SIZE_MAX) made.emplace_back(orig_w, std::move(ends->write));
  for (auto& [i, fd] : made) {
    if (auto ok = apply_file_state(fd.get(), plan.files[i].rec, built.notes); !ok) return ok;
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

// The recorded path, checked and opened O_RDWR, at `at`: the path in the mount namespace of the
// targets holding it (/proc/TARGET/root/PATH), or as it is for the --exec process (pipecr's own).
// created: we made it (--create-fifos).
Expected<sys::UniqueFd> open_named_fifo(const PipeRecord& p, const std::string& at, const ProcessRestoreOptions& opts,
                                        Built& built, bool& created) {
  struct stat st {};
  if (::lstat(at.c_str(), &st) < 0) {
    if (errno != ENOENT) return tl::unexpected(sys::call_error("lstat", p.path));
    if (!opts.create_fifos)
      return fail(Errc::not_found, ENOENT, fmt::format("FIFO {} does not exist (give --create-fifos to create it)", p.path));
    if (::mkfifo(at.c_str(), p.mode ? (p.mode & 0777) : 0600) < 0)  // never setuid/setgid/sticky
      return tl::unexpected(sys::call_error("mkfifo", fmt::format("{}, {:#o}", p.path, p.mode)));
    built.created_fifos.push_back(at);
    created = true;
  } else if (S_ISLNK(st.st_mode)) {
    return fail(Errc::unsupported, ELOOP, fmt::format("FIFO {} is now a symbolic link: not followed", p.path));
  } else if (!S_ISFIFO(st.st_mode)) {
    return fail(Errc::unsupported, ENOTSUP, fmt::format("{} exists but is not a FIFO: refused", p.path));
  }
  sys::UniqueFd fd(::open(at.c_str(), O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOFOLLOW));
  if (!fd) return tl::unexpected(sys::call_error("open", fmt::format("{}, O_RDWR|O_NOFOLLOW", p.path)));
  if (::fstat(fd.get(), &st) < 0) return tl::unexpected(sys::call_error("fstat", p.path));
  if (!S_ISFIFO(st.st_mode)) return fail(Errc::unsupported, ENOTSUP, fmt::format("{} is not a FIFO: refused", p.path));
  return fd;
}

// Where the recorded path of a FIFO is, for the processes that will hold it: in the mount namespace
// of the targets holding it (/proc/TARGET/root/PATH: a path in pipecr's own namespace may name
// another FIFO, and the restored bytes would go to whoever holds that one), or pipecr's own path
// when only the --exec process holds it. Targets in different mount namespaces: refused.
Expected<std::string> fifo_path_in_namespace(const Plan& plan, const PlannedPipe& pp) {
  const std::string& path = pp.pipe->path;
  std::optional<std::pair<pid_t, std::string>> first;  // target, its mount namespace
  for (const Holder& h : plan.holders) {
    if (h.exec) continue;
    bool holds = std::any_of(h.fds.begin(), h.fds.end(), [&](const PlannedFd& f) {
      return plan.files[plan.file_index.at(f.rec->file_id)].pipe == pp.pipe;
    });
    if (!holds) continue;
    char ns[64] = {};
    std::string link = fmt::format("/proc/{}/ns/mnt", h.target);
    ssize_t n = ::readlink(link.c_str(), ns, sizeof ns - 1);
    if (n < 0) return tl::unexpected(sys::call_error("readlink", link));
    std::string mnt(ns, static_cast<size_t>(n));
    if (!first) first.emplace(h.target, mnt);
    else if (first->second != mnt)
      return fail(Errc::unsupported, EXDEV,
                  fmt::format("FIFO {}: targets {} and {} are in different mount namespaces: refused", path,
                              first->first, h.target));
  }
  if (!first) return path;
  if (path.empty() || path[0] != '/')
    return fail(Errc::bad_image, EINVAL, fmt::format("FIFO path {} is not absolute: refused", path));
  return fmt::format("/proc/{}/root{}", first->first, path);
}

bool latched_reader(const FileRecord& f) {
  return accmode(f) == O_RDONLY && f.fifo_reader == FifoReaderState::no_writer_yet;
}

// Opens the files of pp through `via` (an open of the same FIFO) that pass `which`.
template <typename Which>
Expected<void> open_fifo_files(const Plan& plan, const PlannedPipe& pp, int via, Which which, Built& built) {
  for (size_t i : pp.files) {
    const FileRecord& f = plan.files[i].rec;
    if (!which(f)) continue;
    auto fd = reopen(via, accmode(f));
    if (!fd) return tl::unexpected(fd.error());
    if (auto ok = apply_file_state(fd->get(), f, built.notes); !ok) return ok;
    built.files[f.id] = std::move(*fd);
  }
  return {};
}

// Open order that keeps each reader's view of "a writer has been here" (see the top of the file):
//   1. the read-write open (a writer: w_counter moves on), refill;
//   2. readers that had seen a writer, while it is open (their f_pipe stays behind w_counter);
//   3. if there are no_writer_yet readers: a temporary reader holds the buffer, the read-write open
//      is closed (writers == 0), those readers are opened (f_pipe = w_counter), and what is kept
//      until the end is the temporary reader;
//   4. writers and read-write files (a no_writer_yet reader is recorded only where the image has no
//      writer, so this adds nothing after step 3 for an image pipecr dump wrote).
Expected<void> build_fifo(const Plan& plan, const PlannedPipe& pp, const ProcessRestoreOptions& opts, Built& built) {
  const PipeRecord& p = *pp.pipe;
  bool created = p.unlinked;
  auto at = fifo_path_in_namespace(plan, pp);
  if (!at) return tl::unexpected(at.error());
  auto keep = p.unlinked ? open_unlinked_fifo(p) : open_named_fifo(p, *at, opts, built, created);
  if (!keep) return tl::unexpected(keep.error());
  auto queued = sys::bytes_queued(keep->get());
  if (!queued) return tl::unexpected(queued.error());
  if (*queued != 0)
    return fail(Errc::unsupported, EBUSY,
                fmt::format("it already holds {} bytes: another process has it open with data", *queued));
  if (auto ok = fill(keep->get(), p, opts); !ok) return ok;
  if (created)
    if (auto ok = set_inode_owner(keep->get(), p); !ok) return ok;
  auto seen_reader = [](const FileRecord& f) { return accmode(f) == O_RDONLY && !latched_reader(f); };
  if (auto ok = open_fifo_files(plan, pp, keep->get(), seen_reader, built); !ok) return ok;
  bool any_latched = false;
  for (size_t i : pp.files) any_latched = any_latched || latched_reader(plan.files[i].rec);
  if (any_latched) {
    auto hold = reopen(keep->get(), O_RDONLY);
    if (!hold) return tl::unexpected(hold.error());
    *keep = std::move(*hold);  // the read-write open is closed here: no writer is open now
    if (auto ok = open_fifo_files(plan, pp, keep->get(), latched_reader, built); !ok) return ok;
  }
  auto writer = [](const FileRecord& f) { return accmode(f) != O_RDONLY; };
  if (auto ok = open_fifo_files(plan, pp, keep->get(), writer, built); !ok) return ok;
  built.keep.push_back(std::move(*keep));
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
  size_t n = plan.files.size() + kFdSlack;
  for (const PlannedPipe& pp : plan.pipes) {
    if (pp.choice.in_place) n += in_place_fds(pp, pp.choice.kept);  // copies, scratch, holding, own ends
    else if (pp.pipe->kind == PipeKind::fifo) ++n;  // the read-write open or the temporary reader, kept
  }
  bool targets = false;
  for (const Holder& h : plan.holders) {
    if (h.exec) n += 2 * h.fds.size();  // at the recorded numbers, and a copy of what was there
    else targets = true;
  }
  if (targets) n += kStashChunk;  // copies of the targets' old fds, one chunk beyond the files installed
  return n;
}

Expected<void> check_fd_room(const Plan& plan) {
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) < 0) return tl::unexpected(sys::call_error("getrlimit", "RLIMIT_NOFILE"));
  auto open_now = open_fd_count();
  if (!open_now) return tl::unexpected(open_now.error());
  const size_t need = fds_needed(plan);
  if (rl.rlim_cur == RLIM_INFINITY || *open_now + need <= rl.rlim_cur) return {};
  return fail(Errc::system, EMFILE,
              fmt::format("this restore needs about {} fds open in pipecr at once ({} open files of {} pipes, "
                          "plus temporaries) and pipecr holds {} already, but its RLIMIT_NOFILE is {} (hard {}): "
                          "raise the hard limit (ulimit -Hn, prlimit --nofile) or restore fewer processes at once",
                          need, plan.files.size(), plan.pipes.size(), *open_now, rl.rlim_cur, rl.rlim_max));
}

Expected<Built> build(const Plan& plan, const ProcessRestoreOptions& opts) {
  if (auto ok = check_fd_room(plan); !ok) return tl::unexpected(ok.error());
  Built built;
  built.files.reserve(plan.files.size());
  for (const PlannedPipe& pp : plan.pipes) {
    auto ok = pp.choice.in_place           ? build_in_place(plan, pp, opts, built)
              : pp.pipe->kind == PipeKind::fifo ? build_fifo(plan, pp, opts, built)
                                                : build_anonymous(plan, pp, opts, built);
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
