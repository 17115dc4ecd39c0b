// tables_test.cpp: the dump's collection path against real processes: every fd table (a thread's
// own, one shared by two processes), snapshots packed into shared scratch pipes, pipecr's own fd
// limit (batches, and a clear refusal), and a target killed while it is dumped.
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <thread>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "dump_child.hpp"
#include "restore/process.hpp"
#include "sys/proc.hpp"

namespace pipecr {
namespace {

using testing::block_usr1;
using testing::DumpChild;
using testing::dump_image;
using testing::expect_running;
using testing::raise_nofile;
using testing::wait_usr1;

std::string data_of(const PipeRecord& p) {
  return std::string(reinterpret_cast<const char*>(p.data.data()), p.data.size());
}

const PipeRecord* pipe_of_fd(const Image& img, const FdRecord& d) {
  const FileRecord* f = img.find_file(d.file_id);
  return f ? img.find_pipe(f->pipe_id) : nullptr;
}

// A thread that called unshare(CLONE_FILES) holds a pipe with data in its own fd table, at the
// same fd number as a pipe of the process's table: both are dumped, the thread's with its tid.
std::atomic<bool> g_thread_go{false};
std::atomic<int> g_thread_result{-1};
std::atomic<pid_t> g_thread_tid{0};
int g_thread_fd = -1;

void* own_table_thread(void* ready) {
  if (unshare(CLONE_FILES) != 0) {
    g_thread_result = 10;
    close(*static_cast<int*>(ready));
    return nullptr;
  }
  // In its own table: close the copy of the main table's pipe at g_thread_fd, put a new one there.
  int p[2];
  if (pipe(p) != 0) return nullptr;
  (void)!write(p[1], "thread-data", 11);
  dup2(p[0], g_thread_fd);
  close(p[0]);
  g_thread_tid = static_cast<pid_t>(syscall(SYS_gettid));
  close(*static_cast<int*>(ready));  // only this table's copy of the ready fd; the main thread closes its own
  while (!g_thread_go) usleep(1000);
  int q = 0;
  ioctl(g_thread_fd, FIONREAD, &q);
  char buf[16] = {};
  g_thread_result = q == 11 && read(g_thread_fd, buf, sizeof buf) == 11 && memcmp(buf, "thread-data", 11) == 0 ? 0 : 11;
  return nullptr;
}

TEST(DumpTables, ThreadWithItsOwnFdTable) {
  DumpChild c([](int ready) {
    block_usr1();
    int p[2];
    if (pipe(p) != 0) return 2;
    (void)!write(p[1], "main-data", 9);
    g_thread_fd = 30;
    dup2(p[0], 30);
    close(p[0]);
    pthread_t t;
    int ready_copy = ready;
    pthread_create(&t, nullptr, own_table_thread, &ready_copy);
    while (g_thread_tid == 0 && g_thread_result < 0) usleep(1000);
    close(ready);
    wait_usr1();
    g_thread_go = true;
    pthread_join(t, nullptr);
    int q = 0;
    ioctl(30, FIONREAD, &q);
    return g_thread_result == 0 && q == 9 ? 0 : 20 + g_thread_result;
  });
  ASSERT_TRUE(c.ready());
  std::vector<std::byte> bytes;
  dump::DumpStats st;
  auto img = dump_image({c.pid()}, bytes, &st);
  ASSERT_TRUE(img) << img.error().what;
  expect_running(c.pid());
  EXPECT_EQ(st.tables, 2u);
  const FdRecord* main_fd = nullptr;
  const FdRecord* thread_fd = nullptr;
  for (const FdRecord& d : img->fds) {
    if (d.fd != 30) continue;
    (d.tid == 0 ? main_fd : thread_fd) = &d;
  }
  ASSERT_TRUE(main_fd && thread_fd);
  EXPECT_EQ(thread_fd->pid, c.pid());
  EXPECT_NE(thread_fd->tid, c.pid());
  EXPECT_TRUE(std::filesystem::exists("/proc/" + std::to_string(c.pid()) + "/task/" + std::to_string(thread_fd->tid)));
  EXPECT_EQ(data_of(*pipe_of_fd(*img, *main_fd)), "main-data");
  EXPECT_EQ(data_of(*pipe_of_fd(*img, *thread_fd)), "thread-data");
  EXPECT_EQ(c.finish(), 0);
}

// clone(CLONE_FILES) without CLONE_THREAD: two processes, one fd table. Its fds are recorded
// once, under the first process, and the second is recorded as sharing that table.
TEST(DumpTables, ProcessesSharingOneFdTable) {
  DumpChild c([](int ready) {
    block_usr1();
    int p[2];
    if (pipe(p) != 0) return 2;
    (void)!write(p[1], "shared", 6);
    pid_t parent = getpid();
    long kid = syscall(SYS_clone, CLONE_FILES | SIGCHLD, 0, 0, 0, 0);
    if (kid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(0);
      for (;;) pause();
    }
    if (kid < 0) return 3;
    close(ready);  // one table: this closes it for the sharer too
    wait_usr1();
    int q = 0;
    ioctl(p[0], FIONREAD, &q);
    kill(static_cast<pid_t>(kid), SIGKILL);
    waitpid(static_cast<pid_t>(kid), nullptr, 0);
    return q == 6 ? 0 : 4;
  });
  ASSERT_TRUE(c.ready());
  image::MemorySink sink;
  dump::DumpOptions opts{.pids = {c.pid()}, .tree = true};
  auto st = dump::dump_processes(opts, sink);
  ASSERT_TRUE(st) << st.error().what;
  auto img = image::parse(sink.bytes());
  ASSERT_TRUE(img) << img.error().what;
  ASSERT_EQ(img->processes.size(), 2u);
  pid_t kid = img->processes[0].pid == c.pid() ? img->processes[1].pid : img->processes[0].pid;
  expect_running(c.pid());
  expect_running(kid);
  EXPECT_EQ(st->tables, 1u);
  ASSERT_EQ(img->shared_tables.size(), 1u);
  EXPECT_EQ(img->shared_tables[0].pid, kid);
  EXPECT_EQ(img->shared_tables[0].with_pid, c.pid());
  ASSERT_EQ(img->pipes.size(), 1u);
  EXPECT_EQ(data_of(img->pipes[0]), "shared");
  EXPECT_EQ(img->fds.size(), 2u);  // once, not once per process
  for (const FdRecord& d : img->fds) EXPECT_EQ(d.pid, c.pid());
  EXPECT_EQ(c.finish(), 0);
}

// Pipes of every layout, side by side, packed into shared scratch pipes: each pipe's slots and
// bytes come back as they were, and far fewer scratch pipes than pipes are used.
TEST(DumpTables, SnapshotsPackedIntoSharedScratchPipes) {
  constexpr int kPipes = 400;
  DumpChild c([](int ready) {
    block_usr1();
    std::vector<int> rd;
    std::string big(65536, 'B');
    for (int i = 0; i < kPipes; ++i) {
      int p[2];
      if (pipe(p) != 0) return 2;
      switch (i % 5) {
        case 0: (void)!write(p[1], fmt::format("{:016}", i).data(), 16); break;
        case 1:  // packets of 10 and 100 bytes
          fcntl(p[1], F_SETFL, O_DIRECT);
          (void)!write(p[1], std::string(10, 'p').data(), 10);
          (void)!write(p[1], std::string(100, 'q').data(), 100);
          break;
        case 2: (void)!write(p[1], big.data(), big.size()); break;  // 16 full slots
        case 3: break;                                                // empty
        case 4:  // a 1-byte packet last (a stream write would merge into a stream slot before it)
          fcntl(p[1], F_SETFL, O_DIRECT);
          (void)!write(p[1], "packet", 6);
          (void)!write(p[1], "x", 1);
          break;
      }
      rd.push_back(p[0]);
    }
    close(ready);
    wait_usr1();
    // Every pipe still holds what it held.
    static const int expect[5] = {16, 110, 65536, 0, 7};
    for (int i = 0; i < kPipes; ++i) {
      int q = -1;
      ioctl(rd[static_cast<size_t>(i)], FIONREAD, &q);
      if (q != expect[i % 5]) return 3;
    }
    return 0;
  });
  ASSERT_TRUE(c.ready());
  std::vector<std::byte> bytes;
  dump::DumpStats st;
  auto img = dump_image({c.pid()}, bytes, &st, false);  // pipecr's packing alone: the agent tees nothing
  ASSERT_TRUE(img) << img.error().what;
  ASSERT_EQ(img->pipes.size(), static_cast<size_t>(kPipes));
  // 80 pipes of 16 slots, 80 of 2, 80 of 1, 80 of 2: 1,600 slots in 256-slot scratch pipes.
  EXPECT_LE(st.scratch_pipes, 12u);
  EXPECT_GE(st.scratch_pipes, 7u);
  std::map<std::string, int> kinds;
  for (const PipeRecord& rec : img->pipes) {
    const PipeRecord* p = &rec;
    if (p->slots.empty()) {
      ++kinds["empty"];
    } else if (p->slots.size() == 16) {
      for (const Slot& s : p->slots) EXPECT_EQ(s, (Slot{4096, false}));
      EXPECT_EQ(data_of(*p), std::string(65536, 'B'));
      ++kinds["full"];
    } else if (p->slots.size() == 1) {
      EXPECT_EQ(p->slots[0], (Slot{16, false}));
      EXPECT_EQ(data_of(*p).size(), 16u);
      ++kinds["small"];
    } else if (p->slots[0].len == 10) {
      EXPECT_EQ(p->slots[0], (Slot{10, true}));
      EXPECT_EQ(p->slots[1], (Slot{100, true}));
      EXPECT_EQ(data_of(*p), std::string(10, 'p') + std::string(100, 'q'));
      ++kinds["packets"];
    } else {
      EXPECT_EQ(p->slots[0], (Slot{6, true}));
      EXPECT_EQ(p->slots[1], (Slot{1, true}));
      EXPECT_EQ(data_of(*p), "packetx");
      ++kinds["mixed"];
    }
  }
  for (const char* k : {"empty", "full", "small", "packets", "mixed"}) EXPECT_EQ(kinds[k], kPipes / 5) << k;
  EXPECT_EQ(c.finish(), 0);
}

// Runs `fn` in a forked process (so that lowering its hard fd limit does not touch the test
// process) and returns its exit status.
int in_child(const std::function<int()>& fn) {
  pid_t pid = fork();
  if (pid == 0) _exit(fn());
  int st = 0;
  waitpid(pid, &st, 0);
  return WIFEXITED(st) ? WEXITSTATUS(st) : 100 + WTERMSIG(st);
}

DumpChild many_pipes(int n, int bytes) {
  return DumpChild([n, bytes](int ready) {
    block_usr1();
    raise_nofile();
    std::vector<int> rd;
    for (int i = 0; i < n; ++i) {
      int p[2];
      if (pipe(p) != 0) return 2;
      std::string d = fmt::format("{:0{}}", i, bytes);
      if (bytes && write(p[1], d.data(), d.size()) != bytes) return 3;
      rd.push_back(p[0]);
    }
    close(ready);
    wait_usr1();
    for (int i = 0; i < n; ++i) {
      int q = -1;
      ioctl(rd[static_cast<size_t>(i)], FIONREAD, &q);
      if (q != bytes) return 4;
    }
    return 0;
  });
}

// pipecr under a hard fd limit far below the fds dumped: the copies are taken in batches and the
// image is whole.
TEST(DumpTables, BatchesUnderALowFdLimit) {
  constexpr int kPipes = 1500;  // 3,000 fds
  DumpChild c = many_pipes(kPipes, 8);
  ASSERT_TRUE(c.ready());
  int rc = in_child([&] {
    raise_nofile(700);
    std::vector<std::byte> bytes;
    dump::DumpStats st;
    auto img = dump_image({c.pid()}, bytes, &st);
    if (!img) return 10;
    if (img->pipes.size() != static_cast<size_t>(kPipes) || img->fds.size() != 2u * kPipes ||
        img->files.size() != 2u * kPipes)
      return 11;
    if (st.batches < 5) return 12;
    std::set<std::string> seen;
    for (const PipeRecord& p : img->pipes) seen.insert(data_of(p));
    if (seen.size() != static_cast<size_t>(kPipes) || !seen.count(fmt::format("{:08}", kPipes - 1))) return 13;
    for (const FdRecord& d : img->fds) {
      const FileRecord* f = img->find_file(d.file_id);
      if (!f || (f->flags & O_ACCMODE) != (d.fd % 2 == 0 ? O_RDONLY : O_WRONLY)) return 14;
    }
    return 0;
  });
  EXPECT_EQ(rc, 0);
  expect_running(c.pid());
  EXPECT_EQ(c.finish(), 0);
}

// A limit that cannot hold even a small batch: one clear error naming the limit, the number
// needed and the command that raises it, and the target runs on untouched.
TEST(DumpTables, FdLimitTooLowIsAClearError) {
  DumpChild c = many_pipes(200, 4);
  ASSERT_TRUE(c.ready());
  int rc = in_child([&] {
    raise_nofile(40);
    std::vector<std::byte> bytes;
    auto img = dump_image({c.pid()}, bytes);
    if (img) return 10;
    const std::string& w = img.error().what;
    if (img.error().kind != Errc::capacity) return 11;
    if (w.find("RLIMIT_NOFILE") == std::string::npos || w.find("prlimit --nofile=") == std::string::npos ||
        w.find(" 40") == std::string::npos)
      return 12;
    return 0;
  });
  EXPECT_EQ(rc, 0);
  expect_running(c.pid());
  EXPECT_EQ(c.finish(), 0);
}

// A target killed at some moment of a dump of 9,000 pipes: either the dump fails with
// Errc::gone, or (killed after its stop) the image holds all 9,000 pipes; never a partial image.
TEST(DumpTables, TargetKilledDuringTheDump) {
  constexpr int kPipes = 9000;
  int gone = 0, whole = 0;
  for (int delay_us : {0, 1000, 5000, 20000, 60000, 400000}) {
    DumpChild c = many_pipes(kPipes, 16);
    ASSERT_TRUE(c.ready());
    std::thread killer([&] {
      std::this_thread::sleep_for(std::chrono::microseconds(delay_us));
      kill(c.pid(), SIGKILL);
    });
    std::vector<std::byte> bytes;
    auto img = dump_image({c.pid()}, bytes);
    killer.join();
    if (!img) {
      EXPECT_EQ(img.error().kind, Errc::gone) << delay_us << ": " << img.error().what;
      ++gone;
    } else {
      EXPECT_EQ(img->pipes.size(), static_cast<size_t>(kPipes)) << delay_us;
      ++whole;
    }
    // Not its exit status: the dump, as its tracer, may have reaped it already.
    (void)c.reap();
  }
  EXPECT_GT(gone, 0);  // whole images depend on the machine's speed: counted, not required
  std::printf("killed during the dump: %d gone, %d whole images\n", gone, whole);
}

}  // namespace
}  // namespace pipecr

namespace pipecr {
namespace {

using testing::block_usr1;
using testing::DumpChild;

// Flags shared with a child through a MAP_SHARED page.
struct Shared {
  std::atomic<int> step{0};
  std::atomic<int> result{-1};
  std::atomic<pid_t> tid{0};
};

Shared* shared_page() {
  void* p = mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  return new (p) Shared;
}

void wait_step(const Shared* s, int n) {
  for (int i = 0; i < 5000 && s->step.load() < n; ++i) usleep(1000);
}

struct ThreadArgs {
  Shared* s;
  int ready;
};

// A pipe at fds 30 (read) and 31 (write) of the caller's table, holding `data`.
bool pipe_at_30(const char* data) {
  int p[2];
  if (pipe(p) != 0) return false;
  dup2(p[0], 30);
  dup2(p[1], 31);
  close(p[0]);
  close(p[1]);
  const size_t n = strlen(data);
  return write(31, data, n) == static_cast<ssize_t>(n);
}

// The thread is set up: its id for the test, and its copy of the child's ready fd closed.
void announce(const ThreadArgs* a) {
  a->s->tid = static_cast<pid_t>(syscall(SYS_gettid));
  close(a->ready);
}

// epoll_ctl(ep, EPOLL_CTL_ADD, fd) for EPOLLIN with data.
bool watch(int ep, int fd, uint64_t data) {
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = data;
  return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) == 0;
}

// The thread: its own table, a pipe at 30 (read) and 31 (write) with "thread-data". Step 1: drain
// it. Step 3 (after the restore): the data is back at 30, and 31 writes into the same pipe.
void* restore_thread(void* arg) {
  auto* a = static_cast<ThreadArgs*>(arg);
  Shared* s = a->s;
  if (unshare(CLONE_FILES) != 0 || !pipe_at_30("thread-data")) return nullptr;
  announce(a);
  wait_step(s, 1);
  char buf[64];
  if (read(30, buf, sizeof buf) != 11) s->result = 2;
  s->step = 2;
  wait_step(s, 3);
  ssize_t n = read(30, buf, sizeof buf);
  bool data = n == 11 && memcmp(buf, "thread-data", 11) == 0;
  bool linked = write(31, "z", 1) == 1 && read(30, buf, 1) == 1 && buf[0] == 'z';
  if (s->result < 0) s->result = data && linked ? 0 : data ? 4 : 3;
  s->step = 4;
  return nullptr;
}

// The thread of the epoll test: its own table, a pipe at 30 (read) and 31 (write) with
// "thread-data", and an epoll at fd 32 watching fd 30 (EPOLLIN, data 0x3030). Step 3 (after a
// restore that replaced the pipe): the epoll reports fd 30 readable with that data, fd 30 holds
// the bytes again, and once they are read the epoll reports nothing (it watches the new pipe).
void* epoll_thread(void* arg) {
  auto* a = static_cast<ThreadArgs*>(arg);
  Shared* s = a->s;
  if (unshare(CLONE_FILES) != 0 || !pipe_at_30("thread-data")) return nullptr;
  const int ep = epoll_create1(0);
  dup2(ep, 32);
  close(ep);
  if (!watch(32, 30, 0x3030)) s->result = 2;
  announce(a);
  wait_step(s, 3);
  epoll_event got{};
  const bool heard = epoll_wait(32, &got, 1, 0) == 1 && got.data.u64 == 0x3030 && got.events == EPOLLIN;
  char buf[64];
  const bool data = read(30, buf, sizeof buf) == 11 && memcmp(buf, "thread-data", 11) == 0;
  const bool quiet = epoll_wait(32, &got, 1, 0) == 0;
  const bool hears_writes = write(31, "z", 1) == 1 && epoll_wait(32, &got, 1, 0) == 1 && got.data.u64 == 0x3030;
  if (s->result < 0) s->result = !heard ? 3 : !data ? 4 : !quiet ? 5 : !hears_writes ? 6 : 0;
  s->step = 4;
  return nullptr;
}

// The thread of the shared-epoll test: the process made an epoll at fd 32 watching its pipe at
// 30 (data 0xA0) before this thread's unshare(), so fd 32 of both tables is one instance. Here fd
// 30 and 31 become pipe T ("thread-data"), watched through this table's fd 32 (data 0x70): the
// instance holds both watches, keyed (A, 30) and (T, 30). Step 3 (after a restore that replaced
// both pipes): one epoll_wait reports both, each with its data.
void* shared_epoll_thread(void* arg) {
  auto* a = static_cast<ThreadArgs*>(arg);
  Shared* s = a->s;
  if (unshare(CLONE_FILES) != 0 || !pipe_at_30("thread-data")) return nullptr;
  if (!watch(32, 30, 0x70)) s->result = 2;
  announce(a);
  wait_step(s, 3);
  epoll_event got[4]{};
  const int n = epoll_wait(32, got, 4, 0);
  std::set<uint64_t> data;
  for (int i = 0; i < n; ++i) data.insert(got[i].data.u64);
  if (s->result < 0) s->result = data == std::set<uint64_t>{0xA0, 0x70} ? 0 : 10 + n;
  s->step = 4;
  return nullptr;
}

// Starts fn (restore_thread unless said); returns once it has a table of its own. The child's ready
// fd is then in both tables: the thread closes its copy, this closes the process's, so it closes
// for the test once both are made.
pthread_t start_table_thread(Shared* s, int ready, void* (*fn)(void*) = restore_thread) {
  int dup_ready = dup(ready);
  close(ready);
  ThreadArgs a{s, dup_ready};
  pthread_t t;
  pthread_create(&t, nullptr, fn, &a);
  while (s->tid.load() == 0) usleep(1000);
  close(dup_ready);
  return t;
}

// A thread's own fd table: dumped, drained, restored into that very thread's table.
TEST(DumpTables, ThreadTableRestoredIntoItsThread) {
  Shared* s = shared_page();
  DumpChild c([s](int ready) {
    // The process's own table holds no pipe: only the thread's does.
    pthread_t t = start_table_thread(s, ready);
    pthread_join(t, nullptr);
    return s->result.load();
  });
  // The ready fd closes when both tables let it go: the thread closes its copy, the main thread its
  // own once the thread has a table of its own.
  ASSERT_TRUE(c.ready());
  ASSERT_NE(s->tid.load(), 0);
  std::vector<std::byte> bytes;
  auto img = testing::dump_image({c.pid()}, bytes);
  ASSERT_TRUE(img) << img.error().what;
  size_t in_thread = 0;
  for (const FdRecord& d : img->fds) in_thread += d.tid == s->tid.load();
  EXPECT_EQ(in_thread, 2u);

  s->step = 1;
  wait_step(s, 2);
  ASSERT_EQ(s->step.load(), 2);
  auto sum = restore::restore_processes(*img, restore::ProcessRestoreRequest{{{c.pid(), std::nullopt}}, std::nullopt});
  ASSERT_TRUE(sum) << sum.error().what;
  s->step = 3;
  wait_step(s, 4);
  EXPECT_EQ(s->result.load(), 0);
  EXPECT_EQ(c.reap(), 0);
}

// The fds of the table thread tid of pid uses, ascending, to compare a table before and after.
std::vector<int> fds_of_table(pid_t pid, pid_t tid) {
  sys::UniqueFd dir;
  auto fds = sys::list_task_fds(pid, tid, dir);
  EXPECT_TRUE(fds) << fds.error().what;
  if (!fds) return {};
  std::sort(fds->begin(), fds->end());
  return *fds;
}

// A process whose own table and whose thread's own table both hold a pipe at fds 30 and 31: one
// restore puts each back in its table (an agent in each of the two threads of the one stopped
// process), each with its own bytes, and neither table gains or loses an fd.
TEST(DumpTables, ProcessAndThreadTablesRestoredInOneRestore) {
  Shared* s = shared_page();
  DumpChild c([s](int ready) {
    if (!pipe_at_30("main-data")) return 2;
    pthread_t t = start_table_thread(s, ready);
    wait_step(s, 2);  // the thread drained its pipe; the test drains this one
    pthread_join(t, nullptr);
    char buf[64];
    ssize_t n = read(30, buf, sizeof buf);
    bool data = n == 9 && memcmp(buf, "main-data", 9) == 0;
    bool linked = write(31, "m", 1) == 1 && read(30, buf, 1) == 1 && buf[0] == 'm';
    return s->result.load() != 0 ? 10 + s->result.load() : data && linked ? 0 : data ? 5 : 6;
  });
  ASSERT_TRUE(c.ready());
  const pid_t tid = s->tid.load();
  ASSERT_NE(tid, 0);
  std::vector<std::byte> bytes;
  auto img = testing::dump_image({c.pid()}, bytes);
  ASSERT_TRUE(img) << img.error().what;
  size_t in_thread = 0, in_process = 0;
  for (const FdRecord& d : img->fds) (d.tid == tid ? in_thread : in_process) += d.fd == 30 || d.fd == 31;
  EXPECT_EQ(in_thread, 2u);
  EXPECT_EQ(in_process, 2u);

  s->step = 1;
  wait_step(s, 2);
  ASSERT_EQ(s->step.load(), 2);
  {  // drain the process's own pipe too, through its table
    sys::UniqueFd r(::open(fmt::format("/proc/{}/fd/30", c.pid()).c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC));
    ASSERT_TRUE(r);
    char buf[64];
    ASSERT_EQ(::read(r.get(), buf, sizeof buf), 9);
  }
  const auto main_before = fds_of_table(c.pid(), c.pid()), thread_before = fds_of_table(c.pid(), tid);
  auto sum = restore::restore_processes(*img, restore::ProcessRestoreRequest{{{c.pid(), std::nullopt}}, std::nullopt});
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_EQ(fds_of_table(c.pid(), c.pid()), main_before);
  EXPECT_EQ(fds_of_table(c.pid(), tid), thread_before);
  testing::expect_running(c.pid());
  s->step = 3;
  wait_step(s, 4);
  EXPECT_EQ(s->result.load(), 0);
  EXPECT_EQ(c.reap(), 0) << "10 + n: the thread's check n failed; 5, 6: the process's bytes or link";
}

// An epoll in a thread's own table watching a pipe end of that table: dumped with the thread's id
// (THREAD_EPOLL_WATCH), and re-added by the thread's agent when a restore replaces the pipe (the
// kernel drops a watch with the file it watches).
TEST(DumpTables, ThreadTableEpollWatchFollowsTheReplacedPipe) {
  Shared* s = shared_page();
  DumpChild c([s](int ready) {
    pthread_t t = start_table_thread(s, ready, epoll_thread);
    pthread_join(t, nullptr);
    return s->result.load();
  });
  ASSERT_TRUE(c.ready());
  const pid_t tid = s->tid.load();
  ASSERT_NE(tid, 0);
  std::vector<std::byte> bytes;
  auto img = testing::dump_image({c.pid()}, bytes);
  ASSERT_TRUE(img) << img.error().what;
  ASSERT_EQ(img->epoll_watches.size(), 1u);
  const EpollWatch& w = img->epoll_watches[0];
  EXPECT_EQ(w.pid, c.pid());
  EXPECT_EQ(w.tid, tid);
  EXPECT_EQ(w.epoll_fd, 32);
  EXPECT_EQ(w.fd, 30);
  EXPECT_EQ(w.events, static_cast<uint32_t>(EPOLLIN | EPOLLERR | EPOLLHUP));  // the kernel adds the last two
  EXPECT_EQ(w.data, 0x3030u);

  const auto main_before = fds_of_table(c.pid(), c.pid()), thread_before = fds_of_table(c.pid(), tid);
  restore::ProcessRestoreOptions replace;
  replace.replace = true;
  auto sum = restore::restore_processes(*img, restore::ProcessRestoreRequest{{{c.pid(), std::nullopt}}, std::nullopt},
                                        replace);
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_EQ(sum->epoll_readded, 1u);
  std::string notes;
  for (const std::string& n : sum->notes) notes += n + "\n";
  EXPECT_NE(notes.find(fmt::format("epoll fd 32 of thread {} of process {}: 1 watch re-added on the restored pipe "
                                   "ends (fd 30)",
                                   tid, c.pid())),
            std::string::npos)
      << notes;
  EXPECT_EQ(notes.find("will not hear"), std::string::npos) << notes;
  EXPECT_EQ(fds_of_table(c.pid(), c.pid()), main_before);
  EXPECT_EQ(fds_of_table(c.pid(), tid), thread_before);
  testing::expect_running(c.pid());
  s->step = 3;
  wait_step(s, 4);
  EXPECT_EQ(s->result.load(), 0) << "2: the program's own ADD; 3: no event with the data; 4: the bytes; 5: still "
                                    "readable once read; 6: a new write not heard";
  EXPECT_EQ(c.reap(), 0);
}

// One epoll instance in the process's table and in its thread's copy of it, watching a pipe of
// each table at the same fd number: each table's fdinfo shows both watches, and each table can
// attribute only its own. Both are recorded (one per table, one epoll id), neither is called lost,
// and a restore that replaces both pipes re-adds each through its own table's agent.
TEST(DumpTables, OneEpollInTwoTablesKeepsTheWatchesOfBoth) {
  Shared* s = shared_page();
  DumpChild c([s](int ready) {
    if (!pipe_at_30("main-data")) return 2;
    const int ep = epoll_create1(0);
    dup2(ep, 32);
    close(ep);
    if (!watch(32, 30, 0xA0)) return 3;
    pthread_t t = start_table_thread(s, ready, shared_epoll_thread);
    pthread_join(t, nullptr);
    return s->result.load();
  });
  ASSERT_TRUE(c.ready());
  const pid_t tid = s->tid.load();
  ASSERT_NE(tid, 0);
  std::vector<std::byte> bytes;
  dump::DumpStats stats;
  auto img = testing::dump_image({c.pid()}, bytes, &stats);
  ASSERT_TRUE(img) << img.error().what;
  ASSERT_EQ(img->epoll_watches.size(), 2u);
  std::map<int32_t, uint64_t> data_by_tid;
  for (const EpollWatch& w : img->epoll_watches) {
    EXPECT_EQ(w.epoll_id, img->epoll_watches[0].epoll_id) << "one instance";
    EXPECT_EQ(w.epoll_fd, 32);
    EXPECT_EQ(w.fd, 30);
    data_by_tid[w.tid] = w.data;
  }
  EXPECT_EQ(data_by_tid, (std::map<int32_t, uint64_t>{{0, 0xA0}, {tid, 0x70}}));
  EXPECT_EQ(stats.epoll_unattributed, 0u);
  EXPECT_TRUE(stats.notes.empty()) << stats.notes.front();

  restore::ProcessRestoreOptions replace;
  replace.replace = true;
  auto sum = restore::restore_processes(*img, restore::ProcessRestoreRequest{{{c.pid(), std::nullopt}}, std::nullopt},
                                        replace);
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_EQ(sum->epoll_readded, 2u);
  testing::expect_running(c.pid());
  s->step = 3;
  wait_step(s, 4);
  EXPECT_EQ(s->result.load(), 0) << "10 + n: epoll_wait reported n watches, not the two";
  EXPECT_EQ(c.reap(), 0);
}

// The same image into another process, which has no such thread: refused, nothing done.
TEST(DumpTables, ThreadTableIntoAnotherProcessIsRefused) {
  Shared* s = shared_page();
  DumpChild c([s](int ready) {
    pthread_t t = start_table_thread(s, ready);
    wait_step(s, 1);
    s->result = 0;
    s->step = 3;
    pthread_join(t, nullptr);
    return 0;
  });
  ASSERT_TRUE(c.ready());
  std::vector<std::byte> bytes;
  auto img = testing::dump_image({c.pid()}, bytes);
  ASSERT_TRUE(img) << img.error().what;
  DumpChild other([](int ready) {
    close(ready);
    pause();
    return 0;
  });
  ASSERT_TRUE(other.ready());
  auto sum = restore::restore_processes(*img, restore::ProcessRestoreRequest{{{other.pid(), c.pid()}}, std::nullopt});
  ASSERT_FALSE(sum);
  EXPECT_EQ(sum.error().kind, Errc::invalid_argument);
  EXPECT_NE(sum.error().what.find("has no thread"), std::string::npos) << sum.error().what;
  testing::expect_running(other.pid());
  s->step = 1;
}

// Two processes, one fd table: restored into the sharer alone, the table's fds arrive once and no
// note calls them dropped; the first process sees them too (one table).
TEST(DumpTables, SharedTableRestoredThroughTheSharer) {
  Shared* s = shared_page();
  DumpChild c([s](int ready) {
    block_usr1();
    if (!pipe_at_30("shared")) return 2;
    long kid = syscall(SYS_clone, CLONE_FILES | SIGCHLD, 0, 0, 0, 0);
    if (kid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      for (;;) pause();
    }
    s->tid = static_cast<pid_t>(kid);
    close(ready);
    wait_step(s, 1);
    char buf[16];
    if (read(30, buf, sizeof buf) != 6) return 3;  // drained
    s->step = 2;
    wait_step(s, 3);
    ssize_t n = read(30, buf, sizeof buf);
    kill(static_cast<pid_t>(kid), SIGKILL);
    waitpid(static_cast<pid_t>(kid), nullptr, 0);
    return n == 6 && memcmp(buf, "shared", 6) == 0 ? 0 : 4;
  });
  ASSERT_TRUE(c.ready());
  pid_t kid = s->tid.load();
  image::MemorySink sink;
  auto st = dump::dump_processes(dump::DumpOptions{.pids = {c.pid(), kid}}, sink);
  ASSERT_TRUE(st) << st.error().what;
  auto img = image::parse(sink.bytes());
  ASSERT_TRUE(img) << img.error().what;
  ASSERT_EQ(img->shared_tables.size(), 1u);
  s->step = 1;
  wait_step(s, 2);
  ASSERT_EQ(s->step.load(), 2);
  std::vector<std::string> notes;
  restore::ProcessRestoreOptions opts;
  opts.note = [&](const std::string& n) { notes.push_back(n); };
  auto sum = restore::restore_processes(*img, restore::ProcessRestoreRequest{{{kid, kid}}, std::nullopt}, opts);
  ASSERT_TRUE(sum) << sum.error().what;
  for (const std::string& n : notes) ADD_FAILURE() << "note: " << n;
  s->step = 3;
  EXPECT_EQ(c.reap(), 0);
}

}  // namespace
}  // namespace pipecr
