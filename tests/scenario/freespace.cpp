// freespace: the room a writer finds in a partly filled pipe, which depends on the slot layout.
//
// A pipe counts its capacity in slots, and write() merges into the last slot only when the whole
// (sub-page part of the) write fits (fs/pipe.c, pipe_write). So the same bytes leave different
// room: pipe A, one write() of 10,000 bytes, is packed (4096 + 4096 + 1808, last slot mergeable)
// and takes exactly capacity - bytes = 55,536 one-byte writes; pipe B, 23 writes of 1,000 bytes,
// holds 4,000 bytes per slot and takes what a twin pipe built the same way takes (measured here
// at start). After SIGUSR1 the program counts one-byte writes until EAGAIN on each, then reads
// back the old bytes followed by the new ones.
#include "zdtmlite.h"

namespace {
constexpr int kAR = 120, kAW = 121, kBR = 122, kBW = 123;
constexpr size_t kABytes = 10000, kBChunk = 1000, kBBytes = 23000;

void make(int r, int w) {
  int p[2];
  if (pipe(p) != 0) ZDTM_SYSFAIL("pipe");
  zdtm::move_fd(p[0], r);
  zdtm::move_fd(p[1], w);
  zdtm::setfl(w, O_NONBLOCK);
}

// The room pipe B's layout leaves, measured on a twin built by the same writes.
size_t twin_free() {
  int p[2];
  if (pipe2(p, O_NONBLOCK) != 0) ZDTM_SYSFAIL("pipe2");
  zdtm::write_pattern(p[1], 141, 0, kBBytes, kBChunk, "twin");
  size_t n = zdtm::count_free(p[1], 'z');
  close(p[0]);
  close(p[1]);
  return n;
}

void check(int r, int w, uint32_t seed, size_t bytes, size_t want_free, const char* what) {
  ZDTM_CHECK(zdtm::fionread(r) == static_cast<int>(bytes), "%s: %d bytes queued, expected %zu", what,
             zdtm::fionread(r), bytes);
  size_t got = zdtm::count_free(w, 'z');
  ZDTM_CHECK(got == want_free, "%s: a writer found room for %zu bytes, expected %zu (slot layout changed)", what, got,
             want_free);
  zdtm::expect_pattern(r, seed, 0, bytes, what);
  zdtm::expect_filler(r, 'z', got, what);
}
}  // namespace

int main() {
  zdtm::init("freespace");
  size_t b_free = twin_free();
  make(kAR, kAW);
  make(kBR, kBW);
  zdtm::write_pattern(kAW, 140, 0, kABytes, kABytes, "A");
  zdtm::write_pattern(kBW, 141, 0, kBBytes, kBChunk, "B");

  zdtm::Expect e;
  e.process(getpid());
  e.pipe("A", 65536, kABytes).slots = {4096, 4096, 1808};
  e.pipe("B", 65536, kBBytes).slots = {4000, 4000, 4000, 4000, 4000, 3000};
  e.file("A.r", "A", "read");
  e.file("A.w", "A", "write", O_NONBLOCK);
  e.file("B.r", "B", "read");
  e.file("B.w", "B", "write", O_NONBLOCK);
  e.fd(getpid(), kAR, "A.r");
  e.fd(getpid(), kAW, "A.w");
  e.fd(getpid(), kBR, "B.r");
  e.fd(getpid(), kBW, "B.w");
  e.write();
  zdtm::ready();
  zdtm::wait_for_signal();

  check(kAR, kAW, 140, kABytes, 65536 - kABytes, "A (one write)");
  check(kBR, kBW, 141, kBBytes, b_free, "B (1000-byte writes)");
  zdtm::pass();
}
