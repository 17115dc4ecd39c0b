// restore/fifo.cpp: the FIFO kind's build step (fifo.hpp): where its path is, how it is opened,
// and in which order its files are opened.
//
// A FIFO's recorded path is checked (lstat: a symlink or a non-FIFO is refused, a missing one
// created only when asked) and opened once, O_RDWR|O_NOFOLLOW; that open refills it and keeps its
// buffer alive until every end is installed; every file is then a new open of /proc/self/fd/<that
// open>, never of the path again, so nothing can swap the path in between. An unlinked FIFO is a
// FIFO made in a private directory, opened and unlinked again.
// A FIFO a target holds (the plan's scan) is the target's own buffer: it is not refilled here but
// in the stop, from a scratch pipe, like a pipe refilled in place (stage_replaced_fifo(),
// inplace.hpp), so that a restore that fails leaves its bytes and capacity as they were.
// A FIFO reader opened O_RDONLY|O_NONBLOCK remembers the writer counter at its open, and only when no
// writer is open at that moment (fs/pipe.c: fifo_open sets filp->f_pipe = pipe->w_counter only if
// !pipe->writers; pipe_poll shows EPOLLHUP when !pipe->writers && filp->f_pipe != pipe->w_counter).
// So a reader that had seen a writer is opened while the read-write open is there (f_pipe stays 0,
// w_counter is past 0: POLLHUP once the writers are gone), and a reader that had not
// ("no_writer_yet") is opened with NO writer open at all: a temporary reader takes over holding the
// buffer, the read-write open is closed, the reader is opened through the temporary reader, and no
// writer is opened after it. Opening it after the read-write open but while it is still open is not
// enough (measured: POLLHUP once it is closed), because writers != 0 then and f_pipe is not set.
#include "restore/fifo.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <optional>

#include <fmt/format.h>

#include "restore/inplace.hpp"
#include "restore/open_file.hpp"
#include "restore/pipe.hpp"
#include "sys/proc.hpp"
#include "sys/syscalls.hpp"

namespace pipecr::restore {
namespace {

int accmode(const FileRecord& f) { return static_cast<int>(f.flags) & O_ACCMODE; }

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

// Whose bytes a FIFO about to be refilled already holds, for the refusal to say (an error path: the
// targets' tables are read here, not in the plan). A FIFO keeps one buffer while anyone has it open,
// so the opens a replacement makes would keep those bytes before the recorded ones, and the build
// runs before any target is stopped: dropping them here would change a running target, outside
// the transaction. Refill in place is what swaps a held FIFO's bytes (inplace.hpp).
std::string who_holds_bytes(const Plan& plan, const PlannedPipe& pp, int fifo) {
  struct stat at {};
  if (::fstat(fifo, &at) < 0) return "a process has it open with data";
  const PipeRecord& p = *pp.pipe;
  if (at.st_dev == p.dev && at.st_ino == p.inode && !pp.choice.strangers.empty()) {
    const pid_t who = pp.choice.strangers.front();
    auto comm = sys::read_comm(who);
    return fmt::format("process {} ({}), which is not restored, has it open with data", who, comm ? *comm : "?");
  }
  for (const Holder& h : plan.holders) {
    if (h.exec) continue;
    const pid_t task = h.thread ? h.thread : h.target;
    auto fds = sys::list_fds(task, true);
    if (!fds) continue;
    for (const sys::FdEntry& e : *fds) {
      struct stat st {};
      if (e.target.empty() || e.target[0] != '/') continue;
      if (::stat(fmt::format("/proc/{}/fd/{}", task, e.fd).c_str(), &st) < 0) continue;
      if (!S_ISFIFO(st.st_mode) || st.st_dev != at.st_dev || st.st_ino != at.st_ino) continue;
      std::string holder = h.thread ? fmt::format("thread {} of target {}", h.thread, h.target)
                                    : fmt::format("target {}", h.target);
      return fmt::format("{} itself holds it (fd {}), and a FIFO keeps its bytes while anyone has it open (new "
                         "opens would read them before the recorded ones): {}",
                         holder, e.fd,
                         pp.choice.why == "--replace"
                             ? "restore it without --replace, which refills it in place while the targets are stopped"
                             : fmt::format("it is replaced ({}), so drain it first", pp.choice.why));
    }
  }
  return "a process pipecr cannot see (another user's, or not dumpable) has it open with data";
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

}  // namespace

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
                fmt::format("it already holds {} bytes: {}", *queued, who_holds_bytes(plan, pp, keep->get())));
  bool any_latched = false;
  for (size_t i : pp.files) any_latched = any_latched || latched_reader(plan.files[i].rec);
  // A FIFO a target holds keeps its buffer through the target's open: its capacity and content go
  // in inside the stop (stage_replaced_fifo()), so that a restore that fails leaves it as it was.
  const bool staged = pp.choice.target_holds && !created;
  if (staged && any_latched && !p.slots.empty())
    return fail(Errc::unsupported, ENOTSUP,
                "a target holds it, and a reader of it has not seen a writer yet: its bytes could go in only "
                "through a writer opened while the targets are stopped, which that reader would see");
  if (!staged)
    if (auto ok = fill(keep->get(), p, opts.refill); !ok) return ok;
  if (created)
    if (auto ok = set_inode_owner(keep->get(), p); !ok) return ok;
  auto seen_reader = [](const FileRecord& f) { return accmode(f) == O_RDONLY && !latched_reader(f); };
  if (auto ok = open_fifo_files(plan, pp, keep->get(), seen_reader, built); !ok) return ok;
  if (any_latched) {
    auto hold = reopen(keep->get(), O_RDONLY);
    if (!hold) return tl::unexpected(hold.error());
    *keep = std::move(*hold);  // the read-write open is closed here: no writer is open now
    if (auto ok = open_fifo_files(plan, pp, keep->get(), latched_reader, built); !ok) return ok;
  }
  auto writer = [](const FileRecord& f) { return accmode(f) != O_RDONLY; };
  if (auto ok = open_fifo_files(plan, pp, keep->get(), writer, built); !ok) return ok;
  if (staged)
    if (auto ok = stage_replaced_fifo(keep->get(), p, opts, built); !ok) return ok;
  built.keep.push_back(std::move(*keep));
  return {};
}

}  // namespace pipecr::restore
