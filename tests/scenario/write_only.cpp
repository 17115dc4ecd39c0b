// write_only: a pipe of which only the write end is held, with 30,000 bytes queued.
//
// Nobody can read these bytes today, but a reader can appear (open /proc/PID/fd/N), so they are
// state. CRIU saves neither the data nor the size of such a pipe. The checks: FIONREAD on the
// write end; a write fails with EPIPE (no read end survived the dump or the restore, including
// one pipecr might have opened); then a reader opened through /proc/self/fd gets every byte.
#include "zdtmlite.h"

namespace {
constexpr int kW = 60;
constexpr size_t kBytes = 30000;
}  // namespace

int main() {
  zdtm::init("write_only");
  signal(SIGPIPE, SIG_IGN);
  int p[2];
  if (pipe(p) != 0) ZDTM_SYSFAIL("pipe");
  zdtm::move_fd(p[1], kW);
  zdtm::write_pattern(kW, 80, 0, kBytes, kBytes, "w");
  close(p[0]);

  zdtm::Expect e;
  e.process(getpid());
  e.pipe("P", 65536, kBytes).slots = {4096, 4096, 4096, 4096, 4096, 4096, 4096, 1328};
  e.file("w", "P", "write");
  e.fd(getpid(), kW, "w");
  e.write();
  zdtm::ready();
  zdtm::wait_for_signal();

  zdtm::expect_fd(kW, O_WRONLY, 0, false, "write end");
  ZDTM_CHECK(zdtm::pipe_size(kW) == 65536, "capacity %d", zdtm::pipe_size(kW));
  ZDTM_CHECK(zdtm::fionread(kW) == static_cast<int>(kBytes), "%d bytes queued, expected %zu", zdtm::fionread(kW),
             kBytes);
  char c = 'x';
  errno = 0;
  ZDTM_CHECK(write(kW, &c, 1) < 0 && errno == EPIPE, "write without a reader did not fail with EPIPE (errno %d)",
             errno);
  int r = open("/proc/self/fd/60", O_RDONLY | O_NONBLOCK);
  if (r < 0) ZDTM_SYSFAIL("open(/proc/self/fd/60)");
  zdtm::expect_pattern(r, 80, 0, kBytes, "queued bytes");
  errno = 0;
  ZDTM_CHECK(read(r, &c, 1) < 0 && errno == EAGAIN, "bytes beyond the %zu queued ones (errno %d)", kBytes, errno);
  zdtm::pass();
}
