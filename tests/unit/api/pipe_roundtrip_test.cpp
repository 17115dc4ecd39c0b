// pipe_roundtrip_test.cpp: checkpoint a real pipe filled every way the kernel allows, restore it,
// and check that nothing can tell the restored pipe from the original: bytes, slot layout, packet
// boundaries, free space for a writer, and that the source was not touched.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cstring>

#include <gtest/gtest.h>

#include "pipecr/pipe.hpp"
#include "pipecr/pipecr.h"
#include "sys/unique_fd.hpp"
#include "unit/api/pipe_helpers.hpp"

namespace pipecr {
namespace {

using sys::UniqueFd;
using namespace pipecr::testing;

struct Pipe {
  UniqueFd r, w;
  explicit Pipe(int flags = 0) {
    int fds[2];
    EXPECT_EQ(pipe2(fds, flags), 0);
    r.reset(fds[0]);
    w.reset(fds[1]);
  }
};

struct Restored {
  UniqueFd r, w;
};

Restored roundtrip(int fd, const RestoreOptions& opts = {}) {
  auto img = checkpoint_pipe(fd);
  EXPECT_TRUE(img) << img.error().what;
  if (!img) return {};
  auto got = restore_pipe(*img, -1, -1, opts);
  EXPECT_TRUE(got) << got.error().what;
  if (!got) return {};
  return {UniqueFd(got->read_fd), UniqueFd(got->write_fd)};
}

void write_str(int fd, const std::string& s) { ASSERT_EQ(write(fd, s.data(), s.size()), static_cast<ssize_t>(s.size())); }

void vmsplice_chunks(int wfd, const std::vector<std::string>& chunks, unsigned flags) {
  for (const auto& c : chunks) {
    // A fresh page per chunk, as a producer using vmsplice would have.
    void* mem = mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(mem, MAP_FAILED);
    memcpy(mem, c.data(), c.size());
    iovec iov{mem, c.size()};
    ASSERT_EQ(vmsplice(wfd, &iov, 1, flags), static_cast<ssize_t>(c.size())) << strerror(errno);
    munmap(mem, 4096);
  }
}

TEST(Roundtrip, WriteFilledKeepsBytesAndFreeSpace) {
  Pipe p;
  std::string data = pattern(100);
  write_str(p.w.get(), data);
  Restored r = roundtrip(p.r.get());
  EXPECT_EQ(queued(r.r.get()), 100);
  // The original takes 65,436 more one-byte writes: the restored pipe must too.
  EXPECT_EQ(free_space_one_byte(r.w.get()), 65536u - 100u);
  EXPECT_EQ(free_space_one_byte(p.w.get()), 65536u - 100u);
  EXPECT_EQ(drain(r.r.get()).substr(0, 100), data);
}

TEST(Roundtrip, SourceIsUnchangedByteForByte) {
  Pipe p;
  std::string data = pattern(70000 - 1);
  fcntl(p.w.get(), F_SETPIPE_SZ, 131072);
  write_str(p.w.get(), data);
  auto before = slots_of(p.r.get());
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(checkpoint_pipe(p.r.get()));
  EXPECT_EQ(slots_of(p.r.get()), before);
  EXPECT_EQ(queued(p.r.get()), static_cast<int>(data.size()));
  EXPECT_EQ(drain(p.r.get()), data);
}

TEST(Roundtrip, EmptyPipe) {
  Pipe p;
  Restored r = roundtrip(p.w.get());
  EXPECT_EQ(queued(r.r.get()), 0);
  EXPECT_EQ(free_space_one_byte(r.w.get()), 65536u);
}

TEST(Roundtrip, FullOneMiBPipeStaysFull) {
  Pipe p(O_NONBLOCK);
  ASSERT_EQ(fcntl(p.w.get(), F_SETPIPE_SZ, 1 << 20), 1 << 20);
  std::string chunk = pattern(65536, 7);
  std::string all;
  for (;;) {
    ssize_t n = write(p.w.get(), chunk.data(), chunk.size());
    if (n <= 0) break;
    all.append(chunk, 0, static_cast<size_t>(n));
  }
  ASSERT_EQ(all.size(), 1u << 20);
  Restored r = roundtrip(p.r.get());
  EXPECT_EQ(fcntl(r.w.get(), F_GETPIPE_SZ), 1 << 20);
  EXPECT_EQ(free_space_one_byte(r.w.get()), 0u);
  EXPECT_EQ(drain(r.r.get()), all);
  EXPECT_EQ(drain(p.r.get()), all);
}

class FileSplice : public ::testing::TestWithParam<const char*> {};

TEST_P(FileSplice, SplicedFromRegularFile) {
  std::string path = std::string(GetParam()) + "/pipecr-splice-XXXXXX";
  UniqueFd f(mkstemp(path.data()));
  ASSERT_TRUE(f) << path;
  unlink(path.c_str());
  std::string data = pattern(10000, 3);
  ASSERT_EQ(pwrite(f.get(), data.data(), data.size(), 0), static_cast<ssize_t>(data.size()));
  Pipe p;
  loff_t off = 0;
  ASSERT_EQ(splice(f.get(), &off, p.w.get(), nullptr, 5000, 0), 5000);
  ASSERT_EQ(splice(f.get(), &off, p.w.get(), nullptr, 5000, 0), 5000);
  auto layout = slots_of(p.r.get());
  Restored r = roundtrip(p.r.get());
  // A later write to the file must not show in the restored pipe.
  ASSERT_EQ(pwrite(f.get(), "XXXX", 4, 0), 4);
  EXPECT_EQ(slots_of(r.r.get()), layout);
  EXPECT_EQ(drain(r.r.get()), data);
}
INSTANTIATE_TEST_SUITE_P(Filesystems, FileSplice, ::testing::Values("/tmp", "/dev/shm"));

TEST(Roundtrip, VmspliceKeepsEverySlot) {
  for (unsigned flags : {0u, static_cast<unsigned>(SPLICE_F_GIFT)}) {
    Pipe p;
    std::vector<std::string> chunks = {pattern(100, 1), pattern(1, 2), pattern(4096, 3), pattern(7, 4)};
    vmsplice_chunks(p.w.get(), chunks, flags);
    std::vector<Slot> expect = {{100, false}, {1, false}, {4096, false}, {7, false}};
    EXPECT_EQ(slots_of(p.r.get()), expect) << "flags " << flags;
    Restored r = roundtrip(p.r.get());
    EXPECT_EQ(slots_of(r.r.get()), expect);
    EXPECT_EQ(drain(r.r.get()), chunks[0] + chunks[1] + chunks[2] + chunks[3]);
  }
}

TEST(Roundtrip, WithoutVmspliceKeepsSlots) {
  Pipe p;
  std::vector<std::string> chunks = {pattern(100, 1), pattern(200, 2), pattern(300, 3)};
  vmsplice_chunks(p.w.get(), chunks, 0);
  auto layout = slots_of(p.r.get());
  RestoreOptions opts;
  opts.no_vmsplice = true;
  Restored r = roundtrip(p.r.get(), opts);
  EXPECT_EQ(slots_of(r.r.get()), layout);
  EXPECT_EQ(drain(r.r.get()), chunks[0] + chunks[1] + chunks[2]);
}

TEST(Roundtrip, TeeFromAnotherPipe) {
  Pipe a, b;
  std::string data = pattern(9000, 5);
  write_str(a.w.get(), data);
  ASSERT_EQ(tee(a.r.get(), b.w.get(), data.size(), 0), static_cast<ssize_t>(data.size()));
  auto layout = slots_of(b.r.get());
  Restored r = roundtrip(b.r.get());
  EXPECT_EQ(slots_of(r.r.get()), layout);
  EXPECT_EQ(drain(r.r.get()), data);
}

TEST(Roundtrip, PacketsKeepTheirBoundaries) {
  Pipe p(O_DIRECT);
  std::vector<size_t> sizes = {1, 10, 100, 3000, 4096, 5000, 1};
  for (size_t i = 0; i < sizes.size(); ++i) write_str(p.w.get(), pattern(sizes[i], static_cast<unsigned>(i)));
  std::vector<size_t> expect = {1, 10, 100, 3000, 4096, 4096, 904, 1};
  Restored r = roundtrip(p.r.get());
  EXPECT_EQ(read_sizes(r.r.get()), expect);
  EXPECT_EQ(read_sizes(p.r.get()), expect);
  // The write end still writes packets.
  EXPECT_TRUE(fcntl(r.w.get(), F_GETFL) & O_DIRECT);
}

TEST(Roundtrip, MixedStreamAndPackets) {
  Pipe p;
  write_str(p.w.get(), pattern(50, 1));  // stream, mergeable
  fcntl(p.w.get(), F_SETFL, O_DIRECT);
  write_str(p.w.get(), pattern(4096, 2));  // a full-page packet does not merge
  write_str(p.w.get(), pattern(1, 3));
  fcntl(p.w.get(), F_SETFL, 0);
  write_str(p.w.get(), pattern(70, 4));
  auto layout = slots_of(p.r.get());
  ASSERT_EQ(layout.size(), 3u + 1u);
  Restored r = roundtrip(p.r.get());
  EXPECT_EQ(slots_of(r.r.get()), layout);
  EXPECT_EQ(read_sizes(r.r.get()), read_sizes(p.r.get()));
}

TEST(Roundtrip, OnlyTheWriteEndHeld) {
  Pipe p;
  std::string data = pattern(3000, 9);
  write_str(p.w.get(), data);
  p.r.reset();
  Restored r = roundtrip(p.w.get());
  EXPECT_EQ(drain(r.r.get()), data);
}

TEST(Roundtrip, CapacityOwnerAndMode) {
  Pipe p;
  ASSERT_EQ(fcntl(p.w.get(), F_SETPIPE_SZ, 16384), 16384);
  ASSERT_EQ(fchown(p.r.get(), 65534, 65534), 0);
  ASSERT_EQ(fchmod(p.r.get(), 0640), 0);
  write_str(p.w.get(), "abc");
  Restored r = roundtrip(p.r.get());
  struct stat st {};
  ASSERT_EQ(fstat(r.r.get(), &st), 0);
  EXPECT_EQ(st.st_uid, 65534u);
  EXPECT_EQ(st.st_gid, 65534u);
  EXPECT_EQ(st.st_mode & 07777, 0640u);
  EXPECT_EQ(fcntl(r.w.get(), F_GETPIPE_SZ), 16384);
  EXPECT_EQ(free_space_one_byte(r.w.get()), 16384u - 3u);
}

}  // namespace
}  // namespace pipecr
