// pipe01: a pipe filled to EAGAIN, held by its two original fds, a dup of each, and a reopen of
// each through /proc/self/fd, with O_NONBLOCK and FD_CLOEXEC on some only.
//
// Six fds, four open file descriptions: {r, r_dup} blocking, {r_proc} O_NONBLOCK, {w, w_dup}
// O_NONBLOCK (w_dup close-on-exec), {w_proc} blocking. Status flags belong to the open file
// description and FD_CLOEXEC to the fd slot, so a restore must rebuild exactly this sharing:
// checked with kcmp(KCMP_FILE), by toggling a flag through one fd and looking at the others, and
// by reading every one of the 65,536 queued bytes.
#include "zdtmlite.h"

namespace {

constexpr int kR = 20, kRDup = 21, kRProc = 22, kW = 23, kWDup = 24, kWProc = 25;

int reopen(int fd, int flags, int target) {
  char path[64];
  snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  int n = open(path, flags);
  if (n < 0) ZDTM_SYSFAIL("open(%s)", path);
  return zdtm::move_fd(n, target);
}

size_t fill_to_eagain(int w) {
  size_t total = 0;
  for (size_t chunk : {size_t{4096}, size_t{1}}) {
    for (;;) {
      std::vector<uint8_t> v = zdtm::pattern_bytes(7, total, chunk);
      ssize_t n = write(w, v.data(), chunk);
      if (n < 0 && errno == EAGAIN) break;
      if (n <= 0) ZDTM_SYSFAIL("filling write");
      total += static_cast<size_t>(n);
    }
  }
  return total;
}

}  // namespace

int main() {
  zdtm::init("pipe01");
  int p[2];
  if (pipe(p) != 0) ZDTM_SYSFAIL("pipe");
  zdtm::move_fd(p[0], kR);
  zdtm::move_fd(p[1], kW);
  zdtm::setfl(kW, O_NONBLOCK);
  size_t bytes = fill_to_eagain(kW);
  if (dup2(kR, kRDup) != kRDup) ZDTM_SYSFAIL("dup2");
  if (fcntl(kW, F_DUPFD_CLOEXEC, kWDup) != kWDup) ZDTM_SYSFAIL("F_DUPFD_CLOEXEC");
  reopen(kR, O_RDONLY | O_NONBLOCK, kRProc);
  reopen(kW, O_WRONLY, kWProc);

  zdtm::Expect e;
  e.process(getpid());
  e.pipe("P", 65536, static_cast<long>(bytes));
  e.file("r", "P", "read");
  e.file("r_proc", "P", "read", O_NONBLOCK);
  e.file("w", "P", "write", O_NONBLOCK);
  e.file("w_proc", "P", "write");
  e.fd(getpid(), kR, "r");
  e.fd(getpid(), kRDup, "r");
  e.fd(getpid(), kRProc, "r_proc");
  e.fd(getpid(), kW, "w");
  e.fd(getpid(), kWDup, "w", true);
  e.fd(getpid(), kWProc, "w_proc");
  e.write();
  zdtm::ready();
  zdtm::wait_for_signal();

  zdtm::expect_fd(kR, O_RDONLY, 0, false, "r");
  zdtm::expect_fd(kRDup, O_RDONLY, 0, false, "r_dup");
  zdtm::expect_fd(kRProc, O_RDONLY, O_NONBLOCK, false, "r_proc");
  zdtm::expect_fd(kW, O_WRONLY, O_NONBLOCK, false, "w");
  zdtm::expect_fd(kWDup, O_WRONLY, O_NONBLOCK, true, "w_dup");
  zdtm::expect_fd(kWProc, O_WRONLY, 0, false, "w_proc");
  ino_t ino = zdtm::inode_of(kR);
  for (int fd : {kRDup, kRProc, kW, kWDup, kWProc})
    ZDTM_CHECK(zdtm::inode_of(fd) == ino, "fd %d is not on the same pipe as fd %d", fd, kR);
  zdtm::expect_shared(kR, kRDup, true, "r/r_dup");
  zdtm::expect_shared(kR, kRProc, false, "r/r_proc");
  zdtm::expect_shared(kW, kWDup, true, "w/w_dup");
  zdtm::expect_shared(kW, kWProc, false, "w/w_proc");
  zdtm::expect_shared(kR, kW, false, "r/w");
  // A flag set through one fd shows through its dup only.
  if (fcntl(kWDup, F_SETFL, 0) != 0) ZDTM_SYSFAIL("F_SETFL(w_dup)");
  ZDTM_CHECK((zdtm::getfl(kW) & O_NONBLOCK) == 0, "clearing O_NONBLOCK on w_dup did not clear it on w");
  zdtm::setfl(kRDup, O_NONBLOCK);
  ZDTM_CHECK(zdtm::getfl(kR) & O_NONBLOCK, "setting O_NONBLOCK on r_dup did not set it on r");
  if (fcntl(kWDup, F_SETFL, O_NONBLOCK) != 0 || fcntl(kRDup, F_SETFL, 0) != 0) ZDTM_SYSFAIL("F_SETFL back");

  ZDTM_CHECK(zdtm::pipe_size(kR) == 65536, "capacity %d", zdtm::pipe_size(kR));
  ZDTM_CHECK(zdtm::fionread(kR) == static_cast<int>(bytes), "%d bytes queued, expected %zu", zdtm::fionread(kR),
             bytes);
  char c = 'x';
  errno = 0;
  ZDTM_CHECK(write(kW, &c, 1) < 0 && errno == EAGAIN, "full pipe accepted a byte (errno %d)", errno);
  zdtm::expect_pattern(kRProc, 7, 0, bytes, "queued bytes via r_proc");
  errno = 0;
  ZDTM_CHECK(read(kRProc, &c, 1) < 0 && errno == EAGAIN, "empty pipe with writers: read gave no EAGAIN (errno %d)",
             errno);
  zdtm::write_pattern(kWProc, 8, 0, 100, 100, "w_proc");
  zdtm::expect_pattern(kRDup, 8, 0, 100, "bytes written through w_proc, read via r_dup");
  zdtm::pass();
}
