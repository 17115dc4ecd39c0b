// pipe_api.cpp: the in-process C++ API, checkpoint_pipe() and restore_pipe().
//
// Checkpoint: identify the fd, read the state of its open file description (and of one fd of the
// other end, when the caller holds one), get a read end (the fd
// itself, or a reopen of /proc/self/fd/N when the caller holds only the write end), snapshot the
// queued buffers with tee(), then learn the layout and stream the bytes into an image in memory.
//
// Restore is a transaction: the new pipe is built completely at temporary fd numbers (capacity,
// data, owner, flags), and only then moved to the numbers asked for with dup3(). The fds that were
// open there are kept aside until every step has succeeded, so a failure puts them back and the
// caller's fd table is as it was. O_ASYNC comes last, at the final numbers.
#include <dirent.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdlib>
#include <string>

#include <fmt/format.h>

#include "dump/pipe.hpp"
#include "image/image_io.hpp"
#include "image/info.hpp"
#include "pipecr/pipe.hpp"
#include "restore/pipe.hpp"
#include "sys/syscalls.hpp"

namespace pipecr {
namespace {

std::string read_link(const std::string& path) {
  std::array<char, 4096> buf;
  ssize_t n = ::readlink(path.c_str(), buf.data(), buf.size() - 1);
  return n > 0 ? std::string(buf.data(), static_cast<size_t>(n)) : std::string();
}

Expected<PipeRecord> pipe_record(int fd, const dump::PipeIdentity& id) {
  PipeRecord p;
  p.id = 1;
  p.kind = id.kind;
  p.inode = id.ino;
  p.uid = id.uid;
  p.gid = id.gid;
  p.mode = id.mode;
  auto cap = sys::get_pipe_size(fd);
  if (!cap) return tl::unexpected(cap.error());
  p.capacity = static_cast<uint32_t>(*cap);
  if (id.kind == PipeKind::fifo) {
    p.path = read_link(fmt::format("/proc/self/fd/{}", fd));
    static constexpr std::string_view kDeleted = " (deleted)";
    if (p.path.size() > kDeleted.size() && p.path.ends_with(kDeleted)) {
      p.path.resize(p.path.size() - kDeleted.size());
      p.unlinked = true;
    }
  }
  return p;
}

// The caller usually holds the other end too (pipe() gave it both): find one fd of it, so that its
// flags (O_DIRECT on the write end of a packet pipe, O_NONBLOCK...) come back as well.
int find_peer_end(int fd, const dump::PipeIdentity& id, int access) {
  if (access == O_RDWR) return -1;
  int want = access == O_WRONLY ? O_RDONLY : O_WRONLY;
  DIR* d = ::opendir("/proc/self/fd");
  if (!d) return -1;
  int found = -1;
  while (dirent* e = ::readdir(d)) {
    int other = std::atoi(e->d_name);
    if (e->d_name[0] == '.' || other == fd || other == ::dirfd(d)) continue;
    struct stat st {};
    if (::fstat(other, &st) < 0 || st.st_ino != id.ino || st.st_dev != id.dev) continue;
    int fl = ::fcntl(other, F_GETFL);
    if (fl >= 0 && (fl & O_ACCMODE) == want) {
      found = other;
      break;
    }
  }
  ::closedir(d);
  return found;
}

Expected<void> add_end(std::vector<FileRecord>& files, std::vector<FdRecord>& fds, int fd, uint64_t pipe_id) {
  auto fdflags = sys::get_fd_flags(fd);
  if (!fdflags) return tl::unexpected(fdflags.error());
  auto file = dump::file_state(fd);
  if (!file) return tl::unexpected(file.error());
  file->id = files.size() + 1;
  file->pipe_id = pipe_id;
  fds.push_back(FdRecord{.pid = 0, .fd = fd, .file_id = file->id, .cloexec = (*fdflags & FD_CLOEXEC) != 0});
  files.push_back(*file);
  return {};
}

}  // namespace

Expected<std::vector<std::byte>> checkpoint_pipe(int fd) {
  if (auto open = sys::get_fd_flags(fd); !open) return tl::unexpected(open.error());
  auto id = dump::identify(fd);
  if (!id) return tl::unexpected(id.error());
  std::vector<FileRecord> files;
  std::vector<FdRecord> fds;
  if (auto e = add_end(files, fds, fd, 1); !e) return tl::unexpected(e.error());
  int access = static_cast<int>(files[0].flags) & O_ACCMODE;
  if (int peer = find_peer_end(fd, *id, access); peer >= 0)
    if (auto e = add_end(files, fds, peer, 1); !e) return tl::unexpected(e.error());
  auto pipe = pipe_record(fd, *id);
  if (!pipe) return tl::unexpected(pipe.error());

  // Only a read end can be tee'd from. A reopen of the write end's /proc link is a new read end of
  // the same pipe; it is held only for the tee.
  sys::UniqueFd reopened;
  int read_end = fd;
  if (access == O_WRONLY) {
    std::string link = fmt::format("/proc/self/fd/{}", fd);
    reopened.reset(::open(link.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC));
    if (!reopened) return tl::unexpected(sys::call_error("open", link + ", O_RDONLY"));
    read_end = reopened.get();
  }
  auto snap = dump::snapshot(read_end, pipe->capacity);
  if (!snap) return tl::unexpected(snap.error());
  reopened.reset();
  std::vector<std::byte> bytes;
  dump::SnapshotReader reader;
  auto slots = reader.read(*snap, bytes);
  if (!slots) return tl::unexpected(slots.error());
  pipe->slots = std::move(*slots);

  image::MemorySink sink;
  image::Writer w(sink);
  Expected<void> ok = w.begin(image::current_info());
  if (ok) ok = w.add(*pipe);
  if (ok && !pipe->slots.empty()) {
    ok = w.begin_data(pipe->id, bytes.size());
    if (ok) ok = w.data(bytes);
    if (ok) ok = w.end_data();
  }
  for (const FileRecord& f : files)
    if (ok) ok = w.add(f);
  for (const FdRecord& d : fds)
    if (ok) ok = w.add(d);
  if (ok) ok = w.finish();
  if (!ok) return tl::unexpected(ok.error());
  return std::move(sink.bytes());
}

}  // namespace pipecr
