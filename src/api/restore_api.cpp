// restore_api.cpp: restore_pipe(), the in-process restore of a single-pipe image.
//
// The pipe is built whole at temporary fd numbers above every number asked for; then a small
// transaction moves each end to its number with dup3(), keeping a duplicate of whatever was open
// there until the last step succeeded. Any failure puts those back, so the caller's fd table is
// unchanged unless the whole restore succeeded.
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <optional>
#include <string>

#include <fmt/format.h>

#include "image/image_io.hpp"
#include "image/validate.hpp"
#include "pipecr/pipe.hpp"
#include "restore/pipe.hpp"
#include "sys/syscalls.hpp"

namespace pipecr {
namespace {

struct End {
  sys::UniqueFd fd;            // the prepared end, at a temporary number
  const FileRecord* file = nullptr;
  bool cloexec = false;
  int want = -1;
};

Expected<sys::UniqueFd> open_fifo(const std::string& path, int flags) {
  sys::UniqueFd fd(::open(path.c_str(), flags | O_NONBLOCK | O_CLOEXEC | O_NOFOLLOW));
  if (!fd) return tl::unexpected(sys::call_error("open", fmt::format("{}, {:#o}", path, flags)));
  struct stat st {};
  if (::fstat(fd.get(), &st) < 0) return tl::unexpected(sys::call_error("fstat", path));
  if (!S_ISFIFO(st.st_mode))
    return fail(Errc::unsupported, ENOTSUP, fmt::format("{} exists but is not a FIFO", path));
  return fd;
}

// Both ends of the recorded pipe, created afresh: pipe2() for a pipe, opens of the path for a FIFO
// (an unlinked FIFO is made again as a FIFO that has no name). `keep` holds a read-write open of a
// FIFO so that its buffer lives while the ends are set up.
Expected<sys::PipePair> create_ends(const PipeRecord& p, sys::UniqueFd& keep) {
  if (p.kind == PipeKind::anonymous) return sys::make_pipe(O_CLOEXEC);
  std::string path = p.path;
  std::string tmpdir;
  if (p.unlinked) {
    char templ[] = "/tmp/pipecr-fifo-XXXXXX";
    if (!::mkdtemp(templ)) return tl::unexpected(sys::call_error("mkdtemp", templ));
    tmpdir = templ;
    path = tmpdir + "/fifo";
    if (::mkfifo(path.c_str(), p.mode ? (p.mode & 0777) : 0600) < 0) {
      Error e = sys::call_error("mkfifo", path);
      ::rmdir(tmpdir.c_str());
      return tl::unexpected(e);
    }
  }
  auto rw = open_fifo(path, O_RDWR);
  if (!tmpdir.empty()) {
    ::unlink(path.c_str());
    ::rmdir(tmpdir.c_str());
  }
  if (!rw) return tl::unexpected(rw.error());
  auto queued = sys::bytes_queued(rw->get());
  if (!queued) return tl::unexpected(queued.error());
  if (*queued != 0)
    return fail(Errc::unsupported, EBUSY,
                fmt::format("FIFO {} already holds {} bytes: another process has it open", path, *queued));
  std::string self = fmt::format("/proc/self/fd/{}", rw->get());
  sys::PipePair ends;
  ends.read.reset(::open(self.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC));
  if (!ends.read) return tl::unexpected(sys::call_error("open", self + ", O_RDONLY"));
  ends.write.reset(::open(self.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC));
  if (!ends.write) return tl::unexpected(sys::call_error("open", self + ", O_WRONLY"));
  keep = std::move(*rw);
  return ends;
}

// Moves fd to a number above `floor` when it sits at or below it.
Expected<void> move_above(sys::UniqueFd& fd, int floor) {
  if (fd.get() > floor) return {};
  int moved = ::fcntl(fd.get(), F_DUPFD_CLOEXEC, floor + 1);
  if (moved < 0) return tl::unexpected(sys::call_error("fcntl", fmt::format("fd={}, F_DUPFD_CLOEXEC, {}", fd.get(), floor + 1)));
  fd.reset(moved);
  return {};
}

// Puts prepared fds at their numbers; undoes everything unless commit() is called.
class Install {
 public:
  explicit Install(int floor) : floor_(floor) {}
  Install(const Install&) = delete;
  Install& operator=(const Install&) = delete;
  ~Install() {
    if (!committed_) rollback();
  }

  // Returns the final fd number of `end`.
  Expected<int> place(End& end) {
    if (end.want < 0) {
      if (!end.cloexec && ::fcntl(end.fd.get(), F_SETFD, 0) < 0)
        return tl::unexpected(sys::call_error("fcntl", fmt::format("fd={}, F_SETFD, 0", end.fd.get())));
      int fd = end.fd.release();
      placed_.push_back(Placed{fd, sys::UniqueFd(), 0, true});
      return fd;
    }
    Placed p{end.want, sys::UniqueFd(), 0, false};
    int old = ::fcntl(end.want, F_GETFD);
    if (old >= 0) {
      p.old_fdflags = old;
      p.saved.reset(::fcntl(end.want, F_DUPFD_CLOEXEC, floor_ + 1));
      if (!p.saved) return tl::unexpected(sys::call_error("fcntl", fmt::format("fd={}, F_DUPFD_CLOEXEC", end.want)));
    }
    if (::dup3(end.fd.get(), end.want, end.cloexec ? O_CLOEXEC : 0) < 0)
      return tl::unexpected(sys::call_error("dup3", fmt::format("{}, {}", end.fd.get(), end.want)));
    placed_.push_back(std::move(p));
    return end.want;
  }

  void commit() { committed_ = true; }

 private:
  struct Placed {
    int fd;
    sys::UniqueFd saved;   // what was open at fd before, if anything
    int old_fdflags;
    bool fresh;            // fd was a new number of ours, not one asked for
  };

  void rollback() {
    for (auto it = placed_.rbegin(); it != placed_.rend(); ++it) {
      if (it->saved)
        ::dup3(it->saved.get(), it->fd, (it->old_fdflags & FD_CLOEXEC) ? O_CLOEXEC : 0);
      else
        sys::UniqueFd(it->fd).reset();
    }
  }

  int floor_;
  std::vector<Placed> placed_;
  bool committed_ = false;
};

Expected<void> check_wanted(int want_read, int want_write) {
  rlimit rl {};
  ::getrlimit(RLIMIT_NOFILE, &rl);
  for (int w : {want_read, want_write}) {
    if (w < -1) return fail(Errc::invalid_argument, EINVAL, fmt::format("fd number {} is not valid", w));
    if (w >= 0 && static_cast<rlim_t>(w) >= rl.rlim_cur)
      return fail(Errc::invalid_argument, EINVAL,
                  fmt::format("fd {} is not below RLIMIT_NOFILE ({})", w, static_cast<unsigned long long>(rl.rlim_cur)));
  }
  if (want_read >= 0 && want_read == want_write)
    return fail(Errc::invalid_argument, EINVAL, fmt::format("both ends asked for fd {}", want_read));
  return {};
}

// The recorded ends of the single pipe: its read-side file (O_RDONLY or O_RDWR) and write-side file.
void pick_files(const Image& img, End& r, End& w) {
  for (const FileRecord& f : img.files) {
    End& e = (f.flags & O_ACCMODE) == O_WRONLY ? w : r;
    if (e.file) continue;
    e.file = &f;
    for (const FdRecord& d : img.fds)
      if (d.file_id == f.id) {
        e.cloexec = d.cloexec;
        break;
      }
  }
}

}  // namespace

Expected<RestoredPipe> restore_pipe(std::span<const std::byte> bytes, int want_read, int want_write,
                                    const RestoreOptions& opts) {
  if (auto ok = check_wanted(want_read, want_write); !ok) return tl::unexpected(ok.error());
  auto img = image::parse(bytes);
  if (!img) return tl::unexpected(img.error());
  if (auto ok = image::validate(*img); !ok) return tl::unexpected(ok.error());
  if (img->pipes.size() != 1)
    return fail(Errc::invalid_argument, EINVAL,
                fmt::format("the image holds {} pipes; restore_pipe restores exactly one", img->pipes.size()));
  const PipeRecord& pipe = img->pipes.front();

  End r, w;
  r.want = want_read;
  w.want = want_write;
  pick_files(*img, r, w);

  sys::UniqueFd keep;
  auto ends = create_ends(pipe, keep);
  if (!ends) return tl::unexpected(ends.error());
  r.fd = std::move(ends->read);
  w.fd = std::move(ends->write);
  if (r.file && (r.file->flags & O_ACCMODE) == O_RDWR) {
    // The recorded end could read and write (a FIFO opened O_RDWR, or a /proc reopen of a pipe).
    std::string self = fmt::format("/proc/self/fd/{}", r.fd.get());
    sys::UniqueFd rw(::open(self.c_str(), O_RDWR | O_NONBLOCK | O_CLOEXEC));
    if (!rw) return tl::unexpected(sys::call_error("open", self + ", O_RDWR"));
    r.fd = std::move(rw);
  }

  restore::RefillOptions ropts{opts.allow_smaller_capacity, opts.no_vmsplice};
  if (auto c = restore::set_capacity(w.fd.get(), pipe, ropts); !c) return tl::unexpected(c.error());
  if (auto f = restore::refill(w.fd.get(), pipe, ropts); !f) return tl::unexpected(f.error());
  if (auto o = restore::set_inode_owner(r.fd.get(), pipe); !o) return tl::unexpected(o.error());
  static const FileRecord kDefault{};
  for (End* e : {&r, &w})
    if (auto s = restore::set_file_state(e->fd.get(), e->file ? *e->file : kDefault); !s)
      return tl::unexpected(s.error());

  int floor = std::max({want_read, want_write, 2});
  for (End* e : {&r, &w})
    if (auto m = move_above(e->fd, floor); !m) return tl::unexpected(m.error());

  Install tx(floor);
  RestoredPipe out;
  auto rf = tx.place(r);
  if (!rf) return tl::unexpected(rf.error());
  auto wf = tx.place(w);
  if (!wf) return tl::unexpected(wf.error());
  for (auto [e, fd] : {std::pair{&r, *rf}, std::pair{&w, *wf}})
    if (e->file)
      if (auto a = restore::set_async(fd, *e->file); !a) return tl::unexpected(a.error());
  tx.commit();
  out.read_fd = *rf;
  out.write_fd = *wf;
  return out;
}

}  // namespace pipecr
