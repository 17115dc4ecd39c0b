// process_dump_test.cpp: dump real processes and check what the image says, and that the
// processes run on with their pipes exactly as they were (each child checks its own pipes after
// the dump and reports through its exit status).
#include <fcntl.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <thread>

#include <gtest/gtest.h>

#include "dump/process.hpp"
#include "image/image_io.hpp"
#include "dump_child.hpp"

namespace pipecr {
namespace {

using Child = testing::DumpChild;

void signal_ready(int fd) { close(fd); }

using testing::block_usr1;
using testing::expect_running;
using testing::state_of;
using testing::wait_usr1;

Expected<Image> dump(std::vector<pid_t> pids, bool tree, std::vector<std::byte>& bytes, bool leave_stopped = false) {
  image::MemorySink sink;
  dump::DumpOptions opts{.pids = std::move(pids), .tree = tree, .leave_stopped = leave_stopped};
  auto st = dump::dump_processes(opts, sink);
  if (!st) return tl::unexpected(st.error());
  bytes = std::move(sink.bytes());
  return image::parse(bytes);
}

const FdRecord* fd_of(const Image& img, pid_t pid, int fd) {
  for (const FdRecord& r : img.fds)
    if (r.pid == pid && r.fd == fd) return &r;
  return nullptr;
}

TEST(ProcessDump, BytesAndLayoutUnchangedForTheProcess) {
  Child c([](int ready) {
    block_usr1();
    int p[2];
    pipe(p);
    std::string data(100000, '\0');
    for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 7);
    fcntl(p[1], F_SETPIPE_SZ, 1 << 17);
    if (write(p[1], data.data(), data.size()) != static_cast<ssize_t>(data.size())) return 2;
    signal_ready(ready);
    wait_usr1();
    int q = 0;
    ioctl(p[0], FIONREAD, &q);
    if (q != static_cast<int>(data.size())) return 3;
    std::string back(data.size(), '\0');
    size_t got = 0;
    while (got < back.size()) got += static_cast<size_t>(read(p[0], &back[got], back.size() - got));
    return back == data ? 0 : 4;
  });
  ASSERT_TRUE(c.ready());
  std::vector<std::byte> bytes;
  auto img = dump({c.pid()}, false, bytes);
  ASSERT_TRUE(img) << img.error().what;
  expect_running(c.pid());
  ASSERT_EQ(img->pipes.size(), 1u);
  EXPECT_EQ(img->pipes[0].bytes(), 100000u);
  EXPECT_EQ(img->pipes[0].capacity, 1u << 17);
  EXPECT_EQ(img->pipes[0].data.size(), 100000u);
  EXPECT_EQ(static_cast<unsigned char>(img->pipes[0].data[3]), 21u);
  EXPECT_EQ(img->files.size(), 2u);
  ASSERT_EQ(img->processes.size(), 1u);
  EXPECT_EQ(img->processes[0].pid, c.pid());
  EXPECT_EQ(c.finish(), 0);
}

// pipe00: ends cross-wired between parent and child at fds 11 and 12, the child blocked in read().
TEST(ProcessDump, CrossWiredParentAndChildWithBlockedReader) {
  Child c([](int ready) {
    block_usr1();
    int a[2], b[2];
    pipe(a);
    pipe(b);
    pid_t kid = fork();
    if (kid == 0) {
      close(ready);
      dup2(a[0], 11);
      dup2(b[1], 12);
      for (int fd : {a[0], a[1], b[0], b[1]}) close(fd);
      char buf[16] = {};
      ssize_t n = read(11, buf, sizeof buf);  // blocked here during the dump
      if (n != 4 || memcmp(buf, "ping", 4) != 0) _exit(5);
      _exit(write(12, "pong", 4) == 4 ? 0 : 6);
    }
    dup2(b[0], 11);
    dup2(a[1], 12);
    for (int fd : {a[0], a[1], b[0], b[1]}) close(fd);
    usleep(100000);  // let the child block in read()
    signal_ready(ready);
    wait_usr1();
    if (write(12, "ping", 4) != 4) return 7;
    char buf[8] = {};
    if (read(11, buf, 4) != 4 || memcmp(buf, "pong", 4) != 0) return 8;
    int st = 0;
    waitpid(kid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 9;
  });
  ASSERT_TRUE(c.ready());
  std::vector<std::byte> bytes;
  auto img = dump({c.pid()}, true, bytes);
  ASSERT_TRUE(img) << img.error().what;
  ASSERT_EQ(img->processes.size(), 2u);
  pid_t kid = img->processes[1].pid;
  expect_running(c.pid());
  expect_running(kid);
  ASSERT_EQ(img->pipes.size(), 2u);
  const FdRecord* k11 = fd_of(*img, kid, 11);
  const FdRecord* p12 = fd_of(*img, c.pid(), 12);
  ASSERT_TRUE(k11 && p12);
  EXPECT_EQ(k11->blocked, Blocked::reading);
  EXPECT_EQ(p12->blocked, Blocked::none);
  // The child's fd 11 and the parent's fd 12 are the two ends of one pipe.
  EXPECT_EQ(img->find_file(k11->file_id)->pipe_id, img->find_file(p12->file_id)->pipe_id);
  EXPECT_NE(k11->file_id, p12->file_id);
  EXPECT_EQ(c.finish(), 0);
}

// pipe01/pipe02: an fd, a dup (one open file description) and a /proc reopen (another one).
TEST(ProcessDump, SharedAndSeparateOpenFiles) {
  Child c([](int ready) {
    block_usr1();
    int p[2];
    pipe(p);
    dup2(p[0], 20);
    dup2(p[0], 21);
    int re = open(("/proc/self/fd/" + std::to_string(p[0])).c_str(), O_RDONLY | O_NONBLOCK);
    dup2(re, 22);
    fcntl(p[1], F_SETFD, FD_CLOEXEC);
    signal_ready(ready);
    wait_usr1();
    return 0;
  });
  ASSERT_TRUE(c.ready());
  std::vector<std::byte> bytes;
  auto img = dump({c.pid()}, false, bytes);
  ASSERT_TRUE(img) << img.error().what;
  const FdRecord* f20 = fd_of(*img, c.pid(), 20);
  const FdRecord* f21 = fd_of(*img, c.pid(), 21);
  const FdRecord* f22 = fd_of(*img, c.pid(), 22);
  ASSERT_TRUE(f20 && f21 && f22);
  EXPECT_EQ(f20->file_id, f21->file_id);
  EXPECT_NE(f20->file_id, f22->file_id);
  EXPECT_EQ(img->find_file(f20->file_id)->pipe_id, img->find_file(f22->file_id)->pipe_id);
  EXPECT_TRUE(img->find_file(f22->file_id)->flags & O_NONBLOCK);
  EXPECT_FALSE(img->find_file(f20->file_id)->flags & O_NONBLOCK);
  int cloexec = 0;
  for (const FdRecord& r : img->fds) cloexec += r.cloexec;
  EXPECT_EQ(cloexec, 1);
  EXPECT_EQ(img->pipes.size(), 1u);
  EXPECT_EQ(c.finish(), 0);
}

TEST(ProcessDump, OnlyTheWriteEndHeld) {
  Child c([](int ready) {
    block_usr1();
    int p[2];
    pipe(p);
    (void)!write(p[1], "only-writer", 11);
    close(p[0]);
    signal_ready(ready);
    wait_usr1();
    // A write now must fail with EPIPE again: the dump's extra read end is gone.
    signal(SIGPIPE, SIG_IGN);
    return write(p[1], "x", 1) < 0 && errno == EPIPE ? 0 : 3;
  });
  ASSERT_TRUE(c.ready());
  std::vector<std::byte> bytes;
  auto img = dump({c.pid()}, false, bytes);
  ASSERT_TRUE(img) << img.error().what;
  ASSERT_EQ(img->pipes.size(), 1u);
  std::string data(reinterpret_cast<const char*>(img->pipes[0].data.data()), img->pipes[0].data.size());
  EXPECT_EQ(data, "only-writer");
  EXPECT_EQ(c.finish(), 0);
}

TEST(ProcessDump, TenThousandPipes) {
  constexpr int kPipes = 10000;
  Child c([](int ready) {
    block_usr1();
    rlimit rl{};
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    for (int i = 0; i < kPipes; ++i) {
      int p[2];
      if (pipe(p) != 0) return 2;
      char c = static_cast<char>(i);
      (void)!write(p[1], &c, 1);
      close(p[1]);  // hold read ends only: 10,000 fds
    }
    signal_ready(ready);
    wait_usr1();
    return 0;
  });
  ASSERT_TRUE(c.ready());
  rlimit rl{};
  getrlimit(RLIMIT_NOFILE, &rl);
  rlimit raised = rl;
  raised.rlim_cur = rl.rlim_max;
  setrlimit(RLIMIT_NOFILE, &raised);
  std::vector<std::byte> bytes;
  auto img = dump({c.pid()}, false, bytes);
  setrlimit(RLIMIT_NOFILE, &rl);
  ASSERT_TRUE(img) << img.error().what;
  EXPECT_EQ(img->pipes.size(), static_cast<size_t>(kPipes));
  EXPECT_EQ(img->fds.size(), static_cast<size_t>(kPipes));
  for (const PipeRecord& p : img->pipes) EXPECT_EQ(p.bytes(), 1u);
  expect_running(c.pid());
  EXPECT_EQ(c.finish(), 0);
}

// FIFOs: opened read-write, read-only before any writer (the "no writer yet" latch), and unlinked.
TEST(ProcessDump, FifosWithPathsAndReaderState) {
  char dir[] = "/tmp/pipecr-dump-XXXXXX";
  ASSERT_TRUE(mkdtemp(dir));
  std::string rw_path = std::string(dir) + "/rw", ro_path = std::string(dir) + "/ro",
              ghost_path = std::string(dir) + "/ghost";
  for (const auto& p : {rw_path, ro_path, ghost_path}) ASSERT_EQ(mkfifo(p.c_str(), 0640), 0);
  Child c([&](int ready) {
    block_usr1();
    int rw = open(rw_path.c_str(), O_RDWR);
    if (write(rw, "fifo-data", 9) != 9) return 2;
    int ro = open(ro_path.c_str(), O_RDONLY | O_NONBLOCK);  // no writer has ever come
    int ghost = open(ghost_path.c_str(), O_RDWR);
    if (write(ghost, "boo", 3) != 3) return 3;
    unlink(ghost_path.c_str());
    dup2(rw, 30);
    dup2(ro, 31);
    dup2(ghost, 32);
    signal_ready(ready);
    wait_usr1();
    char buf[16];
    return read(30, buf, sizeof buf) == 9 && read(32, buf, sizeof buf) == 3 ? 0 : 4;
  });
  ASSERT_TRUE(c.ready());
  std::vector<std::byte> bytes;
  auto img = dump({c.pid()}, false, bytes);
  ASSERT_TRUE(img) << img.error().what;
  std::map<int, const PipeRecord*> by_fd;
  std::map<int, const FileRecord*> file_by_fd;
  for (int fd : {30, 31, 32}) {
    const FdRecord* r = fd_of(*img, c.pid(), fd);
    ASSERT_TRUE(r) << fd;
    file_by_fd[fd] = img->find_file(r->file_id);
    by_fd[fd] = img->find_pipe(file_by_fd[fd]->pipe_id);
  }
  EXPECT_EQ(by_fd[30]->kind, PipeKind::fifo);
  EXPECT_EQ(by_fd[30]->path, rw_path);
  EXPECT_EQ(by_fd[30]->bytes(), 9u);
  EXPECT_EQ(by_fd[30]->mode, 0640u);
  EXPECT_FALSE(by_fd[30]->unlinked);
  EXPECT_EQ(file_by_fd[30]->flags & O_ACCMODE, static_cast<uint32_t>(O_RDWR));
  EXPECT_EQ(by_fd[31]->path, ro_path);
  EXPECT_EQ(file_by_fd[31]->fifo_reader, FifoReaderState::no_writer_yet);
  EXPECT_EQ(by_fd[32]->path, ghost_path);
  EXPECT_TRUE(by_fd[32]->unlinked);
  EXPECT_EQ(by_fd[32]->bytes(), 3u);
  EXPECT_EQ(c.finish(), 0);
  for (const auto& p : {rw_path, ro_path}) unlink(p.c_str());
  rmdir(dir);
}

// A FIFO reader without POLLHUP and no dumped writer: its latch state needs to know whether any
// process holds the FIFO for writing. The empty FIFO's tee says so (0 without a writer, EAGAIN with
// one), so no process's fd table is scanned; the full scan (--outside-holders) agrees.
TEST(ProcessDump, FifoReaderStateFromTheTeeWithoutAScan) {
  char dir[] = "/tmp/pipecr-dump-XXXXXX";
  ASSERT_TRUE(mkdtemp(dir));
  std::string lonely = std::string(dir) + "/lonely", fed = std::string(dir) + "/fed";
  for (const auto& p : {lonely, fed}) ASSERT_EQ(mkfifo(p.c_str(), 0600), 0);
  Child c([&](int ready) {
    block_usr1();
    int a = open(lonely.c_str(), O_RDONLY | O_NONBLOCK);  // no writer, ever
    int b = open(fed.c_str(), O_RDONLY | O_NONBLOCK);     // a writer outside the dump comes next
    dup2(a, 40);
    dup2(b, 41);
    signal_ready(ready);
    wait_usr1();
    return 0;
  });
  ASSERT_TRUE(c.ready());
  Child writer([&](int ready) {  // not dumped
    block_usr1();
    if (open(fed.c_str(), O_WRONLY | O_NONBLOCK) < 0) return 2;
    signal_ready(ready);
    wait_usr1();
    return 0;
  });
  ASSERT_TRUE(writer.ready());
  for (bool scan : {false, true}) {
    image::MemorySink sink;
    dump::DumpOptions opts{.pids = {c.pid()}};
    opts.outside_holders = scan;
    auto st = dump::dump_processes(opts, sink);
    ASSERT_TRUE(st) << st.error().what;
    auto img = image::parse(sink.bytes());
    ASSERT_TRUE(img) << img.error().what;
    const FileRecord* fa = img->find_file(fd_of(*img, c.pid(), 40)->file_id);
    const FileRecord* fb = img->find_file(fd_of(*img, c.pid(), 41)->file_id);
    EXPECT_EQ(img->find_pipe(fa->pipe_id)->path, lonely);
    EXPECT_EQ(fa->fifo_reader, FifoReaderState::no_writer_yet) << "scan " << scan;
    EXPECT_FALSE(img->find_pipe(fa->pipe_id)->outside_holders) << "scan " << scan;
    EXPECT_EQ(fb->fifo_reader, FifoReaderState::unknown) << "scan " << scan;
    EXPECT_TRUE(img->find_pipe(fb->pipe_id)->outside_holders) << "scan " << scan;
    EXPECT_EQ(st->outside_scans, scan ? 1u : 0u);
    EXPECT_EQ(st->fifo_writers_from_tee, scan ? 0u : 2u);
  }
  EXPECT_EQ(c.finish(), 0);
  EXPECT_EQ(writer.finish(), 0);
  for (const auto& p : {lonely, fed}) unlink(p.c_str());
  rmdir(dir);
}

TEST(ProcessDump, LeaveStopped) {
  Child c([](int ready) {
    block_usr1();
    signal_ready(ready);
    wait_usr1();
    return 0;
  });
  ASSERT_TRUE(c.ready());
  std::vector<std::byte> bytes;
  auto img = dump({c.pid()}, false, bytes, true);
  ASSERT_TRUE(img) << img.error().what;
  auto [state, tracer] = state_of(c.pid());
  EXPECT_EQ(state, 'T');
  EXPECT_EQ(tracer, 0);
  kill(c.pid(), SIGCONT);
  for (int i = 0; i < 100 && state_of(c.pid()).first == 'T'; ++i) usleep(10000);
  expect_running(c.pid());
  EXPECT_EQ(c.finish(), 0);
}

TEST(ProcessDump, MissingProcessIsGone) {
  pid_t dead = fork();
  if (dead == 0) _exit(0);
  waitpid(dead, nullptr, 0);
  std::vector<std::byte> bytes;
  auto img = dump({dead}, false, bytes);
  ASSERT_FALSE(img);
  EXPECT_EQ(img.error().kind, Errc::gone) << img.error().what;
}

TEST(ProcessDump, UnprivilegedCallerIsRefusedAndNothingIsStopped) {
  Child target([](int ready) {
    block_usr1();
    int p[2];
    pipe(p);
    signal_ready(ready);
    wait_usr1();
    return 0;
  });
  ASSERT_TRUE(target.ready());
  pid_t t = target.pid();
  Child dumper([t](int ready) {
    block_usr1();
    if (setresgid(65534, 65534, 65534) != 0 || setresuid(65534, 65534, 65534) != 0) return 10;
    image::MemorySink sink;
    auto st = dump::dump_processes(dump::DumpOptions{.pids = {t}}, sink);
    signal_ready(ready);
    if (st) return 11;
    return st.error().kind == Errc::permission ? 0 : 12;
  });
  ASSERT_TRUE(dumper.ready());
  EXPECT_EQ(dumper.finish(), 0);
  expect_running(t);
  EXPECT_EQ(target.finish(), 0);
}

}  // namespace
}  // namespace pipecr
