// fdt_shared: two processes that share one fd table (clone(CLONE_FILES) without CLONE_THREAD),
// after CRIU's zdtm fdt_shared, with pipes in the table instead of a regular file; and a third,
// forked, with a copy of it.
//
// The parent makes a pipe at fds 128 (read) and 129 (write, O_NONBLOCK) with 6,000 bytes queued,
// then clones the sharer and forks the copier. Every fd is held in two tables (the shared one and
// the copy), by three processes. A restore must give the shared table each fd once: installing it
// for each of its two processes would leave an extra open file description, which the checks
// below catch, since each end must be one description in all three processes.
//
// After SIGUSR1 (the parent passes it on): the sharer reads the first 2,000 bytes through fd 128
// and dup2s fd 128 to fd 140, which the parent must then see (proof that the table is still
// one); the copier reads the next 2,000 through its own fd 128, clears O_NONBLOCK through its
// fd 129, which the parent must then see (one description across the fork), and closes both its
// fds; the parent reads the last 2,000, checks fd 140, writes through fd 129 and reads it back.
// The bytes read in turn show that fd 128 is one pipe, and one read position, in all three.
#include <sched.h>

#include "zdtmlite.h"

namespace {
constexpr int kR = 128, kW = 129, kSharerDup = 140;
constexpr size_t kPart = 2000;
constexpr uint32_t kSeed = 91;

void check_ends(const char* who) {
  zdtm::expect_fd(kR, O_RDONLY, 0, false, who);
  zdtm::expect_fd(kW, O_WRONLY, O_NONBLOCK, true, who);
  ZDTM_CHECK(zdtm::inode_of(kR) == zdtm::inode_of(kW), "%s: fds %d and %d are not one pipe", who, kR, kW);
  ZDTM_CHECK(zdtm::pipe_size(kR) == 65536, "%s: capacity %d", who, zdtm::pipe_size(kR));
}

// The sharer: runs on its own stack, in the parent's fd table.
int sharer_main(void*) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  zdtm::wait_for_signal();
  check_ends("sharer");
  ZDTM_CHECK(zdtm::fionread(kR) == static_cast<int>(3 * kPart), "sharer: %d bytes queued, expected %zu",
             zdtm::fionread(kR), 3 * kPart);
  zdtm::expect_pattern(kR, kSeed, 0, kPart, "sharer");
  if (dup2(kR, kSharerDup) != kSharerDup) ZDTM_SYSFAIL("dup2(%d, %d)", kR, kSharerDup);
  _exit(0);
}

pid_t clone_sharer() {
  static std::vector<char> stack(256 * 1024);
  pid_t pid = clone(sharer_main, stack.data() + stack.size(), CLONE_FILES | SIGCHLD, nullptr);
  if (pid < 0) ZDTM_SYSFAIL("clone(CLONE_FILES)");
  return pid;
}

}  // namespace

int main() {
  zdtm::init("fdt_shared");
  int p[2];
  if (pipe(p) != 0) ZDTM_SYSFAIL("pipe");
  zdtm::move_fd(p[0], kR);
  zdtm::move_fd(p[1], kW);
  zdtm::setfl(kW, O_NONBLOCK);
  if (fcntl(kW, F_SETFD, FD_CLOEXEC) != 0) ZDTM_SYSFAIL("F_SETFD");
  zdtm::write_pattern(kW, kSeed, 0, 3 * kPart, 1000, "writer");

  // The copier first: a fork made after the clone would also copy the sharer's stack, harmlessly,
  // but this order keeps the sharer the only user of the table besides the parent.
  pid_t copier = zdtm::fork_child();
  if (copier == 0) {
    zdtm::wait_for_signal();
    check_ends("copier");
    // The sharer has read its part by now (the parent waited for it before passing SIGUSR1 on).
    ZDTM_CHECK(zdtm::fionread(kR) == static_cast<int>(2 * kPart), "copier: %d bytes queued, expected %zu",
               zdtm::fionread(kR), 2 * kPart);
    zdtm::expect_pattern(kR, kSeed, kPart, kPart, "copier");
    // Its fd 129 is the parent's description: the parent's O_NONBLOCK is ours.
    if (fcntl(kW, F_SETFL, 0) != 0) ZDTM_SYSFAIL("F_SETFL(copier's fd %d)", kW);
    close(kR);
    close(kW);
    zdtm::pass();
  }
  pid_t sharer = clone_sharer();
  zdtm::wait_blocked(copier, SYS_rt_sigtimedwait, -1);
  zdtm::wait_blocked(sharer, SYS_rt_sigtimedwait, -1);

  zdtm::Expect e;
  e.process(getpid());
  e.process(copier);
  e.process(sharer);
  e.pipe("P", 65536, static_cast<long>(3 * kPart));
  e.file("r", "P", "read");
  e.file("w", "P", "write", O_NONBLOCK);
  for (pid_t pid : {getpid(), copier, sharer}) {
    e.fd(pid, kR, "r");
    e.fd(pid, kW, "w", true);
  }
  e.write();
  zdtm::ready();
  zdtm::wait_for_signal();

  if (kill(sharer, SIGUSR1) != 0) ZDTM_SYSFAIL("kill(sharer)");
  int st = zdtm::reap(sharer);
  ZDTM_CHECK(st == 0, "sharer exited with %d", st);
  if (kill(copier, SIGUSR1) != 0) ZDTM_SYSFAIL("kill(copier)");
  st = zdtm::reap(copier);
  ZDTM_CHECK(st == 0, "copier exited with %d", st);

  // The copier cleared O_NONBLOCK through its copy of fd 129: one description in both tables.
  ZDTM_CHECK((zdtm::getfl(kW) & O_NONBLOCK) == 0, "fd %d is not the copier's description (O_NONBLOCK still set)",
             kW);
  zdtm::setfl(kW, O_NONBLOCK);
  check_ends("parent");
  // The sharer's dup2 landed in this table.
  struct stat st_dup;
  ZDTM_CHECK(fstat(kSharerDup, &st_dup) == 0, "fd %d, which the sharer made, is not in this table", kSharerDup);
  zdtm::expect_shared(kR, kSharerDup, true, "fd 128 and the sharer's dup");
  ZDTM_CHECK(zdtm::fionread(kR) == static_cast<int>(kPart), "parent: %d bytes queued, expected %zu",
             zdtm::fionread(kR), kPart);
  zdtm::expect_pattern(kR, kSeed, 2 * kPart, kPart, "parent");
  zdtm::write_pattern(kW, kSeed + 1, 0, 100, 100, "parent's writer");
  zdtm::expect_pattern(kR, kSeed + 1, 0, 100, "parent's own bytes");
  zdtm::pass();
}
