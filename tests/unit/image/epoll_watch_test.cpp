// epoll_watch_test.cpp: record EPOLL_WATCH (type 7, docs/image-format.md): round trip through the
// writer and reader, its optional flag (an older reader skips it), the references the reader and
// writer check, and the rules of image::validate() for it.
#include <fcntl.h>
#include <sys/epoll.h>
#include <xxhash.h>

#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "image/encoding.hpp"
#include "image/image_io.hpp"
#include "image/validate.hpp"

namespace pipecr::image {
namespace {

using Bytes = std::vector<std::byte>;
using ::testing::HasSubstr;

// Process 10 holds a pipe: read end at fd 3, write end at fd 4 and 200; epoll 1 at fd 5 (and
// fd 6, a dup) watches 3 and 200; process 11 holds epoll 2 at fd 7 watching its fd 3 (read end).
Image sample() {
  Image img;
  img.processes.push_back({10, 1, "loop", {"loop"}});
  img.processes.push_back({11, 10, "loop", {"loop"}});
  PipeRecord p;
  p.id = 1, p.capacity = 65536, p.mode = 0600;
  img.pipes.push_back(p);
  img.files.push_back(FileRecord{.id = 1, .pipe_id = 1, .flags = O_RDONLY});
  img.files.push_back(FileRecord{.id = 2, .pipe_id = 1, .flags = O_WRONLY});
  img.fds.push_back(FdRecord{.pid = 10, .fd = 3, .file_id = 1});
  img.fds.push_back(FdRecord{.pid = 10, .fd = 4, .file_id = 2});
  img.fds.push_back(FdRecord{.pid = 10, .fd = 200, .file_id = 2});
  img.fds.push_back(FdRecord{.pid = 11, .fd = 3, .file_id = 1});
  const uint32_t all = EPOLLIN | EPOLLET | EPOLLONESHOT | EPOLLWAKEUP;
  img.epoll_watches.push_back({1, 10, 5, 1, 3, all, 0xdeadbeefcafef00dull});
  img.epoll_watches.push_back({1, 10, 5, 2, 200, EPOLLOUT | EPOLLEXCLUSIVE, 200});
  img.epoll_watches.push_back({1, 10, 6, 1, 3, all, 0xdeadbeefcafef00dull});
  img.epoll_watches.push_back({1, 10, 6, 2, 200, EPOLLOUT | EPOLLEXCLUSIVE, 200});
  img.epoll_watches.push_back({2, 11, 7, 1, 3, EPOLLIN | EPOLLRDHUP, 0});
  return img;
}

// The offset of the first record of type t in an encoded image, or 0.
size_t find_record(const Bytes& b, RecordType t) {
  for (size_t pos = kFileHeaderSize; pos + kRecordOverhead <= b.size();) {
    uint32_t type = get_le<uint32_t>(b.data() + pos);
    if (type == static_cast<uint32_t>(t)) return pos;
    pos += kRecordOverhead + get_le<uint64_t>(b.data() + pos + 8);
  }
  return 0;
}

TEST(EpollWatch, RoundTrip) {
  Image img = sample();
  auto bytes = encode(img);
  ASSERT_TRUE(bytes) << bytes.error().what;
  auto back = parse(*bytes);
  ASSERT_TRUE(back) << back.error().what;
  EXPECT_EQ(back->epoll_watches, img.epoll_watches);
  EXPECT_TRUE(validate(*back));
  auto again = encode(*back);
  ASSERT_TRUE(again);
  EXPECT_EQ(*again, *bytes);
}

TEST(EpollWatch, RecordIsOptionalAndAfterTheFds) {
  auto bytes = encode(sample());
  ASSERT_TRUE(bytes);
  size_t at = find_record(*bytes, RecordType::epoll_watch);
  ASSERT_NE(at, 0u);
  EXPECT_EQ(get_le<uint32_t>(bytes->data() + at + 4), 0u) << "EPOLL_WATCH must not be flagged required";
  EXPECT_GT(at, find_record(*bytes, RecordType::fd));
  // Payload: u64 epoll_id, i32 pid, i32 epoll_fd, u64 file_id, i32 fd, u32 events, u64 data.
  EXPECT_EQ(get_le<uint64_t>(bytes->data() + at + 8), 8u + 4 + 4 + 8 + 4 + 4 + 8);
  const std::byte* p = bytes->data() + at + kRecordHeaderSize;
  EXPECT_EQ(get_le<uint64_t>(p), 1u);
  EXPECT_EQ(get_le<uint32_t>(p + 8), 10u);
  EXPECT_EQ(get_le<uint32_t>(p + 12), 5u);
  EXPECT_EQ(get_le<uint64_t>(p + 16), 1u);
  EXPECT_EQ(get_le<uint32_t>(p + 24), 3u);
  EXPECT_EQ(get_le<uint32_t>(p + 28), static_cast<uint32_t>(EPOLLIN | EPOLLET | EPOLLONESHOT | EPOLLWAKEUP));
  EXPECT_EQ(get_le<uint64_t>(p + 32), 0xdeadbeefcafef00dull);
}

TEST(EpollWatch, ImageWithoutWatchesIsUnchanged) {
  Image img = sample();
  img.epoll_watches.clear();
  auto bytes = encode(img);
  ASSERT_TRUE(bytes);
  EXPECT_EQ(find_record(*bytes, RecordType::epoll_watch), 0u);
  auto back = parse(*bytes);
  ASSERT_TRUE(back);
  EXPECT_TRUE(back->epoll_watches.empty());
}

TEST(EpollWatch, WriterRefusesBadReferences) {
  auto refused = [](auto change, const std::string& says) {
    Image img = sample();
    change(img);
    auto r = encode(img);
    ASSERT_FALSE(r) << says;
    EXPECT_EQ(r.error().kind, Errc::invalid_argument);
    EXPECT_THAT(r.error().what, HasSubstr(says));
  };
  refused([](Image& i) { i.epoll_watches[0].file_id = 9; }, "unknown file 9");
  refused([](Image& i) { i.epoll_watches[0].pid = 12; }, "no PROCESS record");
  refused([](Image& i) { i.epoll_watches[0].epoll_id = 0; }, "epoll id 0");
  refused([](Image& i) { i.epoll_watches[4].epoll_fd = 5, i.epoll_watches[4].pid = 10; }, "is epoll 1 and epoll 2");
  refused([](Image& i) { i.epoll_watches.push_back(i.epoll_watches[1]); }, "added twice");
  refused([](Image& i) { i.epoll_watches[1].fd = -1; }, "negative fd");
}

// The sample without watches, with one hand-made record of type t (payload pl, flags 0) between the
// FDs and END.
Bytes with_record(RecordType t, const Bytes& pl) {
  Image img = sample();
  img.epoll_watches.clear();
  Bytes good = *encode(img);
  Bytes b(good.begin(), good.end() - (kRecordOverhead + 8));
  std::vector<std::byte> rec = record_header(static_cast<uint32_t>(t), 0, pl.size());
  put_bytes(rec, pl);
  put_u64(rec, XXH3_64bits(rec.data(), rec.size()));
  put_bytes(b, rec);
  uint64_t count = get_le<uint64_t>(good.data() + good.size() - 16) + 1;
  Bytes end;
  put_u64(end, count);
  std::vector<std::byte> e = record_header(static_cast<uint32_t>(RecordType::end), kRecordRequired, end.size());
  put_bytes(e, end);
  put_u64(e, XXH3_64bits(e.data(), e.size()));
  put_bytes(b, e);
  return b;
}

// An EPOLL_WATCH payload: epoll 1 at fd 5 of pid 10 watching file `file` through fd 3.
Bytes watch_payload(uint64_t file) {
  Bytes pl;
  put_u64(pl, 1);
  put_i32(pl, 10);
  put_i32(pl, 5);
  put_u64(pl, file);
  put_i32(pl, 3);
  put_u32(pl, EPOLLIN);
  put_u64(pl, 0);
  return pl;
}

TEST(EpollWatch, ReaderChecksReferences) {
  auto r = parse(with_record(RecordType::epoll_watch, watch_payload(42)));  // file 42: none
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().kind, Errc::bad_image);
  EXPECT_THAT(r.error().what, HasSubstr("record EPOLL_WATCH: epoll 1 watches file 42 which has no FILE record"));
}

// Thread 13 of process 10 has a table of its own (unshare(CLONE_FILES)): the read end at its fd 3
// and fd 9, epoll 1 (the instance the process's fd 5 holds, copied by unshare()) at its fd 5 and
// epoll 3 at its fd 6, both watching its fd 3. THREAD_EPOLL_WATCH records carry the tid.
Image with_thread_table() {
  Image img = sample();
  img.fds.push_back(FdRecord{.pid = 10, .fd = 3, .file_id = 1, .tid = 13});
  img.fds.push_back(FdRecord{.pid = 10, .fd = 9, .file_id = 1, .tid = 13});
  img.epoll_watches.push_back({1, 10, 5, 1, 3, EPOLLIN | EPOLLET, 0x13, 13});
  img.epoll_watches.push_back({3, 10, 6, 1, 3, EPOLLIN, 0x14, 13});
  return img;
}

TEST(EpollWatch, AThreadsOwnTableHasItsOwnRecord) {
  Image img = with_thread_table();
  ASSERT_TRUE(validate(img)) << validate(img).error().what;
  auto bytes = encode(img);
  ASSERT_TRUE(bytes) << bytes.error().what;
  auto back = parse(*bytes);
  ASSERT_TRUE(back) << back.error().what;
  EXPECT_EQ(back->epoll_watches, img.epoll_watches);
  auto again = encode(*back);
  ASSERT_TRUE(again);
  EXPECT_EQ(*again, *bytes);
  // Type 11, optional (an older reader skips it), the EPOLL_WATCH payload and then the tid.
  size_t at = find_record(*bytes, RecordType::thread_epoll_watch);
  ASSERT_NE(at, 0u);
  EXPECT_EQ(get_le<uint32_t>(bytes->data() + at + 4), 0u) << "THREAD_EPOLL_WATCH must not be flagged required";
  EXPECT_EQ(get_le<uint64_t>(bytes->data() + at + 8), 8u + 4 + 4 + 8 + 4 + 4 + 8 + 4);
  const std::byte* p = bytes->data() + at + kRecordHeaderSize;
  EXPECT_EQ(get_le<uint32_t>(p + 12), 5u);
  EXPECT_EQ(get_le<uint64_t>(p + 32), 0x13u);
  EXPECT_EQ(get_le<uint32_t>(p + 40), 13u);
  // The process's own watches stay EPOLL_WATCH records.
  EXPECT_NE(find_record(*bytes, RecordType::epoll_watch), 0u);
}

TEST(EpollWatch, AThreadsWatchesAreCheckedInItsTable) {
  auto refused = [](auto change, const std::string& says) {
    Image img = with_thread_table();
    change(img);
    auto r = validate(img);
    ASSERT_FALSE(r) << says;
    EXPECT_EQ(r.error().kind, Errc::bad_image);
    EXPECT_THAT(r.error().what, HasSubstr(says));
  };
  // File 2 is held in the process's table only.
  refused([](Image& i) { i.epoll_watches[5].file_id = 2; },
          "epoll 1 (fd 5 of thread 13 of pid 10) watches file 2, but that thread's table holds no fd of it");
  refused([](Image& i) { i.epoll_watches[6].epoll_fd = 9; }, "that fd is a recorded pipe end");
  refused([](Image& i) { i.epoll_watches[6].epoll_fd = 5; }, "fd 5 of thread 13 of pid 10 is epoll 1 and epoll 3");
  refused([](Image& i) { i.epoll_watches[5].tid = 14; }, "that thread's table holds no fd of it");
  // One number in two tables is two epoll fds: the thread's fd 6 may be another instance than a
  // process's fd 6 (the process has none here: its fd 6 holds epoll 1).
  Image two = with_thread_table();
  two.epoll_watches[6].epoll_fd = 6;
  EXPECT_TRUE(validate(two));
  // The writer and the reader check the tid.
  Image img = with_thread_table();
  img.epoll_watches[6].tid = -1;
  auto w = encode(img);
  ASSERT_FALSE(w);
  EXPECT_THAT(w.error().what, HasSubstr("thread id -1"));
  Bytes pl = watch_payload(1);
  put_i32(pl, 0);
  auto r = parse(with_record(RecordType::thread_epoll_watch, pl));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().kind, Errc::bad_image);
  EXPECT_THAT(r.error().what, HasSubstr("record THREAD_EPOLL_WATCH: epoll fd 5 has thread id 0"));
  r = parse(with_record(RecordType::thread_epoll_watch, watch_payload(1)));  // the tid missing
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().kind, Errc::bad_image);
  pl = watch_payload(1);
  put_i32(pl, 13);
  r = parse(with_record(RecordType::thread_epoll_watch, pl));
  ASSERT_TRUE(r) << r.error().what;
  ASSERT_EQ(r->epoll_watches.size(), 1u);
  EXPECT_EQ(r->epoll_watches[0].tid, 13);
}

TEST(EpollWatch, ValidateChecksThatIdsAgree) {
  auto refused = [](auto change, const std::string& says) {
    Image img = sample();
    ASSERT_TRUE(validate(img));
    change(img);
    auto r = validate(img);
    ASSERT_FALSE(r) << says;
    EXPECT_EQ(r.error().kind, Errc::bad_image);
    EXPECT_THAT(r.error().what, HasSubstr(says));
  };
  // The process must hold the watched file (at the fd the watch was added with, or at another).
  refused([](Image& i) { i.epoll_watches[4].file_id = 2; }, "watches file 2, but pid 11 holds no fd of it");
  refused([](Image& i) { i.epoll_watches[0].epoll_fd = 4; }, "that fd is a recorded pipe end");
  refused([](Image& i) { i.epoll_watches[4].pid = 12; }, "does not record");
  refused([](Image& i) { i.epoll_watches[4].file_id = 9; }, "watches file 9");
  refused([](Image& i) { i.epoll_watches[2].epoll_id = 3; }, "fd 6 of pid 10 is epoll 3 and epoll 1");
  refused([](Image& i) { i.epoll_watches[4] = i.epoll_watches[0]; }, "appears twice");
  // A watch added through an fd that holds another file now (or nothing) is valid: the watch is
  // keyed by that number, the file lives at another.
  Image keyed = sample();
  keyed.epoll_watches[0].file_id = 2;  // file 2 (held at 4 and 200), keyed by fd 3
  keyed.epoll_watches[2].file_id = 2;
  keyed.epoll_watches[4].fd = 4;       // pid 11 holds nothing at 4
  EXPECT_TRUE(validate(keyed)) << validate(keyed).error().what;
  // A table shared with another process is recorded under that one.
  Image img = sample();
  img.processes.push_back({12, 10, "loop", {"loop"}});
  img.shared_tables.push_back({12, 10});
  img.epoll_watches.push_back({1, 12, 5, 1, 3, EPOLLIN, 0});
  EXPECT_TRUE(validate(img));
}

}  // namespace
}  // namespace pipecr::image
