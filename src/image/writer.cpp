// writer.cpp: streaming encoder of format v1 images (docs/image-format.md).
//
// Each metadata record is encoded into a small buffer, checksummed and handed to the Sink whole.
// A pipe's queued bytes are the exception: begin_data() writes the PIPE_DATA header with the
// announced length and seeds an XXH3 streaming state with it, data() hashes and forwards each
// chunk as it comes, end_data() appends the digest. So a dump never holds more than one chunk of
// pipe data (up to 1 MiB per pipe here, but a tree can hold thousands of pipes), and the sink sees
// the bytes in file order. The writer keeps the same books the reader checks (ids, order, data
// lengths, references) and refuses with Errc::invalid_argument, before writing anything, a call
// that would make an image the reader refuses.
#include <poll.h>
#include <unistd.h>
#include <xxhash.h>

#include <map>
#include <memory>
#include <set>
#include <tuple>
#include <unordered_map>
#include <unordered_set>

#include "image/encoding.hpp"
#include "image/image_io.hpp"
#include "sys/syscalls.hpp"

namespace pipecr::image {
namespace {

// The order of sections; a record may not come after one of a later section.
enum class Phase : uint8_t { fresh, info, processes, pipes, files, fds, finished, failed };

[[nodiscard]] tl::unexpected<Error> misuse(std::string what) {
  return fail(Errc::invalid_argument, 0, "image writer: " + std::move(what));
}

struct XxhFree {
  void operator()(XXH3_state_t* s) const { XXH3_freeState(s); }
};

void encode_info(std::vector<std::byte>& out, const ImageInfo& i) {
  put_u32(out, i.page_size);
  put_u64(out, i.created_unix_ns);
  put_string(out, i.kernel);
  put_string(out, i.tool);
  put_string(out, i.boot_id);
}

void encode_process(std::vector<std::byte>& out, const ProcessRecord& p) {
  put_i32(out, p.pid);
  put_i32(out, p.ppid);
  put_string(out, p.comm);
  put_u32(out, static_cast<uint32_t>(p.argv.size()));
  for (const std::string& a : p.argv) put_string(out, a);
}

void encode_pipe(std::vector<std::byte>& out, const PipeRecord& p) {
  put_u64(out, p.id);
  put_u8(out, static_cast<uint8_t>(p.kind));
  put_u64(out, p.inode);
  put_u32(out, p.capacity);
  put_u32(out, p.uid);
  put_u32(out, p.gid);
  put_u32(out, p.mode);
  put_string(out, p.path);
  put_u32(out, (p.unlinked ? kPipeUnlinked : 0) | (p.outside_holders ? kPipeOutsideHolders : 0));
  put_u32(out, static_cast<uint32_t>(p.slots.size()));
  for (const Slot& s : p.slots) {
    put_u32(out, s.len);
    put_u32(out, s.packet ? kSlotPacket : 0);
  }
  put_u64(out, p.dev);
}

void encode_file(std::vector<std::byte>& out, const FileRecord& f) {
  put_u64(out, f.id);
  put_u64(out, f.pipe_id);
  put_u32(out, f.flags);
  put_i32(out, f.owner.type);
  put_i32(out, f.owner.pid);
  put_u32(out, f.owner.has_uids ? 1u : 0u);
  put_u32(out, f.owner.uid);
  put_u32(out, f.owner.euid);
  put_i32(out, f.signal);
  put_u8(out, static_cast<uint8_t>(f.fifo_reader));
}

void encode_fd(std::vector<std::byte>& out, const FdRecord& f) {
  put_i32(out, f.pid);
  put_i32(out, f.fd);
  put_u64(out, f.file_id);
  put_u32(out, f.cloexec ? 1u : 0u);
  put_u8(out, static_cast<uint8_t>(f.blocked));
  if (f.tid != 0) put_i32(out, f.tid);  // THREAD_FD only
}

void encode_epoll_watch(std::vector<std::byte>& out, const EpollWatch& w) {
  put_u64(out, w.epoll_id);
  put_i32(out, w.pid);
  put_i32(out, w.epoll_fd);
  put_u64(out, w.file_id);
  put_i32(out, w.fd);
  put_u32(out, w.events);
  put_u64(out, w.data);
  if (w.tid != 0) put_i32(out, w.tid);  // THREAD_EPOLL_WATCH only
}

}  // namespace

struct Writer::State {
  explicit State(Sink& s) : sink(s) {}
  Sink& sink;
  Phase phase = Phase::fresh;
  uint32_t page_size = 0;
  uint64_t records = 0;  // records written so far, END excluded
  std::unordered_set<int32_t> pids;
  struct PipeBooks {
    uint64_t bytes = 0;
    bool has_data = false;
  };
  std::unordered_map<uint64_t, PipeBooks> pipes;
  std::unordered_set<uint64_t> files;
  std::set<std::tuple<int32_t, int32_t, int32_t>> fds;  // (pid, tid, fd)
  std::set<std::tuple<int32_t, int32_t, uint32_t, uint32_t>> in_flight;  // (pid, sock_fd, msg, slot)
  std::set<std::tuple<int32_t, int32_t, int32_t, uint64_t, int32_t>> watches;  // (pid, tid, epoll fd, file, fd)
  std::map<std::tuple<int32_t, int32_t, int32_t>, uint64_t> epolls;         // (pid, tid, epoll fd) -> epoll id
  // The PIPE_DATA record being streamed, if any.
  bool in_data = false;
  uint64_t data_pipe = 0, data_len = 0, data_written = 0;
  std::unique_ptr<XXH3_state_t, XxhFree> xxh;

  // A sink failure leaves a partial record behind: nothing more may be written.
  Expected<void> write(std::span<const std::byte> b) {
    auto r = sink.write(b);
    if (!r) phase = Phase::failed;
    return r;
  }

  // Enter the section of a record of section `to`; refuses going back, or leaving the pipes
  // section with a pipe whose bytes were never written.
  Expected<void> enter(Phase to, const char* what) {
    if (phase == Phase::failed) return misuse("unusable after an earlier failure");
    if (phase == Phase::fresh) return misuse(fmt::format("{} before begin()", what));
    if (phase == Phase::finished) return misuse(fmt::format("{} after finish()", what));
    if (in_data) return misuse(fmt::format("{} while the data of pipe {} is open", what, data_pipe));
    if (phase > to) return misuse(fmt::format("{} after a record of a later section", what));
    if (to > Phase::pipes && phase <= Phase::pipes)
      for (const auto& [id, b] : pipes)
        if (b.bytes > 0 && !b.has_data) return misuse(fmt::format("pipe {} holds {} bytes but has no data", id, b.bytes));
    return {};
  }

  // The payload buffer, emptied: one per writer, reused by every record (a dump writes a few
  // records per fd, and two fresh vectors each cost several allocations as they grew).
  std::vector<std::byte>& payload() {
    pl_buf.clear();
    return pl_buf;
  }

  // One whole record: header, payload, checksum, encoded into a reused buffer.
  Expected<void> emit(RecordType type, std::span<const std::byte> payload, uint32_t flags = kRecordRequired) {
    std::vector<std::byte>& rec = rec_buf;
    rec.clear();
    put_u32(rec, static_cast<uint32_t>(type));
    put_u32(rec, flags);
    put_u64(rec, payload.size());
    put_bytes(rec, payload);
    put_u64(rec, XXH3_64bits(rec.data(), rec.size()));
    auto r = write(rec);
    if (r) ++records;
    return r;
  }
  std::vector<std::byte> pl_buf, rec_buf;
};

Writer::Writer(Sink& sink) : st_(new State(sink)) {}
Writer::~Writer() { delete st_; }

Expected<void> Writer::begin(const ImageInfo& info) {
  if (st_->phase != Phase::fresh) return misuse("begin() called twice");
  if (auto p = check_info(info); !p.empty()) return misuse(p);
  std::vector<std::byte> h(kMagic.begin(), kMagic.end());
  put_u32(h, kFormatVersion);
  put_u32(h, 0);  // reserved
  put_u64(h, XXH3_64bits(h.data(), h.size()));
  if (auto r = st_->write(h); !r) return r;
  std::vector<std::byte>& pl = st_->payload();
  encode_info(pl, info);
  st_->page_size = info.page_size;
  st_->phase = Phase::info;
  return st_->emit(RecordType::info, pl);
}

Expected<void> Writer::add(const ProcessRecord& p) {
  if (auto r = st_->enter(Phase::processes, "PROCESS"); !r) return r;
  if (auto e = check_process(p); !e.empty()) return misuse(e);
  if (st_->pids.count(p.pid)) return misuse(fmt::format("process {} added twice", p.pid));
  std::vector<std::byte>& pl = st_->payload();
  encode_process(pl, p);
  st_->phase = Phase::processes;
  st_->pids.insert(p.pid);
  return st_->emit(RecordType::process, pl);
}

Expected<void> Writer::add(const PipeRecord& p) {
  if (auto r = st_->enter(Phase::pipes, "PIPE"); !r) return r;
  if (auto e = check_pipe(p, st_->page_size); !e.empty()) return misuse(e);
  if (st_->pipes.count(p.id)) return misuse(fmt::format("pipe {} added twice", p.id));
  std::vector<std::byte>& pl = st_->payload();
  encode_pipe(pl, p);
  st_->phase = Phase::pipes;
  st_->pipes[p.id] = State::PipeBooks{p.bytes(), false};
  return st_->emit(RecordType::pipe, pl);
}

Expected<void> Writer::begin_data(uint64_t pipe_id, uint64_t len) {
  if (auto r = st_->enter(Phase::pipes, "PIPE_DATA"); !r) return r;
  auto it = st_->pipes.find(pipe_id);
  if (it == st_->pipes.end()) return misuse(fmt::format("data for pipe {} before its PIPE record", pipe_id));
  if (it->second.has_data) return misuse(fmt::format("second data record for pipe {}", pipe_id));
  if (len != it->second.bytes)
    return misuse(fmt::format("data length {} for pipe {} whose slots hold {} bytes", len, pipe_id, it->second.bytes));
  if (!st_->xxh) st_->xxh.reset(XXH3_createState());
  if (!st_->xxh) return fail(Errc::system, ENOMEM, "XXH3_createState: out of memory");
  std::vector<std::byte> h = record_header(static_cast<uint32_t>(RecordType::pipe_data), kRecordRequired, 8 + len);
  put_u64(h, pipe_id);
  (void)XXH3_64bits_reset(st_->xxh.get());
  (void)XXH3_64bits_update(st_->xxh.get(), h.data(), h.size());
  if (auto r = st_->write(h); !r) return r;
  it->second.has_data = true;
  st_->in_data = true;
  st_->data_pipe = pipe_id;
  st_->data_len = len;
  st_->data_written = 0;
  return {};
}

Expected<void> Writer::data(std::span<const std::byte> chunk) {
  if (st_->phase == Phase::failed) return misuse("unusable after an earlier failure");
  if (!st_->in_data) return misuse("data() without begin_data()");
  if (chunk.size() > st_->data_len - st_->data_written)
    return misuse(fmt::format("pipe {}: {} more data bytes than the {} announced", st_->data_pipe,
                              st_->data_written + chunk.size() - st_->data_len, st_->data_len));
  (void)XXH3_64bits_update(st_->xxh.get(), chunk.data(), chunk.size());
  st_->data_written += chunk.size();
  return st_->write(chunk);
}

Expected<void> Writer::end_data() {
  if (st_->phase == Phase::failed) return misuse("unusable after an earlier failure");
  if (!st_->in_data) return misuse("end_data() without begin_data()");
  if (st_->data_written != st_->data_len) {
    // The record's header promised more bytes than came: the output cannot be completed.
    st_->phase = Phase::failed;
    return misuse(fmt::format("pipe {}: {} data bytes written of the {} announced", st_->data_pipe,
                              st_->data_written, st_->data_len));
  }
  std::vector<std::byte> sum;
  put_u64(sum, XXH3_64bits_digest(st_->xxh.get()));
  st_->in_data = false;
  auto r = st_->write(sum);
  if (r) ++st_->records;
  return r;
}

Expected<void> Writer::add(const FileRecord& f) {
  if (auto r = st_->enter(Phase::files, "FILE"); !r) return r;
  if (auto e = check_file(f); !e.empty()) return misuse(e);
  if (st_->files.count(f.id)) return misuse(fmt::format("file {} added twice", f.id));
  if (!st_->pipes.count(f.pipe_id)) return misuse(fmt::format("file {} refers to unknown pipe {}", f.id, f.pipe_id));
  std::vector<std::byte>& pl = st_->payload();
  encode_file(pl, f);
  st_->phase = Phase::files;
  st_->files.insert(f.id);
  return st_->emit(RecordType::file, pl);
}

Expected<void> Writer::add(const FdRecord& f) {
  if (auto r = st_->enter(Phase::fds, "FD"); !r) return r;
  if (auto e = check_fd(f); !e.empty()) return misuse(e);
  if (!st_->files.count(f.file_id)) return misuse(fmt::format("fd {} refers to unknown file {}", f.fd, f.file_id));
  if (f.pid != 0 && !st_->pids.count(f.pid))
    return misuse(fmt::format("fd {} belongs to pid {} which has no PROCESS record", f.fd, f.pid));
  if (st_->fds.count({f.pid, f.tid, f.fd})) return misuse(fmt::format("fd {} of pid {} added twice", f.fd, f.pid));
  std::vector<std::byte>& pl = st_->payload();
  encode_fd(pl, f);
  st_->phase = Phase::fds;
  st_->fds.insert({f.pid, f.tid, f.fd});
  return st_->emit(f.tid != 0 ? RecordType::thread_fd : RecordType::fd, pl);
}

Expected<void> Writer::add(const InFlightRecord& f) {
  if (auto r = st_->enter(Phase::fds, "IN_FLIGHT"); !r) return r;
  if (auto e = check_in_flight(f); !e.empty()) return misuse(e);
  if (!st_->files.count(f.file_id)) return misuse(fmt::format("end in flight refers to unknown file {}", f.file_id));
  if (!st_->pids.count(f.pid))
    return misuse(fmt::format("file {} in flight in pid {} which has no PROCESS record", f.file_id, f.pid));
  if (!st_->in_flight.insert({f.pid, f.sock_fd, f.msg, f.slot}).second)
    return misuse(fmt::format("place {}/{} of socket fd {} of pid {} added twice", f.msg, f.slot, f.sock_fd, f.pid));
  std::vector<std::byte>& pl = st_->payload();
  put_u64(pl, f.file_id);
  put_i32(pl, f.pid);
  put_i32(pl, f.sock_fd);
  put_u64(pl, f.sock_ino);
  put_u32(pl, f.msg);
  put_u32(pl, f.slot);
  put_u64(pl, f.end);
  st_->phase = Phase::fds;
  // Optional: an older reader skips it and restores the image as if the end were not there.
  return st_->emit(RecordType::in_flight, pl, 0);
}

Expected<void> Writer::add(const SharedFdTable& s) {
  if (auto r = st_->enter(Phase::processes, "SHARED_FILES"); !r) return r;
  if (auto e = check_shared(s); !e.empty()) return misuse(e);
  if (!st_->pids.count(s.pid) || !st_->pids.count(s.with_pid))
    return misuse(fmt::format("shared fd table of pids {} and {} without their PROCESS records", s.pid, s.with_pid));
  std::vector<std::byte>& pl = st_->payload();
  put_i32(pl, s.pid);
  put_i32(pl, s.with_pid);
  st_->phase = Phase::processes;
  return st_->emit(RecordType::shared_files, pl, 0);  // optional
}

Expected<void> Writer::add(const EpollWatch& w) {
  if (auto r = st_->enter(Phase::fds, "EPOLL_WATCH"); !r) return r;
  if (auto e = check_epoll_watch(w); !e.empty()) return misuse(e);
  if (!st_->pids.count(w.pid)) return misuse(fmt::format("epoll {} held by pid {} which has no PROCESS record", w.epoll_id, w.pid));
  if (!st_->files.count(w.file_id)) return misuse(fmt::format("epoll {} watches unknown file {}", w.epoll_id, w.file_id));
  auto [it, fresh] = st_->epolls.emplace(std::tuple(w.pid, w.tid, w.epoll_fd), w.epoll_id);
  if (!fresh && it->second != w.epoll_id)
    return misuse(fmt::format("fd {} of pid {} is epoll {} and epoll {}", w.epoll_fd, w.pid, it->second, w.epoll_id));
  if (st_->watches.count({w.pid, w.tid, w.epoll_fd, w.file_id, w.fd}))
    return misuse(fmt::format("watch of fd {} in epoll fd {} of pid {} added twice", w.fd, w.epoll_fd, w.pid));
  std::vector<std::byte>& pl = st_->payload();
  encode_epoll_watch(pl, w);
  st_->phase = Phase::fds;
  st_->watches.insert({w.pid, w.tid, w.epoll_fd, w.file_id, w.fd});
  // Optional either way: an older reader skips them, and restores without re-adding those watches.
  return st_->emit(w.tid != 0 ? RecordType::thread_epoll_watch : RecordType::epoll_watch, pl, 0);
}

Expected<void> Writer::finish() {
  if (auto r = st_->enter(Phase::fds, "finish()"); !r) return r;
  std::vector<std::byte>& pl = st_->payload();
  put_u64(pl, st_->records);
  auto r = st_->emit(RecordType::end, pl);
  if (r) st_->phase = Phase::finished;
  return r;
}

// ---- sinks --------------------------------------------------------------------------------

Expected<void> MemorySink::write(std::span<const std::byte> bytes) {
  buf_.insert(buf_.end(), bytes.begin(), bytes.end());
  return {};
}

namespace {
// 256 KiB: large enough that the write(2) count stays small for a 1 MiB pipe, small enough to
// stay in L2 (the chunks come straight from a pipe read).
constexpr size_t kFdSinkBuffer = 256 * 1024;
}  // namespace

FdSink::FdSink(int fd, std::string name) : fd_(fd), name_(std::move(name)) {}

// Not flushed here: a destructor cannot report a failed write, and a caller that did not reach
// flush() has failed anyway.
FdSink::~FdSink() = default;

Expected<void> FdSink::write(std::span<const std::byte> bytes) {
  if (buf_.size() + bytes.size() > kFdSinkBuffer) {
    if (auto r = flush(); !r) return r;
    if (bytes.size() >= kFdSinkBuffer) return flush_direct(bytes);
  }
  if (buf_.capacity() < kFdSinkBuffer) buf_.reserve(kFdSinkBuffer);
  buf_.insert(buf_.end(), bytes.begin(), bytes.end());
  return {};
}

Expected<void> FdSink::flush_direct(std::span<const std::byte> bytes) {
  // Like sys::write_all(), but a non-blocking fd (stdout may be one: `dump -o -`) is waited for.
  while (!bytes.empty()) {
    ssize_t n = ::write(fd_, bytes.data(), bytes.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) {
      pollfd p{fd_, POLLOUT, 0};
      ::poll(&p, 1, -1);
      continue;
    }
    if (n < 0) {
      Error e = sys::call_error("write", fmt::format("fd={}, len={}", fd_, bytes.size()));
      e.what = fmt::format("{} (image {})", e.what, name_);
      return tl::unexpected(std::move(e));
    }
    bytes = bytes.subspan(static_cast<size_t>(n));
  }
  return {};
}

Expected<void> FdSink::flush() {
  if (buf_.empty()) return {};
  auto r = flush_direct(buf_);
  buf_.clear();
  return r;
}

// ---- encode -------------------------------------------------------------------------------

Expected<std::vector<std::byte>> encode(const Image& img) {
  if (img.format_version != kFormatVersion)
    return fail(Errc::invalid_argument, 0, fmt::format("cannot encode format version {}", img.format_version));
  MemorySink sink;
  Writer w(sink);
  if (auto r = w.begin(img.info); !r) return tl::unexpected(r.error());
  for (const ProcessRecord& p : img.processes)
    if (auto r = w.add(p); !r) return tl::unexpected(r.error());
  for (const SharedFdTable& s : img.shared_tables)
    if (auto r = w.add(s); !r) return tl::unexpected(r.error());
  for (const PipeRecord& p : img.pipes) {
    if (auto r = w.add(p); !r) return tl::unexpected(r.error());
    if (p.slots.empty() && p.data.empty()) continue;
    if (auto r = w.begin_data(p.id, p.data.size()); !r) return tl::unexpected(r.error());
    if (auto r = w.data(p.data); !r) return tl::unexpected(r.error());
    if (auto r = w.end_data(); !r) return tl::unexpected(r.error());
  }
  for (const FileRecord& f : img.files)
    if (auto r = w.add(f); !r) return tl::unexpected(r.error());
  for (const FdRecord& f : img.fds)
    if (auto r = w.add(f); !r) return tl::unexpected(r.error());
  for (const InFlightRecord& f : img.in_flight)
    if (auto r = w.add(f); !r) return tl::unexpected(r.error());
  for (const EpollWatch& e : img.epoll_watches)
    if (auto r = w.add(e); !r) return tl::unexpected(r.error());
  if (auto r = w.finish(); !r) return tl::unexpected(r.error());
  return std::move(sink.bytes());
}

}  // namespace pipecr::image
