// untrusted_image_test.cpp: images that parse but must not restore as they say (issue 9), through
// the C API and the C++ API into this process, on real pipes: every one is refused with -EBADMSG /
// Errc::bad_image before any fd is touched, and nothing crashes (run under ASan in scripts/test).
// Also the fidelity rule of refill for vmspliced pipes (docs/design.md section 3), on a real
// vmspliced pipe.
#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "image/image_io.hpp"
#include "image/validate.hpp"
#include "pipe_helpers.hpp"
#include "pipecr/pipe.hpp"
#include "pipecr/pipecr.h"
#include "sys/syscalls.hpp"

namespace pipecr {
namespace {

using Bytes = std::vector<std::byte>;
using testing::drain;
using testing::free_space_one_byte;
using testing::queued;

// A one-pipe image as restore_pipe() takes it: a reader and a writer file, one fd each.
struct Crafted {
  Image img;
  std::string data;
};

Crafted one_pipe(uint32_t page, uint32_t capacity, std::vector<uint32_t> slots) {
  Crafted c;
  c.img.info.page_size = page;
  PipeRecord p;
  p.id = 1;
  p.capacity = capacity;
  p.mode = 0600;
  char fill = 'A';
  for (uint32_t len : slots) {
    p.slots.push_back({len, false});
    c.data.append(len, fill);
    fill = fill == 'A' ? 'B' : 'A';
  }
  c.img.pipes.push_back(p);
  c.img.files.push_back(FileRecord{.id = 1, .pipe_id = 1, .flags = O_RDONLY});
  c.img.files.push_back(FileRecord{.id = 2, .pipe_id = 1, .flags = O_WRONLY});
  c.img.fds.push_back(FdRecord{.pid = 0, .fd = 100, .file_id = 1});
  c.img.fds.push_back(FdRecord{.pid = 0, .fd = 101, .file_id = 2});
  return c;
}

Bytes encode(Crafted& c) {
  c.img.pipes[0].data = std::as_bytes(std::span(c.data.data(), c.data.size()));
  auto b = image::encode(c.img);
  EXPECT_TRUE(b) << (b ? "" : b.error().what);
  return b ? *b : Bytes{};
}

// Restores through the C API asking for fds 100/101 (open /dev/null there first): on refusal both
// must still be /dev/null.
int c_restore(const Bytes& img) {
  int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
  dup2(null, 100);
  dup2(null, 101);
  close(null);
  int fd[2] = {100, 101};
  int r = pipecr_restore_pipe(fd, img.data(), img.size());
  if (r != 0) {
    struct stat a {}, b {};
    EXPECT_EQ(fstat(100, &a), 0);
    EXPECT_EQ(fstat(101, &b), 0);
    EXPECT_TRUE(S_ISCHR(a.st_mode) && S_ISCHR(b.st_mode)) << "a refused restore changed fd 100 or 101";
  }
  close(100);
  close(101);
  return r;
}

TEST(UntrustedImage, SlotsLongerThanAPageHereAreRefusedWhateverInfoSays) {
  // INFO page 65536 lets the reader accept 5000-byte slots; a pipe_buffer here holds 4096 bytes.
  for (std::vector<uint32_t> slots : {std::vector<uint32_t>{5000}, {4097, 100, 4097}, {4096, 100, 65536},
                                      {10, 20000, 10}}) {
    Crafted c = one_pipe(65536, 1u << 20, slots);
    Bytes img = encode(c);
    ASSERT_TRUE(image::parse(img)) << "the reader accepts it: the page size check is restore's";
    EXPECT_EQ(c_restore(img), -EBADMSG);
    auto r = restore_pipe(img);
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().kind, Errc::bad_image) << r.error().what;
    EXPECT_NE(r.error().what.find("page size 4096"), std::string::npos) << r.error().what;
  }
}

TEST(UntrustedImage, CapacityThatFSetpipeSzCannotSetIsBadImage) {
  for (uint32_t cap : {0xFFFFFFFFu, 3u * 4096, 100u, 0u, 4096u * 3 + 1}) {
    Crafted c = one_pipe(4096, cap, {});
    Bytes img = encode(c);
    if (!image::parse(img)) continue;  // the reader may refuse some already
    EXPECT_EQ(c_restore(img), -EBADMSG) << "capacity " << cap;
  }
}

TEST(UntrustedImage, CapacityAbovePipeMaxSizeIsStillACapacityError) {
  Crafted c = one_pipe(4096, 1u << 30, {5});
  Bytes img = encode(c);
  ASSERT_TRUE(image::validate(*image::parse(img)));
  EXPECT_EQ(c_restore(img), -EPERM);  // a fact of this machine, not of the image
}

TEST(UntrustedImage, FifoPathsMustBeAbsoluteAndModesWithin0777) {
  char dir[] = "/tmp/pipecr-untrusted-XXXXXX";
  ASSERT_TRUE(mkdtemp(dir));
  std::string fifo = std::string(dir) + "/f";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  char old[4096];
  ASSERT_TRUE(getcwd(old, sizeof old));
  ASSERT_EQ(chdir(dir), 0);  // a relative "f" would resolve to the FIFO just made
  for (std::string path : {std::string("f"), std::string("./f"), std::string(dir) + "/../" + (dir + 5) + "/f",
                           std::string(dir) + std::string("/f\0x", 4)}) {
    Crafted c = one_pipe(4096, 65536, {3});
    c.img.pipes[0].kind = PipeKind::fifo;
    c.img.pipes[0].path = path;
    Bytes img = encode(c);
    if (!image::parse(img)) continue;
    EXPECT_EQ(c_restore(img), -EBADMSG) << path;
  }
  ASSERT_EQ(chdir(old), 0);
  for (uint32_t mode : {06777u, 01600u, 04600u}) {
    Crafted c = one_pipe(4096, 65536, {3});
    c.img.pipes[0].kind = PipeKind::fifo;
    c.img.pipes[0].path = "/nonexistent/x";
    c.img.pipes[0].unlinked = true;  // restore_pipe would mkfifo it privately, with this mode
    c.img.pipes[0].mode = mode;
    Bytes img = encode(c);
    ASSERT_TRUE(image::parse(img));
    EXPECT_EQ(c_restore(img), -EBADMSG) << std::oct << mode;
  }
  unlink(fifo.c_str());
  rmdir(dir);
}

TEST(UntrustedImage, ValidImageRestoresExactly) {
  Crafted c = one_pipe(4096, 65536, {4096, 100, 4096, 7});
  Bytes img = encode(c);
  ASSERT_TRUE(image::validate(*image::parse(img)));
  auto r = restore_pipe(img);
  ASSERT_TRUE(r) << r.error().what;
  EXPECT_EQ(queued(r->read_fd), static_cast<int>(c.data.size()));
  EXPECT_EQ(testing::slots_of(r->read_fd), c.img.pipes[0].slots);
  EXPECT_EQ(drain(r->read_fd), c.data);
  close(r->read_fd);
  close(r->write_fd);
}

// Sixteen 10-byte slots, each vmspliced from its own page: the pipe is full (16 slots of 16).
// The middle pairs (10 + 10 <= 4096) cannot have been left by write(), so the last slot is rebuilt
// unmergeable as well, and the restored pipe is full too (before the rule: 4086 bytes free).
TEST(UntrustedImage, VmsplicedSlotsStayFullAfterRestore) {
  auto p = sys::make_pipe(O_CLOEXEC);
  ASSERT_TRUE(p);
  std::vector<std::string> pages(16, std::string(4096, 'v'));
  for (auto& pg : pages) {
    iovec iov{pg.data(), 10};
    ASSERT_EQ(vmsplice(p->write.get(), &iov, 1, 0), 10);
  }
  ASSERT_EQ(free_space_one_byte(p->write.get()), 0u) << "vmspliced slots do not merge: the pipe is full";
  auto img = checkpoint_pipe(p->read.get());
  ASSERT_TRUE(img) << img.error().what;
  auto r = restore_pipe(*img);
  ASSERT_TRUE(r) << r.error().what;
  EXPECT_EQ(queued(r->read_fd), 160);
  EXPECT_EQ(testing::slots_of(r->read_fd).size(), 16u);
  EXPECT_EQ(free_space_one_byte(r->write_fd), 0u) << "the last slot was rebuilt mergeable";
  close(r->read_fd);
  close(r->write_fd);
}

// What write() leaves keeps its last slot mergeable: write(4000), write(100), write(4000) makes
// slots 4000, 100, 4000 (100 did not fit behind 4000, 4000 not behind 100), a short middle slot that
// write() made. A writer can still add 96 bytes to the last slot after the restore.
TEST(UntrustedImage, WrittenShortMiddleSlotKeepsLastSlotMergeable) {
  auto p = sys::make_pipe(O_CLOEXEC);
  ASSERT_TRUE(p);
  std::string a(4000, 'a'), b(100, 'b');
  ASSERT_EQ(write(p->write.get(), a.data(), a.size()), 4000);
  ASSERT_EQ(write(p->write.get(), b.data(), b.size()), 100);
  ASSERT_EQ(write(p->write.get(), a.data(), a.size()), 4000);
  ASSERT_EQ(testing::slots_of(p->read.get()), (std::vector<Slot>{{4000, false}, {100, false}, {4000, false}}));
  auto img = checkpoint_pipe(p->read.get());
  ASSERT_TRUE(img) << img.error().what;
  size_t before = free_space_one_byte(p->write.get());  // fills the original (after the checkpoint)
  EXPECT_GE(before, 96u);
  auto r = restore_pipe(*img);
  ASSERT_TRUE(r) << r.error().what;
  size_t after = free_space_one_byte(r->write_fd);
  EXPECT_EQ(after, before);
  close(r->read_fd);
  close(r->write_fd);
}

}  // namespace
}  // namespace pipecr
