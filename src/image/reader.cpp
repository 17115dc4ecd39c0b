// reader.cpp: parser and verifier of format v1 images (docs/image-format.md).
//
// One pass over bytes already in memory (a buffer or a read-only mapping). The reader trusts no
// field: a record's length is checked against the bytes left before its checksum is computed, the
// checksum is verified before the payload is decoded, every count is checked against the payload
// bytes left before anything is reserved for it, and every id and reference is checked against
// the records already seen (the grammar puts referenced records first). Any problem becomes
// Errc::bad_image with the offset and a sentence; a version or a required record type this build
// does not know becomes Errc::image_version. PIPE_DATA bytes are not copied: PipeRecord::data views
// the input, which must outlive the Image.
#include <xxhash.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <set>
#include <tuple>
#include <unordered_map>
#include <unordered_set>

#include "image/encoding.hpp"
#include "image/image_io.hpp"

namespace pipecr::image {
namespace {

[[nodiscard]] tl::unexpected<Error> bad(uint64_t off, std::string what) {
  return fail(Errc::bad_image, 0, fmt::format("image offset {}: {}", off, what));
}

// Sections in grammar order; PIPE_DATA belongs to the pipes section.
enum class Section : uint8_t { info, processes, pipes, files, fds };

[[nodiscard]] const char* section_name(Section s) {
  switch (s) {
    case Section::info: return "INFO";
    case Section::processes: return "PROCESS";
    case Section::pipes: return "PIPE";
    case Section::files: return "FILE";
    case Section::fds: return "FD";
  }
  return "?";
}

// A record's payload, already length- and checksum-verified.
struct RawRecord {
  uint32_t type = 0;
  uint32_t flags = 0;
  uint64_t offset = 0;                  // of the record header
  std::span<const std::byte> payload;   // starts at offset + kRecordHeaderSize
  [[nodiscard]] Cursor cursor() const { return Cursor(payload, offset + kRecordHeaderSize); }
};

[[nodiscard]] tl::unexpected<Error> bad_field(const RawRecord& r, const Cursor& c) {
  return bad(c.problem_offset(), fmt::format("record {}: {}", record_name(r.type), c.problem()));
}

Expected<ImageInfo> decode_info(const RawRecord& r) {
  Cursor c = r.cursor();
  ImageInfo i;
  if (!c.opt(i.page_size, "page_size") || !c.opt(i.created_unix_ns, "created_unix_ns") ||
      !c.opt_string(i.kernel, "kernel", kMaxShortString) || !c.opt_string(i.tool, "tool", kMaxShortString) ||
      !c.opt_string(i.boot_id, "boot_id", kMaxBootId))
    return bad_field(r, c);
  return i;
}

Expected<ProcessRecord> decode_process(const RawRecord& r) {
  Cursor c = r.cursor();
  ProcessRecord p;
  uint32_t argc = 0;
  if (!c.opt(p.pid, "pid") || !c.opt(p.ppid, "ppid") || !c.opt_string(p.comm, "comm", kMaxComm)) return bad_field(r, c);
  uint64_t at = c.offset();
  if (!c.opt(argc, "argc")) return bad_field(r, c);
  if (argc > c.left() / 4)  // each argument takes at least its u32 length
    return bad(at, fmt::format("record PROCESS: argc {} cannot fit in the {} bytes left", argc, c.left()));
  p.argv.reserve(argc);
  uint64_t total = 0;
  for (uint32_t i = 0; i < argc; ++i) {
    auto a = c.string("argv", static_cast<uint32_t>(kMaxArgvBytes - total));
    if (!a) return bad_field(r, c);
    total += a->size();
    p.argv.push_back(std::move(*a));
  }
  return p;
}

Expected<PipeRecord> decode_pipe(const RawRecord& r, uint32_t page_size) {
  Cursor c = r.cursor();
  PipeRecord p;
  uint8_t kind = 0;
  uint32_t flags = 0, nslots = 0;
  if (!c.opt(p.id, "id") || !c.opt(kind, "kind") || !c.opt(p.inode, "inode") || !c.opt(p.capacity, "capacity") ||
      !c.opt(p.uid, "uid") || !c.opt(p.gid, "gid") || !c.opt(p.mode, "mode") ||
      !c.opt_string(p.path, "path", kMaxPath) || !c.opt(flags, "flags"))
    return bad_field(r, c);
  p.kind = static_cast<PipeKind>(kind);
  p.unlinked = flags & kPipeUnlinked;
  p.outside_holders = flags & kPipeOutsideHolders;
  uint64_t at = c.offset();
  if (!c.opt(nslots, "slot count")) return bad_field(r, c);
  if (nslots > c.left() / 8)
    return bad(at, fmt::format("record PIPE: slot count {} needs {} bytes but {} are left", nslots,
                               uint64_t{nslots} * 8, c.left()));
  if (nslots > p.capacity / page_size)
    return bad(at, fmt::format("record PIPE: slot count {} exceeds capacity {} / page size {}", nslots, p.capacity,
                               page_size));
  p.slots.reserve(nslots);
  for (uint32_t i = 0; i < nslots; ++i) {
    auto len = c.u32("slot length");
    auto fl = c.u32("slot flags");
    if (!len || !fl) return bad_field(r, c);
    p.slots.push_back(Slot{*len, (*fl & kSlotPacket) != 0});
  }
  if (!c.opt(p.dev, "dev")) return bad_field(r, c);
  return p;
}

Expected<FileRecord> decode_file(const RawRecord& r) {
  Cursor c = r.cursor();
  FileRecord f;
  uint32_t owner_flags = 0;
  uint8_t fifo = 0;
  if (!c.opt(f.id, "id") || !c.opt(f.pipe_id, "pipe_id") || !c.opt(f.flags, "flags") ||
      !c.opt(f.owner.type, "owner type") || !c.opt(f.owner.pid, "owner pid") || !c.opt(owner_flags, "owner flags") ||
      !c.opt(f.owner.uid, "owner uid") || !c.opt(f.owner.euid, "owner euid") || !c.opt(f.signal, "signal") ||
      !c.opt(fifo, "fifo_reader"))
    return bad_field(r, c);
  f.owner.has_uids = owner_flags & 1;
  f.fifo_reader = static_cast<FifoReaderState>(fifo);
  return f;
}

Expected<FdRecord> decode_fd(const RawRecord& r) {
  Cursor c = r.cursor();
  FdRecord f;
  uint32_t fd_flags = 0;
  uint8_t blocked = 0;
  if (!c.opt(f.pid, "pid") || !c.opt(f.fd, "fd") || !c.opt(f.file_id, "file_id") || !c.opt(fd_flags, "fd flags") ||
      !c.opt(blocked, "blocked"))
    return bad_field(r, c);
  f.cloexec = fd_flags & 1;
  f.blocked = static_cast<Blocked>(blocked);
  if (r.type == static_cast<uint32_t>(RecordType::thread_fd)) {
    auto tid = c.i32("tid");
    if (!tid) return bad_field(r, c);
    if (*tid <= 0)
      return bad(r.offset,
                 fmt::format("record THREAD_FD: fd {} has thread id {}: a THREAD_FD names a thread (id above 0)", f.fd,
                             *tid));
    f.tid = *tid;
  }
  return f;
}

Expected<EpollWatch> decode_epoll_watch(const RawRecord& r) {
  Cursor c = r.cursor();
  EpollWatch w;
  if (!c.opt(w.epoll_id, "epoll_id") || !c.opt(w.pid, "pid") || !c.opt(w.epoll_fd, "epoll_fd") ||
      !c.opt(w.file_id, "file_id") || !c.opt(w.fd, "fd") || !c.opt(w.events, "events") || !c.opt(w.data, "data"))
    return bad_field(r, c);
  if (r.type == static_cast<uint32_t>(RecordType::thread_epoll_watch)) {
    auto tid = c.i32("tid");
    if (!tid) return bad_field(r, c);
    if (*tid <= 0)
      return bad(r.offset, fmt::format("record THREAD_EPOLL_WATCH: epoll fd {} has thread id {}: a "
                                       "THREAD_EPOLL_WATCH names a thread (id above 0)",
                                       w.epoll_fd, *tid));
    w.tid = *tid;
  }
  return w;
}

// A record of a type this build does not know, marked required: an image of a later format.
tl::unexpected<Error> unknown_required(uint64_t pos, uint32_t type) {
  return fail(Errc::image_version, 0,
              fmt::format("image offset {}: required record type {:#x} is not known to this build", pos, type));
}

// Any first record but INFO.
tl::unexpected<Error> not_info_first(uint64_t pos, uint32_t type) {
  return bad(pos, fmt::format("first record is {}, not INFO", record_name(type)));
}

// The 24-byte file header at the start of bytes: the magic (checked first, on as many bytes as there
// are, so that a short file that is no image is named as such), the length, the checksum, then the
// version. Returns the version.
Expected<uint32_t> check_file_header(std::span<const std::byte> bytes) {
  if (bytes.size() >= kMagic.size() && !std::equal(kMagic.begin(), kMagic.end(), bytes.begin()))
    return bad(0, "not a pipecr image (bad magic)");
  if (bytes.size() < kFileHeaderSize)
    return bad(0, fmt::format("file header needs {} bytes but the image has {} (truncated)", kFileHeaderSize,
                              bytes.size()));
  uint64_t stored = get_le<uint64_t>(bytes.data() + 16);
  uint64_t computed = XXH3_64bits(bytes.data(), 16);
  if (stored != computed)
    return bad(16, fmt::format("file header checksum mismatch (stored {:#018x}, computed {:#018x})", stored, computed));
  uint32_t version = get_le<uint32_t>(bytes.data() + 8);
  if (version != kFormatVersion)
    return fail(Errc::image_version, 0,
                fmt::format("image offset 8: format version {} is not supported (this build reads version {})",
                            version, kFormatVersion));
  return version;
}

class Parser {
 public:
  explicit Parser(std::span<const std::byte> bytes) : bytes_(bytes) {}

  Expected<Image> run() {
    if (auto r = header(); !r) return tl::unexpected(r.error());
    uint64_t pos = kFileHeaderSize;
    for (;;) {
      auto rec = next(pos);
      if (!rec) return tl::unexpected(rec.error());
      pos += kRecordOverhead + rec->payload.size();
      if (rec->type == static_cast<uint32_t>(RecordType::end)) {
        if (auto r = end(*rec); !r) return tl::unexpected(r.error());
        if (pos != bytes_.size()) return bad(pos, fmt::format("{} bytes follow the END record", bytes_.size() - pos));
        return std::move(img_);
      }
      if (auto r = dispatch(*rec); !r) return tl::unexpected(r.error());
      ++records_;
    }
  }

 private:
  Expected<void> header() {
    auto version = check_file_header(bytes_);
    if (!version) return tl::unexpected(version.error());
    img_.format_version = *version;
    return {};
  }

  // The record at pos: header in bounds, length in bounds, checksum verified.
  Expected<RawRecord> next(uint64_t pos) {
    uint64_t left = bytes_.size() - pos;
    if (left == 0)
      return bad(pos, fmt::format("image ends after {} records without an END record (truncated)", records_));
    if (left < kRecordOverhead)
      return bad(pos, fmt::format("record header and checksum need {} bytes but {} are left", kRecordOverhead, left));
    RawRecord r;
    r.offset = pos;
    r.type = get_le<uint32_t>(bytes_.data() + pos);
    r.flags = get_le<uint32_t>(bytes_.data() + pos + 4);
    uint64_t len = get_le<uint64_t>(bytes_.data() + pos + 8);
    uint64_t room = left - kRecordOverhead;  // for the payload
    if (len > room)
      return bad(pos, fmt::format("record {} length {} exceeds the {} bytes left", record_name(r.type), len, room));
    const std::byte* p = bytes_.data() + pos;
    uint64_t stored = get_le<uint64_t>(p + kRecordHeaderSize + len);
    uint64_t computed = XXH3_64bits(p, kRecordHeaderSize + len);
    if (stored != computed)
      return bad(pos, fmt::format("record {} checksum mismatch (stored {:#018x}, computed {:#018x})",
                                  record_name(r.type), stored, computed));
    r.payload = bytes_.subspan(pos + kRecordHeaderSize, len);
    return r;
  }

  // Place a known record in the grammar: INFO first, then sections in order.
  Expected<void> enter(const RawRecord& r, Section s) {
    if (!saw_info_ && s != Section::info) return not_info_first(r.offset, r.type);
    if (saw_info_ && s == Section::info) return bad(r.offset, "second INFO record");
    if (s < section_)
      return bad(r.offset, fmt::format("{} record after a {} record", record_name(r.type), section_name(section_)));
    if (s > Section::pipes && section_ <= Section::pipes)
      if (auto e = all_data_present(); !e) return e;
    section_ = s;
    return {};
  }

  Expected<void> dispatch(const RawRecord& r) {
    switch (static_cast<RecordType>(r.type)) {
      case RecordType::info: return info(r);
      case RecordType::process: return process(r);
      case RecordType::pipe: return pipe(r);
      case RecordType::pipe_data: return pipe_data(r);
      case RecordType::file: return file(r);
      case RecordType::fd: return fd(r);
      case RecordType::thread_fd: return fd(r);
      case RecordType::epoll_watch: return epoll_watch(r);
      case RecordType::thread_epoll_watch: return epoll_watch(r);
      case RecordType::in_flight: return in_flight(r);
      case RecordType::shared_files: return shared(r);
      case RecordType::end: break;  // handled by run()
    }
    if (r.flags & kRecordRequired) return unknown_required(r.offset, r.type);
    if (!saw_info_) return not_info_first(r.offset, r.type);
    return {};  // an optional record from a later writer: skipped
  }

  Expected<void> info(const RawRecord& r) {
    if (auto e = enter(r, Section::info); !e) return e;
    auto i = decode_info(r);
    if (!i) return tl::unexpected(i.error());
    if (auto p = check_info(*i); !p.empty()) return bad(r.offset, "record INFO: " + p);
    img_.info = std::move(*i);
    saw_info_ = true;
    return {};
  }

  Expected<void> process(const RawRecord& r) {
    if (auto e = enter(r, Section::processes); !e) return e;
    auto p = decode_process(r);
    if (!p) return tl::unexpected(p.error());
    if (auto e = check_process(*p); !e.empty()) return bad(r.offset, "record PROCESS: " + e);
    if (!pids_.insert(p->pid).second) return bad(r.offset, fmt::format("record PROCESS: pid {} appears twice", p->pid));
    img_.processes.push_back(std::move(*p));
    return {};
  }

  Expected<void> pipe(const RawRecord& r) {
    if (auto e = enter(r, Section::pipes); !e) return e;
    auto p = decode_pipe(r, img_.info.page_size);
    if (!p) return tl::unexpected(p.error());
    if (auto e = check_pipe(*p, img_.info.page_size); !e.empty()) return bad(r.offset, "record PIPE: " + e);
    if (!pipe_index_.emplace(p->id, img_.pipes.size()).second)
      return bad(r.offset, fmt::format("record PIPE: pipe id {} appears twice", p->id));
    pipes_.push_back(PipeBooks{r.offset, p->bytes(), false});
    img_.pipes.push_back(std::move(*p));
    return {};
  }

  Expected<void> pipe_data(const RawRecord& r) {
    if (auto e = enter(r, Section::pipes); !e) return e;
    Cursor c = r.cursor();
    auto id = c.u64("pipe_id");
    if (!id) return bad_field(r, c);
    auto it = pipe_index_.find(*id);
    if (it == pipe_index_.end())
      return bad(r.offset, fmt::format("record PIPE_DATA: pipe {} has no earlier PIPE record", *id));
    PipeBooks& b = pipes_[it->second];
    if (b.has_data) return bad(r.offset, fmt::format("record PIPE_DATA: second data record for pipe {}", *id));
    if (c.left() != b.bytes)
      return bad(r.offset, fmt::format("record PIPE_DATA: pipe {} data has {} bytes but its slots hold {}", *id,
                                       c.left(), b.bytes));
    b.has_data = true;
    img_.pipes[it->second].data = r.payload.subspan(8);
    return {};
  }

  Expected<void> file(const RawRecord& r) {
    if (auto e = enter(r, Section::files); !e) return e;
    auto f = decode_file(r);
    if (!f) return tl::unexpected(f.error());
    if (auto e = check_file(*f); !e.empty()) return bad(r.offset, "record FILE: " + e);
    if (!pipe_index_.count(f->pipe_id))
      return bad(r.offset, fmt::format("record FILE: file {} refers to pipe {} which has no PIPE record", f->id,
                                       f->pipe_id));
    if (!file_ids_.insert(f->id).second) return bad(r.offset, fmt::format("record FILE: file id {} appears twice", f->id));
    img_.files.push_back(*f);
    return {};
  }

  Expected<void> shared(const RawRecord& r) {
    if (auto e = enter(r, Section::processes); !e) return e;
    Cursor c = r.cursor();
    SharedFdTable s;
    if (!c.opt(s.pid, "pid") || !c.opt(s.with_pid, "with_pid")) return bad_field(r, c);
    if (auto e = check_shared(s); !e.empty()) return bad(r.offset, "record SHARED_FILES: " + e);
    if (!pids_.count(s.pid) || !pids_.count(s.with_pid))
      return bad(r.offset, fmt::format("record SHARED_FILES: pid {} or {} has no earlier PROCESS record", s.pid,
                                       s.with_pid));
    img_.shared_tables.push_back(s);
    return {};
  }

  Expected<void> fd(const RawRecord& r) {
    if (auto e = enter(r, Section::fds); !e) return e;
    auto f = decode_fd(r);
    if (!f) return tl::unexpected(f.error());
    if (auto e = check_fd(*f); !e.empty()) return bad(r.offset, "record FD: " + e);
    if (!file_ids_.count(f->file_id))
      return bad(r.offset, fmt::format("record FD: fd {} refers to file {} which has no FILE record", f->fd,
                                       f->file_id));
    if (f->pid != 0 && !pids_.count(f->pid))
      return bad(r.offset, fmt::format("record FD: fd {} belongs to pid {} which has no PROCESS record", f->fd, f->pid));
    if (!fds_.insert({f->pid, f->tid, f->fd}).second)
      return bad(r.offset, fmt::format("record FD: fd {} of pid {} appears twice", f->fd, f->pid));
    img_.fds.push_back(*f);
    return {};
  }

  Expected<void> in_flight(const RawRecord& r) {
    if (auto e = enter(r, Section::fds); !e) return e;
    Cursor c = r.cursor();
    InFlightRecord f;
    if (!c.opt(f.file_id, "file_id") || !c.opt(f.pid, "pid") || !c.opt(f.sock_fd, "sock_fd") ||
        !c.opt(f.sock_ino, "sock_ino") || !c.opt(f.msg, "msg") || !c.opt(f.slot, "slot") || !c.opt(f.end, "end"))
      return bad_field(r, c);
    if (auto e = check_in_flight(f); !e.empty()) return bad(r.offset, "record IN_FLIGHT: " + e);
    if (!file_ids_.count(f.file_id))
      return bad(r.offset, fmt::format("record IN_FLIGHT: file {} has no FILE record", f.file_id));
    if (!pids_.count(f.pid))
      return bad(r.offset, fmt::format("record IN_FLIGHT: file {} is in flight in pid {} which has no PROCESS record",
                                       f.file_id, f.pid));
    if (!in_flight_.insert({f.pid, f.sock_fd, f.msg, f.slot}).second)
      return bad(r.offset, fmt::format("record IN_FLIGHT: place {}/{} of socket fd {} of pid {} appears twice", f.msg,
                                       f.slot, f.sock_fd, f.pid));
    img_.in_flight.push_back(f);
    return {};
  }

  Expected<void> epoll_watch(const RawRecord& r) {
    if (auto e = enter(r, Section::fds); !e) return e;
    auto w = decode_epoll_watch(r);
    if (!w) return tl::unexpected(w.error());
    const std::string rec = "record " + record_name(r.type);
    if (auto e = check_epoll_watch(*w); !e.empty()) return bad(r.offset, rec + ": " + e);
    if (!pids_.count(w->pid))
      return bad(r.offset, fmt::format("{}: epoll {} belongs to pid {} which has no PROCESS record", rec,
                                       w->epoll_id, w->pid));
    if (!file_ids_.count(w->file_id))
      return bad(r.offset, fmt::format("{}: epoll {} watches file {} which has no FILE record", rec, w->epoll_id,
                                       w->file_id));
    auto [it, fresh] = epolls_.emplace(std::tuple(w->pid, w->tid, w->epoll_fd), w->epoll_id);
    if (!fresh && it->second != w->epoll_id)
      return bad(r.offset, fmt::format("{}: fd {} of pid {} is epoll {} and epoll {}", rec, w->epoll_fd, w->pid,
                                       it->second, w->epoll_id));
    if (!watches_.insert({w->pid, w->tid, w->epoll_fd, w->file_id, w->fd}).second)
      return bad(r.offset, fmt::format("{}: the watch of fd {} in epoll fd {} of pid {} appears twice", rec, w->fd,
                                       w->epoll_fd, w->pid));
    img_.epoll_watches.push_back(*w);
    return {};
  }

  Expected<void> end(const RawRecord& r) {
    if (!saw_info_) return bad(r.offset, "first record is END, not INFO");
    if (section_ <= Section::pipes)
      if (auto e = all_data_present(); !e) return e;
    Cursor c = r.cursor();
    auto count = c.u64("record count");
    if (!count) return bad_field(r, c);
    if (*count != records_)
      return bad(r.offset, fmt::format("record END counts {} records but {} precede it", *count, records_));
    return {};
  }

  // A pipe with queued bytes must have had its PIPE_DATA by the end of the pipes section.
  Expected<void> all_data_present() const {
    for (size_t i = 0; i < pipes_.size(); ++i)
      if (pipes_[i].bytes > 0 && !pipes_[i].has_data)
        return bad(pipes_[i].offset, fmt::format("record PIPE: pipe {} holds {} bytes but has no PIPE_DATA record",
                                                 img_.pipes[i].id, pipes_[i].bytes));
    return {};
  }

  struct PipeBooks {
    uint64_t offset = 0;  // of its PIPE record, for errors
    uint64_t bytes = 0;
    bool has_data = false;
  };

  std::span<const std::byte> bytes_;
  Image img_;
  uint64_t records_ = 0;  // records before END, skipped ones included
  bool saw_info_ = false;
  Section section_ = Section::info;
  std::unordered_map<uint64_t, size_t> pipe_index_;  // id -> index in img_.pipes and pipes_
  std::vector<PipeBooks> pipes_;
  std::unordered_set<uint64_t> file_ids_;
  std::unordered_set<int32_t> pids_;
  std::set<std::tuple<int32_t, int32_t, int32_t>> fds_;  // (pid, tid, fd)
  std::set<std::tuple<int32_t, int32_t, uint32_t, uint32_t>> in_flight_;  // (pid, sock_fd, msg, slot)
  std::set<std::tuple<int32_t, int32_t, int32_t, uint64_t, int32_t>> watches_;  // (pid, tid, epoll fd, file, fd)
  std::map<std::tuple<int32_t, int32_t, int32_t>, uint64_t> epolls_;          // (pid, tid, epoll fd) -> id
};

}  // namespace

Expected<void> check_head(std::span<const std::byte> head, uint64_t size) {
  // What head does not hold is left to parse(), which names what is missing (an empty file maps).
  if (head.size() < kFileHeaderSize) {
    if (head.size() >= kMagic.size() && !std::equal(kMagic.begin(), kMagic.end(), head.begin()))
      return bad(0, "not a pipecr image (bad magic)");
    return {};
  }
  if (auto v = check_file_header(head.first(kFileHeaderSize)); !v) return tl::unexpected(v.error());
  if (head.size() < kFileHeaderSize + kRecordHeaderSize) return {};
  // The first record: INFO (parse() refuses anything else there, and a required type it does not
  // know as a version it does not read), with a payload and checksum that fit in the image.
  const uint64_t pos = kFileHeaderSize;
  const uint32_t type = get_le<uint32_t>(head.data() + pos);
  const uint32_t flags = get_le<uint32_t>(head.data() + pos + 4);
  const uint64_t len = get_le<uint64_t>(head.data() + pos + 8);
  if (type != static_cast<uint32_t>(RecordType::info)) {
    if (!is_known_record(type) && (flags & kRecordRequired)) return unknown_required(pos, type);
    return not_info_first(pos, type);
  }
  // An image whose size is not known (a pipe) is at most what a file can hold: off_t is signed.
  const uint64_t cap = std::min<uint64_t>(size, static_cast<uint64_t>(INT64_MAX));
  const uint64_t room = cap >= pos + kRecordOverhead ? cap - pos - kRecordOverhead : 0;
  if (len > room) {
    if (size == UINT64_MAX)
      return bad(pos, fmt::format("record INFO length {} cannot fit in any image (a file holds at most {} bytes)", len,
                                  INT64_MAX));
    return bad(pos, fmt::format("record INFO length {} exceeds the {} bytes left", len, room));
  }
  return {};
}

Expected<Image> parse(std::span<const std::byte> bytes) { return Parser(bytes).run(); }

}  // namespace pipecr::image
