// process_test.cpp: restore_processes() into real children, which check their own fds afterwards.
//
// Each test describes a recorded state with the image writer, starts a child holding something else
// at those numbers (/dev/null, or its own pipe), restores into it, signals it, and lets the child
// judge: bytes, flags, capacity, sharing (kcmp against its own fds), SIGIO with si_fd. Failure tests
// check that the child still holds what it held. After every restore no process may be traced or
// in a tracing stop.
#include "restore/process.hpp"

#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstddef>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <thread>

#include <gtest/gtest.h>

#include "image/info.hpp"
#include "restore/plan.hpp"
#include "restore_helpers.hpp"

namespace pipecr::restore {
namespace {

using testing::ImageBuilder;
using testing::Scenario;

constexpr int32_t kRec = 4242;  // recorded pid
constexpr int32_t kRec2 = 4343;

#define EXPECT_UNTRACED(pid) EXPECT_EQ(testing::traced_or_stopped(pid), "")

std::string flags_is(int fd, int mask, int want) {
  int fl = ::fcntl(fd, F_GETFL);
  if ((fl & mask) == want) return "";
  return fmt::format("fd {}: flags {:#o}, want {:#o} under mask {:#o}", fd, fl, want, mask);
}

TEST(RestoreProcess, SharingReopenFlagsAndBytes) {
  ImageBuilder b;
  b.process(kRec);
  std::string one = testing::pattern(4096, 1), two = testing::pattern(1000, 2);
  auto p = b.pipe({{one, false}, {two, false}}, 131072);
  auto rd = b.file(p, O_RDONLY);
  auto wr = b.file(p, O_WRONLY);
  auto re = b.file(p, O_RDONLY | O_NONBLOCK | O_LARGEFILE);
  b.fd(kRec, 11, rd).fd(kRec, 12, wr, true).fd(kRec, 13, rd).fd(kRec, 14, re);
  Image img = b.parsed();

  Scenario child([] { testing::dev_null_at({11, 12, 13, 14}); },
                 [&]() -> std::string {
                   if (!testing::same_file(11, 13)) return "11 and 13 should share a file";
                   if (testing::same_file(11, 14)) return "14 should be a separate open";
                   if (auto e = flags_is(11, O_ACCMODE | O_NONBLOCK, O_RDONLY); !e.empty()) return e;
                   if (auto e = flags_is(14, O_ACCMODE | O_NONBLOCK, O_RDONLY | O_NONBLOCK); !e.empty()) return e;
                   if (auto e = flags_is(12, O_ACCMODE, O_WRONLY); !e.empty()) return e;
                   if (::fcntl(12, F_GETFD) != FD_CLOEXEC || ::fcntl(11, F_GETFD) != 0) return "FD_CLOEXEC wrong";
                   if (::fcntl(11, F_GETPIPE_SZ) != 131072) return "capacity wrong";
                   if (auto e = testing::expect_bytes(14, one + two); !e.empty()) return e;
                   if (::write(12, "x", 1) != 1) return "write to 12";
                   return testing::expect_bytes(11, "x");
                 });
  ASSERT_TRUE(child.ready());
  auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt});
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_EQ(sum->pipes, 1u);
  EXPECT_EQ(sum->files, 3u);
  EXPECT_EQ(sum->fds, 4u);
  EXPECT_UNTRACED(child.pid());
  EXPECT_EQ(child.finish(), "");
}

TEST(RestoreProcess, PacketsKeepTheirBoundaries) {
  ImageBuilder b;
  b.process(kRec);
  auto p = b.pipe({{"aaaaaaaaaa", true}, {std::string(100, 'b'), true}, {"ccc", false}});
  b.fd(kRec, 11, b.file(p, O_RDONLY)).fd(kRec, 12, b.file(p, O_WRONLY | O_DIRECT));
  Image img = b.parsed();
  Scenario child([] { testing::dev_null_at({11, 12}); },
                 []() -> std::string {
                   if (auto e = flags_is(12, O_DIRECT, O_DIRECT); !e.empty()) return e;
                   char buf[4096];
                   std::vector<ssize_t> sizes;
                   ::fcntl(11, F_SETFL, O_NONBLOCK);
                   for (ssize_t r; (r = ::read(11, buf, sizeof buf)) > 0;) sizes.push_back(r);
                   if (sizes != std::vector<ssize_t>{10, 100, 3}) return fmt::format("read sizes {}", fmt::join(sizes, ","));
                   return "";
                 });
  ASSERT_TRUE(child.ready());
  auto sum = restore_processes(img, {{{child.pid(), std::nullopt}}, std::nullopt});
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_EQ(child.finish(), "");
}

TEST(RestoreProcess, AsyncOwnerAndSignalArriveWithSiFd) {
  ImageBuilder b;
  b.process(kRec);
  auto p = b.pipe({});
  const int sig = SIGRTMIN + 1;
  auto rd = b.file(p, O_RDONLY | O_ASYNC | O_NONBLOCK, Owner{F_OWNER_PID, kRec}, sig);
  b.fd(kRec, 11, rd).fd(kRec, 12, b.file(p, O_WRONLY));
  Image img = b.parsed();
  Scenario child(
      [] { testing::dev_null_at({11, 12}); },
      [sig]() -> std::string {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, sig);
        ::sigprocmask(SIG_BLOCK, &set, nullptr);
        if (auto e = flags_is(11, O_ASYNC | O_NONBLOCK, O_ASYNC | O_NONBLOCK); !e.empty()) return e;
        f_owner_ex own{};
        ::fcntl(11, F_GETOWN_EX, &own);
        if (own.pid != ::getpid() || own.type != F_OWNER_PID) return fmt::format("owner {} type {}", own.pid, own.type);
        if (::fcntl(11, F_GETSIG) != sig) return "F_GETSIG wrong";
        if (::write(12, "z", 1) != 1) return "write";
        siginfo_t si{};
        timespec ts{5, 0};
        if (::sigtimedwait(&set, &si, &ts) != sig) return "no SIGIO";
        if (si.si_fd != 11) return fmt::format("si_fd {}", si.si_fd);
        return "";
      });
  ASSERT_TRUE(child.ready());
  auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt});
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_TRUE(sum->notes.empty());
  EXPECT_EQ(child.finish(), "");
}

// Parent and child cross-wired at 11/12; the reader is blocked in read(11) on a pipe of its own and
// must go on reading the restored pipe: first the bytes that were queued, then what the writer sends.
TEST(RestoreProcess, BlockedReaderAcrossTwoTargets) {
  ImageBuilder b;
  b.process(kRec).process(kRec2);
  auto p = b.pipe({{"queued", false}});
  b.fd(kRec, 11, b.file(p, O_RDONLY)).fd(kRec2, 12, b.file(p, O_WRONLY));
  Image img = b.parsed();
  Scenario reader(
      [] {
        int fds[2];
        (void)!::pipe(fds);
        ::dup2(fds[0], 11);
        ::dup2(fds[1], 13);  // a writer of its own: the read blocks instead of seeing EOF
      },
      []() -> std::string {
        char buf[64];
        ssize_t n = ::read(11, buf, sizeof buf);  // blocks until restored
        std::string got(buf, n > 0 ? static_cast<size_t>(n) : 0);
        if (got != "queued") return "first read: '" + got + "'";
        n = ::read(11, buf, sizeof buf);
        got.assign(buf, n > 0 ? static_cast<size_t>(n) : 0);
        if (got != "later") return "second read: '" + got + "'";
        return ::read(11, buf, sizeof buf) == 0 ? "" : "no EOF after the writer left";
      },
      false);
  Scenario writer([] { testing::dev_null_at({12}); },
                  []() -> std::string { return ::write(12, "later", 5) == 5 ? "" : "write failed"; });
  ASSERT_TRUE(reader.ready() && writer.ready());
  ASSERT_TRUE(reader.wait_blocked_in(SYS_read));
  auto sum = restore_processes(img, {{{reader.pid(), kRec}, {writer.pid(), kRec2}}, std::nullopt});
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_UNTRACED(reader.pid());
  EXPECT_UNTRACED(writer.pid());
  EXPECT_EQ(writer.finish(), "");
  EXPECT_EQ(reader.finish(0), "");
}

// A target blocked in poll() (with and without a timeout: the kernel restarts them differently)
// and in write() on a full pipe: each goes on with the restored pipe at the same number.
TEST(RestoreProcess, BlockedInPollAndWriteGoOnWithTheRestoredPipe) {
  for (int timeout : {-1, 20000}) {
    SCOPED_TRACE("poll timeout " + std::to_string(timeout));
    ImageBuilder b;
    b.process(kRec);
    auto p = b.pipe({{"polled", false}});
    b.fd(kRec, 11, b.file(p, O_RDONLY));
    Image img = b.parsed();
    Scenario child(
        [] {
          int fds[2];
          (void)!::pipe(fds);
          ::dup2(fds[0], 11);
          ::dup2(fds[1], 13);  // keeps the old pipe empty but open: poll() blocks
        },
        [timeout]() -> std::string {
          pollfd pfd{11, POLLIN, 0};
          int r = ::poll(&pfd, 1, timeout);  // blocks until restored
          if (r != 1 || !(pfd.revents & POLLIN)) return "poll: " + std::to_string(r);
          return testing::expect_bytes(11, "polled");
        },
        false);
    ASSERT_TRUE(child.ready());
    ASSERT_TRUE(child.wait_blocked_in(SYS_poll));
    auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt});
    ASSERT_TRUE(sum) << sum.error().what;
    EXPECT_UNTRACED(child.pid());
    EXPECT_EQ(child.finish(0), "");
  }
  // A writer blocked on a full pipe writes into the restored (empty) one instead.
  ImageBuilder b;
  b.process(kRec);
  auto p = b.pipe({});
  b.fd(kRec, 12, b.file(p, O_WRONLY)).fd(kRec, 14, b.file(p, O_RDONLY));
  Image img = b.parsed();
  Scenario child(
      [] {
        int fds[2];
        (void)!::pipe(fds);
        ::fcntl(fds[1], F_SETFL, O_NONBLOCK);
        std::string chunk(4096, 'f');
        while (::write(fds[1], chunk.data(), chunk.size()) > 0) {
        }
        ::fcntl(fds[1], F_SETFL, 0);
        ::dup2(fds[1], 12);
        ::dup2(fds[0], 15);  // the old reader, never read: the write below blocks
      },
      []() -> std::string {
        if (::write(12, "written", 7) != 7) return "write failed";
        return testing::expect_bytes(14, "written");
      },
      false);
  ASSERT_TRUE(child.ready());
  ASSERT_TRUE(child.wait_blocked_in(SYS_write));
  auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt});
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_UNTRACED(child.pid());
  EXPECT_EQ(child.finish(0), "");
}

// A pipe also held outside the image (here: by this test, the way a supervisor holds a child's
// stdout) that the target still holds at the recorded number is left as it is: a new pipe would cut
// the outside holder off.
TEST(RestoreProcess, PipeStillSharedWithOutsideHolderIsLeftAsItIs) {
  int live[2];
  ASSERT_EQ(::pipe(live), 0);
  sys::UniqueFd live_r(live[0]), live_w(live[1]);
  struct stat st {};
  ASSERT_EQ(::fstat(live[0], &st), 0);
  ImageBuilder b;
  b.process(kRec);
  auto p = b.pipe({{"from-image", false}});
  b.raw().pipes.back().inode = st.st_ino;
  b.raw().pipes.back().outside_holders = true;
  b.fd(kRec, 11, b.file(p, O_RDONLY));
  Image img = b.parsed();
  int keep = live[0];
  Scenario child([keep] { ::dup2(keep, 11); }, [] { return testing::expect_bytes(11, "live"); });
  ASSERT_TRUE(child.ready());
  live_r.reset();
  std::vector<std::string> notes;
  ProcessRestoreOptions opts;
  opts.note = [&](const std::string& n) { notes.push_back(n); };
  auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt}, opts);
  ASSERT_TRUE(sum) << sum.error().what;
  bool noted = false;
  for (const auto& n : notes) noted |= n.find("fd 11 of process") != std::string::npos;
  EXPECT_TRUE(noted);
  ASSERT_EQ(::write(live_w.get(), "live", 4), 4);  // still connected: the child reads it
  EXPECT_EQ(child.finish(), "");
}

TEST(RestoreProcess, DroppedWriterGivesEofAfterTheData) {
  ImageBuilder b;
  b.process(kRec).process(kRec2);
  auto p = b.pipe({{"tail", false}});
  b.fd(kRec, 11, b.file(p, O_RDONLY)).fd(kRec2, 12, b.file(p, O_WRONLY));
  Image img = b.parsed();
  Scenario child([] { testing::dev_null_at({11}); },
                 []() -> std::string {
                   char buf[16];
                   ssize_t n = ::read(11, buf, sizeof buf);
                   if (n != 4 || std::memcmp(buf, "tail", 4) != 0) return "data";
                   return ::read(11, buf, sizeof buf) == 0 ? "" : "no EOF";
                 });
  ASSERT_TRUE(child.ready());
  std::vector<std::string> notes;
  ProcessRestoreOptions opts;
  opts.note = [&](const std::string& n) { notes.push_back(n); };
  auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt}, opts);
  ASSERT_TRUE(sum) << sum.error().what;
  ASSERT_EQ(sum->dropped.size(), 1u);
  EXPECT_EQ(sum->dropped[0].fd, 12);
  EXPECT_TRUE(sum->dropped[0].write_side);
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_NE(notes[0].find("fd 12 of recorded process 4343"), std::string::npos) << notes[0];
  EXPECT_EQ(child.finish(), "");
}

// "N -> target" for each open fd of pid.
std::vector<std::string> fd_links(pid_t pid) {
  std::vector<std::string> out;
  const std::string dir = fmt::format("/proc/{}/fd", pid);
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    std::error_code ec;
    out.push_back(e.path().filename().string() + " -> " + std::filesystem::read_symlink(e.path(), ec).string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

TEST(RestoreProcess, StoppedTargetStaysStopped) {
  ImageBuilder b;
  b.process(kRec);
  auto p = b.pipe({{"s", false}});
  b.fd(kRec, 11, b.file(p, O_RDONLY));
  Image img = b.parsed();
  Scenario child([] { testing::dev_null_at({11}); }, [] { return testing::expect_bytes(11, "s"); });
  ASSERT_TRUE(child.ready());
  ::kill(child.pid(), SIGSTOP);
  for (int i = 0; i < 200 && testing::state_of(child.pid()) != 'T'; ++i) ::usleep(5000);
  const std::vector<std::string> fds_before = fd_links(child.pid());
  auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt});
  ASSERT_TRUE(sum) << sum.error().what;
  // The kernel puts it back into the group stop as it is detached: allow it a moment.
  for (int i = 0; i < 200 && testing::state_of(child.pid()) != 'T'; ++i) ::usleep(5000);
  EXPECT_EQ(testing::state_of(child.pid()), 'T');
  ::usleep(50000);
  EXPECT_EQ(testing::state_of(child.pid()), 'T') << "it must stay stopped";
  EXPECT_UNTRACED(child.pid());
  // Still stopped, it holds its own fds and the restored one, and nothing of the agent: no socket
  // at some number, no mapping (an agent left to return by itself would wait for the SIGCONT, then
  // close its socket's number, which a later restore may have filled).
  std::vector<std::string> fds_after = fd_links(child.pid());
  ASSERT_EQ(fds_after.size(), fds_before.size());
  for (const std::string& l : fds_after) EXPECT_EQ(l.find("socket:"), std::string::npos) << l;
  std::ifstream maps(fmt::format("/proc/{}/maps", child.pid()));
  std::string line;
  while (std::getline(maps, line)) EXPECT_EQ(line.find("pipecr"), std::string::npos) << line;
  ::kill(child.pid(), SIGCONT);
  EXPECT_EQ(child.finish(), "");
}

// --- FIFOs -----------------------------------------------------------------------------------

struct TempDir {
  std::string path;
  TempDir() {
    char t[] = "/tmp/pipecr-restore-test-XXXXXX";
    path = ::mkdtemp(t);
  }
  ~TempDir() { (void)!::system(fmt::format("rm -rf '{}'", path).c_str()); }
};

TEST(RestoreProcess, FifoReadWriteAndReadWriteOpens) {
  TempDir dir;
  std::string path = dir.path + "/f";
  ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0);
  ImageBuilder b;
  b.process(kRec);
  auto p = b.pipe({{"fifo-data", false}}, 65536, PipeKind::fifo, path);
  b.fd(kRec, 11, b.file(p, O_RDONLY | O_NONBLOCK)).fd(kRec, 12, b.file(p, O_WRONLY)).fd(kRec, 13, b.file(p, O_RDWR));
  Image img = b.parsed();
  Scenario child([] { testing::dev_null_at({11, 12, 13}); },
                 [path]() -> std::string {
                   struct stat a {}, f {};
                   ::stat(path.c_str(), &f);
                   for (int fd : {11, 12, 13})
                     if (::fstat(fd, &a) != 0 || a.st_ino != f.st_ino) return fmt::format("fd {} is not the FIFO", fd);
                   if (auto e = flags_is(11, O_ACCMODE | O_NONBLOCK, O_RDONLY | O_NONBLOCK); !e.empty()) return e;
                   if (auto e = flags_is(12, O_ACCMODE | O_NONBLOCK, O_WRONLY); !e.empty()) return e;
                   if (auto e = flags_is(13, O_ACCMODE, O_RDWR); !e.empty()) return e;
                   return testing::expect_bytes(11, "fifo-data");
                 });
  ASSERT_TRUE(child.ready());
  auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt});
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_EQ(child.finish(), "");
}

TEST(RestoreProcess, UnlinkedFifoIsAFifoWithoutAName) {
  ImageBuilder b;
  b.process(kRec);
  auto p = b.pipe({{"gone", false}}, 65536, PipeKind::fifo, "/nonexistent/fifo", true);
  b.fd(kRec, 11, b.file(p, O_RDONLY)).fd(kRec, 12, b.file(p, O_WRONLY));
  Image img = b.parsed();
  Scenario child([] { testing::dev_null_at({11, 12}); },
                 []() -> std::string {
                   struct stat st {};
                   if (::fstat(11, &st) != 0 || !S_ISFIFO(st.st_mode) || st.st_nlink != 0) return "not an unlinked FIFO";
                   return testing::expect_bytes(11, "gone");
                 });
  ASSERT_TRUE(child.ready());
  auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt});
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_EQ(child.finish(), "");
}

TEST(RestoreProcess, MissingFifoNeedsCreateFifos) {
  TempDir dir;
  std::string path = dir.path + "/missing";
  ImageBuilder b;
  b.process(kRec);
  auto p = b.pipe({{"m", false}}, 65536, PipeKind::fifo, path);
  b.fd(kRec, 11, b.file(p, O_RDONLY));
  Image img = b.parsed();
  Scenario child([] { testing::dev_null_at({11}); },
                 [] { return testing::is_dev_null(11) ? std::string() : std::string("fd 11 changed"); });
  ASSERT_TRUE(child.ready());
  auto no = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt});
  ASSERT_FALSE(no);
  EXPECT_EQ(no.error().kind, Errc::not_found) << no.error().what;
  EXPECT_EQ(child.finish(), "");

  Scenario again([] { testing::dev_null_at({11}); }, [] { return testing::expect_bytes(11, "m"); });
  ASSERT_TRUE(again.ready());
  ProcessRestoreOptions opts;
  opts.create_fifos = true;
  auto yes = restore_processes(img, {{{again.pid(), kRec}}, std::nullopt}, opts);
  ASSERT_TRUE(yes) << yes.error().what;
  struct stat st {};
  ASSERT_EQ(::lstat(path.c_str(), &st), 0);
  EXPECT_TRUE(S_ISFIFO(st.st_mode));
  EXPECT_EQ(again.finish(), "");
}

TEST(RestoreProcess, PathThatIsNotAFifoIsRefused) {
  TempDir dir;
  std::string path = dir.path + "/regular";
  ::close(::open(path.c_str(), O_CREAT | O_WRONLY, 0600));
  std::string link = dir.path + "/link";
  std::string fifo = dir.path + "/fifo";
  ::mkfifo(fifo.c_str(), 0600);
  ASSERT_EQ(::symlink(fifo.c_str(), link.c_str()), 0);
  for (const std::string& where : {path, link}) {
    ImageBuilder b;
    b.process(kRec);
    auto p = b.pipe({}, 65536, PipeKind::fifo, where);
    b.fd(kRec, 11, b.file(p, O_RDONLY));
    Image img = b.parsed();
    Scenario child([] { testing::dev_null_at({11}); }, [] { return testing::is_dev_null(11) ? "" : "changed"; });
    ASSERT_TRUE(child.ready());
    auto r = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt});
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().kind, Errc::unsupported) << r.error().what;
    EXPECT_EQ(child.finish(), "");
  }
}

// A record in b for the FIFO at path as a dump records it: its device and inode, on this boot (what
// tells the restore that a target may hold that very FIFO).
uint64_t the_fifo(ImageBuilder& b, const std::string& path, std::vector<std::pair<std::string, bool>> slots,
                  uint32_t capacity) {
  struct stat f {};
  if (::stat(path.c_str(), &f) != 0 || !S_ISFIFO(f.st_mode)) throw std::runtime_error("no FIFO at " + path);
  uint64_t p = b.pipe(std::move(slots), capacity, PipeKind::fifo, path);
  b.raw().pipes.back().dev = f.st_dev;
  b.raw().pipes.back().inode = f.st_ino;
  b.raw().info.boot_id = image::boot_id();
  return p;
}

// A FIFO that only the target holds, with bytes queued in it since the dump: a replacement opens
// the same FIFO, whose buffer stays while the target holds it, so --replace is refused, saying the
// bytes are the target's own (not "another process"), and nothing changes; without --replace it is
// refilled in place.
TEST(RestoreProcess, FifoWithBytesHeldOnlyByTheTargetIsRefilledInPlaceNotReplaced) {
  TempDir dir;
  std::string path = dir.path + "/f";
  ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0);
  ImageBuilder b;
  b.process(kRec);
  auto p = the_fifo(b, path, {{"recorded", false}}, 65536);
  b.fd(kRec, 11, b.file(p, O_RDWR));
  Image img = b.parsed();
  Scenario child(
      [path] {
        int fd = ::open(path.c_str(), O_RDWR);
        ::dup2(fd, 11);
        ::close(fd);
        (void)!::write(11, "live", 4);
      },
      [] { return testing::expect_bytes(11, "recorded"); });
  ASSERT_TRUE(child.ready());
  ProcessRestoreOptions replace;
  replace.replace = true;
  auto r = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt}, replace);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().kind, Errc::unsupported) << r.error().what;
  EXPECT_NE(r.error().what.find(fmt::format("already holds 4 bytes: target {} itself holds it (fd 11)", child.pid())),
            std::string::npos)
      << r.error().what;
  EXPECT_EQ(r.error().what.find("another process"), std::string::npos) << r.error().what;
  EXPECT_UNTRACED(child.pid());
  int queued = -1;
  {
    int fd = ::open(fmt::format("/proc/{}/fd/11", child.pid()).c_str(), O_RDWR | O_NONBLOCK | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    ::ioctl(fd, FIONREAD, &queued);
    ::close(fd);
  }
  EXPECT_EQ(queued, 4);  // the target's bytes, untouched
  auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt});
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_EQ(sum->in_place, 1u);
  EXPECT_UNTRACED(child.pid());
  EXPECT_EQ(child.finish(), "");
}

// A replaced FIFO (--replace) that the target itself holds, empty: the FIFO keeps one buffer while
// the target has it open, so the recorded bytes and capacity may go into it only while the targets
// are stopped. A restore that fails after the build (a second target gone: at the seize, or after
// the swap inside the stop) leaves the FIFO empty, at its capacity, and the target's fd 11 the
// description it had (fd 12, a dup of it the image does not record, is the witness); one that
// succeeds gives fd 11 a new description with the recorded flags, and the FIFO the recorded bytes
// and capacity.
TEST(RestoreProcess, ReplacedFifoTheTargetHoldsIsFilledInsideTheStop) {
  TempDir dir;
  std::string path = dir.path + "/f";
  ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0);
  ImageBuilder b;
  b.process(kRec).process(kRec2);
  auto p = the_fifo(b, path, {{"recorded", false}}, 16384);
  b.fd(kRec, 11, b.file(p, O_RDWR | O_NONBLOCK));
  b.fd(kRec2, 13, b.file(b.pipe({{"x", false}}), O_RDONLY));
  Image img = b.parsed();
  auto holds_fifo = [path] {
    int fd = ::open(path.c_str(), O_RDWR);
    ::dup2(fd, 11);
    ::dup2(fd, 12);
    ::close(fd);
  };
  auto queued_in = [](int fd) {
    int n = -1;
    return ::ioctl(fd, FIONREAD, &n) == 0 ? n : -1;
  };
  for (Stage when : {Stage::built, Stage::stashed}) {
    SCOPED_TRACE(when == Stage::built ? "second target killed once built" : "second target killed once stashed");
    Scenario child(holds_fifo, [queued_in]() -> std::string {
      if (!testing::same_file(11, 12)) return "fd 11 is no longer the description it was";
      if (auto e = flags_is(11, O_ACCMODE | O_NONBLOCK, O_RDWR); !e.empty()) return e;
      if (::fcntl(11, F_GETPIPE_SZ) != 65536) return fmt::format("capacity {}, want 65536", ::fcntl(11, F_GETPIPE_SZ));
      if (int n = queued_in(11); n != 0) return fmt::format("the FIFO holds {} bytes, want 0", n);
      return "";
    });
    Scenario victim([] {}, [] { return std::string(); });
    ASSERT_TRUE(child.ready() && victim.ready());
    int queued_at_built = -1;
    ProcessRestoreOptions opts;
    opts.replace = true;
    opts.hook = [&](Stage s) {
      if (s == Stage::built) {
        int fd = ::open(fmt::format("/proc/{}/fd/12", child.pid()).c_str(), O_RDWR | O_NONBLOCK | O_CLOEXEC);
        queued_at_built = fd < 0 ? -2 : queued_in(fd);
        if (fd >= 0) ::close(fd);
      }
      if (s == when) ::kill(victim.pid(), SIGKILL);
    };
    auto r = restore_processes(img, {{{child.pid(), kRec}, {victim.pid(), kRec2}}, std::nullopt}, opts);
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().kind, Errc::gone) << r.error().what;
    EXPECT_EQ(queued_at_built, 0);  // nothing goes into the target's FIFO before the stop
    EXPECT_UNTRACED(child.pid());
    EXPECT_EQ(child.finish(), "");
  }
  Scenario child(holds_fifo, [queued_in]() -> std::string {
    if (testing::same_file(11, 12)) return "fd 11 is still the description it was, not a new one";
    if (auto e = flags_is(11, O_ACCMODE | O_NONBLOCK, O_RDWR | O_NONBLOCK); !e.empty()) return e;
    if (::fcntl(11, F_GETPIPE_SZ) != 16384) return fmt::format("capacity {}, want 16384", ::fcntl(11, F_GETPIPE_SZ));
    if (int n = queued_in(12); n != 8) return fmt::format("the FIFO holds {} bytes, want 8", n);
    return testing::expect_bytes(11, "recorded");
  });
  ASSERT_TRUE(child.ready());
  ImageBuilder one;
  one.process(kRec);
  auto q = the_fifo(one, path, {{"recorded", false}}, 16384);
  one.fd(kRec, 11, one.file(q, O_RDWR | O_NONBLOCK));
  Image img1 = one.parsed();
  ProcessRestoreOptions replace;
  replace.replace = true;
  auto sum = restore_processes(img1, {{{child.pid(), kRec}}, std::nullopt}, replace);
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_EQ(sum->in_place, 0u);
  ASSERT_EQ(sum->outcomes.size(), 1u);
  EXPECT_EQ(sum->outcomes[0].why, "--replace");
  EXPECT_UNTRACED(child.pid());
  EXPECT_EQ(child.finish(), "");
}

// --- failures: every target as it was ----------------------------------------------------------

TEST(RestoreProcess, FdLimitTooLowLeavesTargetUnchanged) {
  ImageBuilder b;
  b.process(kRec);
  auto p = b.pipe({{"x", false}});
  b.fd(kRec, 11, b.file(p, O_RDONLY)).fd(kRec, 12, b.file(p, O_WRONLY));
  Image img = b.parsed();
  Scenario child(
      [] {
        testing::dev_null_at({11});
        rlimit rl{12, 12};  // fd 12 cannot be installed: it is not below the limit
        ::setrlimit(RLIMIT_NOFILE, &rl);
      },
      []() -> std::string {
        if (!testing::is_dev_null(11)) return "fd 11 is no longer /dev/null";
        if (::fcntl(12, F_GETFD) != -1) return "fd 12 was opened";
        return "";
      });
  ASSERT_TRUE(child.ready());
  auto r = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().err, EMFILE) << r.error().what;
  EXPECT_NE(r.error().what.find(fmt::format("target {}", child.pid())), std::string::npos) << r.error().what;
  EXPECT_UNTRACED(child.pid());
  EXPECT_EQ(child.finish(), "");
}

// Two recorded processes on one pipe: kRec reads it at fd 11, kRec2 writes it at fd 12. (The
// image parsed from the builder reads the builder's bytes: the builder must outlive it.)
ImageBuilder two_targets_one_pipe() {
  ImageBuilder b;
  b.process(kRec).process(kRec2);
  auto p = b.pipe({{"x", false}});
  b.fd(kRec, 11, b.file(p, O_RDONLY)).fd(kRec2, 12, b.file(p, O_WRONLY));
  return b;
}

// A target holding /dev/null at fd, which must still hold it at the end (a failed restore changes
// nothing).
Scenario dev_null_target(int fd) {
  return Scenario([fd] { testing::dev_null_at({fd}); },
                  [fd]() -> std::string { return testing::is_dev_null(fd) ? "" : fmt::format("fd {} is no longer /dev/null", fd); });
}

TEST(RestoreProcess, TargetDyingHalfWayRollsBackTheOthers) {
  ImageBuilder b = two_targets_one_pipe();
  Image img = b.parsed();
  Scenario a = dev_null_target(11);
  Scenario victim([] {}, [] { return std::string(); });
  ASSERT_TRUE(a.ready() && victim.ready());
  ProcessRestoreOptions opts;
  opts.hook = [&](Stage s) {
    if (s == Stage::stashed) ::kill(victim.pid(), SIGKILL);
  };
  auto r = restore_processes(img, {{{a.pid(), kRec}, {victim.pid(), kRec2}}, std::nullopt}, opts);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().kind, Errc::gone) << r.error().what;
  EXPECT_UNTRACED(a.pid());
  EXPECT_EQ(a.finish(), "");
}

// A target whose seccomp filter would kill it for a call pipecr's agent makes there (socketpair())
// is refused before anything is done in any target: the restore fails (Errc::unsupported, the
// filter's verdict named), both targets keep their fds, live on and are not traced.
TEST(RestoreProcess, ASeccompFilterThatWouldKillTheAgentRefusesTheRestore) {
  ImageBuilder b = two_targets_one_pipe();
  Image img = b.parsed();
  Scenario a = dev_null_target(11);
  Scenario filtered(
      [] {
        testing::dev_null_at({12});
        sock_filter f[] = {BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
                           BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_socketpair, 0, 1),
                           BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
                           BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
        sock_fprog prog{4, f};
        if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 || ::syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0)
          ::_exit(7);
      },
      []() -> std::string { return testing::is_dev_null(12) ? "" : "fd 12 is no longer /dev/null"; });
  ASSERT_TRUE(a.ready() && filtered.ready());
  auto r = restore_processes(img, {{{a.pid(), kRec}, {filtered.pid(), kRec2}}, std::nullopt});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().kind, Errc::unsupported) << r.error().what;
  EXPECT_NE(r.error().what.find("seccomp filter would kill the process for socketpair()"), std::string::npos)
      << r.error().what;
  EXPECT_UNTRACED(a.pid());
  EXPECT_UNTRACED(filtered.pid());
  EXPECT_EQ(a.finish(), "");
  EXPECT_EQ(filtered.finish(), "");
}

TEST(RestoreProcess, DeadTargetIsGone) {
  ImageBuilder b;
  b.process(kRec);
  b.fd(kRec, 11, b.file(b.pipe({}), O_RDONLY));
  Image img = b.parsed();
  pid_t dead = ::fork();
  if (dead == 0) ::_exit(0);
  ::waitpid(dead, nullptr, 0);
  auto r = restore_processes(img, {{{dead, kRec}}, std::nullopt});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().kind, Errc::gone) << r.error().what;
}

// A target that exits (and is reaped) once the plan is made, before its limits are read from
// /proc: gone, as at any later step (not a "no such file" about /proc/PID/limits).
TEST(RestoreProcess, TargetGoneBeforeItsLimitsAreReadIsGone) {
  ImageBuilder b;
  b.process(kRec);
  b.fd(kRec, 11, b.file(b.pipe({{"x", false}}), O_RDONLY));
  Image img = b.parsed();
  pid_t target = ::fork();
  if (target == 0) {
    ::pause();
    ::_exit(0);
  }
  ProcessRestoreOptions opts;
  opts.hook = [&](Stage s) {
    if (s != Stage::planned) return;
    ::kill(target, SIGKILL);
    ::waitpid(target, nullptr, 0);  // reaped: its /proc directory is gone
  };
  auto r = restore_processes(img, {{{target, kRec}}, std::nullopt}, opts);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().kind, Errc::gone) << r.error().what;
  EXPECT_NE(r.error().what.find("is gone"), std::string::npos) << r.error().what;
}

TEST(RestoreProcess, UnknownRecordedPidIsABadArgument) {
  ImageBuilder b;
  b.process(kRec).process(kRec2);
  b.fd(kRec, 11, b.file(b.pipe({}), O_RDONLY));
  Image img = b.parsed();
  Scenario child([] {}, [] { return std::string(); });
  auto r = restore_processes(img, {{{child.pid(), 7}}, std::nullopt});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().kind, Errc::invalid_argument);
  auto r2 = restore_processes(img, {{{child.pid(), std::nullopt}}, std::nullopt});
  ASSERT_FALSE(r2);
  EXPECT_EQ(r2.error().kind, Errc::invalid_argument) << r2.error().what;
}

TEST(RestoreProcess, NotAllowedToPtraceIsPermission) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to run a target of another user";
  ImageBuilder b;
  b.process(kRec);
  b.fd(kRec, 11, b.file(b.pipe({{"p", false}}), O_RDONLY));
  Image img = b.parsed();
  Scenario target([] { testing::dev_null_at({11}); }, [] { return testing::is_dev_null(11) ? "" : "changed"; });
  ASSERT_TRUE(target.ready());
  pid_t tool = ::fork();
  if (tool == 0) {
    if (::setresgid(65534, 65534, 65534) != 0 || ::setresuid(65534, 65534, 65534) != 0) ::_exit(100);
    auto r = restore_processes(img, {{{target.pid(), kRec}}, std::nullopt});
    ::_exit(r ? 101 : static_cast<int>(r.error().kind));
  }
  int status = 0;
  ::waitpid(tool, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), static_cast<int>(Errc::permission));
  EXPECT_UNTRACED(target.pid());
  EXPECT_EQ(target.finish(), "");
}

// --- exec ------------------------------------------------------------------------------------

TEST(RestoreProcess, ExecCommandReadsTheRestoredPipe) {
  ImageBuilder b;
  b.process(kRec);
  auto p = b.pipe({{"from the image\n", false}});
  b.fd(kRec, 11, b.file(p, O_RDONLY));
  Image img = b.parsed();
  int out[2];
  ASSERT_EQ(::pipe2(out, O_CLOEXEC), 0);
  pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(out[1], 1);
    ExecSpec ex{kRec, {"bash", "-c", "cat <&11"}};
    auto r = restore_processes(img, {{}, ex});
    ::_exit(r ? 98 : 99);
  }
  ::close(out[1]);
  std::string got;
  char buf[256];
  for (ssize_t n; (n = ::read(out[0], buf, sizeof buf)) > 0;) got.append(buf, static_cast<size_t>(n));
  ::close(out[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  EXPECT_EQ(got, "from the image\n");  // and EOF: no copy of the write end leaked into the command
}

TEST(RestoreProcess, ExecPlusIntoConnectsThePipe) {
  ImageBuilder b;
  b.process(kRec).process(kRec2);
  auto p = b.pipe({{"in flight;", false}});
  b.fd(kRec, 11, b.file(p, O_RDONLY)).fd(kRec2, 12, b.file(p, O_WRONLY));
  Image img = b.parsed();
  Scenario producer([] { testing::dev_null_at({12}); },
                    []() -> std::string { return ::write(12, "next", 4) == 4 ? "" : "write"; });
  ASSERT_TRUE(producer.ready());
  int out[2];
  ASSERT_EQ(::pipe2(out, O_CLOEXEC), 0);
  pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(out[1], 1);
    ExecSpec shell{kRec, {"bash", "-c", "exec cat <&11"}};
    auto r = restore_processes(img, {{{producer.pid(), kRec2}}, shell});
    ::_exit(r ? 98 : 99);
  }
  ::close(out[1]);
  std::string got;
  char buf[256];
  // Read what was in flight (the command runs: the targets were committed and let go), then let the
  // producer write; cat ends at EOF when the producer exits.
  ssize_t n = ::read(out[0], buf, sizeof buf);
  got.append(buf, n > 0 ? static_cast<size_t>(n) : 0);
  EXPECT_UNTRACED(producer.pid());  // only now: cat printing means the restore is done
  EXPECT_EQ(producer.finish(), "");
  for (; (n = ::read(out[0], buf, sizeof buf)) > 0;) got.append(buf, static_cast<size_t>(n));
  ::close(out[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  EXPECT_EQ(got, "in flight;next");
}

TEST(RestoreProcess, ExecOfAMissingCommandFailsBeforeAnythingIsDone) {
  ImageBuilder b;
  b.process(kRec);
  b.fd(kRec, 11, b.file(b.pipe({}), O_RDONLY));
  Image img = b.parsed();
  auto r = restore_processes(img, {{}, ExecSpec{kRec, {"pipecr-no-such-command-xyz"}}});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().kind, Errc::invalid_argument);
  EXPECT_EQ(::fcntl(11, F_GETFD), -1);
}

}  // namespace
}  // namespace pipecr::restore

namespace pipecr::restore {
namespace {

size_t agent_mappings(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/maps", pid));
  std::string line;
  size_t n = 0;
  while (std::getline(in, line)) n += line.find("pipecr-agent") != std::string::npos;
  return n;
}

// pipecr killed right after the commit store (its agent has installed and is parked, waiting to be
// taken back): the target keeps the restored pipe and goes on by itself; a new restore into it while
// the old agent is still parked works too, and takes its own agent back.
TEST(RestoreProcess, PipecrKilledAfterTheCommitLeavesTheTargetRestored) {
  ImageBuilder first, second;
  first.process(kRec);
  first.fd(kRec, 11, first.file(first.pipe({{"first", false}}), O_RDONLY));
  second.process(kRec);
  second.fd(kRec, 11, second.file(second.pipe({{"second", false}}), O_RDONLY));
  Image img1 = first.parsed(), img2 = second.parsed();
  Scenario child([] { testing::dev_null_at({11}); }, [] { return testing::expect_bytes(11, "second"); });
  ASSERT_TRUE(child.ready());
  const pid_t target = child.pid();
  pid_t pipecr = ::fork();
  if (pipecr == 0) {
    ProcessRestoreOptions opts;
    opts.hook = [](Stage s) {
      if (s == Stage::committed) ::raise(SIGKILL);
    };
    (void)restore_processes(img1, {{{target, kRec}}, std::nullopt}, opts);
    ::_exit(3);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pipecr, &status, 0), pipecr);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << status;
  EXPECT_UNTRACED(target);
  {
    char link[256] = {};
    ssize_t n = ::readlink(fmt::format("/proc/{}/fd/11", target).c_str(), link, sizeof link - 1);
    EXPECT_EQ(std::string(link, n > 0 ? static_cast<size_t>(n) : 0).rfind("pipe:", 0), 0u) << link;
  }
  // Again, at once (the first agent waits up to 2 s to be taken back before it returns by itself).
  auto sum = restore_processes(img2, {{{target, kRec}}, std::nullopt});
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_UNTRACED(target);
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));  // the first agent has returned
  EXPECT_LE(agent_mappings(target), 1u);  // the orphan's mapping (if the kernel names anonymous VMAs)
  EXPECT_EQ(child.finish(), "");
}

}  // namespace
}  // namespace pipecr::restore
