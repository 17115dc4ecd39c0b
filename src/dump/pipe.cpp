// dump/pipe.cpp: reading one pipe's bytes and slot layout without consuming them.
//
// snapshot(): tee() links every queued pipe_buffer of the source into a scratch pipe of ours.
// tee() copies page references, not bytes, and leaves the source as it was whatever filled it
// (write, splice, vmsplice with or without GIFT, tee); packet marks survive it.
//
// SnapshotReader: the layout and the bytes come from three sources, each cheap in system calls
// (they cost several microseconds each on the machines pipecr was measured on, so their count is
// the cost):
//   - slot lengths: a copy W of the snapshot is walked. tee() into a 16-slot pipe returns the sum
//     of up to 16 head slots; exactly 16 pages means 16 full slots (no slot holds more than a page),
//     the common case of a pipe filled by write(), learned with three calls. Otherwise one slot at a
//     time: tee() into a 1-slot pipe returns the head slot's length.
//   - packet marks: read() returns at most up to the end of a packet, so reading the snapshot with a
//     buffer as large as what is left stops exactly at each packet's end. A stop before the end
//     marks the slot that ends there as a packet.
//   - the last slot, which ends the data whether it is a packet or not: W is refilled, all but the
//     last slot is spliced away, and the last slot is tee'd into a 1-slot pipe T and read 1 byte
//     at a time: a short read drops the rest of a packet (FIONREAD 0 after), a stream slot keeps
//     it. A 1-byte slot reads the same either way: a 1-byte sentinel written behind it (tee'd
//     buffers never merge, so it is a slot of its own) and a read of two slots tells them apart.
#include "dump/pipe.hpp"

#include <fcntl.h>
#include <poll.h>
#include <linux/magic.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <optional>
#include <utility>

#include <fmt/format.h>

#include "sys/syscalls.hpp"

// <linux/watch_queue.h> clashes with <fcntl.h>; the ioctl number is ABI.
#ifndef IOC_WATCH_QUEUE_SET_FILTER
#define IOC_WATCH_QUEUE_SET_FILTER _IO('W', 0x61)
#endif

namespace pipecr::dump {
namespace {

constexpr uint32_t kPage = 4096;

std::string describe_fd(int fd) {
  char buf[256];
  ssize_t n = ::readlink(fmt::format("/proc/self/fd/{}", fd).c_str(), buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string("?");
}

// A pipe of exactly `size` bytes of capacity, both ends non-blocking, for our own bookkeeping.
Expected<sys::PipePair> scratch_pipe(uint32_t size) {
  auto p = sys::make_pipe(O_CLOEXEC | O_NONBLOCK);
  if (!p) return tl::unexpected(p.error());
  // A new pipe has 65,536 bytes unless its user is past pipe-user-pages-soft; snapshot() checks
  // that tee() took every byte, which catches that case without an F_GETPIPE_SZ per pipe.
  if (size != 65536) {
    auto set = sys::set_pipe_size(p->read.get(), static_cast<int>(size));
    if (!set) {
      Error e = set.error();
      if (e.err == EPERM) {
        e.kind = Errc::capacity;
        e.what += fmt::format(" (a scratch pipe of {} bytes is above /proc/sys/fs/pipe-max-size; "
                              "raise it or run with CAP_SYS_RESOURCE)", size);
      }
      return tl::unexpected(e);
    }
  }
  return p;
}

// Whether this kernel can make notification pipes at all (CONFIG_WATCH_QUEUE): pipe2() with
// O_NOTIFICATION_PIPE (= O_EXCL) answers ENOPKG where it cannot.
bool notification_pipes_exist() {
  static const bool exist = [] {
    int fds[2];
    if (::pipe2(fds, O_EXCL | O_CLOEXEC) < 0) return errno != ENOPKG && errno != EINVAL;
    sys::UniqueFd a(fds[0]), b(fds[1]);
    return true;
  }();
  return exist;
}

}  // namespace

bool is_notification_pipe(int fd) {
  if (!notification_pipes_exist()) return false;
  // IOC_WATCH_QUEUE_SET_FILTER answers ENODEV on an ordinary pipe (ENOTTY without
  // CONFIG_WATCH_QUEUE) before it looks at its argument; on a notification pipe it copies the
  // filter from the argument, and the unmapped address 1 makes that fail with EFAULT, so nothing
  // is changed either way.
  return ::ioctl(fd, IOC_WATCH_QUEUE_SET_FILTER, reinterpret_cast<void*>(1)) < 0 && errno == EFAULT;
}

Expected<PipeIdentity> identify(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) < 0) return tl::unexpected(sys::call_error("fstat", fmt::format("fd={}", fd)));
  if (!S_ISFIFO(st.st_mode))
    return fail(Errc::unsupported, ENOTSUP, fmt::format("fd {} is not a pipe or FIFO ({})", fd, describe_fd(fd)));
  struct statfs sfs {};
  if (::fstatfs(fd, &sfs) < 0) return tl::unexpected(sys::call_error("fstatfs", fmt::format("fd={}", fd)));
  if (is_notification_pipe(fd))
    return fail(Errc::unsupported, ENOTSUP,
                fmt::format("fd {} is a notification pipe (O_NOTIFICATION_PIPE): its messages cannot be "
                            "read without consuming them",
                            fd));
  PipeIdentity id;
  id.kind = sfs.f_type == PIPEFS_MAGIC ? PipeKind::anonymous : PipeKind::fifo;
  id.dev = st.st_dev;
  id.ino = st.st_ino;
  id.uid = st.st_uid;
  id.gid = st.st_gid;
  id.mode = st.st_mode & 07777;
  return id;
}

Expected<Snapshot> snapshot(int read_end, uint32_t capacity) {
  Snapshot snap;
  auto queued = sys::bytes_queued(read_end);
  if (!queued) return tl::unexpected(queued.error());
  if (*queued == 0) return snap;  // nothing to link: no scratch pipe at all
  auto scratch = scratch_pipe(std::max(capacity, kPage));
  if (!scratch) return tl::unexpected(scratch.error());
  auto got = sys::tee_nb(read_end, scratch->write.get(), static_cast<size_t>(*queued) * 2);
  if (got) {
    snap.bytes = static_cast<uint32_t>(*got);
    // Fewer bytes than FIONREAD said: a reader outside the stopped set took some meanwhile (the
    // tee is then the point in time), or the scratch pipe has fewer slots than the source.
    if (*got < static_cast<size_t>(*queued)) {
      auto have = sys::get_pipe_size(scratch->read.get());
      if (have && static_cast<uint32_t>(*have) < capacity)
        return fail(Errc::capacity, ENOSPC,
                    fmt::format("a scratch pipe got {} bytes of capacity, not the source's {} (is the user past "
                                "/proc/sys/fs/pipe-user-pages-soft?)",
                                *have, capacity));
    }
  } else if (got.error().err != EAGAIN) {  // EAGAIN: empty, a writer still open
    Error e = got.error();
    if (e.err == EINVAL) {
      e.kind = Errc::unsupported;
      e.what += " (a notification pipe cannot be read without consuming it)";
    }
    return tl::unexpected(e);
  }
  snap.scratch = std::move(scratch->read);
  return snap;
}

namespace {

// /proc/sys/fs/pipe-max-size, read once (1 MiB when it cannot be read).
uint32_t pipe_max_size() {
  static const uint32_t size = [] {
    sys::UniqueFd f(::open("/proc/sys/fs/pipe-max-size", O_RDONLY | O_CLOEXEC));
    char buf[32] = {};
    if (!f || ::read(f.get(), buf, sizeof buf - 1) <= 0) return uint32_t{1} << 20;
    unsigned long v = std::strtoul(buf, nullptr, 10);
    return v >= kPage && v <= (uint32_t{1} << 31) ? static_cast<uint32_t>(v) : uint32_t{1} << 20;
  }();
  return size;
}

}  // namespace

Expected<void> SnapshotPacker::fresh(uint32_t capacity) {
  uint32_t size = std::max(pipe_max_size(), capacity);
  auto p = scratch_pipe(size);
  if (!p) return tl::unexpected(p.error());
  scratch_.push_back(std::move(p->read));
  cur_ = static_cast<uint32_t>(scratch_.size() - 1);
  write_ = std::move(p->write);
  write_cap_ = size;
  write_used_ = false;
  return {};
}

// One tee of everything read_end holds into the current scratch pipe: the bytes linked, or
// -EAGAIN (the source is empty, or the scratch pipe full) and -EBADF (read_end is not open for
// reading), which are answers here, not failures: no message is formatted for them (an empty pipe
// answers EAGAIN, and a dump asks thousands). Anything else is an Error; EINVAL as add() says.
Expected<ssize_t> SnapshotPacker::tee(int read_end) {
  for (;;) {
    ssize_t r = ::tee(read_end, write_.get(), SIZE_MAX >> 1, SPLICE_F_NONBLOCK);
    if (r > 0) write_used_ = true;
    if (r >= 0) return r;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EBADF) return -errno;
    Error e = sys::call_error("tee", fmt::format("in={}, out={}", read_end, write_.get()));
    if (e.err == EINVAL) {
      e.kind = Errc::unsupported;
      e.what += " (a notification pipe cannot be read without consuming it)";
    }
    return tl::unexpected(e);
  }
}

namespace {
tl::unexpected<Error> not_readable(int fd) {
  return fail(Errc::invalid_argument, EBADF, "tee: fd " + std::to_string(fd) + " is not open for reading");
}
}  // namespace

Expected<SnapshotPacker::Piece> SnapshotPacker::add(int read_end, uint32_t queued, uint32_t capacity) {
  if (queued == 0) return Piece{};
  if (!write_ || capacity > write_cap_) {
    if (auto s = settle(); !s) return tl::unexpected(s.error());  // the scratch pipe it was in is left
    if (auto f = fresh(capacity); !f) return tl::unexpected(f.error());
  }
  return add_from(read_end, queued, capacity, 0);
}

// poll() on the current scratch pipe's write end: no POLLOUT when every slot is taken.
Expected<bool> SnapshotPacker::scratch_full() const {
  pollfd p{write_.get(), POLLOUT, 0};
  int n;
  do n = ::poll(&p, 1, 0);
  while (n < 0 && errno == EINTR);
  if (n < 0) return tl::unexpected(sys::call_error("poll", fmt::format("scratch pipe {}, POLLOUT", write_.get())));
  return n == 0 || !(p.revents & POLLOUT);
}

Expected<void> SnapshotPacker::settle() {
  if (unproven_.id == UINT32_MAX || !write_) return {};  // nothing to check (or sealed: too late)
  const Unproven u = std::exchange(unproven_, Unproven{});
  // Slots left after it: its tee ended because its source had nothing more, not for lack of room.
  auto full = scratch_full();
  if (!full) return tl::unexpected(full.error());
  if (!*full) return {};
  ++fionread_calls_;
  auto q = sys::bytes_queued(u.read_end);
  if (!q) return tl::unexpected(q.error());
  const auto queued = static_cast<uint32_t>(*q);
  // got >= queued: whole (got > queued: a reader outside the stopped set took bytes after the tee,
  // which is the moment).
  if (placed_[u.id].bytes >= queued) return {};
  // Cut short by the full scratch pipe: what it linked stays there as dead weight, at the tail (no
  // piece with bytes came after it); the source goes whole into a fresh one.
  if (auto f = fresh(0); !f) return tl::unexpected(f.error());
  auto moved = add_from(u.read_end, queued, 0, 1);
  if (!moved) return tl::unexpected(moved.error());
  placed_[u.id] = Piece{moved->scratch, moved->bytes, u.id};
  return {};
}

Expected<SnapshotPacker::Piece> SnapshotPacker::add_unknown(int read_end, Writers* writers) {
  if (writers) *writers = Writers::unknown;
  if (!write_)
    if (auto f = fresh(0); !f) return tl::unexpected(f.error());
  bool used = write_used_;
  auto r = tee(read_end);
  if (!r) return tl::unexpected(r.error());
  if (*r == -EBADF) return not_readable(read_end);
  // An empty source: the tee's ipipe_prep() returns 0 without a writer, EAGAIN with one, before it
  // looks at the scratch pipe; a full scratch pipe answers EAGAIN too, so only an unused one is sure.
  if (*r == 0 || (*r == -EAGAIN && !used)) {
    if (writers && !used) *writers = *r == 0 ? Writers::none : Writers::some;
    return Piece{};
  }
  if (*r > 0) {  // linked: the piece before it in this scratch pipe is whole (there was room after it)
    Piece piece{cur_, static_cast<uint32_t>(*r),
                static_cast<uint32_t>(placed_.size())};
    placed_.push_back(piece);
    unproven_ = Unproven{read_end, piece.id};
    return piece;
  }
  // EAGAIN into a used scratch pipe: the source is empty, or the scratch pipe is full.
  auto full = scratch_full();
  if (!full) return tl::unexpected(full.error());
  if (!*full) {
    unproven_ = Unproven{};  // room left: the last piece is whole too
    return Piece{};
  }
  if (auto s = settle(); !s) return tl::unexpected(s.error());
  ++fionread_calls_;
  auto q = sys::bytes_queued(read_end);
  if (!q) return tl::unexpected(q.error());
  if (*q == 0) return Piece{};
  if (auto f = fresh(0); !f) return tl::unexpected(f.error());
  auto piece = add_from(read_end, static_cast<uint32_t>(*q), 0, 1);
  if (!piece) return tl::unexpected(piece.error());
  piece->id = static_cast<uint32_t>(placed_.size());  // proven whole (add_from compares with FIONREAD)
  placed_.push_back(*piece);
  return piece;
}

// add() from its `attempt`-th tee on (attempt 0: into the current scratch pipe; 1 and on: into a
// fresh one, made by the caller). A tee that links bytes into the current scratch pipe proves the
// unproven piece before it whole; one that comes up short there leaves that scratch pipe, whose
// unproven piece is settled first.
Expected<SnapshotPacker::Piece> SnapshotPacker::add_from(int read_end, uint32_t queued, uint32_t capacity,
                                                         int attempt) {
  for (;; ++attempt) {
    auto r = tee(read_end);
    if (!r) return tl::unexpected(r.error());
    if (*r == -EBADF) return not_readable(read_end);
    // -EAGAIN: the scratch pipe is full, or the source emptied meanwhile.
    size_t got = *r > 0 ? static_cast<size_t>(*r) : 0;
    if (got > 0 && attempt == 0) unproven_ = Unproven{};
    if (got >= queued) return Piece{cur_, static_cast<uint32_t>(got)};
    if (attempt > 0) {
      // Short into a fresh scratch pipe: either the source has more slots than pipe-max-size (a
      // capacity set with CAP_SYS_RESOURCE), so a scratch pipe its size is needed, or a reader
      // outside the stopped set took bytes meanwhile, and the tee is the point in time.
      auto cap = sys::get_pipe_size(read_end);
      if (!cap) return tl::unexpected(cap.error());
      if (attempt > 1 || static_cast<uint32_t>(*cap) <= write_cap_)
        return Piece{cur_, static_cast<uint32_t>(got)};
      capacity = static_cast<uint32_t>(*cap);
    } else if (auto s = settle(); !s) {
      return tl::unexpected(s.error());
    }
    if (auto f = fresh(capacity); !f) return tl::unexpected(f.error());
  }
}

Expected<sys::UniqueFd> SnapshotPacker::lend(uint32_t* index) {
  if (spares_.empty()) make_spares(1);
  if (spares_.empty()) return fail(Errc::system, EMFILE, "no scratch pipe to lend");  // the caller tees itself
  *index = static_cast<uint32_t>(scratch_.size());
  scratch_.push_back(std::move(spares_.back().first));
  sys::UniqueFd write = std::move(spares_.back().second);
  spares_.pop_back();
  return write;
}

void SnapshotPacker::make_spares(size_t n) {
  while (spares_.size() < n) {
    auto p = scratch_pipe(pipe_max_size());
    if (!p) return;  // the fd limit: fewer, and pipecr tees the rest
    spares_.emplace_back(std::move(p->read), std::move(p->write));
  }
}

void SnapshotPacker::seal() { write_.reset(); }

struct SnapshotReader::Tools {
  sys::PipePair walk;     // W: a copy of the snapshot being walked
  uint32_t walk_cap = 0;
  sys::PipePair t1;       // 1 slot
  sys::PipePair t2;       // 2 slots
  sys::PipePair t16;      // 16 slots
  sys::UniqueFd null;     // /dev/null, where walked bytes go
};

SnapshotReader::SnapshotReader() : tools_(new Tools) {}
SnapshotReader::~SnapshotReader() { delete tools_; }

namespace {

constexpr uint32_t kWindow = 16;

Expected<void> make_tools(SnapshotReader::Tools& t, uint32_t cap) {
  if (!t.null) {
    t.null.reset(::open("/dev/null", O_WRONLY | O_CLOEXEC));
    if (!t.null) return tl::unexpected(sys::call_error("open", "/dev/null"));
    for (auto [pp, size] : {std::pair{&t.t1, kPage}, std::pair{&t.t2, 2 * kPage}, std::pair{&t.t16, kWindow * kPage}}) {
      auto p = scratch_pipe(size);
      if (!p) return tl::unexpected(p.error());
      *pp = std::move(*p);
    }
  }
  cap = std::max(cap, 2 * kPage);
  if (t.walk_cap < cap) {
    auto p = scratch_pipe(cap);
    if (!p) return tl::unexpected(p.error());
    t.walk = std::move(*p);
    t.walk_cap = cap;
  }
  return {};
}

// Moves n bytes from the head of pipe fd to /dev/null.
Expected<void> discard(const SnapshotReader::Tools& t, int fd, size_t n) {
  while (n > 0) {
    auto r = sys::splice_nb(fd, t.null.get(), n);
    if (!r) return tl::unexpected(r.error());
    if (*r == 0) return fail(Errc::system, EIO, "snapshot walk: pipe emptied early");
    n -= *r;
  }
  return {};
}

// The slot lengths of W, which holds `total` bytes; W is empty afterwards.
Expected<std::vector<uint32_t>> walk_lengths(const SnapshotReader::Tools& t, uint64_t total) {
  std::vector<uint32_t> lens;
  int w = t.walk.read.get();
  uint64_t left = total;
  size_t one_by_one = 0;  // slots to walk singly before trying a window again
  while (left > 0) {
    if (one_by_one == 0 && left >= kWindow * kPage) {
      auto s = sys::tee_nb(w, t.t16.write.get(), SIZE_MAX >> 1);
      if (!s) return tl::unexpected(s.error());
      if (auto d = discard(t, t.t16.read.get(), *s); !d) return tl::unexpected(d.error());
      if (*s == kWindow * kPage) {
        if (auto d = discard(t, w, *s); !d) return tl::unexpected(d.error());
        lens.insert(lens.end(), kWindow, kPage);
        left -= *s;
        continue;
      }
      one_by_one = kWindow;
    }
    auto len = sys::tee_nb(w, t.t1.write.get(), SIZE_MAX >> 1);
    if (!len) return tl::unexpected(len.error());
    if (*len == 0 || *len > left) return fail(Errc::system, EIO, "snapshot walk lost its place");
    if (auto d = discard(t, t.t1.read.get(), *len); !d) return tl::unexpected(d.error());
    if (auto d = discard(t, w, *len); !d) return tl::unexpected(d.error());
    lens.push_back(static_cast<uint32_t>(*len));
    left -= *len;
    if (one_by_one) --one_by_one;
  }
  return lens;
}

// Whether the last of the slots of `scratch` (total bytes, the last slot `last` long) is a packet.
Expected<bool> last_is_packet(const SnapshotReader::Tools& t, int scratch, uint64_t total, uint32_t last) {
  int w = t.walk.read.get();
  auto copied = sys::tee_nb(scratch, t.walk.write.get(), total);
  if (!copied) return tl::unexpected(copied.error());
  if (*copied != total) return fail(Errc::system, EIO, "snapshot copy came up short");
  if (auto d = discard(t, w, total - last); !d) return tl::unexpected(d.error());
  std::array<std::byte, 2> buf;
  bool packet = false;
  if (last >= 2) {
    if (auto r = sys::tee_nb(w, t.t1.write.get(), last); !r) return tl::unexpected(r.error());
    auto one = sys::read_some(t.t1.read.get(), std::span(buf).first(1));
    if (!one) return tl::unexpected(one.error());
    auto rest = sys::bytes_queued(t.t1.read.get());
    if (!rest) return tl::unexpected(rest.error());
    packet = *rest == 0;
    if (auto d = discard(t, t.t1.read.get(), static_cast<size_t>(*rest)); !d) return tl::unexpected(d.error());
  } else {
    static constexpr std::byte sentinel{0x5a};
    if (auto r = sys::write_all(t.walk.write.get(), std::span(&sentinel, 1), "write(sentinel)"); !r)
      return tl::unexpected(r.error());
    auto two = sys::tee_nb(w, t.t2.write.get(), 2);
    if (!two) return tl::unexpected(two.error());
    auto got = sys::read_some(t.t2.read.get(), buf);
    if (!got) return tl::unexpected(got.error());
    packet = *got == 1;
    if (auto d = discard(t, t.t2.read.get(), *two - *got); !d) return tl::unexpected(d.error());
    last = 2;  // the sentinel goes too
  }
  if (auto d = discard(t, w, last); !d) return tl::unexpected(d.error());
  return packet;
}

}  // namespace

Expected<std::vector<Slot>> SnapshotReader::read(Snapshot& snap, std::vector<std::byte>& bytes) {
  if (snap.bytes == 0) {
    bytes.clear();
    return std::vector<Slot>{};
  }
  auto slots = read_head(snap.scratch.get(), snap.bytes, bytes);
  if (slots) snap.scratch.reset();
  return slots;
}

namespace {

// A copy of the 16 full-page slots at the head of `s` in the 16-slot pipe T16: true when the
// head holds exactly that (a tee of 16 pages into 16 slots takes that much only if each slot is a
// full page, no slot holding more), with the last slot's packet mark in *packet (read from T16
// after its first 15 pages are dropped, as last_is_packet() does). False: the head is something
// else; T16 is empty either way.
Expected<bool> sixteen_pages(const SnapshotReader::Tools& t, int s, bool* packet) {
  auto got = sys::tee_nb(s, t.t16.write.get(), kWindow * kPage);
  if (!got) return tl::unexpected(got.error());
  if (*got != kWindow * kPage) {
    if (auto d = discard(t, t.t16.read.get(), *got); !d) return tl::unexpected(d.error());
    return false;
  }
  if (auto d = discard(t, t.t16.read.get(), (kWindow - 1) * kPage); !d) return tl::unexpected(d.error());
  std::array<std::byte, 1> one;
  auto r1 = sys::read_some(t.t16.read.get(), one);
  if (!r1) return tl::unexpected(r1.error());
  auto rest = sys::bytes_queued(t.t16.read.get());
  if (!rest) return tl::unexpected(rest.error());
  *packet = *rest == 0;
  if (auto d = discard(t, t.t16.read.get(), static_cast<size_t>(*rest)); !d) return tl::unexpected(d.error());
  return true;
}

}  // namespace

Expected<void> SnapshotReader::skip_head(int s, uint64_t total) {
  if (auto m = make_tools(*tools_, kWindow * kPage); !m) return tl::unexpected(m.error());
  return discard(*tools_, s, total);
}

Expected<std::vector<Slot>> SnapshotReader::read_head(int s, uint64_t total, std::vector<std::byte>& bytes) {
  std::vector<Slot> slots;
  if (total == 0) {
    bytes.clear();
    return slots;
  }
  // The walk pipe must hold every slot of the piece: at most one per byte, at most the scratch
  // pipe's capacity; asked of the kernel only when the byte count alone does not settle it.
  uint32_t need = tools_->walk_cap;
  if (total > tools_->walk_cap / kPage) {
    auto cap = sys::get_pipe_size(s);
    if (!cap) return tl::unexpected(cap.error());
    need = static_cast<uint32_t>(*cap);
  }
  if (auto m = make_tools(*tools_, std::max(need, kWindow * kPage)); !m) return tl::unexpected(m.error());
  bytes.resize(total);  // not cleared first: what is kept of the last piece is overwritten, not zeroed

  // One slot (the common case for small pipes): its copy in the 1-slot pipe T says its length and,
  // read 1 byte at a time, whether it is a packet; then its bytes come in one read(). A piece of
  // more than a page cannot be one slot.
  if (total >= 2 && total <= kPage) {
    auto first = sys::tee_nb(s, tools_->t1.write.get(), total);
    if (!first) return tl::unexpected(first.error());
    if (*first == total) {
      std::array<std::byte, 1> one;
      auto r1 = sys::read_some(tools_->t1.read.get(), one);
      if (!r1) return tl::unexpected(r1.error());
      auto rest = sys::bytes_queued(tools_->t1.read.get());
      if (!rest) return tl::unexpected(rest.error());
      if (auto d = discard(*tools_, tools_->t1.read.get(), static_cast<size_t>(*rest)); !d)
        return tl::unexpected(d.error());
      for (uint64_t off = 0; off < total;) {
        auto r = sys::read_some(s, std::span(bytes).subspan(off));
        if (!r) return tl::unexpected(r.error());
        if (*r == 0 || (off + *r < total && *rest == 0))
          return fail(Errc::system, EIO, "snapshot ended early");
        off += *r;
      }
      slots.push_back(Slot{static_cast<uint32_t>(total), *rest == 0});
      return slots;
    }
    if (auto d = discard(*tools_, tools_->t1.read.get(), *first); !d) return tl::unexpected(d.error());
  }

  // Sixteen full pages (a default pipe filled by write(), the common full pipe): one tee into T16
  // says so and gives the last slot's mark, instead of the walk below (12 calls against 5).
  std::optional<std::vector<uint32_t>> lens;
  bool last_packet = false;
  if (total == kWindow * kPage) {
    auto sixteen = sixteen_pages(*tools_, s, &last_packet);
    if (!sixteen) return tl::unexpected(sixteen.error());
    if (*sixteen) lens.emplace(kWindow, kPage);
  }
  if (!lens) {
    auto copied = sys::tee_nb(s, tools_->walk.write.get(), total);
    if (!copied) return tl::unexpected(copied.error());
    if (*copied != total) return fail(Errc::system, EIO, fmt::format("tee copied {} of {} bytes", *copied, total));
    auto walked = walk_lengths(*tools_, total);
    if (!walked) return tl::unexpected(walked.error());
    auto last = last_is_packet(*tools_, s, total, walked->back());
    if (!last) return tl::unexpected(last.error());
    lens = std::move(*walked);
    last_packet = *last;
  }

  // The bytes; each read() ends at a packet's end or at the end of the data.
  std::vector<uint64_t> stops;
  for (uint64_t off = 0; off < total;) {
    auto r = sys::read_some(s, std::span(bytes).subspan(off));
    if (!r) return tl::unexpected(r.error());
    if (*r == 0) return fail(Errc::system, EIO, "snapshot ended early");
    off += *r;
    if (off < total) stops.push_back(off);
  }
  slots.reserve(lens->size());
  uint64_t end = 0;
  size_t next_stop = 0;
  for (uint32_t len : *lens) {
    end += len;
    // A read can only stop at a packet's end: a stop inside a slot means the walk went wrong.
    if (next_stop < stops.size() && stops[next_stop] < end)
      return fail(Errc::system, EIO, fmt::format("snapshot read stopped at {}, inside a slot", stops[next_stop]));
    bool packet = next_stop < stops.size() && stops[next_stop] == end;
    if (packet) ++next_stop;
    slots.push_back(Slot{len, packet});
  }
  slots.back().packet = last_packet;
  return slots;
}

Expected<std::vector<Slot>> layout(const Snapshot& snap) {
  if (snap.bytes == 0) return std::vector<Slot>{};
  auto cap = sys::get_pipe_size(snap.scratch.get());
  if (!cap) return tl::unexpected(cap.error());
  auto copy = scratch_pipe(static_cast<uint32_t>(*cap));
  if (!copy) return tl::unexpected(copy.error());
  auto n = sys::tee_nb(snap.scratch.get(), copy->write.get(), SIZE_MAX >> 1);
  if (!n) return tl::unexpected(n.error());
  Snapshot dup{std::move(copy->read), static_cast<uint32_t>(*n)};
  SnapshotReader reader;
  std::vector<std::byte> bytes;
  return reader.read(dup, bytes);
}

}  // namespace pipecr::dump
