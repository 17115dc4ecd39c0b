// survey_dump_test.cpp: the dump reads each fd table through the agent's survey (sys::Agent::survey:
// the files over SCM_RIGHTS, FD_CLOEXEC from the stop) or, as a fallback, with pidfd_getfd of every
// number and FD_CLOEXEC from fdinfo after the resume. On one real child holding a bit of
// everything the dump records (pipes with bytes and FD_CLOEXEC on some ends, O_NONBLOCK, a dup,
// a FIFO, an epoll watch, a pipe end in flight in a unix socket, the main thread blocked in read()),
// both ways give the same records, and the target is left running, untraced, with its fds intact.
#include <fcntl.h>
#include <sched.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "dump/process.hpp"
#include "image/image_io.hpp"
#include "dump_child.hpp"
#include "unit/send_fds.hpp"
#include "unit/table_sharer.hpp"

namespace pipecr {
namespace {

using testing::DumpChild;
using testing::expect_running;

Expected<Image> dump(pid_t pid, bool agent, std::vector<std::byte>& bytes, dump::DumpStats& stats) {
  image::MemorySink sink;
  dump::DumpOptions opts{.pids = {pid}};
  opts.survey_agent = agent;
  auto st = dump::dump_processes(opts, sink);
  if (!st) return tl::unexpected(st.error());
  stats = *st;
  bytes = std::move(sink.bytes());
  return image::parse(bytes);
}

// dump() with the agent allowed, of a process that must be read without it: checks that, and that
// the process runs on.
Expected<Image> dump_without_agent(pid_t pid, std::vector<std::byte>& bytes, dump::DumpStats& stats) {
  auto img = dump(pid, true, bytes, stats);
  if (img) {
    expect_running(pid);
    EXPECT_EQ(stats.agents, 0u);
  }
  return img;
}

// A copy of the child's fd (pidfd_getfd), to write into.
int fd_of_child(pid_t pid, int fd) {
  int pfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  int copy = static_cast<int>(::syscall(SYS_pidfd_getfd, pfd, fd, 0));
  ::close(pfd);
  return copy;
}

// The slots of pid's fd table (FDSize in its status).
int fd_slots(pid_t pid) {
  std::ifstream status(fmt::format("/proc/{}/status", pid));
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("FDSize:", 0) == 0) return std::stoi(line.substr(7));
  return 0;
}

std::string fifo_path() { return fmt::format("/tmp/pipecr-survey-test-{}", ::getpid()); }

// The child: 40 pipes at 10.. (read, write), FD_CLOEXEC on every third read end, O_NONBLOCK on
// every fifth write end, i bytes queued in pipe i; a dup of pipe 0's write end at 100; a FIFO
// (both ends); an epoll watching pipe 2's read end; pipe 3's read end sent over a socketpair and
// not received; its main thread blocked in read() on pipe 1. The bytes written to pipe 1 by the
// test end it: it checks every fd is still as it made it and exits 0.
int survey_child(int ready) {
  for (int i = 0; i < 40; ++i) {
    int p[2];
    if (::pipe(p) < 0) return 2;
    ::dup2(p[0], 10 + 2 * i);
    ::dup2(p[1], 11 + 2 * i);
    ::close(p[0]);
    ::close(p[1]);
    if (i % 3 == 0) ::fcntl(10 + 2 * i, F_SETFD, FD_CLOEXEC);
    if (i % 5 == 0) ::fcntl(11 + 2 * i, F_SETFL, O_NONBLOCK);
    std::string bytes(static_cast<size_t>(i), 'a');
    if (i != 1 && i && ::write(11 + 2 * i, bytes.data(), bytes.size()) != i) return 3;
  }
  ::dup2(11, 100);
  const std::string path = fifo_path();
  ::unlink(path.c_str());
  if (::mkfifo(path.c_str(), 0600) < 0) return 4;
  int fr = ::open(path.c_str(), O_RDONLY | O_NONBLOCK);
  int fw = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fr < 0 || fw < 0 || ::write(fw, "fifo", 4) != 4) return 5;
  int ep = ::epoll_create1(EPOLL_CLOEXEC);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = 77;
  if (::epoll_ctl(ep, EPOLL_CTL_ADD, 14, &ev) < 0) return 6;
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_DGRAM, 0, sv) < 0) return 7;
  if (!testing::send_fds(sv[0], "x", {16})) return 8;
  ::close(ready);
  char buf[8];
  if (::read(12, buf, sizeof buf) != 3) return 9;  // blocked here while dumped
  for (int i = 0; i < 40; ++i) {
    const int r = 10 + 2 * i, w = r + 1;
    if (::fcntl(r, F_GETFD) != (i % 3 == 0 ? FD_CLOEXEC : 0) || ::fcntl(w, F_GETFD) != 0) return 10;
    if (((::fcntl(w, F_GETFL) & O_NONBLOCK) != 0) != (i % 5 == 0)) return 11;
    int q = -1;
    if (::ioctl(r, FIONREAD, &q) < 0 || q != (i == 1 ? 0 : i)) return 12;
  }
  return ::unlink(path.c_str()) == 0 ? 0 : 13;
}

void expect_same_records(const Image& a, const Image& b) {
  ASSERT_EQ(a.pipes.size(), b.pipes.size());
  for (size_t i = 0; i < a.pipes.size(); ++i) {
    const PipeRecord &x = a.pipes[i], &y = b.pipes[i];
    EXPECT_EQ(x.id, y.id);
    EXPECT_EQ(x.kind, y.kind);
    EXPECT_EQ(x.inode, y.inode);
    EXPECT_EQ(x.capacity, y.capacity);
    EXPECT_EQ(x.path, y.path);
    EXPECT_EQ(x.slots, y.slots);
    EXPECT_TRUE(x.data.size() == y.data.size() && std::equal(x.data.begin(), x.data.end(), y.data.begin()));
  }
  ASSERT_EQ(a.files.size(), b.files.size());
  for (size_t i = 0; i < a.files.size(); ++i) {
    EXPECT_EQ(a.files[i].id, b.files[i].id);
    EXPECT_EQ(a.files[i].pipe_id, b.files[i].pipe_id);
    EXPECT_EQ(a.files[i].flags, b.files[i].flags) << "file " << a.files[i].id;
    EXPECT_EQ(a.files[i].owner, b.files[i].owner);
    EXPECT_EQ(a.files[i].fifo_reader, b.files[i].fifo_reader);
  }
  ASSERT_EQ(a.fds.size(), b.fds.size());
  for (size_t i = 0; i < a.fds.size(); ++i) {
    const FdRecord &x = a.fds[i], &y = b.fds[i];
    EXPECT_EQ(x.fd, y.fd);
    EXPECT_EQ(x.file_id, y.file_id) << "fd " << x.fd;
    EXPECT_EQ(x.cloexec, y.cloexec) << "fd " << x.fd;
    EXPECT_EQ(x.blocked, y.blocked) << "fd " << x.fd;
  }
  EXPECT_EQ(a.in_flight.size(), b.in_flight.size());
  for (size_t i = 0; i < std::min(a.in_flight.size(), b.in_flight.size()); ++i) {
    EXPECT_EQ(a.in_flight[i].file_id, b.in_flight[i].file_id);
    EXPECT_EQ(a.in_flight[i].sock_fd, b.in_flight[i].sock_fd);
  }
  EXPECT_EQ(a.epoll_watches, b.epoll_watches);
}

TEST(SurveyDump, TheAgentAndTheFallbackGiveTheSameRecords) {
  testing::raise_nofile();
  DumpChild c(survey_child);
  ASSERT_TRUE(c.ready());
  // Wait until its read() on fd 12 blocks (/proc/PID/syscall: read is 0, its first argument 0xc).
  bool blocked = false;
  for (int i = 0; i < 5000 && !blocked; ++i) {
    std::ifstream sc(fmt::format("/proc/{}/syscall", c.pid()));
    std::string nr, arg;
    blocked = (sc >> nr >> arg) && nr == "0" && arg == "0xc";
    if (!blocked) ::usleep(1000);
  }
  ASSERT_TRUE(blocked);
  std::vector<std::byte> with_bytes, without_bytes;
  dump::DumpStats with{}, without{};
  auto a = dump(c.pid(), true, with_bytes, with);
  ASSERT_TRUE(a) << a.error().what;
  expect_running(c.pid());
  auto b = dump(c.pid(), false, without_bytes, without);
  ASSERT_TRUE(b) << b.error().what;
  expect_running(c.pid());
  EXPECT_EQ(with.agents, 1u);
  EXPECT_EQ(without.agents, 0u);
  for (const std::string& n : with.notes) ADD_FAILURE() << "note: " << n;
  expect_same_records(*a, *b);

  // What the records say, checked once against the child's own making.
  ASSERT_EQ(a->pipes.size(), 41u);  // 40 pipes and the FIFO
  ASSERT_EQ(a->in_flight.size(), 1u);
  ASSERT_EQ(a->epoll_watches.size(), 1u);
  EXPECT_EQ(a->epoll_watches[0].fd, 14);
  EXPECT_EQ(a->epoll_watches[0].data, 77u);
  for (const FdRecord& r : a->fds) {
    if (r.fd >= 10 && r.fd < 90 && r.fd % 2 == 0) {
      const int i = (r.fd - 10) / 2;
      EXPECT_EQ(r.cloexec, i % 3 == 0) << "fd " << r.fd;
      EXPECT_EQ(r.blocked, r.fd == 12 ? Blocked::reading : Blocked::none) << "fd " << r.fd;
    } else if (r.fd >= 11 && r.fd < 90) {
      EXPECT_FALSE(r.cloexec) << "fd " << r.fd;
      const FileRecord* f = a->find_file(r.file_id);
      ASSERT_TRUE(f);
      EXPECT_EQ((f->flags & O_NONBLOCK) != 0, (r.fd - 11) / 2 % 5 == 0) << "fd " << r.fd;
    }
  }
  // fd 100 is a dup of 11: one open file description.
  const FdRecord *d = nullptr, *o = nullptr;
  for (const FdRecord& r : a->fds) {
    if (r.fd == 100) d = &r;
    if (r.fd == 11) o = &r;
  }
  ASSERT_TRUE(d && o);
  EXPECT_EQ(d->file_id, o->file_id);

  const int wake = fd_of_child(c.pid(), 13);  // pipe 1's write end: the child's read() returns
  ASSERT_GE(wake, 0);
  EXPECT_EQ(::write(wake, "end", 3), 3);
  ::close(wake);
  EXPECT_EQ(c.reap(), 0);
}

// A process under a seccomp filter gets the agent only where the filter allows every call the
// agent makes (sys/seccomp.hpp: pipecr reads the filter and runs it first). One that kills on
// socketpair() is read without it, with a note, and lives on with its pipe; one that allows all
// (here: kills only on getppid()) is read by the agent.
TEST(SurveyDump, AProcessUnderSeccompGetsTheAgentOnlyWhereItsFilterAllowsIt) {
  for (const int nr : {SYS_socketpair, SYS_getppid}) {
    SCOPED_TRACE(nr);
    DumpChild c([nr](int ready) {
      testing::block_usr1();
      sock_filter f[] = {BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
                         BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, static_cast<uint32_t>(nr), 0, 1),
                         BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS), BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
      sock_fprog prog{4, f};
      if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) return 2;
      if (::syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0) return 3;
      int p[2];
      if (::pipe(p) < 0 || ::write(p[1], "abc", 3) != 3) return 4;
      ::fcntl(p[0], F_SETFD, FD_CLOEXEC);
      for (int fd = 30; fd <= 100; ++fd)  // 73 fds in a table of 128 slots: enough for the agent
        if (::dup2(p[1], fd) < 0) return 6;
      ::close(ready);
      testing::wait_usr1();
      int q = 0;
      return ::ioctl(p[0], FIONREAD, &q) == 0 && q == 3 ? 0 : 5;
    });
    ASSERT_TRUE(c.ready());
    std::vector<std::byte> bytes;
    dump::DumpStats stats{};
    auto img = dump(c.pid(), true, bytes, stats);
    ASSERT_TRUE(img) << img.error().what;
    expect_running(c.pid());
    const bool allowed = nr != SYS_socketpair;
    EXPECT_EQ(stats.agents, allowed ? 1u : 0u);
    size_t noted = 0;
    for (const std::string& n : stats.notes) noted += n.find("seccomp filter would kill the process for socketpair()") != std::string::npos;
    EXPECT_EQ(noted, allowed ? 0u : 1u) << fmt::format("{}", fmt::join(stats.notes, "\n"));
    ASSERT_EQ(img->pipes.size(), 1u);
    EXPECT_EQ(img->pipes[0].bytes(), 3u);
    int cloexec = 0;
    for (const FdRecord& r : img->fds) cloexec += r.cloexec;
    EXPECT_EQ(cloexec, 1);
    EXPECT_EQ(c.finish(), 0);
  }
}

// stopped and the table is read by the agent, once.
TEST(SurveyDump, ATableSharedWithAProcessNotDumpedIsReadWithoutTheAgent) {
  DumpChild c([](int ready) {
    testing::block_usr1();
    int p[2];
    if (::pipe(p) < 0 || ::write(p[1], "abc", 3) != 3) return 4;
    for (int fd = 30; fd <= 100; ++fd)  // 73 fds in a table of 128 slots: enough for the agent
      if (::dup2(p[1], fd) < 0) return 6;
    if (testing::spawn_table_sharer() < 0) return 7;
    ::close(ready);
    testing::wait_usr1();
    int q = 0;
    return ::ioctl(p[0], FIONREAD, &q) == 0 && q == 3 ? 0 : 5;
  });
  ASSERT_TRUE(c.ready());
  pid_t sharer = 0;  // the child's only child
  std::ifstream(fmt::format("/proc/{}/task/{}/children", c.pid(), c.pid())) >> sharer;
  ASSERT_GT(sharer, 0);
  {
    std::vector<std::byte> bytes;
    dump::DumpStats stats{};
    auto img = dump_without_agent(c.pid(), bytes, stats);
    ASSERT_TRUE(img) << img.error().what;
    ASSERT_EQ(img->pipes.size(), 1u);
    EXPECT_EQ(img->pipes[0].bytes(), 3u);
    size_t named = 0;
    for (const std::string& n : stats.notes)
      named += n.find(fmt::format("process {} uses the same fd table", sharer)) != std::string::npos;
    EXPECT_EQ(named, 1u) << fmt::format("{}", fmt::join(stats.notes, "\n"));
  }
  {
    image::MemorySink sink;
    dump::DumpOptions opts{.pids = {c.pid(), sharer}};
    auto stats = dump::dump_processes(opts, sink);
    ASSERT_TRUE(stats) << stats.error().what;
    EXPECT_EQ(stats->agents, 1u);
    EXPECT_EQ(stats->tables, 1u);
    auto img = image::parse(sink.bytes());
    ASSERT_TRUE(img) << img.error().what;
    ASSERT_EQ(img->pipes.size(), 1u);
    EXPECT_EQ(img->pipes[0].bytes(), 3u);
    EXPECT_EQ(img->shared_tables.size(), 1u);
  }
  expect_running(c.pid());
  expect_running(sharer);
  EXPECT_EQ(c.finish(), 0);
}

// A table that once held thousands of fds and now holds few (FDSize stays): its fds are listed and
// taken one by one, not probed slot by slot, and without the agent, which would walk every slot; the
// records are what the child made. With 100 pipes (more than the agent's minimum) as with 20.
TEST(SurveyDump, ASparseTableIsListedNotWalked) {
  testing::raise_nofile();
  for (int pipes : {20, 100}) {
    SCOPED_TRACE(fmt::format("{} pipes", pipes));
    DumpChild c([pipes](int ready) {
      testing::block_usr1();
      if (::dup2(0, 5000) < 0) return 2;  // the table grows to 8,192 slots and keeps them
      ::close(5000);
      for (int i = 0; i < pipes; ++i) {
        int p[2];
        if (::pipe(p) < 0 || ::write(p[1], "abc", static_cast<size_t>(i % 4)) != i % 4) return 3;
        if (i % 3 == 0) ::fcntl(p[0], F_SETFD, FD_CLOEXEC);
      }
      ::close(ready);
      testing::wait_usr1();
      return 0;
    });
    ASSERT_TRUE(c.ready());
    ASSERT_GE(fd_slots(c.pid()), 8192);
    std::vector<std::byte> bytes;
    dump::DumpStats stats{};
    auto img = dump_without_agent(c.pid(), bytes, stats);
    ASSERT_TRUE(img) << img.error().what;
    EXPECT_EQ(stats.listed_tables, 1u);
    ASSERT_EQ(img->pipes.size(), static_cast<size_t>(pipes));
    size_t queued = 0, cloexec = 0;
    for (const PipeRecord& p : img->pipes) queued += p.bytes();
    for (const FdRecord& r : img->fds) cloexec += r.cloexec;
    size_t want = 0;
    for (int i = 0; i < pipes; ++i) want += static_cast<size_t>(i % 4);
    EXPECT_EQ(queued, want);
    EXPECT_EQ(cloexec, static_cast<size_t>((pipes + 2) / 3));
    EXPECT_EQ(img->fds.size(), static_cast<size_t>(2 * pipes));
    EXPECT_EQ(c.finish(), 0);
  }
}

// A table of the kernel's smallest size (64 slots) is read without the agent: its start would cost
// more than it saves (docs/design.md section 12).
TEST(SurveyDump, ASmallTableIsReadWithoutTheAgent) {
  // A fork copies its parent's table size, and this test process's table has grown: the target is
  // a grandchild forked once the child has closed everything above 3, so its table has 64 slots.
  DumpChild c([](int ready) {
    testing::block_usr1();
    pid_t g = ::fork();
    if (g == 0) {
      int p[2];
      if (::pipe(p) < 0 || ::write(p[1], "ab", 2) != 2) ::_exit(2);
      ::close(ready);
      testing::wait_usr1();
      ::_exit(0);
    }
    ::close(ready);
    int st = 0;
    ::waitpid(g, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 9;
  });
  ASSERT_TRUE(c.ready());
  std::ifstream kids(fmt::format("/proc/{}/task/{}/children", c.pid(), c.pid()));
  pid_t g = 0;
  ASSERT_TRUE(kids >> g);
  ASSERT_EQ(fd_slots(g), 64);
  std::vector<std::byte> bytes;
  dump::DumpStats stats{};
  auto img = dump_without_agent(g, bytes, stats);
  ASSERT_TRUE(img) << img.error().what;
  ASSERT_EQ(img->pipes.size(), 1u);
  EXPECT_EQ(img->pipes[0].bytes(), 2u);
  ::kill(g, SIGUSR1);
  EXPECT_EQ(c.reap(), 0);
}

// The bytes of pipe i of tee_child: its number, then a pattern of its own, `bytes_of(i)` long.
size_t bytes_of(int i) { return static_cast<size_t>(i % 16) * 4096 + static_cast<size_t>(i % 97); }
std::string pattern_of(int i) {
  std::string s(bytes_of(i), '\0');
  for (size_t k = 0; k < s.size(); ++k) s[k] = static_cast<char>('a' + (k * 7 + static_cast<size_t>(i)) % 26);
  if (s.size() >= 4) std::memcpy(s.data(), &i, 4);
  return s;
}

// 300 pipes at 10.. (read, write), pipe i holding bytes_of(i) bytes written in one go (a buffer a
// page), pipe 7 in packet mode holding three packets; a dup of pipe 5's read end at 6 and of pipe
// 9's at 7, away from the other ends (the agent tees those pipes twice, and pipecr must skip the
// second pieces). SIGUSR1 ends it: every pipe must still hold what it held.
int tee_child(int ready) {
  testing::block_usr1();
  for (int i = 0; i < 300; ++i) {
    int p[2];
    if (::pipe2(p, i == 7 ? O_DIRECT : 0) < 0) return 2;
    if (::dup2(p[0], 10 + 2 * i) < 0 || ::dup2(p[1], 11 + 2 * i) < 0) return 2;
    ::close(p[0]);
    ::close(p[1]);
    if (i == 7) {
      for (const char* pk : {"one", "three", "seventeen"})
        if (::write(11 + 2 * i, pk, std::strlen(pk)) != static_cast<ssize_t>(std::strlen(pk))) return 3;
      continue;
    }
    const std::string b = pattern_of(i);
    if (!b.empty() && ::write(11 + 2 * i, b.data(), b.size()) != static_cast<ssize_t>(b.size())) return 3;
  }
  if (::dup2(20, 6) < 0 || ::dup2(28, 7) < 0) return 4;
  ::close(ready);
  testing::wait_usr1();
  for (int i = 0; i < 300; ++i) {
    int q = -1;
    const size_t want = i == 7 ? 3 + 5 + 9 : bytes_of(i);
    if (::ioctl(10 + 2 * i, FIONREAD, &q) < 0 || static_cast<size_t>(q) != want) return 10;
  }
  return 0;
}

size_t open_fds(pid_t pid) {
  size_t n = 0;
  for (const auto& e : std::filesystem::directory_iterator(fmt::format("/proc/{}/fd", pid))) n += !e.path().empty();
  return n;
}

// The agent tees pipes itself (into scratch pipes pipecr lends it) while pipecr takes in earlier
// messages. Forced to tee whatever it can, its pieces (packets, pipes tee'd twice through a dup,
// scratch pipes running full) come back exactly as pipecr's own tees give them, and the target is
// left with its fds alone.
TEST(SurveyDump, PipesTheAgentTeesComeBackWhole) {
  testing::raise_nofile();
  DumpChild c(tee_child);
  ASSERT_TRUE(c.ready());
  const size_t fds_before = open_fds(c.pid());
  image::MemorySink with_sink, without_sink;
  dump::DumpOptions opts{.pids = {c.pid()}};
  opts.agent_tees_always = true;
  auto with = dump::dump_processes(opts, with_sink);
  ASSERT_TRUE(with) << with.error().what;
  expect_running(c.pid());
  EXPECT_EQ(open_fds(c.pid()), fds_before);
  opts.survey_agent = false;
  auto without = dump::dump_processes(opts, without_sink);
  ASSERT_TRUE(without) << without.error().what;
  EXPECT_EQ(with->agents, 1u);
  EXPECT_GT(with->agent_tees, 0u) << with->lent_scratch_pipes << " lent";
  EXPECT_EQ(without->agent_tees, 0u);
  auto a = image::parse(with_sink.bytes());
  auto b = image::parse(without_sink.bytes());
  ASSERT_TRUE(a && b);
  ASSERT_EQ(a->pipes.size(), 300u);
  ASSERT_EQ(b->pipes.size(), 300u);
  std::map<uint64_t, const PipeRecord*> by_inode;
  for (const PipeRecord& p : b->pipes) by_inode[p.inode] = &p;
  for (const PipeRecord& p : a->pipes) {
    auto it = by_inode.find(p.inode);
    ASSERT_NE(it, by_inode.end());
    EXPECT_EQ(p.slots, it->second->slots) << "pipe " << p.id;
    EXPECT_TRUE(p.data.size() == it->second->data.size() &&
                std::equal(p.data.begin(), p.data.end(), it->second->data.begin()))
        << "pipe " << p.id;
  }
  // And against what the child wrote: each pipe by the fd of its read end.
  std::map<uint64_t, const PipeRecord*> by_id;
  for (const PipeRecord& p : a->pipes) by_id[p.id] = &p;
  for (const FdRecord& r : a->fds) {
    if (r.fd < 10 || r.fd >= 610 || r.fd % 2 != 0) continue;
    const int i = (r.fd - 10) / 2;
    const FileRecord* f = a->find_file(r.file_id);
    ASSERT_TRUE(f);
    const PipeRecord* p = by_id.at(f->pipe_id);
    if (i == 7) {
      ASSERT_EQ(p->slots.size(), 3u);
      EXPECT_TRUE(p->slots[0].packet && p->slots[1].packet && p->slots[2].packet);
      continue;
    }
    const std::string want = pattern_of(i);
    ASSERT_EQ(p->data.size(), want.size()) << "pipe " << i;
    EXPECT_TRUE(std::equal(want.begin(), want.end(), reinterpret_cast<const char*>(p->data.data()))) << "pipe " << i;
  }
  EXPECT_EQ(c.finish(), 0);
}

}  // namespace
}  // namespace pipecr
