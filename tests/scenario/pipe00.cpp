// pipe00: two pipes cross-wired between a parent and its child at fds 11 and 12, the child blocked
// in read().
//
// Pipe A carries child -> parent, pipe B parent -> child. The parent holds A's read end at 11 and
// B's write end at 12; the child holds B's read end at 11 and A's write end at 12: the same
// numbers name opposite ends in the two processes, so a restore that installs an fd at its number
// in the wrong process, or connects the wrong ends, breaks the conversation. The child leaves
// 3000 bytes in A, then blocks in read(11) on the empty B. After SIGUSR1 the parent checks A's
// bytes and writes a message to B: the child, still in the same read() (restarted on the restored
// pipe), must receive it whole, then answer on A; both then see EOF, which proves no stray
// writer (of A or B) was left behind.
#include "zdtmlite.h"

namespace {

constexpr size_t kInFlight = 3000;  // child -> parent, queued in A at dump time
constexpr size_t kMessage = 5000;   // parent -> child after the signal
constexpr size_t kReply = 2000;     // child -> parent after the message

// The child: fd 11 = B's read end, fd 12 = A's write end.
[[noreturn]] void child() {
  const int rd = 11, wr = 12;
  zdtm::write_pattern(wr, 1, 0, kInFlight, kInFlight, "A (child fd 12)");
  // Blocks here (empty B) until the parent writes, long after the dump and restore.
  zdtm::expect_pattern(rd, 2, 0, kMessage, "B read by the child (fd 11)");
  zdtm::expect_fd(rd, O_RDONLY, 0, false, "child B read end");
  zdtm::expect_fd(wr, O_WRONLY, 0, false, "child A write end");
  zdtm::write_pattern(wr, 3, 0, kReply, kReply, "A reply (child fd 12)");
  close(wr);
  char c;
  ssize_t r = read(rd, &c, 1);
  ZDTM_CHECK(r == 0, "child: B did not reach EOF after the message (read returned %zd): a writer of B survived", r);
  zdtm::pass();
}

}  // namespace

int main() {
  zdtm::init("pipe00");
  int a[2], b[2];
  if (pipe(a) != 0 || pipe(b) != 0) ZDTM_SYSFAIL("pipe");
  pid_t kid = zdtm::fork_child();
  if (kid == 0) {
    // dup2 both first: the numbers 11 and 12 may not collide with a[] or b[] (3..6).
    zdtm::move_fd(b[0], 11);
    zdtm::move_fd(a[1], 12);
    close(a[0]);
    close(b[1]);
    child();
  }
  zdtm::move_fd(a[0], 11);
  zdtm::move_fd(b[1], 12);
  close(a[1]);
  close(b[0]);

  // Ready only when the child's bytes are queued and the child sleeps in read(11).
  for (int i = 0; i < 10000 && zdtm::fionread(11) < static_cast<int>(kInFlight); i++) usleep(1000);
  zdtm::wait_blocked(kid, SYS_read, 11);

  zdtm::Expect e;
  e.process(getpid());
  e.process(kid);
  e.pipe("A", 65536, kInFlight);
  e.pipe("B", 65536, 0);
  e.file("A.r", "A", "read");
  e.file("B.w", "B", "write");
  e.file("B.r", "B", "read");
  e.file("A.w", "A", "write");
  e.fd(getpid(), 11, "A.r");
  e.fd(getpid(), 12, "B.w");
  e.fd(kid, 11, "B.r").blocked = "reading";
  e.fd(kid, 12, "A.w");
  e.write();
  zdtm::ready();
  zdtm::wait_for_signal();

  zdtm::expect_fd(11, O_RDONLY, 0, false, "parent A read end");
  zdtm::expect_fd(12, O_WRONLY, 0, false, "parent B write end");
  ZDTM_CHECK(zdtm::fionread(11) == static_cast<int>(kInFlight), "A holds %d bytes, expected %zu", zdtm::fionread(11),
             kInFlight);
  ZDTM_CHECK(zdtm::pipe_size(11) == 65536, "A capacity %d", zdtm::pipe_size(11));
  zdtm::expect_pattern(11, 1, 0, kInFlight, "A in flight (parent fd 11)");
  zdtm::write_pattern(12, 2, 0, kMessage, kMessage, "B (parent fd 12)");
  close(12);
  zdtm::expect_pattern(11, 3, 0, kReply, "A reply (parent fd 11)");
  char c;
  ssize_t r = read(11, &c, 1);
  ZDTM_CHECK(r == 0, "parent: A did not reach EOF after the reply (read returned %zd): a writer of A survived", r);
  int st = zdtm::reap(kid);
  ZDTM_CHECK(st == 0, "child exited with %d", st);
  zdtm::pass();
}
