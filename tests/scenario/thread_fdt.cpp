// thread_fdt: a thread with an fd table of its own (unshare(CLONE_FILES)) next to the process's
// table, the same fd numbers in both on different pipes, and one pipe in both tables.
//
// The process's table: pipe A at fds 40 (read) and 41 (write), 3,000 bytes queued. The thread's
// table, copied from it by unshare(): fds 40 and 41 replaced by pipe T (5,000 bytes of another
// stream, its read end O_NONBLOCK), while fd 42 keeps the write end of pipe S, one description in
// both tables, whose read end is fd 43 of the process's table only (700 bytes queued). A restore
// must put each table's pipes back in that table (same numbers, other pipes), keep S's write end
// one description across the two tables, and leave each table without an extra fd.
//
// The thread's table also holds an epoll at fd 44 watching its fd 40 (T's read end, EPOLLIN, data
// 0x7470); a restore that puts a new pipe T there must add that watch again in the thread's table.
//
// After SIGUSR1 the thread checks its table (the bytes of T and the flags of 40, 41 and 42; no fd
// 43; its epoll reports T readable, then nothing once T is drained, then a new write), clears
// O_NONBLOCK on its fd 42, and exits; the main thread then checks its own table, and that the
// thread's change shows through its own fd 42 (one description).
#include <pthread.h>
#include <sched.h>
#include <sys/epoll.h>

#include "zdtmlite.h"

namespace {
constexpr int kR = 40, kW = 41, kShared = 42, kSharedRead = 43, kEpoll = 44;
constexpr uint64_t kEpollData = 0x7470;
constexpr size_t kMain = 3000, kThread = 5000, kSharedBytes = 700;
constexpr uint32_t kSeedMain = 61, kSeedThread = 62, kSeedShared = 63;

struct Sync {
  pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
  pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
  int step = 0;
  pid_t tid = 0;
};
Sync g_sync;

void set_step(int n) {
  pthread_mutex_lock(&g_sync.lock);
  g_sync.step = n;
  pthread_cond_broadcast(&g_sync.cond);
  pthread_mutex_unlock(&g_sync.lock);
}

void wait_step(int n) {
  pthread_mutex_lock(&g_sync.lock);
  while (g_sync.step < n) pthread_cond_wait(&g_sync.cond, &g_sync.lock);
  pthread_mutex_unlock(&g_sync.lock);
}

// arg: the harness's ready fd (or -1), which the thread's copy of the table must not keep.
void* thread_main(void* arg) {
  if (unshare(CLONE_FILES) != 0) ZDTM_SYSFAIL("unshare(CLONE_FILES)");
  if (const int ready = *static_cast<const int*>(arg); ready >= 0) close(ready);
  close(kSharedRead);  // the read end of S stays in the process's table only
  int p[2];
  if (pipe(p) != 0) ZDTM_SYSFAIL("pipe");
  zdtm::move_fd(p[0], kR);
  zdtm::move_fd(p[1], kW);
  zdtm::write_pattern(kW, kSeedThread, 0, kThread, 1000, "thread's writer");
  zdtm::setfl(kR, O_NONBLOCK);
  const int ep = epoll_create1(0);
  if (ep < 0) ZDTM_SYSFAIL("epoll_create1");
  zdtm::move_fd(ep, kEpoll);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kEpollData;
  if (epoll_ctl(kEpoll, EPOLL_CTL_ADD, kR, &ev) != 0) ZDTM_SYSFAIL("epoll_ctl(ADD %d)", kR);
  g_sync.tid = static_cast<pid_t>(syscall(SYS_gettid));
  set_step(1);
  wait_step(2);  // SIGUSR1 came

  const char* who = "thread";
  zdtm::expect_fd(kR, O_RDONLY, O_NONBLOCK, false, who);
  zdtm::expect_fd(kW, O_WRONLY, 0, false, who);
  zdtm::expect_fd(kShared, O_WRONLY, O_NONBLOCK, false, who);
  ZDTM_CHECK(fcntl(kSharedRead, F_GETFD) < 0 && errno == EBADF, "thread: fd %d is open in its table", kSharedRead);
  ZDTM_CHECK(zdtm::inode_of(kR) == zdtm::inode_of(kW), "thread: fds %d and %d are not one pipe", kR, kW);
  ZDTM_CHECK(zdtm::fionread(kR) == static_cast<int>(kThread), "thread: %d bytes queued, expected %zu",
             zdtm::fionread(kR), kThread);
  // The epoll of the thread's table hears the pipe now at its fd 40: the watch follows a new pipe.
  epoll_event got{};
  auto heard = [&] {
    int n;
    do n = epoll_wait(kEpoll, &got, 1, 0);
    while (n < 0 && errno == EINTR);
    if (n < 0) ZDTM_SYSFAIL("epoll_wait(%d)", kEpoll);
    return n;
  };
  ZDTM_CHECK(heard() == 1 && got.data.u64 == kEpollData && got.events == EPOLLIN,
             "thread: epoll fd %d does not report fd %d readable (the watch did not follow the pipe)", kEpoll, kR);
  zdtm::expect_pattern(kR, kSeedThread, 0, kThread, "thread's pipe");
  char c;
  errno = 0;
  ZDTM_CHECK(read(kR, &c, 1) < 0 && errno == EAGAIN, "thread: empty pipe gave no EAGAIN (errno %d)", errno);
  ZDTM_CHECK(heard() == 0, "thread: epoll fd %d reports the drained pipe readable", kEpoll);
  zdtm::write_pattern(kW, kSeedThread + 10, 0, 50, 50, "thread's writer");
  ZDTM_CHECK(heard() == 1 && got.data.u64 == kEpollData, "thread: epoll fd %d did not hear a new write", kEpoll);
  zdtm::expect_pattern(kR, kSeedThread + 10, 0, 50, "thread's own new bytes");
  if (fcntl(kShared, F_SETFL, 0) != 0) ZDTM_SYSFAIL("F_SETFL(thread's fd %d)", kShared);
  return nullptr;
}
}  // namespace

int main() {
  zdtm::init("thread_fdt");
  int p[2];
  if (pipe(p) != 0) ZDTM_SYSFAIL("pipe");
  zdtm::move_fd(p[0], kR);
  zdtm::move_fd(p[1], kW);
  zdtm::write_pattern(kW, kSeedMain, 0, kMain, 1000, "writer");
  if (pipe(p) != 0) ZDTM_SYSFAIL("pipe");
  zdtm::move_fd(p[0], kSharedRead);
  zdtm::move_fd(p[1], kShared);
  zdtm::setfl(kShared, O_NONBLOCK);
  zdtm::write_pattern(kShared, kSeedShared, 0, kSharedBytes, 700, "shared writer");
  static const int ready_fd = zdtm::g_ready_fd;
  pthread_t t;
  if (pthread_create(&t, nullptr, thread_main, const_cast<int*>(&ready_fd)) != 0) ZDTM_SYSFAIL("pthread_create");
  wait_step(1);

  zdtm::Expect e;
  e.process(getpid());
  e.pipe("A", 65536, static_cast<long>(kMain));
  e.pipe("T", 65536, static_cast<long>(kThread));
  e.pipe("S", 65536, static_cast<long>(kSharedBytes));
  e.file("a_r", "A", "read");
  e.file("a_w", "A", "write");
  e.file("t_r", "T", "read", O_NONBLOCK);
  e.file("t_w", "T", "write");
  e.file("s_w", "S", "write", O_NONBLOCK);
  e.file("s_r", "S", "read");
  e.fd(getpid(), kR, "a_r");
  e.fd(getpid(), kW, "a_w");
  e.fd(getpid(), kShared, "s_w");
  e.fd(getpid(), kSharedRead, "s_r");
  e.fd(getpid(), kR, "t_r").tid = g_sync.tid;
  e.fd(getpid(), kW, "t_w").tid = g_sync.tid;
  e.fd(getpid(), kShared, "s_w").tid = g_sync.tid;
  e.write();
  zdtm::ready();
  zdtm::wait_for_signal();
  set_step(2);
  if (pthread_join(t, nullptr) != 0) ZDTM_SYSFAIL("pthread_join");

  const char* who = "process";
  zdtm::expect_fd(kR, O_RDONLY, 0, false, who);
  zdtm::expect_fd(kW, O_WRONLY, 0, false, who);
  // The thread cleared O_NONBLOCK through its fd 42: the same description as this table's fd 42.
  zdtm::expect_fd(kShared, O_WRONLY, 0, false, "process's fd 42, after the thread cleared O_NONBLOCK on its own");
  zdtm::expect_fd(kSharedRead, O_RDONLY, 0, false, who);
  ZDTM_CHECK(zdtm::inode_of(kR) == zdtm::inode_of(kW), "process: fds %d and %d are not one pipe", kR, kW);
  ZDTM_CHECK(zdtm::inode_of(kShared) == zdtm::inode_of(kSharedRead), "process: fds %d and %d are not one pipe",
             kShared, kSharedRead);
  ZDTM_CHECK(zdtm::fionread(kR) == static_cast<int>(kMain), "process: %d bytes queued, expected %zu",
             zdtm::fionread(kR), kMain);
  zdtm::expect_pattern(kR, kSeedMain, 0, kMain, "process's pipe");
  ZDTM_CHECK(zdtm::fionread(kSharedRead) == static_cast<int>(kSharedBytes), "shared pipe: %d bytes, expected %zu",
             zdtm::fionread(kSharedRead), kSharedBytes);
  zdtm::expect_pattern(kSharedRead, kSeedShared, 0, kSharedBytes, "shared pipe");
  zdtm::write_pattern(kW, kSeedMain + 10, 0, 50, 50, "process's writer");
  zdtm::expect_pattern(kR, kSeedMain + 10, 0, 50, "process's own new bytes");
  zdtm::pass();
}
