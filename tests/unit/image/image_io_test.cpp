// image_io_test.cpp: format v1 writer and reader (src/image, docs/image-format.md).
//
// Round trips go through the public Writer/encode and parse. Damaged images are made from a good
// one (truncated, bit-flipped, a record inserted, the header changed); malformed records are
// built by hand from the documented layout with the helpers of image/encoding.hpp, so these tests
// also check that the code and docs/image-format.md agree.
#include <fcntl.h>
#include <xxhash.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "image/encoding.hpp"
#include "image/image_io.hpp"
#include "sys/unique_fd.hpp"

namespace pipecr::image {
namespace {

using Bytes = std::vector<std::byte>;
using ::testing::HasSubstr;
using ::testing::StartsWith;

Bytes pattern(size_t n, uint32_t seed) {
  Bytes b(n);
  uint32_t x = seed * 2654435761u + 1;
  for (auto& c : b) {
    x ^= x << 13, x ^= x >> 17, x ^= x << 5;
    c = static_cast<std::byte>(x);
  }
  return b;
}

// Owns the data the sample image's pipes view.
struct Sample {
  Image img;
  std::vector<Bytes> data;
};

PipeRecord make_pipe(uint64_t id, uint32_t capacity, std::vector<Slot> slots) {
  PipeRecord p;
  p.id = id;
  p.capacity = capacity;
  p.inode = 1000 + id;
  p.uid = 1000;
  p.gid = 1001;
  p.mode = 0600;
  p.slots = std::move(slots);
  return p;
}

Sample sample() {
  Sample s;
  Image& img = s.img;
  img.info.page_size = 4096;
  img.info.created_unix_ns = 1'700'000'000'123'456'789ull;
  img.info.kernel = "6.18.0-test";
  img.info.tool = "pipecr 0.1.0";
  img.info.boot_id = "1217e6e4-5ddc-46cc-9816-1c6be508fffb";
  img.processes.push_back({100, 1, "cat", {"cat", "-"}});
  img.processes.push_back({101, 100, "sh", {"sh", "-c", "echo hi | cat", ""}});
  img.pipes.push_back(make_pipe(1, 65536, {{4096, false}, {100, false}}));
  img.pipes.back().outside_holders = true;
  img.pipes.push_back(make_pipe(2, 16384, {{10, true}, {3000, true}, {1, true}}));
  img.pipes.push_back(make_pipe(3, 4096, {}));  // empty
  img.pipes.push_back(make_pipe(4, 8192, {{5, false}}));
  img.pipes.back().kind = PipeKind::fifo;
  img.pipes.back().dev = 0x10302;
  img.pipes.back().path = "/tmp/x.fifo";
  img.pipes.back().unlinked = true;
  img.pipes.push_back(make_pipe(5, 65536, {}));
  img.pipes.back().kind = PipeKind::fifo;
  img.pipes.back().path = "/run/queue";
  for (PipeRecord& p : img.pipes) {
    s.data.push_back(pattern(p.bytes(), static_cast<uint32_t>(p.id)));
    p.data = s.data.back();
  }
  FileRecord f;
  f.id = 10, f.pipe_id = 1, f.flags = O_RDONLY;
  img.files.push_back(f);
  f = {};
  f.id = 11, f.pipe_id = 1, f.flags = O_WRONLY | O_NONBLOCK | O_ASYNC;
  f.owner = {1, 100, true, 1000, 0};
  f.signal = 10;
  img.files.push_back(f);
  f = {};
  f.id = 12, f.pipe_id = 2, f.flags = O_RDONLY;
  f.owner = {2, 101, false, 0, 0};
  img.files.push_back(f);
  f = {};
  f.id = 13, f.pipe_id = 2, f.flags = O_WRONLY | O_DIRECT;
  img.files.push_back(f);
  f = {};
  f.id = 14, f.pipe_id = 4, f.flags = O_RDONLY | O_NONBLOCK, f.fifo_reader = FifoReaderState::no_writer_yet;
  img.files.push_back(f);
  f = {};
  f.id = 15, f.pipe_id = 5, f.flags = O_RDWR, f.fifo_reader = FifoReaderState::seen_writer;
  img.files.push_back(f);
  f = {};
  f.id = 16, f.pipe_id = 3, f.flags = O_RDONLY | O_LARGEFILE;
  img.files.push_back(f);
  img.fds.push_back({100, 0, 10, false, Blocked::reading});
  img.fds.push_back({100, 1, 11, true, Blocked::writing});
  img.fds.push_back({100, 8, 10, true, Blocked::none});  // shares file 10
  img.fds.push_back({101, 3, 12, false, Blocked::none});
  img.fds.push_back({101, 4, 13, false, Blocked::none});
  img.fds.push_back({0, 5, 14, true, Blocked::none});
  img.fds.push_back({101, 7, 15, false, Blocked::none});
  img.fds.push_back({100, 9, 16, false, Blocked::none});
  return s;
}

void expect_same(const Image& a, const Image& b) {
  EXPECT_EQ(a.format_version, b.format_version);
  EXPECT_EQ(a.info.page_size, b.info.page_size);
  EXPECT_EQ(a.info.created_unix_ns, b.info.created_unix_ns);
  EXPECT_EQ(a.info.kernel, b.info.kernel);
  EXPECT_EQ(a.info.tool, b.info.tool);
  EXPECT_EQ(a.info.boot_id, b.info.boot_id);
  ASSERT_EQ(a.processes.size(), b.processes.size());
  for (size_t i = 0; i < a.processes.size(); ++i) {
    EXPECT_EQ(a.processes[i].pid, b.processes[i].pid);
    EXPECT_EQ(a.processes[i].ppid, b.processes[i].ppid);
    EXPECT_EQ(a.processes[i].comm, b.processes[i].comm);
    EXPECT_EQ(a.processes[i].argv, b.processes[i].argv);
  }
  ASSERT_EQ(a.pipes.size(), b.pipes.size());
  for (size_t i = 0; i < a.pipes.size(); ++i) {
    const PipeRecord &x = a.pipes[i], &y = b.pipes[i];
    EXPECT_EQ(x.id, y.id);
    EXPECT_EQ(x.kind, y.kind);
    EXPECT_EQ(x.inode, y.inode);
    EXPECT_EQ(x.dev, y.dev);
    EXPECT_EQ(x.capacity, y.capacity);
    EXPECT_EQ(x.uid, y.uid);
    EXPECT_EQ(x.gid, y.gid);
    EXPECT_EQ(x.mode, y.mode);
    EXPECT_EQ(x.path, y.path);
    EXPECT_EQ(x.unlinked, y.unlinked);
    EXPECT_EQ(x.outside_holders, y.outside_holders);
    EXPECT_EQ(x.slots, y.slots);
    EXPECT_TRUE(std::equal(x.data.begin(), x.data.end(), y.data.begin(), y.data.end())) << "pipe " << x.id;
  }
  ASSERT_EQ(a.files.size(), b.files.size());
  for (size_t i = 0; i < a.files.size(); ++i) {
    const FileRecord &x = a.files[i], &y = b.files[i];
    EXPECT_EQ(x.id, y.id);
    EXPECT_EQ(x.pipe_id, y.pipe_id);
    EXPECT_EQ(x.flags, y.flags);
    EXPECT_EQ(x.owner, y.owner);
    EXPECT_EQ(x.signal, y.signal);
    EXPECT_EQ(x.fifo_reader, y.fifo_reader);
  }
  ASSERT_EQ(a.fds.size(), b.fds.size());
  for (size_t i = 0; i < a.fds.size(); ++i) {
    const FdRecord &x = a.fds[i], &y = b.fds[i];
    EXPECT_EQ(x.pid, y.pid);
    EXPECT_EQ(x.fd, y.fd);
    EXPECT_EQ(x.file_id, y.file_id);
    EXPECT_EQ(x.cloexec, y.cloexec);
    EXPECT_EQ(x.blocked, y.blocked);
  }
}

bool views(std::span<const std::byte> inner, std::span<const std::byte> outer) {
  return inner.data() >= outer.data() && inner.data() + inner.size() <= outer.data() + outer.size();
}

// ---- raw image surgery --------------------------------------------------------------------

Bytes record(uint32_t type, uint32_t flags, const Bytes& payload) {
  Bytes r = record_header(type, flags, payload.size());
  put_bytes(r, payload);
  put_u64(r, XXH3_64bits(r.data(), r.size()));
  return r;
}
Bytes record(RecordType t, const Bytes& payload) { return record(static_cast<uint32_t>(t), kRecordRequired, payload); }

Bytes file_header(uint32_t version) {
  Bytes h(kMagic.begin(), kMagic.end());
  put_u32(h, version);
  put_u32(h, 0);
  put_u64(h, XXH3_64bits(h.data(), h.size()));
  return h;
}

Bytes end_record(uint64_t count) {
  Bytes p;
  put_u64(p, count);
  return record(RecordType::end, p);
}

// Builds an image record by record, counting them for END.
struct Raw {
  Bytes bytes = file_header(1);
  uint64_t count = 0;
  Raw& add(const Bytes& rec) {
    put_bytes(bytes, rec);
    ++count;
    return *this;
  }
  Raw& info(uint32_t page_size = 4096) {
    Bytes p;
    put_u32(p, page_size);
    return add(record(RecordType::info, p));
  }
  Bytes done() {
    Bytes b = bytes;
    put_bytes(b, end_record(count));
    return b;
  }
};

Bytes pipe_payload(uint64_t id, uint32_t capacity, const std::vector<Slot>& slots, uint8_t kind = 0,
                   const std::string& path = "") {
  Bytes p;
  put_u64(p, id);
  put_u8(p, kind);
  put_u64(p, 77);      // inode
  put_u32(p, capacity);
  put_u32(p, 0);       // uid
  put_u32(p, 0);       // gid
  put_u32(p, 0600);    // mode
  put_string(p, path);
  put_u32(p, 0);       // flags
  put_u32(p, static_cast<uint32_t>(slots.size()));
  for (const Slot& s : slots) {
    put_u32(p, s.len);
    put_u32(p, s.packet ? 1 : 0);
  }
  return p;
}
Bytes data_payload(uint64_t pipe_id, size_t n) {
  Bytes p;
  put_u64(p, pipe_id);
  put_bytes(p, pattern(n, 9));
  return p;
}
Bytes file_payload(uint64_t id, uint64_t pipe_id) {
  Bytes p;
  put_u64(p, id);
  put_u64(p, pipe_id);
  put_u32(p, O_RDONLY);
  return p;  // the owner fields and later ones take their defaults
}
Bytes fd_payload(int32_t pid, int32_t fd, uint64_t file_id) {
  Bytes p;
  put_i32(p, pid);
  put_i32(p, fd);
  put_u64(p, file_id);
  return p;
}

// The encoded sample without its END record (which is the last kRecordOverhead + 8 bytes).
Bytes without_end(const Bytes& img) { return Bytes(img.begin(), img.end() - (kRecordOverhead + 8)); }

// The record count carried by an image's END record.
uint64_t end_count(const Bytes& img) { return get_le<uint64_t>(img.data() + img.size() - 16); }

void expect_error(const Bytes& b, Errc kind, const std::string& text) {
  auto r = parse(b);
  ASSERT_FALSE(r.has_value()) << "parsed, expected: " << text;
  EXPECT_EQ(r.error().kind, kind) << r.error().what;
  EXPECT_THAT(r.error().what, HasSubstr(text));
  EXPECT_THAT(r.error().what, StartsWith("image offset "));
}

// ---- round trips --------------------------------------------------------------------------

TEST(ImageIo, RoundTripSample) {
  Sample s = sample();
  auto bytes = encode(s.img);
  ASSERT_TRUE(bytes) << bytes.error().what;
  auto back = parse(*bytes);
  ASSERT_TRUE(back) << back.error().what;
  expect_same(s.img, *back);
  for (const PipeRecord& p : back->pipes)
    EXPECT_TRUE(p.data.empty() || views(p.data, *bytes)) << "pipe " << p.id << " data copied";
  // Encoding what was read gives the same bytes.
  auto again = encode(*back);
  ASSERT_TRUE(again);
  EXPECT_EQ(*again, *bytes);
}

TEST(ImageIo, EmptyImage) {
  Image img;
  auto bytes = encode(img);
  ASSERT_TRUE(bytes);
  EXPECT_EQ(bytes->size(), kFileHeaderSize + kRecordOverhead + 4 + 8 + 4 + 4 + 4 + kRecordOverhead + 8);
  auto back = parse(*bytes);
  ASSERT_TRUE(back) << back.error().what;
  expect_same(img, *back);
}

TEST(ImageIo, StreamingOddChunks) {
  // A 1 MiB pipe of 256 full slots, written in chunks of awkward sizes.
  PipeRecord p = make_pipe(7, 1 << 20, std::vector<Slot>(256, Slot{4096, false}));
  Bytes data = pattern(p.bytes(), 7);
  const size_t sizes[] = {1, 7, 4095, 65537, 3, 100000};
  MemorySink sink;
  Writer w(sink);
  ASSERT_TRUE(w.begin({}));
  ASSERT_TRUE(w.add(p));
  ASSERT_TRUE(w.begin_data(7, data.size()));
  size_t off = 0;
  for (size_t i = 0; off < data.size(); ++i) {
    size_t n = std::min(sizes[i % std::size(sizes)], data.size() - off);
    ASSERT_TRUE(w.data(std::span(data).subspan(off, n)));
    off += n;
  }
  ASSERT_TRUE(w.data({}));  // an empty chunk is harmless
  ASSERT_TRUE(w.end_data());
  ASSERT_TRUE(w.finish());
  auto back = parse(sink.bytes());
  ASSERT_TRUE(back) << back.error().what;
  ASSERT_EQ(back->pipes.size(), 1u);
  EXPECT_TRUE(std::equal(data.begin(), data.end(), back->pipes[0].data.begin(), back->pipes[0].data.end()));
  // Chunking does not change the bytes.
  Image img;
  p.data = data;
  img.pipes.push_back(p);
  auto whole = encode(img);
  ASSERT_TRUE(whole);
  EXPECT_EQ(*whole, sink.bytes());
}

struct TempFile {
  std::string path;
  TempFile() {
    char tmpl[] = "/tmp/pipecr-image-test-XXXXXX";
    sys::UniqueFd fd(::mkstemp(tmpl));
    path = tmpl;
  }
  ~TempFile() { ::unlink(path.c_str()); }
};

TEST(ImageIo, MegabyteThroughFdSinkAndMappedFile) {
  PipeRecord p = make_pipe(1, 1 << 20, std::vector<Slot>(256, Slot{4096, false}));
  Bytes data = pattern(p.bytes(), 3);
  TempFile tmp;
  {
    sys::UniqueFd fd(::open(tmp.path.c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC));
    ASSERT_TRUE(fd);
    FdSink sink(fd.get(), tmp.path);
    Writer w(sink);
    ASSERT_TRUE(w.begin({}));
    ASSERT_TRUE(w.add(p));
    ASSERT_TRUE(w.begin_data(1, data.size()));
    for (size_t off = 0; off < data.size(); off += 300000)
      ASSERT_TRUE(w.data(std::span(data).subspan(off, std::min<size_t>(300000, data.size() - off))));
    ASSERT_TRUE(w.end_data());
    FileRecord f;
    f.id = 1, f.pipe_id = 1;
    ASSERT_TRUE(w.add(f));
    ASSERT_TRUE(w.finish());
    ASSERT_TRUE(sink.flush());
  }
  auto m = MappedFile::open(tmp.path);
  ASSERT_TRUE(m) << m.error().what;
  MappedFile moved = std::move(*m);
  auto img = parse(moved.bytes());
  ASSERT_TRUE(img) << img.error().what;
  ASSERT_EQ(img->pipes.size(), 1u);
  const auto& got = img->pipes[0].data;
  EXPECT_TRUE(views(got, moved.bytes()));
  EXPECT_TRUE(std::equal(data.begin(), data.end(), got.begin(), got.end()));
}

TEST(ImageIo, MappedFileErrors) {
  TempFile empty;
  auto m = MappedFile::open(empty.path);
  ASSERT_TRUE(m) << m.error().what;
  EXPECT_TRUE(m->bytes().empty());
  auto r = parse(m->bytes());
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().kind, Errc::bad_image);

  auto missing = MappedFile::open("/nonexistent/pipecr.img");
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().kind, Errc::not_found);
  EXPECT_THAT(missing.error().what, HasSubstr("/nonexistent/pipecr.img"));

  // Not a regular file: refused at once (a FIFO is opened without blocking), exit 66 in the CLI.
  auto dir = MappedFile::open("/tmp");
  ASSERT_FALSE(dir);
  EXPECT_EQ(dir.error().kind, Errc::not_found);
  EXPECT_THAT(dir.error().what, HasSubstr("is a directory, not a regular file"));
  auto dev = MappedFile::open("/dev/zero");
  ASSERT_FALSE(dev);
  EXPECT_THAT(dev.error().what, HasSubstr("character device"));
  std::string fifo = empty.path + ".fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  auto f = MappedFile::open(fifo);  // no writer: a blocking open would never return
  ::unlink(fifo.c_str());
  ASSERT_FALSE(f);
  EXPECT_THAT(f.error().what, HasSubstr("is a FIFO"));
}

// The image is read from a private spool: truncating or rewriting the file afterwards changes
// nothing that was read, and touching every byte raises no SIGBUS.
TEST(ImageIo, MappedFileSurvivesTruncation) {
  Sample s = sample();
  auto bytes = encode(s.img);
  ASSERT_TRUE(bytes);
  TempFile file;
  {
    sys::UniqueFd fd(::open(file.path.c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC));
    ASSERT_EQ(::write(fd.get(), bytes->data(), bytes->size()), static_cast<ssize_t>(bytes->size()));
  }
  auto m = MappedFile::open(file.path);
  ASSERT_TRUE(m) << m.error().what;
  ASSERT_EQ(::truncate(file.path.c_str(), 0), 0);
  Bytes copy(m->bytes().begin(), m->bytes().end());  // reads every page: SIGBUS here if mapped directly
  EXPECT_EQ(copy, *bytes);
  EXPECT_TRUE(parse(m->bytes()));
}

TEST(ImageIo, FdSinkReportsWriteFailure) {
  sys::UniqueFd ro(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(ro);
  FdSink sink(ro.get(), "ro-image");
  Bytes b(10);
  ASSERT_TRUE(sink.write(b));  // buffered
  auto r = sink.flush();
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().err, EBADF);
  EXPECT_THAT(r.error().what, HasSubstr("ro-image"));
}

// ---- damage -------------------------------------------------------------------------------

TEST(ImageIo, EveryTruncationRefused) {
  Sample s = sample();
  Bytes full = *encode(s.img);
  for (size_t n = 0; n < full.size(); ++n) {
    Bytes cut(full.begin(), full.begin() + static_cast<ptrdiff_t>(n));
    auto r = parse(cut);
    ASSERT_FALSE(r) << "prefix of " << n << " bytes accepted";
    ASSERT_EQ(r.error().kind, Errc::bad_image) << n << ": " << r.error().what;
  }
}

TEST(ImageIo, EveryBitFlipRefused) {
  Sample s = sample();
  Bytes full = *encode(s.img);
  for (size_t i = 0; i < full.size(); ++i)
    for (int bit = 0; bit < 8; ++bit) {
      Bytes b = full;
      b[i] ^= std::byte(1u << bit);
      auto r = parse(b);
      ASSERT_FALSE(r) << "flip of byte " << i << " bit " << bit << " accepted";
      ASSERT_TRUE(r.error().kind == Errc::bad_image || r.error().kind == Errc::image_version) << r.error().what;
    }
}

TEST(ImageIo, TrailingBytesAfterEndRefused) {
  Bytes b = *encode(sample().img);
  b.push_back(std::byte{0});
  expect_error(b, Errc::bad_image, "1 bytes follow the END record");
}

TEST(ImageIo, BadMagicRefused) {
  Bytes b = *encode(Image{});
  b[1] = std::byte{'Q'};
  expect_error(b, Errc::bad_image, "bad magic");
}

TEST(ImageIo, Version2Refused) {
  Bytes b = *encode(Image{});
  Bytes h = file_header(2);
  std::copy(h.begin(), h.end(), b.begin());
  auto r = parse(b);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().kind, Errc::image_version);
  EXPECT_THAT(r.error().what, HasSubstr("format version 2"));
}

TEST(ImageIo, UnknownOptionalRecordSkipped) {
  Sample s = sample();
  Bytes good = *encode(s.img);
  Bytes b = without_end(good);
  put_bytes(b, record(0x1234, 0, pattern(37, 1)));  // optional, between the FD records and END
  EXPECT_EQ(end_count(good), 1u + 2 + 5 + 3 + 7 + 8);  // INFO, processes, pipes, data, files, fds
  put_bytes(b, end_record(end_count(good) + 1));
  auto r = parse(b);
  ASSERT_TRUE(r) << r.error().what;
  expect_same(s.img, *r);
  // Without counting it, END disagrees.
  Bytes c = without_end(good);
  put_bytes(c, record(0x1234, 0, {}));
  put_bytes(c, end_record(end_count(good)));
  expect_error(c, Errc::bad_image, "END counts");
}

TEST(ImageIo, UnknownRequiredRecordRefused) {
  Bytes good = *encode(sample().img);
  Bytes b = without_end(good);
  put_bytes(b, record(0x1234, kRecordRequired | 0x80, {}));
  put_bytes(b, end_record(end_count(good) + 1));
  auto r = parse(b);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().kind, Errc::image_version);
  EXPECT_THAT(r.error().what, HasSubstr("0x1234"));
}

TEST(ImageIo, ShortAndLongPayloadsFollowEvolutionRules) {
  // A PIPE record cut after `mode` (an "older writer"): path, flags and slots take defaults. A
  // FILE with a longer payload (a "newer writer"): the extra bytes are ignored.
  Bytes pipe = pipe_payload(3, 4096, {});
  pipe.resize(8 + 1 + 8 + 4 * 4);
  Bytes file = file_payload(4, 3);
  Bytes rest;
  put_i32(rest, 1);            // owner type
  put_i32(rest, 55);           // owner pid
  put_u32(rest, 1);            // owner flags: has uids
  put_u32(rest, 7);            // uid
  put_u32(rest, 8);            // euid
  put_i32(rest, 29);           // signal
  put_u8(rest, 2);             // fifo_reader
  put_bytes(rest, pattern(13, 2));  // fields from the future
  put_bytes(file, rest);
  Bytes b = Raw().info().add(record(RecordType::pipe, pipe)).add(record(RecordType::file, file)).done();
  auto r = parse(b);
  ASSERT_TRUE(r) << r.error().what;
  ASSERT_EQ(r->pipes.size(), 1u);
  EXPECT_EQ(r->pipes[0].capacity, 4096u);
  EXPECT_EQ(r->pipes[0].path, "");
  EXPECT_TRUE(r->pipes[0].slots.empty());
  ASSERT_EQ(r->files.size(), 1u);
  EXPECT_EQ(r->files[0].owner, (Owner{1, 55, true, 7, 8}));
  EXPECT_EQ(r->files[0].signal, 29);
  EXPECT_EQ(r->files[0].fifo_reader, FifoReaderState::no_writer_yet);
  // An empty INFO payload means page size 4096.
  Bytes e = Raw().add(record(RecordType::info, {})).done();
  auto i = parse(e);
  ASSERT_TRUE(i) << i.error().what;
  EXPECT_EQ(i->info.page_size, 4096u);
  // A payload that ends inside a field is corrupt.
  Bytes half = pipe_payload(3, 4096, {});
  half.resize(8 + 1 + 2);
  expect_error(Raw().info().add(record(RecordType::pipe, half)).done(), Errc::bad_image, "inode needs 8 bytes");
}

// ---- inconsistent images ------------------------------------------------------------------

Bytes one_pipe(uint64_t id = 1) { return record(RecordType::pipe, pipe_payload(id, 8192, {{10, false}})); }
Bytes its_data(uint64_t id = 1, size_t n = 10) { return record(RecordType::pipe_data, data_payload(id, n)); }

TEST(ImageIo, LengthBeyondImageNamesOffset) {
  Raw raw;
  raw.info();
  raw.add(one_pipe());
  size_t at = raw.bytes.size();
  Bytes rec = its_data();
  put_bytes(raw.bytes, Bytes(rec.begin(), rec.begin() + 8));
  put_u64(raw.bytes, 70000);
  raw.bytes.resize(raw.bytes.size() + 512 + kChecksumSize);
  auto r = parse(raw.bytes);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().kind, Errc::bad_image);
  EXPECT_EQ(r.error().what,
            fmt::format("image offset {}: record PIPE_DATA length 70000 exceeds the 512 bytes left", at));
}

TEST(ImageIo, RecordCutInsideItsChecksumRefused) {
  // Found by the fuzzer: a zero-length record with only part of its checksum left was read past
  // the end of the image.
  Raw raw;
  raw.info();
  size_t at = raw.bytes.size();
  put_bytes(raw.bytes, record_header(static_cast<uint32_t>(RecordType::end), kRecordRequired, 0));
  raw.bytes.resize(raw.bytes.size() + 4);
  auto r = parse(raw.bytes);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().what, fmt::format("image offset {}: record header and checksum need 24 bytes but 20 are left", at));
}

TEST(ImageIo, GoodHandMadeImageParses) {
  // The baseline for the refusals below: the same records, consistent.
  Bytes b = Raw()
                .info()
                .add(one_pipe())
                .add(its_data())
                .add(record(RecordType::file, file_payload(2, 1)))
                .add(record(RecordType::fd, fd_payload(0, 3, 2)))
                .done();
  auto r = parse(b);
  ASSERT_TRUE(r) << r.error().what;
  EXPECT_EQ(r->fds.size(), 1u);
}

TEST(ImageIo, InconsistentReferencesRefused) {
  auto pipe_file = [] { return Raw().info().add(one_pipe()).add(its_data()).add(record(RecordType::file, file_payload(2, 1))); };
  expect_error(Raw().info().add(record(RecordType::file, file_payload(2, 9))).done(), Errc::bad_image,
               "refers to pipe 9");
  expect_error(pipe_file().add(record(RecordType::fd, fd_payload(0, 3, 5))).done(), Errc::bad_image,
               "refers to file 5");
  expect_error(pipe_file().add(record(RecordType::fd, fd_payload(42, 3, 2))).done(), Errc::bad_image,
               "pid 42 which has no PROCESS record");
  expect_error(pipe_file()
                   .add(record(RecordType::fd, fd_payload(0, 3, 2)))
                   .add(record(RecordType::fd, fd_payload(0, 3, 2)))
                   .done(),
               Errc::bad_image, "fd 3 of pid 0 appears twice");
  expect_error(pipe_file().add(record(RecordType::file, file_payload(2, 1))).done(), Errc::bad_image,
               "file id 2 appears twice");
  // A zero id says the rule it breaks, not only the value.
  expect_error(Raw().info().add(record(RecordType::file, file_payload(0, 1))).done(), Errc::bad_image,
               "record FILE: file id 0: ids start at 1");
  expect_error(Raw().info().add(one_pipe()).add(its_data()).add(record(RecordType::file, file_payload(1, 0))).done(),
               Errc::bad_image,
               "record FILE: file 1 has pipe id 0: it must name a PIPE record, and ids start at 1");
  expect_error(pipe_file().add(record(RecordType::fd, fd_payload(0, 3, 0))).done(), Errc::bad_image,
               "record FD: fd 3 has file id 0: it must name a FILE record, and ids start at 1");
  expect_error(Raw().info().add(one_pipe()).add(one_pipe()).done(), Errc::bad_image, "pipe id 1 appears twice");
  expect_error(Raw().info().add(record(RecordType::pipe, pipe_payload(0, 4096, {}))).done(), Errc::bad_image,
               "record PIPE: pipe id 0: ids start at 1");
}

// check_head(): what the first kHeadSize bytes tell before the rest of an image is read (MappedFile
// spools stdin only after it), with parse()'s message for the same fault.
TEST(ImageIo, HeadIsCheckedBeforeTheRest) {
  auto head = [](const Bytes& b) { return std::span<const std::byte>(b.data(), std::min(b.size(), kHeadSize)); };
  auto refused = [&](const Bytes& b, uint64_t size, Errc kind, const std::string& text) {
    auto r = check_head(head(b), size);
    ASSERT_FALSE(r) << text;
    EXPECT_EQ(r.error().kind, kind) << r.error().what;
    EXPECT_THAT(r.error().what, HasSubstr(text));
  };
  Bytes full = *encode(sample().img);
  EXPECT_TRUE(check_head(head(full), full.size()));
  EXPECT_TRUE(check_head(head(full), UINT64_MAX));
  // The file header and the first record's header only: a 30-byte image is left to parse().
  EXPECT_TRUE(check_head(head(Bytes(full.begin(), full.begin() + 30)), 30));

  Bytes zeros(4096);
  refused(zeros, UINT64_MAX, Errc::bad_image, "image offset 0: not a pipecr image (bad magic)");
  EXPECT_EQ(check_head(head(zeros), zeros.size()).error().what, parse(zeros).error().what);
  // A head too short for the magic is left to parse() (MappedFile maps an empty file); one that holds
  // the magic's 8 bytes is checked.
  EXPECT_TRUE(check_head(head(Bytes(zeros.begin(), zeros.begin() + 5)), 5));
  refused(Bytes(zeros.begin(), zeros.begin() + 10), 10, Errc::bad_image, "not a pipecr image (bad magic)");
  EXPECT_TRUE(check_head(head(Bytes(full.begin(), full.begin() + 10)), 10));

  Bytes flipped = full;
  flipped[17] ^= std::byte{1};
  refused(flipped, flipped.size(), Errc::bad_image, "image offset 16: file header checksum mismatch");
  Bytes v2 = full;
  Bytes h = file_header(2);
  std::copy(h.begin(), h.end(), v2.begin());
  refused(v2, v2.size(), Errc::image_version, "format version 2 is not supported");

  Bytes pipe_first = Raw().add(one_pipe()).done();
  refused(pipe_first, pipe_first.size(), Errc::bad_image, "image offset 24: first record is PIPE, not INFO");
  EXPECT_EQ(check_head(head(pipe_first), pipe_first.size()).error().what, parse(pipe_first).error().what);
  Bytes unknown = Raw().add(record(0x77, kRecordRequired, Bytes(8))).done();
  refused(unknown, unknown.size(), Errc::image_version, "required record type 0x77 is not known to this build");

  // An INFO length beyond the image: beyond its size when known, beyond any file when not.
  Bytes info_len = file_header(1);
  put_u32(info_len, static_cast<uint32_t>(RecordType::info));
  put_u32(info_len, kRecordRequired);
  put_u64(info_len, 1000);
  info_len.resize(100);
  refused(info_len, 100, Errc::bad_image, "image offset 24: record INFO length 1000 exceeds the 52 bytes left");
  EXPECT_EQ(check_head(head(info_len), 100).error().what, parse(info_len).error().what);
  EXPECT_TRUE(check_head(head(info_len), UINT64_MAX));  // a pipe may still bring them
  Bytes huge = info_len;
  for (size_t i = 32; i < 40; ++i) huge[i] = std::byte{0xff};
  refused(huge, UINT64_MAX, Errc::bad_image, "record INFO length 18446744073709551615 cannot fit in any image");
}

TEST(ImageIo, InconsistentDataRefused) {
  expect_error(Raw().info().add(its_data()).add(one_pipe()).done(), Errc::bad_image, "has no earlier PIPE record");
  expect_error(Raw().info().add(one_pipe()).add(its_data()).add(its_data()).done(), Errc::bad_image,
               "second data record for pipe 1");
  expect_error(Raw().info().add(one_pipe()).add(its_data(1, 11)).done(), Errc::bad_image,
               "data has 11 bytes but its slots hold 10");
  expect_error(Raw().info().add(one_pipe()).done(), Errc::bad_image, "holds 10 bytes but has no PIPE_DATA");
  expect_error(Raw().info().add(one_pipe()).add(record(RecordType::file, file_payload(2, 1))).done(), Errc::bad_image,
               "holds 10 bytes but has no PIPE_DATA");
  expect_error(Raw().info().add(record(RecordType::pipe_data, Bytes(5))).done(), Errc::bad_image,
               "pipe_id needs 8 bytes");
}

TEST(ImageIo, BadSlotTablesRefused) {
  auto with = [](const Bytes& pl) { return Raw().info().add(record(RecordType::pipe, pl)).done(); };
  expect_error(with(pipe_payload(1, 8192, {{0, false}})), Errc::bad_image,
               "slot 0 holds 0 bytes: a pipe buffer holds 1..4096 bytes");
  expect_error(with(pipe_payload(1, 8192, {{4097, false}})), Errc::bad_image,
               "slot 0 holds 4097 bytes: a pipe buffer holds 1..4096 bytes");
  expect_error(with(pipe_payload(1, 4096, {{1, false}, {1, false}})), Errc::bad_image,
               "slot count 2 exceeds capacity 4096");
  // A slot count the payload cannot hold is refused before anything is allocated.
  Bytes pl = pipe_payload(1, 8192, {});
  pl.resize(pl.size() - 4);
  put_u32(pl, 0xFFFFFFFF);
  expect_error(with(pl), Errc::bad_image, "slot count 4294967295 needs 34359738360 bytes but 0 are left");
  // Strings and counts past their limits.
  Bytes big_path = pipe_payload(1, 8192, {}, 1, std::string(kMaxPath + 1, 'a'));
  expect_error(with(big_path), Errc::bad_image, "path length 4097 exceeds the limit of 4096");
  Bytes nul = pipe_payload(1, 8192, {}, 1, std::string("/a\0b", 4));
  expect_error(with(nul), Errc::bad_image, "path contains a NUL byte");
  expect_error(with(pipe_payload(1, 8192, {}, 1, "")), Errc::bad_image, "FIFO 1 has no path");
  expect_error(with(pipe_payload(1, 8192, {}, 0, "/x")), Errc::bad_image, "anonymous pipe 1 has a FIFO path");
  expect_error(with(pipe_payload(1, 8192, {}, 9, "/x")), Errc::bad_image,
               "pipe 1 has kind 9: a pipe is anonymous (0) or a FIFO (1)");
  Bytes proc;
  put_i32(proc, 5);
  put_i32(proc, 1);
  put_string(proc, "x");
  put_u32(proc, 1000000);
  expect_error(Raw().info().add(record(RecordType::process, proc)).done(), Errc::bad_image,
               "argc 1000000 cannot fit");
}

TEST(ImageIo, GrammarViolationsRefused) {
  expect_error(Raw().add(one_pipe()).done(), Errc::bad_image, "first record is PIPE, not INFO");
  expect_error(Raw().info().info().done(), Errc::bad_image, "second INFO record");
  expect_error(Raw().info().add(record(RecordType::info, {})).done(), Errc::bad_image, "second INFO record");
  Bytes proc;
  put_i32(proc, 5);
  expect_error(Raw().info().add(record(RecordType::pipe, pipe_payload(1, 4096, {}))).add(record(RecordType::process, proc)).done(),
               Errc::bad_image, "PROCESS record after a PIPE record");
  expect_error(Raw().info(1000).done(), Errc::bad_image, "page size 1000");
  Raw r;
  r.info();
  Bytes b = r.bytes;
  put_bytes(b, end_record(5));
  expect_error(b, Errc::bad_image, "END counts 5 records but 1 precede it");
  Bytes e = r.bytes;
  put_bytes(e, record(RecordType::end, {}));
  expect_error(e, Errc::bad_image, "record count needs 8 bytes");
  expect_error(Raw().done(), Errc::bad_image, "first record is END");
}

// ---- writer misuse ------------------------------------------------------------------------

TEST(ImageWriter, DataLengthMismatchRefused) {
  PipeRecord p = make_pipe(1, 8192, {{10, false}});
  Bytes ten = pattern(10, 1);
  {
    MemorySink sink;
    Writer w(sink);
    ASSERT_TRUE(w.begin({}));
    ASSERT_TRUE(w.add(p));
    auto r = w.begin_data(1, 11);
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().kind, Errc::invalid_argument);
    EXPECT_THAT(r.error().what, HasSubstr("data length 11 for pipe 1 whose slots hold 10"));
    ASSERT_TRUE(w.begin_data(1, 10));  // nothing was written: the writer goes on
    auto over = w.data(pattern(11, 1));
    ASSERT_FALSE(over);
    EXPECT_EQ(over.error().kind, Errc::invalid_argument);
    ASSERT_TRUE(w.data(std::span(ten).first(4)));
    auto short_end = w.end_data();
    ASSERT_FALSE(short_end);
    EXPECT_THAT(short_end.error().what, HasSubstr("4 data bytes written of the 10 announced"));
    EXPECT_FALSE(w.finish());  // the output holds a partial record now
    EXPECT_FALSE(parse(sink.bytes()));
  }
  {
    MemorySink sink;
    Writer w(sink);
    ASSERT_TRUE(w.begin({}));
    ASSERT_TRUE(w.add(p));
    FileRecord f;
    f.id = 2, f.pipe_id = 1;
    auto r = w.add(f);
    ASSERT_FALSE(r);
    EXPECT_THAT(r.error().what, HasSubstr("pipe 1 holds 10 bytes but has no data"));
    EXPECT_FALSE(w.finish());
    ASSERT_TRUE(w.begin_data(1, 10));
    ASSERT_TRUE(w.data(ten));
    EXPECT_FALSE(w.begin_data(1, 10));  // nested
    ASSERT_TRUE(w.end_data());
    EXPECT_FALSE(w.begin_data(1, 10));  // second data for the pipe
    ASSERT_TRUE(w.add(f));
    ASSERT_TRUE(w.finish());
    auto img = parse(sink.bytes());
    ASSERT_TRUE(img) << img.error().what;
  }
  // encode() with data that does not match the slots.
  Image img;
  p.data = std::span(ten).first(9);
  img.pipes.push_back(p);
  auto e = encode(img);
  ASSERT_FALSE(e);
  EXPECT_EQ(e.error().kind, Errc::invalid_argument);
}

TEST(ImageWriter, OrderAndIdsChecked) {
  MemorySink sink;
  Writer w(sink);
  EXPECT_FALSE(w.add(ProcessRecord{1, 0, "a", {}}));  // before begin
  ImageInfo bad_info;
  bad_info.page_size = 3000;
  EXPECT_FALSE(w.begin(bad_info));
  ASSERT_TRUE(w.begin({}));
  EXPECT_FALSE(w.begin({}));
  ASSERT_TRUE(w.add(ProcessRecord{1, 0, "a", {}}));
  EXPECT_FALSE(w.add(ProcessRecord{1, 0, "a", {}}));  // duplicate pid
  EXPECT_FALSE(w.add(ProcessRecord{2, 0, std::string(65, 'c'), {}}));
  ASSERT_TRUE(w.add(make_pipe(1, 4096, {})));
  EXPECT_FALSE(w.add(make_pipe(1, 4096, {})));
  EXPECT_FALSE(w.add(make_pipe(0, 4096, {})));
  EXPECT_FALSE(w.add(make_pipe(2, 4096, {{4097, false}})));
  EXPECT_FALSE(w.add(ProcessRecord{3, 0, "late", {}}));  // process after pipe
  FileRecord f;
  f.id = 5, f.pipe_id = 9;
  EXPECT_FALSE(w.add(f));  // unknown pipe
  f.pipe_id = 1;
  ASSERT_TRUE(w.add(f));
  EXPECT_FALSE(w.add(FdRecord{0, 1, 6, false, Blocked::none}));  // unknown file
  EXPECT_FALSE(w.add(FdRecord{77, 1, 5, false, Blocked::none}));  // unknown pid
  ASSERT_TRUE(w.add(FdRecord{1, 1, 5, false, Blocked::none}));
  EXPECT_FALSE(w.add(FdRecord{1, 1, 5, false, Blocked::none}));  // same fd twice
  EXPECT_FALSE(w.add(make_pipe(3, 4096, {})));  // pipe after fd
  ASSERT_TRUE(w.finish());
  EXPECT_FALSE(w.finish());
  auto img = parse(sink.bytes());
  ASSERT_TRUE(img) << img.error().what;
  EXPECT_EQ(img->fds.size(), 1u);
}

TEST(ImageWriter, EncodeRefusesOtherVersions) {
  Image img;
  img.format_version = 2;
  auto e = encode(img);
  ASSERT_FALSE(e);
  EXPECT_EQ(e.error().kind, Errc::invalid_argument);
}


// ---- ends in flight (IN_FLIGHT, type 8) ---------------------------------------------------

Image with_in_flight(const Image& base) {
  Image img = base;
  img.in_flight.push_back(InFlightRecord{.file_id = 10, .pid = 100, .sock_fd = 4, .sock_ino = 777, .msg = 0,
                                         .slot = 0, .end = 1});
  img.in_flight.push_back(InFlightRecord{.file_id = 13, .pid = 101, .sock_fd = 6, .sock_ino = 778, .msg = 2,
                                         .slot = 1, .end = 99});
  return img;
}

Bytes in_flight_payload(uint64_t file_id, int32_t pid, int32_t sock_fd, uint32_t msg, uint32_t slot) {
  Bytes p;
  put_u64(p, file_id);
  put_i32(p, pid);
  put_i32(p, sock_fd);
  put_u64(p, 5);  // sock_ino
  put_u32(p, msg);
  put_u32(p, slot);
  put_u64(p, 1);  // end
  return p;
}

Bytes process_payload(int32_t pid) {
  Bytes p;
  put_i32(p, pid);
  return p;
}

TEST(ImageIo, InFlightRoundTripsAsAnOptionalRecord) {
  Sample s = sample();
  Image img = with_in_flight(s.img);
  auto bytes = encode(img);
  ASSERT_TRUE(bytes) << bytes.error().what;
  auto back = parse(*bytes);
  ASSERT_TRUE(back) << back.error().what;
  expect_same(img, *back);
  EXPECT_EQ(back->in_flight, img.in_flight);
  EXPECT_EQ(end_count(*bytes), end_count(*encode(s.img)) + 2);
  // Both records are type 8 and optional (flags 0): an older reader skips them.
  size_t seen = 0;
  for (size_t pos = kFileHeaderSize; pos < bytes->size();) {
    uint32_t type = get_le<uint32_t>(bytes->data() + pos);
    uint32_t flags = get_le<uint32_t>(bytes->data() + pos + 4);
    uint64_t len = get_le<uint64_t>(bytes->data() + pos + 8);
    if (type == 8) {
      ++seen;
      EXPECT_EQ(flags, 0u);
      EXPECT_EQ(len, 40u);
    }
    pos += kRecordOverhead + len;
  }
  EXPECT_EQ(seen, 2u);
  auto again = encode(*back);
  ASSERT_TRUE(again);
  EXPECT_EQ(*again, *bytes);
}

TEST(ImageIo, InFlightReferencesAreChecked) {
  auto base = [] {
    return Raw()
        .info()
        .add(record(RecordType::process, process_payload(7)))
        .add(one_pipe())
        .add(its_data())
        .add(record(RecordType::file, file_payload(2, 1)));
  };
  auto ok = parse(base().add(record(RecordType::in_flight, in_flight_payload(2, 7, 3, 0, 0))).done());
  ASSERT_TRUE(ok) << ok.error().what;
  ASSERT_EQ(ok->in_flight.size(), 1u);
  EXPECT_EQ(ok->in_flight[0].sock_fd, 3);
  expect_error(base().add(record(RecordType::in_flight, in_flight_payload(5, 7, 3, 0, 0))).done(), Errc::bad_image,
               "file 5 has no FILE record");
  expect_error(base().add(record(RecordType::in_flight, in_flight_payload(2, 8, 3, 0, 0))).done(), Errc::bad_image,
               "pid 8 which has no PROCESS record");
  expect_error(base().add(record(RecordType::in_flight, in_flight_payload(2, 7, -1, 0, 0))).done(), Errc::bad_image,
               "socket fd -1");
  expect_error(base()
                   .add(record(RecordType::in_flight, in_flight_payload(2, 7, 3, 1, 0)))
                   .add(record(RecordType::in_flight, in_flight_payload(2, 7, 3, 1, 0)))
                   .done(),
               Errc::bad_image, "appears twice");
  // The grammar puts it in the fds section: no pipe may follow it.
  expect_error(base().add(record(RecordType::in_flight, in_flight_payload(2, 7, 3, 0, 0))).add(one_pipe(3)).done(),
               Errc::bad_image, "PIPE record after");
  // The writer refuses what the reader would.
  Sample s = sample();
  Image bad = with_in_flight(s.img);
  bad.in_flight[1].file_id = 99;
  auto e = encode(bad);
  ASSERT_FALSE(e);
  EXPECT_EQ(e.error().kind, Errc::invalid_argument);
  bad = with_in_flight(s.img);
  bad.in_flight[1] = bad.in_flight[0];
  EXPECT_FALSE(encode(bad));
}

}  // namespace
}  // namespace pipecr::image
