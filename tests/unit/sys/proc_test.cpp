// proc_test.cpp: the /proc readers against real processes (forked children), real pipes and real
// blocked reads and writes. Every child is killed and reaped by a ChildGuard on every path.
#include "sys/proc.hpp"

#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "sys/syscalls.hpp"

namespace pipecr::sys {
namespace {

// Owns a forked child: SIGKILL + waitpid on destruction.
struct ChildGuard {
  pid_t pid = -1;
  ChildGuard() = default;
  explicit ChildGuard(pid_t p) : pid(p) {}
  ChildGuard(const ChildGuard&) = delete;
  ChildGuard& operator=(const ChildGuard&) = delete;
  ~ChildGuard() { reap(); }
  void reap() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
      }
      pid = -1;
    }
  }
};

// Forks a child that runs fn() then waits forever; returns once the child said it is ready.
template <class Fn>
pid_t fork_ready(Fn fn) {
  int sync[2];
  if (::pipe2(sync, O_CLOEXEC) < 0) return -1;
  pid_t pid = ::fork();
  if (pid == 0) {
    ::close(sync[0]);
    fn();
    char c = 'r';
    (void)!::write(sync[1], &c, 1);
    for (;;) ::pause();
  }
  ::close(sync[1]);
  char c;
  (void)!::read(sync[0], &c, 1);
  ::close(sync[0]);
  return pid;
}

// Waits until pred() holds or 5 s pass.
template <class Pred>
bool eventually(Pred pred) {
  for (int i = 0; i < 500; ++i) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

// The executable mappings of a child, asked of the kernel (PROCMAP_QUERY) and read from the text
// of /proc/PID/maps: the same list, in a child that added 300 one-page executable mappings with
// holes between them (no two merge) and an executable memfd (a file whose name ends in
// " (deleted)"), beside its libc and [vdso].
TEST(ProcMaps, ExecutableMappingsByQueryAndByListingAgree) {
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t kid = ::fork();
  if (kid == 0) {
    for (int i = 0; i < 300; ++i) {
      void* p = ::mmap(nullptr, 2 * 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p != MAP_FAILED) ::munmap(static_cast<char*>(p) + 4096, 4096);
    }
    const int mfd = static_cast<int>(::syscall(SYS_memfd_create, "pipecr-exec", 0));
    if (mfd < 0 || ::ftruncate(mfd, 4096) < 0 ||
        ::mmap(nullptr, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, mfd, 0) == MAP_FAILED)
      ::_exit(2);
    (void)!::write(ready[1], "r", 1);
    ::pause();
    ::_exit(0);
  }
  ::close(ready[1]);
  char c;
  const bool up = ::read(ready[0], &c, 1) == 1;
  ::close(ready[0]);
  auto by_query = up ? executable_mappings_by_query(kid) : std::nullopt;
  const auto by_listing = executable_mappings_by_listing(kid);
  ::kill(kid, SIGKILL);
  ::waitpid(kid, nullptr, 0);
  ASSERT_TRUE(up);
  if (!by_query) GTEST_SKIP() << "PROCMAP_QUERY (Linux 6.11) missing: the listing is the only way";
  EXPECT_GE(by_listing.size(), 303u);
  EXPECT_EQ(*by_query, by_listing);
  auto has = [&](std::string_view part) {
    return std::any_of(by_listing.begin(), by_listing.end(),
                       [&](const ExecMapping& m) { return m.name.find(part) != std::string::npos; });
  };
  EXPECT_TRUE(has("/libc"));
  EXPECT_TRUE(has("[vdso]"));
  EXPECT_TRUE(has("pipecr-exec (deleted)"));
}

TEST(ProcStat, ParsesCommWithSpacesAndParens) {
  auto st = parse_stat("42 (a) (b c) S 7 8 9 34816 8 4194560 ...");
  ASSERT_TRUE(st) << st.error().what;
  EXPECT_EQ(st->pid, 42);
  EXPECT_EQ(st->comm, "a) (b c");
  EXPECT_EQ(st->state, 'S');
  EXPECT_EQ(st->ppid, 7);
  EXPECT_EQ(st->pgrp, 8);
  EXPECT_EQ(st->session, 9);
  EXPECT_FALSE(parse_stat("garbage"));
  EXPECT_FALSE(parse_stat("1 (x) S"));
}

// Field 39 of stat, the CPU a thread last ran on: on a line without it, -1; for a thread bound to
// one CPU, that CPU, for each CPU it may use in turn.
TEST(ProcStat, ProcessorIsTheCpuTheThreadRunsOn) {
  EXPECT_EQ(parse_stat("42 (a) (b c) S 7 8 9 34816 8 4194560 ...")->processor, -1);
  cpu_set_t all;
  ASSERT_EQ(::sched_getaffinity(0, sizeof all, &all), 0);
  const pid_t tid = static_cast<pid_t>(::syscall(SYS_gettid));
  int tried = 0;
  for (int cpu = 0; cpu < CPU_SETSIZE && tried < 8; ++cpu) {
    if (!CPU_ISSET(cpu, &all)) continue;
    ++tried;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    ASSERT_EQ(::sched_setaffinity(0, sizeof one, &one), 0);
    auto st = read_task_stat(::getpid(), tid);
    ASSERT_TRUE(st) << st.error().what;
    EXPECT_EQ(st->processor, cpu);
  }
  ASSERT_EQ(::sched_setaffinity(0, sizeof all, &all), 0);
  EXPECT_GT(tried, 0);
}

TEST(ProcStatus, ParsesTheFieldsPipecrUses) {
  const auto st = parse_status(
      "Name:\tx\nTracerPid:\t77\nFDSize:\t256\nGroups:\t0 1 2\nThreads:\t3\nSigPnd:\t0000000000000100\n"
      "ShdPnd:\t0000000000020000\nSigBlk:\t0000000000000104\nSeccomp:\t2\nSeccomp_filters:\t1\n");
  EXPECT_EQ(st.tracer, 77);
  EXPECT_EQ(st.fd_size, 256u);
  EXPECT_EQ(st.threads, 3u);
  EXPECT_EQ(st.pending, 0x20100u);
  EXPECT_EQ(st.blocked, 0x104u);
  EXPECT_EQ(st.seccomp, 2);
  const auto none = parse_status("Name:\tx\nState:\tZ (zombie)\n");
  EXPECT_FALSE(none.fd_size);
  EXPECT_EQ(none.seccomp, -1);
  EXPECT_EQ(none.threads, 0u);
}

// A child with a signal pending and blocked, and (as root) thousands of supplementary groups: its
// Groups: line, before the others, pushes them far past the first 4 KiB read.
TEST(ProcStatus, ReadsAChildsPendingSignalPastALongGroupsLine) {
  const bool root = ::geteuid() == 0;
  ChildGuard child(fork_ready([root] {
    if (root) {
      std::vector<gid_t> groups(3000);
      for (size_t i = 0; i < groups.size(); ++i) groups[i] = static_cast<gid_t>(100000 + i);
      if (::setgroups(groups.size(), groups.data()) < 0) ::_exit(2);
    }
    sigset_t usr2;
    sigemptyset(&usr2);
    sigaddset(&usr2, SIGUSR2);
    ::sigprocmask(SIG_BLOCK, &usr2, nullptr);
    ::raise(SIGUSR2);
  }));
  ASSERT_GT(child.pid, 0);
  if (root) {
    auto text = read_proc_file(fmt::format("/proc/{}/status", child.pid));
    ASSERT_TRUE(text);
    ASSERT_GT(text->find("\nThreads:"), 4096u) << "the Groups: line is not long enough to test the fallback";
  }
  for (pid_t tid : {pid_t{0}, child.pid}) {
    auto st = read_status(child.pid, tid);
    ASSERT_TRUE(st) << st.error().what;
    const uint64_t bit = 1ull << (SIGUSR2 - 1);
    EXPECT_EQ(st->pending & bit, bit);
    EXPECT_EQ(st->blocked & bit, bit);
    EXPECT_EQ(st->threads, 1u);
    EXPECT_EQ(st->tracer, 0);
    ASSERT_TRUE(st->fd_size);
    EXPECT_GE(*st->fd_size, 64u);
  }
  const pid_t pid = child.pid;
  child.reap();
  auto gone = read_status(pid);
  ASSERT_FALSE(gone);
  EXPECT_EQ(gone.error().kind, Errc::gone);
}

TEST(ProcStat, ReadsSelf) {
  auto st = read_stat(::getpid());
  ASSERT_TRUE(st) << st.error().what;
  EXPECT_EQ(st->pid, ::getpid());
  EXPECT_EQ(st->ppid, ::getppid());
  EXPECT_EQ(st->state, 'R');
  EXPECT_EQ(*read_ppid(::getpid()), ::getppid());
}

TEST(ProcStat, ChildWithHostileCommName) {
  ChildGuard child(fork_ready([] { ::prctl(PR_SET_NAME, "x) (y z", 0, 0, 0); }));
  ASSERT_GT(child.pid, 0);
  auto st = read_stat(child.pid);
  ASSERT_TRUE(st) << st.error().what;
  EXPECT_EQ(st->comm, "x) (y z");
  EXPECT_EQ(st->ppid, ::getpid());
  EXPECT_TRUE(eventually([&] { return read_state(child.pid).value_or('?') == 'S'; }));
  EXPECT_EQ(*read_comm(child.pid), "x) (y z");
}

TEST(ProcCmdline, SplitsAtNul) {
  auto argv = read_cmdline(::getpid());
  ASSERT_TRUE(argv) << argv.error().what;
  ASSERT_FALSE(argv->empty());
  EXPECT_NE(argv->front().find("proc_test"), std::string::npos);
}

TEST(ProcList, PidsAndThreads) {
  auto pids = list_pids();
  ASSERT_TRUE(pids) << pids.error().what;
  EXPECT_TRUE(std::binary_search(pids->begin(), pids->end(), ::getpid()));
  EXPECT_TRUE(std::is_sorted(pids->begin(), pids->end()));

  auto before = list_threads(::getpid());
  ASSERT_TRUE(before);
  int go = 0;
  std::thread t([&] {
    while (!__atomic_load_n(&go, __ATOMIC_ACQUIRE)) ::usleep(1000);
  });
  auto during = list_threads(::getpid());
  __atomic_store_n(&go, 1, __ATOMIC_RELEASE);
  t.join();
  ASSERT_TRUE(during);
  EXPECT_EQ(during->size(), before->size() + 1);
  EXPECT_TRUE(std::binary_search(during->begin(), during->end(), ::getpid()));
}

TEST(ProcTree, ChildrenAndDescendants) {
  // child forks a grandchild, then both wait.
  int gsync[2];
  ASSERT_EQ(::pipe2(gsync, O_CLOEXEC), 0);
  ChildGuard child(fork_ready([&] {
    pid_t g = ::fork();
    if (g == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      for (;;) ::pause();
    }
    (void)!::write(gsync[1], &g, sizeof g);
  }));
  ::close(gsync[1]);
  pid_t grandchild = 0;
  ASSERT_EQ(::read(gsync[0], &grandchild, sizeof grandchild), static_cast<ssize_t>(sizeof grandchild));
  ::close(gsync[0]);
  ChildGuard g(grandchild);  // killed directly too (it is not our child: waitpid fails harmlessly)

  auto kids = children(::getpid());
  ASSERT_TRUE(kids) << kids.error().what;
  EXPECT_NE(std::find(kids->begin(), kids->end(), child.pid), kids->end());
  auto all = descendants(child.pid);
  ASSERT_TRUE(all);
  ASSERT_EQ(all->size(), 1u);
  EXPECT_EQ(all->front(), grandchild);
  auto mine = descendants(::getpid());
  ASSERT_TRUE(mine);
  auto ci = std::find(mine->begin(), mine->end(), child.pid);
  auto gi = std::find(mine->begin(), mine->end(), grandchild);
  ASSERT_NE(ci, mine->end());
  ASSERT_NE(gi, mine->end());
  EXPECT_LT(ci, gi);  // parents before children
}

TEST(ProcFds, ListsPipeWithInode) {
  auto p = make_pipe(O_CLOEXEC);
  ASSERT_TRUE(p);
  struct stat st {};
  ASSERT_EQ(::fstat(p->read.get(), &st), 0);
  auto fds = list_fds(::getpid());
  ASSERT_TRUE(fds) << fds.error().what;
  auto it = std::find_if(fds->begin(), fds->end(), [&](const FdEntry& e) { return e.fd == p->read.get(); });
  ASSERT_NE(it, fds->end());
  EXPECT_EQ(pipe_inode_from_link(it->target), st.st_ino);
  EXPECT_EQ(*read_fd_target(::getpid(), p->write.get()), it->target);
  auto bare = list_fds(::getpid(), false);
  ASSERT_TRUE(bare);
  EXPECT_EQ(bare->size(), fds->size());
}

// The kernel's count of a table's open fds (Linux 6.2) is the listing's, for the process and for one
// of its threads (the same table), and follows fds opened and closed; a table that grew keeps its
// slots but not its count. Where the kernel does not count, 0.
TEST(ProcFds, OpenFdCountIsTheListingsCount) {
  if (open_fd_count(::getpid()) == 0) GTEST_SKIP() << "the kernel does not count open fds in /proc/PID/fd (Linux 6.2)";
  auto listed = [] { return list_fds(::getpid(), false)->size() - 1; };  // less the listing's own fd
  EXPECT_EQ(open_fd_count(::getpid()), listed());
  std::vector<UniqueFd> more;
  for (int i = 0; i < 100; ++i) more.emplace_back(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  UniqueFd high(::fcntl(more[0].get(), F_DUPFD_CLOEXEC, 3000));
  ASSERT_TRUE(high);
  const uint32_t with = open_fd_count(::getpid());
  EXPECT_EQ(with, listed());
  std::atomic<pid_t> live{0};
  std::atomic<bool> done{false};
  std::thread t([&] {
    live = static_cast<pid_t>(::syscall(SYS_gettid));
    while (!done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  });
  while (!live) std::this_thread::yield();
  EXPECT_EQ(open_fd_count(::getpid(), live), with);
  done = true;
  t.join();
  more.clear();
  high.reset();
  EXPECT_EQ(open_fd_count(::getpid()), with - 101);
  EXPECT_EQ(open_fd_count(::getpid()), listed());
}

TEST(ProcFds, TenThousandFdsQuickly) {
  rlimit old{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &old), 0);
  if (old.rlim_max < 10300) GTEST_SKIP() << "RLIMIT_NOFILE hard limit below 10300";
  rlimit more = old;
  more.rlim_cur = std::max<rlim_t>(old.rlim_cur, 10300);
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &more), 0);
  auto p = make_pipe(O_CLOEXEC);
  ASSERT_TRUE(p);
  std::vector<UniqueFd> dups;
  for (int i = 0; i < 10000; ++i) dups.emplace_back(::fcntl(p->read.get(), F_DUPFD_CLOEXEC, 0));
  auto t0 = std::chrono::steady_clock::now();
  auto fds = list_fds(::getpid());
  auto ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(fds) << fds.error().what;
  EXPECT_GE(fds->size(), 10002u);
  EXPECT_TRUE(std::is_sorted(fds->begin(), fds->end(), [](auto& a, auto& b) { return a.fd < b.fd; }));
  // Measured about 10 ms here (one readlinkat per fd); generous bound for sanitizer builds.
  EXPECT_LT(ms, 2000.0);
  RecordProperty("list_fds_10000_ms", std::to_string(ms));
  dups.clear();
  ::setrlimit(RLIMIT_NOFILE, &old);
}

// The kernel's O_LARGEFILE on x86_64; glibc defines O_LARGEFILE as 0 for 64-bit programs.
constexpr int kKernelLargefile = 0100000;

TEST(ProcFdinfo, FlagsAreOctalAndInodeMatches) {
  auto p = make_pipe(O_NONBLOCK | O_CLOEXEC);
  ASSERT_TRUE(p);
  struct stat st {};
  ASSERT_EQ(::fstat(p->read.get(), &st), 0);
  auto info = read_fdinfo(::getpid(), p->read.get());
  ASSERT_TRUE(info) << info.error().what;
  EXPECT_EQ(info->ino, st.st_ino);
  EXPECT_TRUE(info->flags & O_NONBLOCK);
  EXPECT_TRUE(info->flags & O_CLOEXEC);
  EXPECT_FALSE(info->flags & kKernelLargefile);  // pipe2 does not add it
  EXPECT_EQ(info->flags & O_ACCMODE, O_RDONLY);
  auto w = read_fdinfo(::getpid(), p->write.get());
  ASSERT_TRUE(w);
  EXPECT_EQ(w->flags & O_ACCMODE, O_WRONLY);

  // A reopen through /proc gets O_LARGEFILE from open().
  UniqueFd re(::open(fmt::format("/proc/self/fd/{}", p->read.get()).c_str(), O_RDONLY | O_NONBLOCK));
  ASSERT_TRUE(re);
  auto ri = read_fdinfo(::getpid(), re.get());
  ASSERT_TRUE(ri);
  EXPECT_TRUE(ri->flags & kKernelLargefile);
  EXPECT_FALSE(ri->flags & O_CLOEXEC);
}

TEST(ProcFdinfo, Parse) {
  auto i = parse_fdinfo("pos:\t5\nflags:\t0104002\nmnt_id:\t15\nino:\t987\n");
  ASSERT_TRUE(i);
  EXPECT_EQ(i->pos, 5u);
  EXPECT_EQ(i->flags, 0104002);
  EXPECT_EQ(i->mnt_id, 15);
  EXPECT_EQ(i->ino, 987u);
  EXPECT_FALSE(parse_fdinfo("pos:\t0\n"));
  EXPECT_FALSE(parse_fdinfo("flags:\t0999\n"));
}

TEST(ProcFds, PipeInodeFromLink) {
  EXPECT_EQ(pipe_inode_from_link("pipe:[123]"), 123u);
  EXPECT_EQ(pipe_inode_from_link("pipe:[18446744073709551615]"), UINT64_MAX);
  EXPECT_FALSE(pipe_inode_from_link("pipe:[]"));
  EXPECT_FALSE(pipe_inode_from_link("socket:[5]"));
  EXPECT_FALSE(pipe_inode_from_link("pipe:[12"));
  EXPECT_FALSE(pipe_inode_from_link("pipe:[1x]"));
  EXPECT_FALSE(pipe_inode_from_link("/tmp/fifo"));
}

TEST(ProcErrors, GoneProcess) {
  pid_t pid = ::fork();
  if (pid == 0) ::_exit(0);
  ASSERT_GT(pid, 0);
  ASSERT_EQ(::waitpid(pid, nullptr, 0), pid);
  auto st = read_stat(pid);
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().kind, Errc::gone) << st.error().what;
  auto fds = list_fds(pid);
  ASSERT_FALSE(fds);
  EXPECT_EQ(fds.error().kind, Errc::gone);
  auto info = read_fdinfo(pid, 0);
  ASSERT_FALSE(info);
  EXPECT_EQ(info.error().kind, Errc::gone);
  EXPECT_EQ(read_comm(pid).error().kind, Errc::gone);
}

TEST(ProcErrors, ClosedFdIsNotFound) {
  auto p = make_pipe(O_CLOEXEC);
  ASSERT_TRUE(p);
  int fd = p->read.get();
  p->read.reset();
  auto info = read_fdinfo(::getpid(), fd);
  ASSERT_FALSE(info);
  EXPECT_EQ(info.error().kind, Errc::not_found) << info.error().what;
}

TEST(ProcErrors, PermissionDeniedForOtherUser) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to switch to an unprivileged uid";
  // A child that drops to nobody and tries to list our fds: EACCES -> Errc::permission.
  pid_t me = ::getpid();
  pid_t pid = ::fork();
  if (pid == 0) {
    if (::setgid(65534) != 0 || ::setuid(65534) != 0) ::_exit(2);
    auto fds = list_fds(me);
    ::_exit(!fds && fds.error().kind == Errc::permission ? 0 : 1);
  }
  ChildGuard guard(pid);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  guard.pid = -1;
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

TEST(ProcSyscall, Parse) {
  auto run = parse_task_syscall("running\n");
  ASSERT_TRUE(run);
  EXPECT_EQ(run->nr, -1);
  auto kern = parse_task_syscall("-1 0x7ffd 0x7f00\n");
  ASSERT_TRUE(kern);
  EXPECT_EQ(kern->nr, -1);
  auto rd = parse_task_syscall("0 0x5 0x7ffc 0x10000 0x0 0x0 0x0 0x7ffd 0x7f12\n");
  ASSERT_TRUE(rd);
  EXPECT_EQ(rd->nr, 0);
  EXPECT_EQ(rd->args[0], 5u);
  EXPECT_EQ(rd->args[2], 0x10000u);
  auto b = blocked_io(*rd);
  ASSERT_TRUE(b);
  EXPECT_EQ(b->fd, 5);
  EXPECT_EQ(b->dir, Blocked::reading);
  TaskSyscall sleeping;
  sleeping.nr = 230;  // clock_nanosleep
  EXPECT_FALSE(blocked_io(sleeping));
}

TEST(ProcSyscall, SeesBlockedReaderAndWriter) {
  auto empty = make_pipe(0);
  auto full = make_pipe(0);
  ASSERT_TRUE(empty && full);
  int rfd = empty->read.get();
  int wfd = full->write.get();
  // Child 1 reads an empty pipe; child 2 writes into a pipe nobody reads until it is full.
  pid_t r = ::fork();
  if (r == 0) {
    char c;
    (void)!::read(rfd, &c, 1);
    ::_exit(0);
  }
  ChildGuard reader(r);
  pid_t w = ::fork();
  if (w == 0) {
    static char buf[1 << 17];
    (void)!::write(wfd, buf, sizeof buf);
    ::_exit(0);
  }
  ChildGuard writer(w);

  auto blocked_on = [](pid_t pid, int fd, Blocked dir) {
    auto b = list_blocked_io(pid);
    if (!b) return false;
    for (const BlockedIo& x : *b)
      if (x.fd == fd && x.dir == dir && x.tid == pid) return true;
    return false;
  };
  EXPECT_TRUE(eventually([&] { return blocked_on(reader.pid, rfd, Blocked::reading); }));
  EXPECT_TRUE(eventually([&] { return blocked_on(writer.pid, wfd, Blocked::writing); }));
  auto rs = read_task_syscall(reader.pid, reader.pid);
  ASSERT_TRUE(rs);
  // "pipe_read"; "anon_pipe_read" since the anonymous pipe ops were split (seen on 6.18).
  EXPECT_NE(rs->wchan.find("pipe_read"), std::string::npos) << rs->wchan;
  auto ws = read_task_syscall(writer.pid, writer.pid);
  ASSERT_TRUE(ws);
  EXPECT_NE(ws->wchan.find("pipe_write"), std::string::npos) << ws->wchan;
}

// splice, tee and vmsplice name two fds (or one of either direction): the side the thread sleeps on
// is the one reported. Real threads blocked in splice() from an empty pipe, splice() into a full one,
// and vmsplice() into a full one.
TEST(ProcSyscall, SeesWhichSideOfASpliceBlocks) {
  auto empty = make_pipe(0);
  auto full = make_pipe(0);
  auto spare = make_pipe(0);
  ASSERT_TRUE(empty && full && spare);
  ASSERT_EQ(::fcntl(full->write.get(), F_SETFL, O_NONBLOCK), 0);
  static char buf[1 << 16];
  while (::write(full->write.get(), buf, sizeof buf) > 0) {
  }
  ASSERT_EQ(::fcntl(full->write.get(), F_SETFL, 0), 0);
  ASSERT_EQ(::write(spare->write.get(), "abc", 3), 3);
  const int in = empty->read.get(), out = full->write.get(), src = spare->read.get();

  pid_t a = ::fork();  // splice(in -> spare's write end): waits for in to be readable
  if (a == 0) {
    (void)!::splice(in, nullptr, spare->write.get(), nullptr, 16, 0);
    ::_exit(0);
  }
  ChildGuard reader(a);
  pid_t b = ::fork();  // splice(spare's read end -> out): waits for out to be writable
  if (b == 0) {
    (void)!::splice(src, nullptr, out, nullptr, 3, 0);
    ::_exit(0);
  }
  ChildGuard writer(b);
  pid_t c = ::fork();  // vmsplice into out: waits for out to be writable
  if (c == 0) {
    iovec iov{buf, 16};
    (void)!::vmsplice(out, &iov, 1, 0);
    ::_exit(0);
  }
  ChildGuard vwriter(c);

  auto blocked_on = [](pid_t pid, int fd, Blocked dir) {
    auto bl = list_blocked_io(pid);
    if (!bl) return false;
    for (const BlockedIo& x : *bl)
      if (x.fd == fd && x.dir == dir) return true;
    return false;
  };
  EXPECT_TRUE(eventually([&] { return blocked_on(reader.pid, in, Blocked::reading); }));
  EXPECT_TRUE(eventually([&] { return blocked_on(writer.pid, out, Blocked::writing); }));
  EXPECT_TRUE(eventually([&] { return blocked_on(vwriter.pid, out, Blocked::writing); }));
  EXPECT_FALSE(blocked_on(reader.pid, spare->write.get(), Blocked::writing));
}

}  // namespace
}  // namespace pipecr::sys
