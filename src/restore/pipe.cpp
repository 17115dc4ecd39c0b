// restore/pipe.cpp: capacity, refill and inode owner of a restored pipe (see pipe.hpp); the state
// of each of its open files is the generic layer's (restore/open_file.cpp).
//
// Refill builds each slot on purpose rather than writing the bytes in one go: write() merges into
// the last slot while it has room, so one write() of the bytes of a vmspliced or packet pipe would
// fold many slots into few and change how much a writer can add before the pipe is full. Fresh
// anonymous pages are used for vmsplice and unmapped right after, so the pipe holds the only
// reference and nothing can change the queued bytes behind its back.
#include "restore/pipe.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <vector>

#include <fmt/format.h>

#include "image/validate.hpp"
#include "sys/syscalls.hpp"

namespace pipecr::restore {
namespace {

// A pipe_buffer holds one page of THIS machine; the image's INFO page size says nothing about it.
const uint32_t kPage = image::host_page_size();

uint32_t pipe_max_size() {
  std::ifstream f("/proc/sys/fs/pipe-max-size");
  uint64_t v = 0;
  return (f >> v) ? static_cast<uint32_t>(v) : 1048576u;
}

Error capacity_error(uint32_t cap, const Error& cause) {
  return Error{Errc::capacity, cause.err,
               fmt::format("pipe capacity {} cannot be set here: /proc/sys/fs/pipe-max-size is {} and "
                           "CAP_SYS_RESOURCE is missing (raise it with `sysctl fs.pipe-max-size={}`, run with "
                           "CAP_SYS_RESOURCE, or allow a smaller capacity)",
                           cap, pipe_max_size(), cap)};
}

// The methods that make a stream slot of an exact length that does not merge later writes, best first.
enum class Method { vmsplice, splice_memfd, write };

bool refused(int err) { return err == EPERM || err == ENOSYS || err == EOPNOTSUPP || err == EINVAL || err == EACCES; }

// One slot per fresh page, vmspliced, then unmapped. Returns the errno on failure, 0 on success.
int place_vmsplice(int wfd, const std::vector<std::span<const std::byte>>& chunks) {
  size_t len = chunks.size() * kPage;
  void* mem = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return errno;
  std::vector<iovec> iov(chunks.size());
  for (size_t i = 0; i < chunks.size(); ++i) {
    auto* page = static_cast<std::byte*>(mem) + i * kPage;
    if (chunks[i].size() > kPage) {  // refill() refuses such slots first; never copy past the page
      ::munmap(mem, len);
      return EOVERFLOW;
    }
    std::memcpy(page, chunks[i].data(), chunks[i].size());
    iov[i] = iovec{page, chunks[i].size()};
  }
  int err = 0;
  size_t at = 0;
  while (at < iov.size()) {
    size_t n = std::min<size_t>(iov.size() - at, IOV_MAX);
    ssize_t r = ::vmsplice(wfd, &iov[at], n, SPLICE_F_NONBLOCK);
    if (r < 0) {
      if (errno == EINTR) continue;
      err = errno;
      break;
    }
    // vmsplice consumes whole iovecs here: each is within one page and the pipe has room.
    size_t done = static_cast<size_t>(r);
    while (done > 0 && at < iov.size()) {
      if (iov[at].iov_len > done) {  // partial: should not happen, but keep going exactly
        iov[at].iov_base = static_cast<std::byte*>(iov[at].iov_base) + done;
        iov[at].iov_len -= done;
        done = 0;
      } else {
        done -= iov[at++].iov_len;
      }
    }
  }
  ::munmap(mem, len);
  return err;
}

// One slot per page of a memfd, spliced into the pipe. Returns the errno on failure, 0 on success.
int place_splice(int wfd, const std::vector<std::span<const std::byte>>& chunks) {
  sys::UniqueFd mfd(static_cast<int>(::syscall(SYS_memfd_create, "pipecr-refill", MFD_CLOEXEC)));
  if (!mfd) return errno;
  for (size_t i = 0; i < chunks.size(); ++i) {
    if (chunks[i].size() > kPage) return EOVERFLOW;  // would run into the next slot's page
    off_t off = static_cast<off_t>(i * kPage);
    if (::pwrite(mfd.get(), chunks[i].data(), chunks[i].size(), off) != static_cast<ssize_t>(chunks[i].size()))
      return errno ? errno : EIO;
  }
  for (size_t i = 0; i < chunks.size(); ++i) {
    loff_t off = static_cast<loff_t>(i * kPage);
    size_t left = chunks[i].size();
    while (left > 0) {
      ssize_t r = ::splice(mfd.get(), &off, wfd, nullptr, left, SPLICE_F_NONBLOCK);
      if (r < 0) {
        if (errno == EINTR) continue;
        return errno;
      }
      if (r == 0) return EIO;
      left -= static_cast<size_t>(r);
    }
  }
  return 0;
}

class Refiller {
 public:
  Refiller(int wfd, const RefillOptions& opts)
      : wfd_(wfd), method_(opts.no_vmsplice ? Method::splice_memfd : Method::vmsplice) {}

  Expected<void> start() {
    auto fl = sys::get_fl(wfd_);
    if (!fl) return tl::unexpected(fl.error());
    flags_ = (*fl & ~(O_DIRECT | O_ASYNC)) | O_NONBLOCK;
    return sys::set_fl(wfd_, flags_);
  }

  Expected<void> packet(std::span<const std::byte> bytes) {
    if (last_mergeable_room_ && bytes.size() % kPage != 0)
      return fail(Errc::unsupported, EOPNOTSUPP,
                  "cannot rebuild a packet that follows a partial stream slot without vmsplice() or splice()");
    if (auto r = direct(true); !r) return r;
    if (auto r = sys::write_all(wfd_, bytes, "write(packet)"); !r) return r;
    last_mergeable_room_ = false;
    return {};
  }

  Expected<void> full_pages(std::span<const std::byte> bytes) {
    if (auto r = direct(false); !r) return r;
    if (auto r = sys::write_all(wfd_, bytes, "write"); !r) return r;
    last_mergeable_room_ = false;
    return {};
  }

  Expected<void> last_stream(std::span<const std::byte> bytes) {
    if (auto r = direct(false); !r) return r;
    return sys::write_all(wfd_, bytes, "write");
  }

  // Slots of exact length that do not merge.
  Expected<void> fixed(const std::vector<std::span<const std::byte>>& chunks) {
    if (auto r = direct(false); !r) return r;
    while (method_ != Method::write) {
      int err = method_ == Method::vmsplice ? place_vmsplice(wfd_, chunks) : place_splice(wfd_, chunks);
      if (err == 0) return {};
      if (!refused(err))
        return fail_errno(err, fmt::format("{}(fd={}, {} slots)",
                                           method_ == Method::vmsplice ? "vmsplice" : "splice", wfd_, chunks.size()));
      // Nothing was queued by a refused call (EPERM/ENOSYS/EINVAL come before any page is linked).
      method_ = method_ == Method::vmsplice ? Method::splice_memfd : Method::write;
    }
    for (const auto& c : chunks)
      if (auto r = sys::write_all(wfd_, c, "write"); !r) return r;
    last_mergeable_room_ = !chunks.empty() && chunks.back().size() % kPage != 0;
    return {};
  }

 private:
  Expected<void> direct(bool on) {
    int want = on ? (flags_ | O_DIRECT) : (flags_ & ~O_DIRECT);
    if (want == flags_) return {};
    flags_ = want;
    return sys::set_fl(wfd_, flags_);
  }

  int wfd_;
  int flags_ = 0;
  Method method_;
  bool last_mergeable_room_ = false;
};

}  // namespace

Expected<uint32_t> set_capacity(int fd, const PipeRecord& pipe, const RefillOptions& opts) {
  const uint64_t needed = uint64_t{pipe.slots.size()} * kPage;
  if (pipe.capacity > image::kMaxPipeCapacity || needed > image::kMaxPipeCapacity)
    return fail(Errc::bad_image, EBADMSG,
                fmt::format("pipe {}: capacity {} for {} slots cannot be set by F_SETPIPE_SZ", pipe.id, pipe.capacity,
                            pipe.slots.size()));
  uint32_t cap = pipe.capacity ? pipe.capacity : 65536;
  auto set = sys::set_pipe_size(fd, static_cast<int>(cap));
  if (set) return static_cast<uint32_t>(*set);
  if (set.error().err != EPERM) return tl::unexpected(set.error());
  if (!opts.allow_smaller_capacity) return tl::unexpected(capacity_error(cap, set.error()));
  uint64_t most = kPage;
  while (most * 2 <= pipe_max_size()) most *= 2;
  if (most < needed) return tl::unexpected(capacity_error(cap, set.error()));
  auto smaller = sys::set_pipe_size(fd, static_cast<int>(most));
  if (!smaller) return tl::unexpected(capacity_error(cap, smaller.error()));
  return static_cast<uint32_t>(*smaller);
}

static bool last_slot_unmergeable(const PipeRecord& pipe) {
  // See refill() in pipe.hpp and docs/design.md section 3. pipe_write() (fs/pipe.c) appends a
  // write's remainder to the last buffer only when that buffer can merge and the remainder fits
  // whole (offset + chars <= PAGE_SIZE); otherwise it starts new buffers. So of two stream slots a,
  // b in a row, a not the head (a reader shortens only the head), both made by write() and a
  // mergeable, b's first write did not fit behind a: a.len + b.len > page. A pair with
  // a.len + b.len <= page proves that some slot was placed by vmsplice()/splice(), which make
  // buffers that never merge; the pipe's producer is then taken to make its last slot the same way.
  const size_t n = pipe.slots.size();
  for (size_t i = 1; i + 1 < n; ++i) {
    const Slot& a = pipe.slots[i];
    const Slot& b = pipe.slots[i + 1];
    if (!a.packet && !b.packet && uint64_t{a.len} + b.len <= kPage) return true;
  }
  return false;
}

Expected<void> refill(int wfd, const PipeRecord& pipe, const RefillOptions& opts) {
  if (pipe.slots.empty()) return {};
  if (pipe.data.size() != pipe.bytes())
    return fail(Errc::bad_image, EBADMSG, fmt::format("pipe {}: {} bytes of data for slots of {}", pipe.id,
                                                      pipe.data.size(), pipe.bytes()));
  // Never trust the record: a slot longer than a page of this machine cannot be one pipe_buffer, and
  // copying it into one page would write past it (image::validate() refuses such images first).
  for (size_t i = 0; i < pipe.slots.size(); ++i)
    if (pipe.slots[i].len == 0 || pipe.slots[i].len > kPage)
      return fail(Errc::bad_image, EBADMSG,
                  fmt::format("pipe {}: slot {} holds {} bytes, not 1..{} (the page size here)", pipe.id, i,
                              pipe.slots[i].len, kPage));
  const bool fixed_last = last_slot_unmergeable(pipe);
  Refiller r(wfd, opts);
  if (auto s = r.start(); !s) return s;
  size_t off = 0;
  const size_t n = pipe.slots.size();
  for (size_t i = 0; i < n;) {
    const Slot& s = pipe.slots[i];
    auto bytes = pipe.data.subspan(off, s.len);
    Expected<void> done;
    if (s.packet) {
      done = r.packet(bytes);
      off += s.len;
      ++i;
    } else if (i + 1 == n) {
      done = fixed_last && s.len != kPage ? r.fixed({bytes}) : r.last_stream(bytes);
      off += s.len;
      ++i;
    } else if (s.len == kPage) {
      // A run of full-page stream slots: one write() makes exactly those slots (a full page cannot
      // take a merge, and a write of whole pages never merges into what is before it).
      size_t len = 0;
      while (i + 1 < n && !pipe.slots[i].packet && pipe.slots[i].len == kPage) {
        len += kPage;
        ++i;
      }
      done = r.full_pages(pipe.data.subspan(off, len));
      off += len;
    } else {
      std::vector<std::span<const std::byte>> chunks;
      while (i + 1 < n && !pipe.slots[i].packet && pipe.slots[i].len != kPage) {
        chunks.push_back(pipe.data.subspan(off, pipe.slots[i].len));
        off += pipe.slots[i].len;
        ++i;
      }
      if (fixed_last && i + 1 == n && !pipe.slots[i].packet && pipe.slots[i].len != kPage) {
        chunks.push_back(pipe.data.subspan(off, pipe.slots[i].len));  // the last slot, unmergeable too
        off += pipe.slots[i].len;
        ++i;
      }
      done = r.fixed(chunks);
    }
    if (!done) return done;
  }
  auto q = sys::bytes_queued(wfd);
  if (!q) return tl::unexpected(q.error());
  if (static_cast<uint64_t>(*q) != pipe.bytes())
    return fail(Errc::system, EIO, fmt::format("refill queued {} bytes, expected {}", *q, pipe.bytes()));
  return {};
}

Expected<void> fill(int fd, const PipeRecord& pipe, const RefillOptions& opts) {
  auto cap = set_capacity(fd, pipe, opts);
  if (!cap) return tl::unexpected(cap.error());
  return refill(fd, pipe, opts);
}

Expected<void> set_inode_owner(int fd, const PipeRecord& pipe) {
  struct stat st {};
  if (::fstat(fd, &st) < 0) return tl::unexpected(sys::call_error("fstat", fmt::format("fd={}", fd)));
  if ((st.st_uid != pipe.uid || st.st_gid != pipe.gid) && ::fchown(fd, pipe.uid, pipe.gid) < 0)
    return tl::unexpected(sys::call_error("fchown", fmt::format("fd={}, uid={}, gid={}", fd, pipe.uid, pipe.gid)));
  const mode_t mode = pipe.mode & 0777;  // never setuid/setgid/sticky, whatever the record says
  if ((st.st_mode & 07777) != mode && ::fchmod(fd, mode) < 0)
    return tl::unexpected(sys::call_error("fchmod", fmt::format("fd={}, mode={:#o}", fd, mode)));
  return {};
}

}  // namespace pipecr::restore
