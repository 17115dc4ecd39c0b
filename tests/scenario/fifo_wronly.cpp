// fifo_wronly: a FIFO between two processes: the parent holds a write-only end, the child a
// read-only end and is blocked in read() on the empty FIFO.
//
// The blocked read() must go on after a restore (restarted on the restored fd) and receive what
// the parent writes after SIGUSR1, then EOF when the parent closes: no extra writer may survive.
#include "zdtmlite.h"

namespace {
constexpr int kFd = 100;
constexpr size_t kBytes = 10000;
}  // namespace

int main() {
  zdtm::init("fifo_wronly");
  std::string path = zdtm::make_fifo("fifo_wronly");
  pid_t kid = zdtm::fork_child();
  if (kid == 0) {
    int r = open(path.c_str(), O_RDONLY);  // blocks until the parent opens its end
    if (r < 0) ZDTM_SYSFAIL("open(%s, O_RDONLY)", path.c_str());
    zdtm::move_fd(r, kFd);
    zdtm::expect_pattern(kFd, 120, 0, kBytes, "child reading the FIFO");  // blocks here
    zdtm::expect_fd(kFd, O_RDONLY, 0, false, "child reader");
    struct stat st;
    if (stat(path.c_str(), &st) != 0) ZDTM_SYSFAIL("stat(%s)", path.c_str());
    ZDTM_CHECK(st.st_ino == zdtm::inode_of(kFd), "child fd %d is not the FIFO %s", kFd, path.c_str());
    char c;
    ssize_t n = read(kFd, &c, 1);
    ZDTM_CHECK(n == 0, "child: no EOF after the parent closed (read returned %zd): a writer survived", n);
    zdtm::pass();
  }
  int w = open(path.c_str(), O_WRONLY);
  if (w < 0) ZDTM_SYSFAIL("open(%s, O_WRONLY)", path.c_str());
  zdtm::move_fd(w, kFd);
  zdtm::wait_blocked(kid, SYS_read, kFd);

  zdtm::Expect e;
  e.process(getpid());
  e.process(kid);
  zdtm::Expect::Pipe& p = e.pipe("F", 65536, 0);
  p.kind = "fifo";
  p.path = path;
  e.file("w", "F", "write");
  e.file("r", "F", "read");  // blocking reader: its "no writer yet" latch is not pipecr's to report
  e.fd(getpid(), kFd, "w");
  e.fd(kid, kFd, "r").blocked = "reading";
  e.write();
  zdtm::ready();
  zdtm::wait_for_signal();

  zdtm::expect_fd(kFd, O_WRONLY, 0, false, "parent writer");
  struct stat st;
  if (stat(path.c_str(), &st) != 0) ZDTM_SYSFAIL("stat(%s)", path.c_str());
  ZDTM_CHECK(st.st_ino == zdtm::inode_of(kFd), "parent fd %d is not the FIFO %s", kFd, path.c_str());
  ZDTM_CHECK(zdtm::fionread(kFd) == 0, "%d bytes in a FIFO that should be empty", zdtm::fionread(kFd));
  zdtm::write_pattern(kFd, 120, 0, kBytes, 4096, "parent writing the FIFO");
  close(kFd);
  int st_kid = zdtm::reap(kid);
  ZDTM_CHECK(st_kid == 0, "child exited with %d", st_kid);
  zdtm::pass();
}
