// fifo_latch_test.cpp: a FIFO reader that has never seen a writer keeps that state across a restore.
//
// The kernel latches the writer counter into a reader opened O_RDONLY|O_NONBLOCK only when no writer
// is open at that moment (fs/pipe.c, fifo_open); poll() then shows POLLHUP only once a writer has
// come and gone (pipe_poll). restore must therefore open such a reader with no writer open at all,
// not merely after its own read-write open: the children below check, after the restore, that the
// latched readers show no POLLHUP (with and without queued bytes), that a reader recorded as having
// seen a writer does show it, and that a writer coming and going flips the latched one, as it would
// have before.
#include <poll.h>

#include <gtest/gtest.h>

#include "restore/process.hpp"
#include "restore_helpers.hpp"

namespace pipecr::restore {
namespace {

using testing::ImageBuilder;
using testing::Scenario;

constexpr int32_t kRec = 5151;

struct TempDir {
  std::string path;
  TempDir() {
    char t[] = "/tmp/pipecr-latch-test-XXXXXX";
    path = ::mkdtemp(t);
  }
  ~TempDir() { (void)!::system(fmt::format("rm -rf '{}'", path).c_str()); }
};

// revents of fd, polled for POLLIN without waiting.
short revents(int fd) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, 0) < 0 ? short(-1) : p.revents;
}

std::string revents_is(int fd, short want, const char* why) {
  short got = revents(fd);
  if (got == want) return "";
  return fmt::format("fd {} ({}): poll revents {:#x}, want {:#x}", fd, why, got, want);
}

TEST(RestoreFifoLatch, NoWriterYetReaderSeesNoPollhup) {
  TempDir dir;
  const std::string empty = dir.path + "/empty", full = dir.path + "/full";
  ASSERT_EQ(::mkfifo(empty.c_str(), 0600), 0);
  ASSERT_EQ(::mkfifo(full.c_str(), 0600), 0);
  ImageBuilder b;
  b.process(kRec);
  auto e = b.pipe({}, 65536, PipeKind::fifo, empty);
  auto f = b.pipe({{"abc", false}}, 65536, PipeKind::fifo, full);
  b.fd(kRec, 11, b.file(e, O_RDONLY | O_NONBLOCK, {}, 0, FifoReaderState::no_writer_yet));
  b.fd(kRec, 12, b.file(f, O_RDONLY | O_NONBLOCK, {}, 0, FifoReaderState::no_writer_yet));
  b.fd(kRec, 13, b.file(f, O_RDONLY | O_NONBLOCK, {}, 0, FifoReaderState::seen_writer));
  Image img = b.parsed();
  Scenario child([] { testing::dev_null_at({11, 12, 13}); },
                 [empty]() -> std::string {
                   if (auto m = revents_is(11, 0, "latched, empty"); !m.empty()) return m;
                   if (auto m = revents_is(12, POLLIN, "latched, 3 bytes"); !m.empty()) return m;
                   if (auto m = revents_is(13, POLLIN | POLLHUP, "has seen a writer"); !m.empty()) return m;
                   if (auto m = testing::expect_bytes(12, "abc"); !m.empty()) return m;
                   int w = ::open(empty.c_str(), O_WRONLY | O_NONBLOCK);
                   if (w < 0) return fmt::format("open({}, O_WRONLY): {}", empty, std::strerror(errno));
                   ::close(w);
                   return revents_is(11, POLLHUP, "after a writer came and went");
                 });
  ASSERT_TRUE(child.ready());
  auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt});
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_EQ(child.finish(), "");
}

// The same for an unlinked FIFO (no path to open again: everything goes through /proc/self/fd).
TEST(RestoreFifoLatch, UnlinkedFifoReaderStaysLatched) {
  ImageBuilder b;
  b.process(kRec);
  auto p = b.pipe({{"x", false}}, 65536, PipeKind::fifo, "/gone/fifo", /*unlinked=*/true);
  b.fd(kRec, 11, b.file(p, O_RDONLY | O_NONBLOCK, {}, 0, FifoReaderState::no_writer_yet));
  Image img = b.parsed();
  Scenario child([] { testing::dev_null_at({11}); },
                 []() -> std::string {
                   if (auto m = revents_is(11, POLLIN, "latched, 1 byte"); !m.empty()) return m;
                   return testing::expect_bytes(11, "x");
                 });
  ASSERT_TRUE(child.ready());
  auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt});
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_EQ(child.finish(), "");
}

}  // namespace
}  // namespace pipecr::restore
