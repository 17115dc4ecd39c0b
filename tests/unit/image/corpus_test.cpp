// corpus_test.cpp: the seed images of the image reader fuzz target (fuzz/corpus/).
//
// Each seed is small (a fuzzer mutates small inputs faster) and reaches a different part of the
// reader: an empty image, stream and packet slots, FIFOs, processes with argv, signal owners, an
// optional record from a "future" writer, every kind of fd table and epoll watch. The test checks that every seed parses; with
// PIPECR_CORPUS_DIR set it also writes them there, which is how fuzz/corpus/ was made:
//   PIPECR_CORPUS_DIR=fuzz/corpus build/tests/image_corpus_test
#include <fcntl.h>
#include <xxhash.h>

#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "image/encoding.hpp"
#include "image/image_io.hpp"
#include "image/validate.hpp"
#include "sys/syscalls.hpp"
#include "sys/unique_fd.hpp"

namespace pipecr::image {
namespace {

using Bytes = std::vector<std::byte>;

Bytes text(std::string_view s) {
  auto b = std::as_bytes(std::span(s.data(), s.size()));
  return Bytes(b.begin(), b.end());
}

Bytes seed_empty() { return *encode(Image{}); }

Bytes seed_stream_pipe() {
  static const Bytes data = text("hello, pipe\n");
  Image img;
  PipeRecord p;
  p.id = 1, p.capacity = 65536, p.mode = 0600, p.slots = {{12, false}}, p.data = data;
  img.pipes.push_back(p);
  FileRecord r, w;
  r.id = 1, r.pipe_id = 1, r.flags = O_RDONLY;
  w.id = 2, w.pipe_id = 1, w.flags = O_WRONLY;
  img.files = {r, w};
  img.fds = {{0, 3, 1, true, Blocked::none}, {0, 4, 2, true, Blocked::none}};
  return *encode(img);
}

Bytes seed_packets_and_fifo() {
  static const Bytes data = text("abcdefghijklmnopqrstuvwxyz");
  Image img;
  img.info.kernel = "6.18";
  img.info.tool = "pipecr 0.1.0";
  img.processes.push_back({200, 1, "writer", {"writer", "--packets"}});
  PipeRecord p;
  p.id = 1, p.capacity = 16384, p.slots = {{3, true}, {20, true}, {3, false}}, p.data = data;
  img.pipes.push_back(p);
  PipeRecord f;
  f.id = 2, f.kind = PipeKind::fifo, f.capacity = 4096, f.path = "/tmp/q.fifo", f.unlinked = true;
  img.pipes.push_back(f);
  FileRecord a, b;
  a.id = 7, a.pipe_id = 1, a.flags = O_WRONLY | O_DIRECT | O_ASYNC, a.owner = {1, 200, true, 1000, 1000};
  a.signal = 34;
  b.id = 8, b.pipe_id = 2, b.flags = O_RDONLY | O_NONBLOCK, b.fifo_reader = FifoReaderState::no_writer_yet;
  img.files = {a, b};
  img.fds = {{200, 1, 7, false, Blocked::writing}, {200, 5, 8, true, Blocked::none}};
  return *encode(img);
}

// The stream pipe seed with an optional record of an unknown type before END.
Bytes seed_unknown_optional() {
  Bytes good = seed_stream_pipe();
  uint64_t count = get_le<uint64_t>(good.data() + good.size() - 16);
  Bytes b(good.begin(), good.end() - (kRecordOverhead + 8));
  for (auto [type, payload] : {std::pair{0x4242u, text("future")}, std::pair{uint32_t(RecordType::end), Bytes{}}}) {
    if (type == uint32_t(RecordType::end)) put_u64(payload, count + 1);
    Bytes r = record_header(type, type == uint32_t(RecordType::end) ? kRecordRequired : 0, payload.size());
    put_bytes(r, payload);
    put_u64(r, XXH3_64bits(r.data(), r.size()));
    put_bytes(b, r);
  }
  return b;
}

// Seeds for image_restore_fuzz: restore_pipe() takes one pipe. Sixteen vmspliced 10-byte slots
// (the refill path for unmergeable slots and the last-slot rule), and an image from a 64 KiB-page
// machine whose slots are longer than a page here (validate() refuses it; refill must never
// overflow on it).
Bytes seed_vmsplice_pipe() {
  static const Bytes data = text(std::string(160, 'v'));
  Image img;
  PipeRecord p;
  p.id = 1, p.capacity = 65536, p.mode = 0600, p.data = data;
  p.slots.assign(16, Slot{10, false});
  img.pipes.push_back(p);
  FileRecord r, w;
  r.id = 1, r.pipe_id = 1, r.flags = O_RDONLY | O_NONBLOCK;
  w.id = 2, w.pipe_id = 1, w.flags = O_WRONLY;
  img.files = {r, w};
  img.fds = {{0, 3, 1, false, Blocked::none}, {0, 4, 2, true, Blocked::none}};
  return *encode(img);
}

Bytes seed_big_page() {
  static const Bytes data = text(std::string(4097, 'A') + std::string(100, 'B') + std::string(3996, 'A'));
  Image img;
  img.info.page_size = 65536;
  PipeRecord p;
  p.id = 1, p.capacity = 1 << 20, p.mode = 0600, p.data = data;
  p.slots = {{4097, false}, {100, false}, {3996, false}};
  img.pipes.push_back(p);
  FileRecord r;
  r.id = 1, r.pipe_id = 1, r.flags = O_RDONLY;
  img.files = {r};
  img.fds = {{0, 3, 1, false, Blocked::none}};
  return *encode(img);
}

// Every kind of fd table and epoll watch: process 300's table (fds 3 and 4), the own table of its
// thread 301 (THREAD_FD: fd 3 on the read end), process 302 using 300's table (SHARED_FILES), and
// one epoll instance at fd 9 of both tables watching fd 3 of each (EPOLL_WATCH, THREAD_EPOLL_WATCH).
Bytes seed_tables_and_epolls() {
  static const Bytes data = text("tables");
  Image img;
  img.processes.push_back({300, 1, "loop", {"loop"}});
  img.processes.push_back({302, 300, "sharer", {"sharer"}});
  img.shared_tables.push_back({302, 300});
  PipeRecord p;
  p.id = 1, p.capacity = 65536, p.mode = 0600, p.slots = {{6, false}}, p.data = data;
  img.pipes.push_back(p);
  FileRecord r, w;
  r.id = 1, r.pipe_id = 1, r.flags = O_RDONLY;
  w.id = 2, w.pipe_id = 1, w.flags = O_WRONLY | O_NONBLOCK;
  img.files = {r, w};
  img.fds = {{300, 3, 1, false, Blocked::none}, {300, 4, 2, false, Blocked::none}, {300, 3, 1, false, Blocked::none, 301}};
  img.epoll_watches.push_back({1, 300, 9, 1, 3, 0x19, 0xA0});
  img.epoll_watches.push_back({1, 300, 9, 1, 3, 0x80000019, 0x70, 301});
  return *encode(img);
}

// The tables seed is a consistent image (validate() accepts it): restore_fuzz starts from it too.
TEST(ImageCorpus, TablesSeedValidates) {
  auto img = parse(seed_tables_and_epolls());
  ASSERT_TRUE(img) << img.error().what;
  auto ok = validate(*img);
  EXPECT_TRUE(ok) << ok.error().what;
  EXPECT_EQ(img->epoll_watches.size(), 2u);
}

TEST(ImageCorpus, SeedsParse) {
  std::vector<std::pair<const char*, Bytes>> seeds = {
      {"empty.img", seed_empty()},
      {"stream_pipe.img", seed_stream_pipe()},
      {"packets_fifo.img", seed_packets_and_fifo()},
      {"unknown_optional.img", seed_unknown_optional()},
      {"vmsplice_pipe.img", seed_vmsplice_pipe()},
      {"big_page.img", seed_big_page()},
      {"tables_epolls.img", seed_tables_and_epolls()},
  };
  const char* dir = std::getenv("PIPECR_CORPUS_DIR");
  for (const auto& [name, bytes] : seeds) {
    auto img = parse(bytes);
    EXPECT_TRUE(img) << name << ": " << img.error().what;
    if (!dir) continue;
    std::string path = std::string(dir) + "/" + name;
    sys::UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    ASSERT_TRUE(fd) << path;
    ASSERT_TRUE(sys::write_all(fd.get(), bytes));
  }
}

}  // namespace
}  // namespace pipecr::image
