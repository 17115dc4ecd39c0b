// pipe_state_test.cpp: per-end state (flags, owner, signal, FD_CLOEXEC), fd numbers, FIFOs,
// refusals, and the C API's contract: a failed restore changes no fd of the caller.
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <linux/magic.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include <gtest/gtest.h>

#include "image/image_io.hpp"
#include "pipecr/pipe.hpp"
#include "pipecr/pipecr.h"
#include "sys/unique_fd.hpp"
#include "unit/api/pipe_helpers.hpp"

namespace pipecr {
namespace {

using sys::UniqueFd;
using namespace pipecr::testing;

std::vector<std::byte> ckpt(int fd) {
  size_t need = 0;
  long r = pipecr_ckpoint_pipe(fd, nullptr, 0, &need);
  EXPECT_EQ(r, -ENOSPC);
  std::vector<std::byte> img(need);
  r = pipecr_ckpoint_pipe(fd, img.data(), img.size(), nullptr);
  EXPECT_EQ(r, static_cast<long>(need)) << pipecr_strerror(static_cast<int>(r));
  return img;
}

ino_t inode_of(int fd) {
  struct stat st {};
  fstat(fd, &st);
  return st.st_ino;
}

TEST(State, StatusFlagsOwnerSignalCloexec) {
  int fds[2];
  ASSERT_EQ(pipe2(fds, O_CLOEXEC), 0);
  UniqueFd r(fds[0]), w(fds[1]);
  ASSERT_EQ(fcntl(r.get(), F_SETFL, O_NONBLOCK | O_DIRECT), 0);
  f_owner_ex own{F_OWNER_TID, static_cast<pid_t>(syscall(SYS_gettid))};
  ASSERT_EQ(fcntl(r.get(), F_SETOWN_EX, &own), 0);
  ASSERT_EQ(fcntl(r.get(), F_SETSIG, SIGRTMIN + 2), 0);
  write(w.get(), "hi", 2);
  auto img = ckpt(r.get());
  int out[2] = {-1, -1};
  ASSERT_EQ(pipecr_restore_pipe(out, img.data(), img.size()), 0);
  UniqueFd rr(out[0]), rw(out[1]);
  EXPECT_EQ(fcntl(rr.get(), F_GETFL) & (O_NONBLOCK | O_DIRECT | O_ACCMODE), O_NONBLOCK | O_DIRECT | O_RDONLY);
  EXPECT_EQ(fcntl(rw.get(), F_GETFL) & (O_NONBLOCK | O_DIRECT | O_ACCMODE), O_WRONLY);
  f_owner_ex got{};
  ASSERT_EQ(fcntl(rr.get(), F_GETOWN_EX, &got), 0);
  EXPECT_EQ(got.type, F_OWNER_TID);
  EXPECT_EQ(got.pid, own.pid);
  EXPECT_EQ(fcntl(rr.get(), F_GETSIG), SIGRTMIN + 2);
  EXPECT_EQ(fcntl(rr.get(), F_GETFD), FD_CLOEXEC);
  EXPECT_EQ(fcntl(rw.get(), F_GETFD), FD_CLOEXEC);  // the caller's other end was recorded too
  // Without the other end held, the restored write end is as pipe() makes it.
  w.reset();
  auto img2 = ckpt(r.get());
  int out2[2] = {-1, -1};
  ASSERT_EQ(pipecr_restore_pipe(out2, img2.data(), img2.size()), 0);
  UniqueFd rr2(out2[0]), rw2(out2[1]);
  EXPECT_EQ(fcntl(rw2.get(), F_GETFD), 0);
  EXPECT_EQ(fcntl(rw2.get(), F_GETFL) & (O_NONBLOCK | O_DIRECT), 0);
}

// SIGIO carries si_fd = the fd number at the moment O_ASYNC was set: it must be the final number.
TEST(State, AsyncSignalNamesTheFinalFd) {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  UniqueFd r(fds[0]), w(fds[1]);
  int sig = SIGRTMIN + 3;
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, sig);
  ASSERT_EQ(pthread_sigmask(SIG_BLOCK, &set, nullptr), 0);
  f_owner_ex own{F_OWNER_TID, static_cast<pid_t>(syscall(SYS_gettid))};
  ASSERT_EQ(fcntl(r.get(), F_SETOWN_EX, &own), 0);
  ASSERT_EQ(fcntl(r.get(), F_SETSIG, sig), 0);
  ASSERT_EQ(fcntl(r.get(), F_SETFL, O_ASYNC), 0);
  auto img = ckpt(r.get());
  int out[2] = {77, 78};
  ASSERT_EQ(pipecr_restore_pipe(out, img.data(), img.size()), 0);
  UniqueFd rr(out[0]), rw(out[1]);
  ASSERT_EQ(out[0], 77);
  EXPECT_TRUE(fcntl(rr.get(), F_GETFL) & O_ASYNC);
  ASSERT_EQ(write(rw.get(), "x", 1), 1);
  timespec ts{5, 0};
  siginfo_t si{};
  ASSERT_EQ(sigtimedwait(&set, &si, &ts), sig);
  EXPECT_EQ(si.si_fd, 77);
  r.reset();  // stop the original's signals before unblocking
  rr.reset();
  timespec zero{0, 0};
  while (sigtimedwait(&set, &si, &zero) == sig) {
  }
  pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
}

TEST(State, RequestedNumbersReplaceWhatIsOpen) {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  UniqueFd r(fds[0]), w(fds[1]);
  write(w.get(), "data", 4);
  auto img = ckpt(w.get());
  UniqueFd null(open("/dev/null", O_RDONLY));
  ASSERT_EQ(dup2(null.get(), 60), 60);
  int out[2] = {60, 61};
  ASSERT_EQ(pipecr_restore_pipe(out, img.data(), img.size()), 0);
  UniqueFd rr(out[0]), rw(out[1]);
  EXPECT_EQ(out[0], 60);
  EXPECT_EQ(out[1], 61);
  EXPECT_EQ(drain(60), "data");
  char c;
  EXPECT_EQ(write(61, "z", 1), 1);
  EXPECT_EQ(read(60, &c, 1), 1);
}

TEST(State, FailedRestoreChangesNoFd) {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  UniqueFd r(fds[0]), w(fds[1]);
  write(w.get(), "data", 4);
  auto img = ckpt(r.get());
  UniqueFd null(open("/dev/null", O_RDONLY));
  ASSERT_EQ(dup2(null.get(), 62), 62);
  UniqueFd keep62(62);
  ino_t before = inode_of(62);
  auto bad = img;
  bad[bad.size() / 2] ^= std::byte{0x10};
  int out[2] = {62, 63};
  EXPECT_EQ(pipecr_restore_pipe(out, bad.data(), bad.size()), -EBADMSG);
  EXPECT_EQ(inode_of(62), before);
  EXPECT_EQ(fcntl(63, F_GETFD), -1);
  EXPECT_EQ(out[0], 62);
  // Same fd twice, negative numbers, a number past RLIMIT_NOFILE: EINVAL, nothing changed.
  int same[2] = {62, 62};
  EXPECT_EQ(pipecr_restore_pipe(same, img.data(), img.size()), -EINVAL);
  int huge[2] = {-1, 1 << 30};
  EXPECT_EQ(pipecr_restore_pipe(huge, img.data(), img.size()), -EINVAL);
  int neg[2] = {-5, -1};
  EXPECT_EQ(pipecr_restore_pipe(neg, img.data(), img.size()), -EINVAL);
  EXPECT_EQ(inode_of(62), before);
}

TEST(State, NotAPipeIsRefused) {
  UniqueFd file(open("/dev/null", O_RDONLY));
  EXPECT_EQ(pipecr_ckpoint_pipe(file.get(), nullptr, 0, nullptr), -ENOTSUP);
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  UniqueFd a(sv[0]), b(sv[1]);
  EXPECT_EQ(pipecr_ckpoint_pipe(a.get(), nullptr, 0, nullptr), -ENOTSUP);
  UniqueFd dir(open("/tmp", O_RDONLY | O_DIRECTORY));
  EXPECT_EQ(pipecr_ckpoint_pipe(dir.get(), nullptr, 0, nullptr), -ENOTSUP);
  EXPECT_EQ(pipecr_ckpoint_pipe(9999, nullptr, 0, nullptr), -EBADF);
  auto err = checkpoint_pipe(file.get());
  ASSERT_FALSE(err);
  EXPECT_NE(err.error().what.find("not a pipe"), std::string::npos) << err.error().what;
}

TEST(State, NotificationPipeIsRefused) {
  int fds[2];
  if (pipe2(fds, O_EXCL /* O_NOTIFICATION_PIPE */) < 0)
    GTEST_SKIP() << "kernel without notification pipes (CONFIG_WATCH_QUEUE): pipe2(O_NOTIFICATION_PIPE) -> "
                 << strerror(errno);
  UniqueFd r(fds[0]), w(fds[1]);
  EXPECT_EQ(pipecr_ckpoint_pipe(r.get(), nullptr, 0, nullptr), -ENOTSUP);
}

TEST(State, BufferTooSmall) {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  UniqueFd r(fds[0]), w(fds[1]);
  write(w.get(), "0123456789", 10);
  size_t need = 0;
  ASSERT_EQ(pipecr_ckpoint_pipe(r.get(), nullptr, 0, &need), -ENOSPC);
  std::vector<char> small(need - 1);
  EXPECT_EQ(pipecr_ckpoint_pipe(r.get(), small.data(), small.size(), &need), -ENOSPC);
  EXPECT_EQ(pipecr_ckpoint_pipe(r.get(), nullptr, 5, nullptr), -EINVAL);
  EXPECT_EQ(queued(r.get()), 10);
}

TEST(State, FifoReadWriteAndUnlinked) {
  char dir[] = "/tmp/pipecr-test-XXXXXX";
  ASSERT_TRUE(mkdtemp(dir));
  std::string path = std::string(dir) + "/f";
  ASSERT_EQ(mkfifo(path.c_str(), 0620), 0);
  {
    UniqueFd rw(open(path.c_str(), O_RDWR));
    write(rw.get(), "fifo-bytes", 10);
    auto img = ckpt(rw.get());
    rw.reset();  // the FIFO's buffer is gone with its last end
    int out[2] = {-1, -1};
    ASSERT_EQ(pipecr_restore_pipe(out, img.data(), img.size()), 0) ;
    UniqueFd rr(out[0]), rwr(out[1]);
    struct statfs sfs {};
    fstatfs(rr.get(), &sfs);
    EXPECT_NE(sfs.f_type, PIPEFS_MAGIC);  // a FIFO, opened by its path
    EXPECT_EQ(fcntl(rr.get(), F_GETFL) & O_ACCMODE, O_RDWR);
    EXPECT_EQ(drain(rr.get()), "fifo-bytes");
  }
  {
    UniqueFd rw(open(path.c_str(), O_RDWR));
    write(rw.get(), "ghost", 5);
    unlink(path.c_str());
    auto img = ckpt(rw.get());
    int out[2] = {-1, -1};
    ASSERT_EQ(pipecr_restore_pipe(out, img.data(), img.size()), 0);
    UniqueFd rr(out[0]), rwr(out[1]);
    struct stat st {};
    fstat(rr.get(), &st);
    EXPECT_TRUE(S_ISFIFO(st.st_mode));
    EXPECT_EQ(st.st_nlink, 0u);
    EXPECT_EQ(drain(rr.get()), "ghost");
  }
  rmdir(dir);
}

TEST(State, CapacityAbovePipeMaxSize) {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  UniqueFd r(fds[0]), w(fds[1]);
  if (fcntl(w.get(), F_SETPIPE_SZ, 4 << 20) >= 0) GTEST_SKIP() << "CAP_SYS_RESOURCE present: 4 MiB is allowed";
  write(w.get(), "x", 1);
  auto img = checkpoint_pipe(r.get());
  ASSERT_TRUE(img);
  // An image that records 4 MiB, as made on a machine that allowed it.
  auto parsed = image::parse(*img);
  ASSERT_TRUE(parsed) << parsed.error().what;
  parsed->pipes[0].capacity = 4 << 20;
  auto big = image::encode(*parsed);
  ASSERT_TRUE(big);
  UniqueFd null(open("/dev/null", O_RDONLY));
  ASSERT_EQ(dup2(null.get(), 64), 64);
  UniqueFd keep64(64);
  ino_t before = inode_of(64);
  auto refused = restore_pipe(*big, 64, -1);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().kind, Errc::capacity);
  EXPECT_NE(refused.error().what.find("4194304"), std::string::npos) << refused.error().what;
  EXPECT_NE(refused.error().what.find("pipe-max-size"), std::string::npos) << refused.error().what;
  EXPECT_EQ(inode_of(64), before);
  int out[2] = {-1, -1};
  EXPECT_EQ(pipecr_restore_pipe(out, big->data(), big->size()), -EPERM);
  RestoreOptions opts;
  opts.allow_smaller_capacity = true;
  auto smaller = restore_pipe(*big, -1, -1, opts);
  ASSERT_TRUE(smaller) << smaller.error().what;
  UniqueFd sr(smaller->read_fd), sw(smaller->write_fd);
  EXPECT_EQ(fcntl(sr.get(), F_GETPIPE_SZ), 1 << 20);
  EXPECT_EQ(drain(sr.get()), "x");
}

}  // namespace
}  // namespace pipecr
