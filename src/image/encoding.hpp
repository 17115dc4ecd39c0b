// encoding.hpp: the byte-level vocabulary of the image format (docs/image-format.md).
//
// Every on-disk integer is little-endian and moved with memcpy, never by casting a struct over
// the bytes: the image's bytes have no alignment and the host may some day not be little-endian.
// Encoding appends to a std::vector<std::byte>; decoding goes through Cursor, a bounded view that
// checks every length against the bytes left before it touches them and remembers the absolute
// image offset of the field it is reading, so each refusal can name where it happened. The
// format's constants (magic, record types, limits) and the checks shared by the writer and the
// reader (so that the writer never emits what the reader refuses) live here too.
#pragma once

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <fmt/format.h>

#include "pipecr/image.hpp"

namespace pipecr::image {

// ---- format constants ---------------------------------------------------------------------

// "\x89PIPECR\n": the high byte catches 7-bit channels, the newline catches text-mode mangling.
inline constexpr std::array<std::byte, 8> kMagic = {std::byte{0x89}, std::byte{'P'}, std::byte{'I'}, std::byte{'P'},
                                                    std::byte{'E'},  std::byte{'C'}, std::byte{'R'}, std::byte{'\n'}};
inline constexpr size_t kFileHeaderSize = 24;    // magic, u32 version, u32 reserved, u64 checksum
inline constexpr size_t kRecordHeaderSize = 16;  // u32 type, u32 flags, u64 payload length
inline constexpr size_t kChecksumSize = 8;
inline constexpr size_t kRecordOverhead = kRecordHeaderSize + kChecksumSize;

enum class RecordType : uint32_t {
  info = 1,
  process = 2,
  pipe = 3,
  pipe_data = 4,
  file = 5,
  fd = 6,
  epoll_watch = 7,    // EpollWatch; optional
  in_flight = 8,      // InFlightRecord; optional
  thread_fd = 9,      // an FD in a thread's own fd table (FdRecord::tid != 0); required
  shared_files = 10,  // SharedFdTable; optional
  thread_epoll_watch = 11,  // an EpollWatch in a thread's own fd table (EpollWatch::tid != 0); optional
  end = 0xFFFF,
};
inline constexpr uint32_t kRecordRequired = 1u << 0;  // record flags bit 0

[[nodiscard]] inline std::string record_name(uint32_t type) {
  switch (static_cast<RecordType>(type)) {
    case RecordType::info: return "INFO";
    case RecordType::process: return "PROCESS";
    case RecordType::pipe: return "PIPE";
    case RecordType::pipe_data: return "PIPE_DATA";
    case RecordType::file: return "FILE";
    case RecordType::fd: return "FD";
    case RecordType::epoll_watch: return "EPOLL_WATCH";
    case RecordType::in_flight: return "IN_FLIGHT";
    case RecordType::thread_fd: return "THREAD_FD";
    case RecordType::shared_files: return "SHARED_FILES";
    case RecordType::thread_epoll_watch: return "THREAD_EPOLL_WATCH";
    case RecordType::end: return "END";
  }
  return fmt::format("type {:#x}", type);
}

// Whether this build knows the record type (record_name() names it).
[[nodiscard]] inline bool is_known_record(uint32_t type) {
  return type == static_cast<uint32_t>(RecordType::end) ||
         (type >= static_cast<uint32_t>(RecordType::info) && type <= static_cast<uint32_t>(RecordType::shared_files));
}

// PIPE flags.
inline constexpr uint32_t kPipeUnlinked = 1u << 0;
inline constexpr uint32_t kPipeOutsideHolders = 1u << 1;
// Slot flags.
inline constexpr uint32_t kSlotPacket = 1u << 0;

// Bounds on strings and counts: generous for real images, small enough that a corrupt length
// cannot ask for much.
inline constexpr uint32_t kMaxPath = 4096;          // PATH_MAX
inline constexpr uint32_t kMaxComm = 64;            // the kernel's is 16; leave room
inline constexpr uint32_t kMaxShortString = 256;    // INFO.kernel, INFO.tool
inline constexpr uint32_t kMaxBootId = 64;          // INFO.boot_id (a UUID is 36)
inline constexpr uint64_t kMaxArgvBytes = 1u << 20; // sum of argv string lengths
inline constexpr uint32_t kMinPageSize = 4096;
inline constexpr uint32_t kMaxPageSize = 1u << 20;

// ---- encoding -----------------------------------------------------------------------------

template <class T>
inline void put_le(std::vector<std::byte>& out, T v) {
  static_assert(std::is_unsigned_v<T>);
  std::array<std::byte, sizeof(T)> b;
  for (size_t i = 0; i < sizeof(T); ++i) b[i] = static_cast<std::byte>((v >> (8 * i)) & 0xFF);
  out.insert(out.end(), b.begin(), b.end());
}
inline void put_u8(std::vector<std::byte>& out, uint8_t v) { out.push_back(static_cast<std::byte>(v)); }
inline void put_u32(std::vector<std::byte>& out, uint32_t v) { put_le(out, v); }
inline void put_u64(std::vector<std::byte>& out, uint64_t v) { put_le(out, v); }
inline void put_i32(std::vector<std::byte>& out, int32_t v) { put_le(out, static_cast<uint32_t>(v)); }
inline void put_bytes(std::vector<std::byte>& out, std::span<const std::byte> b) {
  out.insert(out.end(), b.begin(), b.end());
}
inline void put_string(std::vector<std::byte>& out, std::string_view s) {
  put_u32(out, static_cast<uint32_t>(s.size()));
  put_bytes(out, std::as_bytes(std::span(s.data(), s.size())));
}

// Little-endian load of a T from exactly sizeof(T) bytes.
template <class T>
[[nodiscard]] inline T get_le(const std::byte* p) {
  static_assert(std::is_unsigned_v<T>);
  std::array<unsigned char, sizeof(T)> b;
  std::memcpy(b.data(), p, sizeof(T));
  T v = 0;
  for (size_t i = 0; i < sizeof(T); ++i) v |= static_cast<T>(b[i]) << (8 * i);
  return v;
}

// The 16-byte header of a record with `payload_len` bytes of payload.
[[nodiscard]] inline std::vector<std::byte> record_header(uint32_t type, uint32_t flags, uint64_t payload_len) {
  std::vector<std::byte> h;
  h.reserve(kRecordHeaderSize);
  put_u32(h, type);
  put_u32(h, flags);
  put_u64(h, payload_len);
  return h;
}

// ---- decoding -----------------------------------------------------------------------------

// A bounded reader over one span of the image. `base` is the image offset of bytes[0], so
// offset() is always an absolute image offset. A failed read leaves an explanation in problem()
// and returns nullopt; the caller turns it into Errc::bad_image.
class Cursor {
 public:
  Cursor(std::span<const std::byte> bytes, uint64_t base) : bytes_(bytes), base_(base) {}

  [[nodiscard]] uint64_t offset() const { return base_ + pos_; }
  [[nodiscard]] size_t left() const { return bytes_.size() - pos_; }
  [[nodiscard]] bool at_end() const { return pos_ == bytes_.size(); }
  [[nodiscard]] const std::string& problem() const { return problem_; }
  [[nodiscard]] uint64_t problem_offset() const { return problem_offset_; }

  // n bytes, viewed in place.
  [[nodiscard]] std::optional<std::span<const std::byte>> take(uint64_t n, std::string_view what) {
    if (n > left()) {
      set_problem(fmt::format("{} needs {} bytes but {} are left", what, n, left()));
      return std::nullopt;
    }
    auto s = bytes_.subspan(pos_, static_cast<size_t>(n));
    pos_ += static_cast<size_t>(n);
    return s;
  }
  template <class T>
  [[nodiscard]] std::optional<T> get(std::string_view what) {
    auto s = take(sizeof(T), what);
    if (!s) return std::nullopt;
    return get_le<T>(s->data());
  }
  [[nodiscard]] std::optional<uint8_t> u8(std::string_view what) { return get<uint8_t>(what); }
  [[nodiscard]] std::optional<uint32_t> u32(std::string_view what) { return get<uint32_t>(what); }
  [[nodiscard]] std::optional<uint64_t> u64(std::string_view what) { return get<uint64_t>(what); }
  [[nodiscard]] std::optional<int32_t> i32(std::string_view what) {
    auto v = get<uint32_t>(what);
    if (!v) return std::nullopt;
    return static_cast<int32_t>(*v);
  }
  // u32 length + bytes; the length is checked against `max` and against the bytes left before
  // anything is allocated. NUL bytes are refused: every string ends up as a C string somewhere.
  [[nodiscard]] std::optional<std::string> string(std::string_view what, uint32_t max) {
    uint64_t at = offset();
    auto n = u32(what);
    if (!n) return std::nullopt;
    if (*n > max) return fail_at(at, fmt::format("{} length {} exceeds the limit of {}", what, *n, max));
    auto b = take(*n, what);
    if (!b) return std::nullopt;
    std::string s(reinterpret_cast<const char*>(b->data()), b->size());
    if (s.find('\0') != std::string::npos) return fail_at(at, fmt::format("{} contains a NUL byte", what));
    return s;
  }

  // Fields appended in later versions: a payload that ends before a field leaves its default
  // in dst; one that ends inside a field is corrupt (take() says so). False on corruption.
  template <class T>
  [[nodiscard]] bool opt(T& dst, std::string_view what) {
    if (at_end()) return true;
    auto v = get<std::make_unsigned_t<T>>(what);
    if (!v) return false;
    dst = static_cast<T>(*v);
    return true;
  }
  [[nodiscard]] bool opt_string(std::string& dst, std::string_view what, uint32_t max) {
    if (at_end()) return true;
    auto v = string(what, max);
    if (!v) return false;
    dst = std::move(*v);
    return true;
  }

  // Record a problem found by the caller at an absolute offset; returns nullopt for convenience.
  std::nullopt_t fail_at(uint64_t at, std::string msg) {
    problem_offset_ = at;
    problem_ = std::move(msg);
    return std::nullopt;
  }

 private:
  void set_problem(std::string msg) { fail_at(offset(), std::move(msg)); }

  std::span<const std::byte> bytes_;
  uint64_t base_ = 0;
  size_t pos_ = 0;
  std::string problem_;
  uint64_t problem_offset_ = 0;
};

// ---- checks shared by writer and reader ---------------------------------------------------
// Each returns an empty string when the record is acceptable, else what is wrong and the rule it
// breaks, in a few words ("pipe id 0: ids start at 1"). validate() says the same where it checks
// the same fields.

[[nodiscard]] inline std::string check_info(const ImageInfo& i) {
  if (i.page_size < kMinPageSize || i.page_size > kMaxPageSize || !std::has_single_bit(i.page_size))
    return fmt::format("page size {} is not a power of two in [{}, {}]", i.page_size, kMinPageSize, kMaxPageSize);
  if (i.kernel.size() > kMaxShortString)
    return fmt::format("kernel string is {} bytes long, over {}", i.kernel.size(), kMaxShortString);
  if (i.tool.size() > kMaxShortString)
    return fmt::format("tool string is {} bytes long, over {}", i.tool.size(), kMaxShortString);
  if (i.boot_id.size() > kMaxBootId)
    return fmt::format("boot id string is {} bytes long, over {}", i.boot_id.size(), kMaxBootId);
  return {};
}

[[nodiscard]] inline std::string check_process(const ProcessRecord& p) {
  if (p.pid <= 0) return fmt::format("process pid {} is not positive", p.pid);
  if (p.ppid < 0) return fmt::format("process {} has ppid {}: a ppid is 0 or positive", p.pid, p.ppid);
  if (p.comm.size() > kMaxComm) return fmt::format("process {} comm is longer than {} bytes", p.pid, kMaxComm);
  uint64_t total = 0;
  for (const std::string& a : p.argv) total += a.size();
  if (total > kMaxArgvBytes) return fmt::format("process {} argv totals {} bytes, over {}", p.pid, total, kMaxArgvBytes);
  return {};
}

// The rules on a pipe's id and kind, which validate() checks again.
[[nodiscard]] inline std::string check_pipe_kind(const PipeRecord& p) {
  if (p.id == 0) return "pipe id 0: ids start at 1";
  if (p.kind != PipeKind::anonymous && p.kind != PipeKind::fifo)
    return fmt::format("pipe {} has kind {}: a pipe is anonymous (0) or a FIFO (1)", p.id,
                       static_cast<unsigned>(p.kind));
  if (p.kind == PipeKind::anonymous && (!p.path.empty() || p.unlinked))
    return fmt::format("anonymous pipe {} has a FIFO path: only a FIFO has one", p.id);
  return {};
}

// The pipe's own fields, given the image's page size.
[[nodiscard]] inline std::string check_pipe(const PipeRecord& p, uint32_t page_size) {
  if (auto e = check_pipe_kind(p); !e.empty()) return e;
  if (p.path.size() > kMaxPath)
    return fmt::format("pipe {} path is {} bytes long, over {} (PATH_MAX)", p.id, p.path.size(), kMaxPath);
  if (p.kind == PipeKind::fifo && p.path.empty())
    return fmt::format("FIFO {} has no path: a FIFO is restored at its path", p.id);
  uint64_t max_slots = page_size ? p.capacity / page_size : 0;
  if (p.slots.size() > max_slots)
    return fmt::format("pipe {} has {} slots but capacity {} holds {} pages of {} bytes", p.id, p.slots.size(),
                       p.capacity, max_slots, page_size);
  for (size_t i = 0; i < p.slots.size(); ++i)
    if (p.slots[i].len == 0 || p.slots[i].len > page_size)
      return fmt::format("pipe {} slot {} holds {} bytes: a pipe buffer holds 1..{} bytes (the page size)", p.id, i,
                         p.slots[i].len, page_size);
  return {};
}

[[nodiscard]] inline std::string check_file(const FileRecord& f) {
  if (f.id == 0) return "file id 0: ids start at 1";
  if (f.pipe_id == 0) return fmt::format("file {} has pipe id 0: it must name a PIPE record, and ids start at 1", f.id);
  if ((f.flags & 3) == 3)
    return fmt::format("file {} has access mode 3: a pipe end is opened O_RDONLY, O_WRONLY or O_RDWR (0, 1, 2)", f.id);
  if (f.owner.type < 0 || f.owner.type > 2)
    return fmt::format("file {} has owner type {}: F_SETOWN_EX takes a thread (0), a process (1) or a group (2)",
                       f.id, f.owner.type);
  if (f.signal < 0 || f.signal > 64)
    return fmt::format("file {} has signal {}: F_SETSIG takes 0 (SIGIO) to 64", f.id, f.signal);
  if (static_cast<unsigned>(f.fifo_reader) > 2)
    return fmt::format("file {} has FIFO reader state {}: the states are 0, 1 and 2", f.id,
                       static_cast<unsigned>(f.fifo_reader));
  return {};
}

[[nodiscard]] inline std::string check_fd(const FdRecord& f) {
  if (f.pid < 0) return fmt::format("fd {} has pid {}: a pid is positive (0: the caller itself)", f.fd, f.pid);
  if (f.fd < 0) return fmt::format("fd number {} is negative: fd numbers start at 0", f.fd);
  if (f.file_id == 0) return fmt::format("fd {} has file id 0: it must name a FILE record, and ids start at 1", f.fd);
  if (static_cast<unsigned>(f.blocked) > 2)
    return fmt::format("fd {} has blocked state {}: the states are 0 (none), 1 (reading) and 2 (writing)", f.fd,
                       static_cast<unsigned>(f.blocked));
  if (f.tid < 0)
    return fmt::format("fd {} has thread id {}: a thread id is positive (0: the process's own table)", f.fd, f.tid);
  if (f.tid != 0 && f.pid == 0)
    return fmt::format("fd {} is in thread {} of pid 0: a thread's own table belongs to a recorded process", f.fd,
                       f.tid);
  return {};
}

[[nodiscard]] inline std::string check_in_flight(const InFlightRecord& f) {
  if (f.file_id == 0) return "end in flight with file id 0: it must name a FILE record, and ids start at 1";
  if (f.pid <= 0) return fmt::format("file {} in flight in pid {}: a pid is positive", f.file_id, f.pid);
  if (f.sock_fd < 0)
    return fmt::format("file {} in flight in socket fd {}: fd numbers start at 0", f.file_id, f.sock_fd);
  return {};
}

[[nodiscard]] inline std::string check_shared(const SharedFdTable& s) {
  if (s.pid <= 0 || s.with_pid <= 0 || s.pid == s.with_pid)
    return fmt::format("shared fd table of pid {} with pid {}: two different positive pids", s.pid, s.with_pid);
  return {};
}

[[nodiscard]] inline std::string check_epoll_watch(const EpollWatch& w) {
  if (w.epoll_id == 0) return "epoll id 0: ids start at 1";
  if (w.pid <= 0) return fmt::format("epoll {} has holder pid {}: a pid is positive", w.epoll_id, w.pid);
  if (w.tid < 0) return fmt::format("epoll {} of pid {} has thread id {}: a thread id is positive", w.epoll_id, w.pid, w.tid);
  if (w.epoll_fd < 0 || w.fd < 0)
    return fmt::format("epoll {} has a negative fd number ({} watching {}): fd numbers start at 0", w.epoll_id,
                       w.epoll_fd, w.fd);
  if (w.epoll_fd == w.fd)
    return fmt::format("epoll {} fd {} watches itself: an epoll cannot watch its own fd", w.epoll_id, w.fd);
  if (w.file_id == 0)
    return fmt::format("epoll {} watches file id 0: it must name a FILE record, and ids start at 1", w.epoll_id);
  return {};
}

}  // namespace pipecr::image
