// pipe02: a second open file description of a read end, opened through /proc/self/fd and made
// O_NONBLOCK, beside the original blocking one.
//
// The two reads ends of one pipe differ only in their status flags; a restore that gives both
// fds one shared open file description, or copies the flags of one to the other, is caught by
// kcmp and F_GETFL. The queued bytes are read half through each end, so both must be connected
// to the same restored pipe.
#include "zdtmlite.h"

namespace {
constexpr int kR = 30, kR2 = 31, kW = 32;
constexpr size_t kBytes = 12345, kFirst = 5000;
}  // namespace

int main() {
  zdtm::init("pipe02");
  int p[2];
  if (pipe(p) != 0) ZDTM_SYSFAIL("pipe");
  zdtm::move_fd(p[0], kR);
  zdtm::move_fd(p[1], kW);
  zdtm::write_pattern(kW, 11, 0, kBytes, kBytes, "w");
  char path[64];
  snprintf(path, sizeof path, "/proc/self/fd/%d", kR);
  int r2 = open(path, O_RDONLY);
  if (r2 < 0) ZDTM_SYSFAIL("open(%s)", path);
  zdtm::move_fd(r2, kR2);
  zdtm::setfl(kR2, O_NONBLOCK);

  zdtm::Expect e;
  e.process(getpid());
  e.pipe("P", 65536, kBytes);
  e.file("r", "P", "read");
  e.file("r2", "P", "read", O_NONBLOCK);
  e.file("w", "P", "write");
  e.fd(getpid(), kR, "r");
  e.fd(getpid(), kR2, "r2");
  e.fd(getpid(), kW, "w");
  e.write();
  zdtm::ready();
  zdtm::wait_for_signal();

  zdtm::expect_fd(kR, O_RDONLY, 0, false, "r");
  zdtm::expect_fd(kR2, O_RDONLY, O_NONBLOCK, false, "r2");
  zdtm::expect_fd(kW, O_WRONLY, 0, false, "w");
  zdtm::expect_shared(kR, kR2, false, "r/r2");
  ZDTM_CHECK(zdtm::inode_of(kR) == zdtm::inode_of(kR2) && zdtm::inode_of(kR) == zdtm::inode_of(kW),
             "the three fds are not on one pipe");
  ZDTM_CHECK(zdtm::fionread(kR2) == static_cast<int>(kBytes), "%d bytes queued, expected %zu", zdtm::fionread(kR2),
             kBytes);
  zdtm::expect_pattern(kR, 11, 0, kFirst, "first part via r");
  zdtm::expect_pattern(kR2, 11, kFirst, kBytes - kFirst, "rest via r2");
  char c;
  errno = 0;
  ZDTM_CHECK(read(kR2, &c, 1) < 0 && errno == EAGAIN, "r2 is not non-blocking on an empty pipe (errno %d)", errno);
  zdtm::pass();
}
