// pipe03: two 1 MiB pipes (the pipe-max-size here), one full, one empty.
//
// Capacity is a property of the pipe that a restore must set before refilling (F_SETPIPE_SZ), and
// a full 1 MiB pipe is the most data a single pipe can hold without CAP_SYS_RESOURCE. The full
// one must refuse one more byte; the empty one must take exactly 1 MiB and then refuse.
#include "zdtmlite.h"

namespace {
constexpr int kSize = 1 << 20;
constexpr int kFullR = 40, kFullW = 41, kEmptyR = 42, kEmptyW = 43;

void make(int r, int w) {
  int p[2];
  if (pipe(p) != 0) ZDTM_SYSFAIL("pipe");
  zdtm::move_fd(p[0], r);
  zdtm::move_fd(p[1], w);
  int got = fcntl(w, F_SETPIPE_SZ, kSize);
  if (got != kSize) ZDTM_SYSFAIL("F_SETPIPE_SZ(%d) gave %d", kSize, got);
  zdtm::setfl(w, O_NONBLOCK);
}

size_t fill(int w, uint32_t seed) {
  size_t total = 0;
  for (;;) {
    std::vector<uint8_t> v = zdtm::pattern_bytes(seed, total, 65536);
    ssize_t n = write(w, v.data(), v.size());
    if (n < 0 && errno == EAGAIN) return total;
    if (n <= 0) ZDTM_SYSFAIL("filling write");
    total += static_cast<size_t>(n);
  }
}
}  // namespace

int main() {
  zdtm::init("pipe03");
  make(kFullR, kFullW);
  make(kEmptyR, kEmptyW);
  size_t full = fill(kFullW, 21);
  ZDTM_CHECK(full == kSize, "filled %zu bytes, expected %d", full, kSize);

  zdtm::Expect e;
  e.process(getpid());
  e.pipe("full", kSize, kSize);
  e.pipe("empty", kSize, 0);
  e.file("full.r", "full", "read");
  e.file("full.w", "full", "write", O_NONBLOCK);
  e.file("empty.r", "empty", "read");
  e.file("empty.w", "empty", "write", O_NONBLOCK);
  e.fd(getpid(), kFullR, "full.r");
  e.fd(getpid(), kFullW, "full.w");
  e.fd(getpid(), kEmptyR, "empty.r");
  e.fd(getpid(), kEmptyW, "empty.w");
  e.write();
  zdtm::ready();
  zdtm::wait_for_signal();

  for (int fd : {kFullR, kFullW, kEmptyR, kEmptyW})
    ZDTM_CHECK(zdtm::pipe_size(fd) == kSize, "fd %d: capacity %d, expected %d", fd, zdtm::pipe_size(fd), kSize);
  zdtm::expect_fd(kFullW, O_WRONLY, O_NONBLOCK, false, "full.w");
  zdtm::expect_fd(kEmptyW, O_WRONLY, O_NONBLOCK, false, "empty.w");
  zdtm::expect_fd(kFullR, O_RDONLY, 0, false, "full.r");
  zdtm::expect_fd(kEmptyR, O_RDONLY, 0, false, "empty.r");
  ZDTM_CHECK(zdtm::fionread(kFullR) == kSize, "full pipe holds %d bytes", zdtm::fionread(kFullR));
  ZDTM_CHECK(zdtm::fionread(kEmptyR) == 0, "empty pipe holds %d bytes", zdtm::fionread(kEmptyR));
  char c = 'x';
  errno = 0;
  ZDTM_CHECK(write(kFullW, &c, 1) < 0 && errno == EAGAIN, "full pipe took one more byte (errno %d)", errno);
  zdtm::expect_pattern(kFullR, 21, 0, kSize, "full pipe");
  ZDTM_CHECK(zdtm::fionread(kFullR) == 0, "full pipe still holds bytes after 1 MiB");
  size_t room = fill(kEmptyW, 22);
  ZDTM_CHECK(room == kSize, "empty pipe took %zu bytes, expected %d", room, kSize);
  zdtm::expect_pattern(kEmptyR, 22, 0, kSize, "empty pipe refilled");
  zdtm::pass();
}
