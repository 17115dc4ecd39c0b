// fifo_loop: three processes in a ring of FIFOs, after CRIU's zdtm fifo_loop: process i reads
// FIFO i and writes FIFO i+1 (mod 3), and each FIFO holds what its writer put in it (3,000, 6,000
// and 9,000 bytes, a stream of its own each).
//
// Every FIFO is held by two processes, one end each, so a restore must reopen each path in both
// and refill it once, with the bytes of the right writer. After SIGUSR1 (the parent passes it on)
// each process checks its two fds and every byte it reads, then closes its writer and waits for
// EOF on its reader: EOF comes only if no writer survived anywhere (no end of a FIFO left open by
// the restore).
#include "zdtmlite.h"

namespace {
constexpr int kProcs = 3, kIn = 60, kOut = 61;

size_t bytes_of(int i) { return 3000 * static_cast<size_t>(i + 1); }
uint32_t seed_of(int i) { return 40 + static_cast<uint32_t>(i); }

std::string fifo(int i) { return zdtm::dir() + "/ring" + std::to_string(i); }

// Open this process's two ends: its reader first (without waiting for a writer), then its writer,
// which waits until the next process has its reader; then the bytes go in.
void open_ends(int i) {
  int r = open(fifo(i).c_str(), O_RDONLY | O_NONBLOCK);
  if (r < 0) ZDTM_SYSFAIL("open(%s, O_RDONLY)", fifo(i).c_str());
  zdtm::move_fd(r, kIn);
  if (fcntl(kIn, F_SETFL, 0) != 0) ZDTM_SYSFAIL("F_SETFL");
  const int next = (i + 1) % kProcs;
  int w = open(fifo(next).c_str(), O_WRONLY);
  if (w < 0) ZDTM_SYSFAIL("open(%s, O_WRONLY)", fifo(next).c_str());
  zdtm::move_fd(w, kOut);
  zdtm::write_pattern(kOut, seed_of(i), 0, bytes_of(i), 4096, "writer");
}

// What process i checks after SIGUSR1.
void check(int i) {
  const int prev = (i + kProcs - 1) % kProcs, next = (i + 1) % kProcs;
  char what[64];
  snprintf(what, sizeof what, "process %d", i);
  zdtm::expect_fd(kIn, O_RDONLY, 0, false, what);
  zdtm::expect_fd(kOut, O_WRONLY, 0, false, what);
  for (auto [fd, path] : {std::pair{kIn, fifo(i)}, std::pair{kOut, fifo(next)}}) {
    struct stat st;
    if (stat(path.c_str(), &st) != 0) ZDTM_SYSFAIL("stat(%s)", path.c_str());
    ZDTM_CHECK(st.st_ino == zdtm::inode_of(fd), "%s: fd %d is not the FIFO %s", what, fd, path.c_str());
  }
  ZDTM_CHECK(zdtm::fionread(kIn) == static_cast<int>(bytes_of(prev)), "%s: %d bytes queued, expected %zu", what,
             zdtm::fionread(kIn), bytes_of(prev));
  zdtm::expect_pattern(kIn, seed_of(prev), 0, bytes_of(prev), what);
  close(kOut);
  char c;
  ssize_t n = read(kIn, &c, 1);  // waits for the writer before it to close
  ZDTM_CHECK(n == 0, "%s: no EOF once its writer closed (read returned %zd): a writer survived", what, n);
}


void wait_for_input(int i) {
  const int prev = (i + kProcs - 1) % kProcs;
  for (int k = 0; zdtm::fionread(kIn) != static_cast<int>(bytes_of(prev)); ++k) {
    ZDTM_CHECK(k < 10000, "process %d: %d bytes arrived, expected %zu", i, zdtm::fionread(kIn), bytes_of(prev));
    usleep(1000);
  }
}
}  // namespace

int main() {
  zdtm::init("fifo_loop");
  for (int i = 0; i < kProcs; ++i) zdtm::make_fifo(("ring" + std::to_string(i)).c_str());
  pid_t kids[kProcs] = {getpid(), 0, 0};
  for (int i = 1; i < kProcs; ++i) {
    kids[i] = zdtm::fork_child();
    if (kids[i] == 0) {
      open_ends(i);
      wait_for_input(i);
      zdtm::wait_for_signal();
      check(i);
      zdtm::pass();
    }
  }
  open_ends(0);
  wait_for_input(0);
  // A child waits for SIGUSR1 only once its bytes are written and its own reader holds what it should.
  for (int i = 1; i < kProcs; ++i) zdtm::wait_blocked(kids[i], SYS_rt_sigtimedwait, -1);

  zdtm::Expect e;
  for (pid_t p : kids) e.process(p);
  for (int i = 0; i < kProcs; ++i) {
    const std::string n = std::to_string(i);
    zdtm::Expect::Pipe& p = e.pipe("F" + n, 65536, static_cast<long>(bytes_of((i + kProcs - 1) % kProcs)));
    p.kind = "fifo";
    p.path = fifo(i);
    e.file("in" + n, "F" + n, "read");
    e.file("out" + n, "F" + std::to_string((i + 1) % kProcs), "write");
    e.fd(kids[i], kIn, "in" + n);
    e.fd(kids[i], kOut, "out" + n);
  }
  e.write();
  zdtm::ready();
  zdtm::wait_for_signal();
  for (int i = 1; i < kProcs; ++i)
    if (kill(kids[i], SIGUSR1) != 0) ZDTM_SYSFAIL("kill(%d, SIGUSR1)", static_cast<int>(kids[i]));
  check(0);
  for (int i = 1; i < kProcs; ++i) {
    int st = zdtm::reap(kids[i]);
    ZDTM_CHECK(st == 0, "process %d exited with %d", i, st);
  }
  zdtm::pass();
}
