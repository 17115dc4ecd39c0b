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
#include <optional>

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
