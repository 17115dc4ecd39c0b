// restore_api.cpp: the in-process restore, restore_pipe(): a thin layer over the restore engine.
//
// The calling process is one more holder of restore/process.hpp (request.caller): the same plan,
// build (pipe2 or the FIFO's open order, capacity, refill, inode owner, flags, owner, signal) and
// install as `pipecr restore --exec`, in the caller's own fd table, all or nothing (what was open at
// the numbers asked for comes back on failure). What is the API's own is here: its arguments (fd
// numbers), the one-pipe image it takes, and the two ends it always returns: the image's fds are
// replaced by one fd per end, at the numbers asked for (-1: any free number), an end the image does
// not record getting a file of default state.
#include <fcntl.h>
#include <sys/resource.h>

#include <algorithm>
#include <cerrno>

#include <fmt/format.h>

#include "image/image_io.hpp"
#include "image/validate.hpp"
#include "pipecr/pipe.hpp"
#include "restore/process.hpp"

namespace pipecr {
namespace {

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

// The image's fds replaced by the two the caller asks for: the first read-side file (O_RDONLY or
// O_RDWR) at want_read, the first write-only file at want_write, each with the FD_CLOEXEC of its
// first recorded fd. A side the image has no file for gets one of default state (flags only).
void ask_for_ends(Image& img, int32_t recorded, int want_read, int want_write) {
  const FileRecord* sides[2] = {nullptr, nullptr};
  for (const FileRecord& f : img.files) {
    const FileRecord*& s = sides[(f.flags & O_ACCMODE) == O_WRONLY ? 1 : 0];
    if (!s) s = &f;
  }
  uint64_t next_id = 1;
  for (const FileRecord& f : img.files) next_id = std::max(next_id, f.id + 1);
  std::vector<FdRecord> fds;
  const int want[2] = {want_read, want_write};
  uint64_t ids[2];
  bool cloexec[2] = {false, false};
  for (int side = 0; side < 2; ++side) {
    if (sides[side]) {
      ids[side] = sides[side]->id;
      auto d = std::find_if(img.fds.begin(), img.fds.end(), [&](const FdRecord& r) { return r.file_id == ids[side]; });
      cloexec[side] = d != img.fds.end() && d->cloexec;
    } else {
      ids[side] = next_id++;
    }
  }
  for (int side = 0; side < 2; ++side) {
    if (!sides[side]) {
      FileRecord f;
      f.id = ids[side];
      f.pipe_id = img.pipes.front().id;
      f.flags = side == 0 ? O_RDONLY : O_WRONLY;
      img.files.push_back(f);
    }
    fds.push_back(FdRecord{.pid = recorded, .fd = want[side], .file_id = ids[side], .cloexec = cloexec[side]});
  }
  img.fds = std::move(fds);
  img.shared_tables.clear();
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
  // An in-process image records no process (its fds are of pid 0); an image of `pipecr dump` of one
  // process is restored as that process.
  const int32_t recorded = img->processes.empty() ? 0 : img->processes.front().pid;
  ask_for_ends(*img, recorded, want_read, want_write);

  restore::ProcessRestoreRequest req;
  req.caller = restore::CallerSpec{recorded};
  restore::ProcessRestoreOptions ropts;
  ropts.refill = restore::RefillOptions{opts.allow_smaller_capacity, opts.no_vmsplice};
  ropts.replace = true;                     // a new pipe, always: the caller may still hold the old one
  ropts.allow_outside_fifo_holders = true;  // a FIFO is shared by path; one holding data is refused (EBUSY)
  auto done = restore::restore_processes(*img, req, ropts);
  if (!done) return tl::unexpected(done.error());
  RestoredPipe out;
  for (const auto& c : done->caller_fds) {
    if (c.file_id == img->fds[0].file_id) out.read_fd = c.fd;
    if (c.file_id == img->fds[1].file_id) out.write_fd = c.fd;
  }
  return out;
}

}  // namespace pipecr
