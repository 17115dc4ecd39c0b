// dump/pipe.cpp: reading one pipe's bytes and slot layout without consuming them.
//
// snapshot(): tee() links every queued pipe_buffer of the source into a scratch pipe of ours.
// tee() copies page references, not bytes, and leaves the source as it was whatever filled it
// (write, splice, vmsplice with or without GIFT, tee); packet marks survive it.
//
// layout(): the slot layout is learned from a second tee of the scratch pipe, so the snapshot
// stays whole for stream(). One slot at a time, head first:
//   - tee into a 1-slot pipe T: the return value is the head slot's length L;
//   - read 1 byte of T: a packet buffer is dropped whole by a short read (FIONREAD 0 after),
//     a stream buffer keeps L-1 bytes;
//   - a 1-byte slot reads the same either way, so tee two slots into a 2-slot pipe and read it
//     with a large buffer: a packet stops the read after its 1 byte, a stream slot does not.
//     The last slot has no successor; a 1-byte sentinel written behind it gives it one (tee'd
//     buffers never merge, so the sentinel is a slot of its own);
//   - splice L bytes of the walked copy to /dev/null and go on with the next slot.
// stream(): reads the bytes out slot-aligned: a read() that ended inside a packet would drop the
// rest of it, so each read asks for whole slots only.
#include "dump/pipe.hpp"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <climits>

#include <fmt/format.h>

#include "sys/syscalls.hpp"

// <linux/watch_queue.h> clashes with <fcntl.h>; the ioctl number is ABI.
#ifndef IOC_WATCH_QUEUE_SET_FILTER
#define IOC_WATCH_QUEUE_SET_FILTER _IO('W', 0x61)
#endif
#ifndef F_GETOWNER_UIDS
#define F_GETOWNER_UIDS 17
#endif

namespace pipecr::dump {
namespace {

constexpr size_t kMaxTee = INT_MAX;
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
  auto cur = sys::get_pipe_size(p->read.get());
  if (!cur) return tl::unexpected(cur.error());
  if (static_cast<uint32_t>(*cur) != size) {
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

// Reads and discards everything queued in fd (a pipe of ours, non-blocking).
Expected<void> drain(int fd) {
  std::array<std::byte, kPage * 2> buf;
  for (;;) {
    auto q = sys::bytes_queued(fd);
    if (!q) return tl::unexpected(q.error());
    if (*q == 0) return {};
    auto r = sys::read_some(fd, buf);
    if (!r) return tl::unexpected(r.error());
  }
}

// Is the head slot of `walk` (length len) a packet? T1 is a 1-slot pipe, T2 a 2-slot pipe, both empty.
Expected<bool> head_is_packet(int walk_r, int walk_w, uint32_t len, uint64_t remaining, const sys::PipePair& t1,
                              const sys::PipePair& t2) {
  std::array<std::byte, kPage * 2> buf;
  if (len >= 2) {
    auto got = sys::tee_nb(walk_r, t1.write.get(), kMaxTee);
    if (!got) return tl::unexpected(got.error());
    auto r = sys::read_some(t1.read.get(), std::span(buf).first(1));
    if (!r) return tl::unexpected(r.error());
    auto left = sys::bytes_queued(t1.read.get());
    if (!left) return tl::unexpected(left.error());
    bool packet = *left == 0;
    if (auto d = drain(t1.read.get()); !d) return tl::unexpected(d.error());
    return packet;
  }
  if (remaining == 1) {  // the last slot: give it a successor
    static constexpr std::byte sentinel{0x5a};
    auto w = sys::write_all(walk_w, std::span(&sentinel, 1), "write(sentinel)");
    if (!w) return tl::unexpected(w.error());
  }
  auto got = sys::tee_nb(walk_r, t2.write.get(), kMaxTee);
  if (!got) return tl::unexpected(got.error());
  auto r = sys::read_some(t2.read.get(), buf);
  if (!r) return tl::unexpected(r.error());
  bool packet = *r == 1;
  if (auto d = drain(t2.read.get()); !d) return tl::unexpected(d.error());
  return packet;
}

}  // namespace

bool is_notification_pipe(int fd) {
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
  auto scratch = scratch_pipe(std::max(capacity, kPage));
  if (!scratch) return tl::unexpected(scratch.error());
  Snapshot snap;
  auto got = sys::tee_nb(read_end, scratch->write.get(), kMaxTee);
  if (got) {
    snap.bytes = static_cast<uint32_t>(*got);
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

Expected<std::vector<Slot>> layout(const Snapshot& snap) {
  std::vector<Slot> slots;
  if (snap.bytes == 0) return slots;
  auto cap = sys::get_pipe_size(snap.scratch.get());
  if (!cap) return tl::unexpected(cap.error());
  auto walk = scratch_pipe(std::max<uint32_t>(static_cast<uint32_t>(*cap), 2 * kPage));
  if (!walk) return tl::unexpected(walk.error());
  auto t1 = scratch_pipe(kPage);
  if (!t1) return tl::unexpected(t1.error());
  auto t2 = scratch_pipe(2 * kPage);
  if (!t2) return tl::unexpected(t2.error());
  sys::UniqueFd devnull(::open("/dev/null", O_WRONLY | O_CLOEXEC));
  if (!devnull) return tl::unexpected(sys::call_error("open", "/dev/null"));

  auto copied = sys::tee_nb(snap.scratch.get(), walk->write.get(), kMaxTee);
  if (!copied) return tl::unexpected(copied.error());
  if (*copied != snap.bytes)
    return fail(Errc::system, EIO, fmt::format("tee copied {} of the {} bytes of a snapshot", *copied, snap.bytes));

  uint64_t remaining = snap.bytes;
  while (remaining > 0) {
    auto len = sys::tee_nb(walk->read.get(), t1->write.get(), kMaxTee);
    if (!len) return tl::unexpected(len.error());
    if (*len == 0 || *len > remaining) return fail(Errc::system, EIO, "slot walk lost its place");
    auto d = drain(t1->read.get());
    if (!d) return tl::unexpected(d.error());
    uint32_t L = static_cast<uint32_t>(*len);
    auto packet = head_is_packet(walk->read.get(), walk->write.get(), L, remaining, *t1, *t2);
    if (!packet) return tl::unexpected(packet.error());
    auto gone = sys::splice_nb(walk->read.get(), devnull.get(), L);
    if (!gone) return tl::unexpected(gone.error());
    if (*gone != L) return fail(Errc::system, EIO, "slot walk: short splice");
    slots.push_back(Slot{L, *packet});
    remaining -= L;
  }
  return slots;
}

Expected<uint64_t> stream(Snapshot& snap, std::span<const Slot> slots, const ChunkSink& sink) {
  constexpr size_t kChunk = 256 * 1024;
  std::vector<std::byte> buf(kChunk);
  uint64_t total = 0;
  size_t i = 0;
  while (i < slots.size()) {
    size_t want = 0;
    size_t j = i;
    while (j < slots.size() && (want == 0 || want + slots[j].len <= kChunk)) want += slots[j++].len;
    auto r = sys::read_some(snap.scratch.get(), std::span(buf).first(want));
    if (!r) return tl::unexpected(r.error());
    if (*r == 0) return fail(Errc::system, EIO, "snapshot ended before its last slot");
    // Advance over the whole slots this read returned (a packet ends a read early).
    size_t got = *r;
    while (got > 0 && i < slots.size() && slots[i].len <= got) got -= slots[i++].len;
    if (got != 0) return fail(Errc::system, EIO, "snapshot read ended inside a slot");
    if (auto s = sink(std::span(buf).first(*r)); !s) return tl::unexpected(s.error());
    total += *r;
  }
  return total;
}

Expected<FileRecord> file_state(int fd) {
  FileRecord f;
  auto fl = sys::get_fl(fd);
  if (!fl) return tl::unexpected(fl.error());
  f.flags = static_cast<uint32_t>(*fl);
  struct f_owner_ex own {};
  if (::fcntl(fd, F_GETOWN_EX, &own) < 0)
    return tl::unexpected(sys::call_error("fcntl", fmt::format("fd={}, F_GETOWN_EX", fd)));
  f.owner.type = own.type;
  f.owner.pid = own.pid;
  if (own.pid != 0) {
    uint32_t uids[2] = {0, 0};
    if (::fcntl(fd, F_GETOWNER_UIDS, uids) == 0) {
      f.owner.has_uids = true;
      f.owner.uid = uids[0];
      f.owner.euid = uids[1];
    }
  }
  int sig = ::fcntl(fd, F_GETSIG);
  if (sig < 0) return tl::unexpected(sys::call_error("fcntl", fmt::format("fd={}, F_GETSIG", fd)));
  f.signal = sig;
  return f;
}

}  // namespace pipecr::dump
