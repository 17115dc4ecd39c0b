// vmsplice: a pipe filled by vmsplice() of chunks of 4096, 100, 5000, 1 and 4096 bytes, each from
// the start of a page of a fresh mapping that is unmapped afterwards.
//
// vmsplice makes one slot per page touched (4096 | 100 | 4096 + 904 | 1 | 4096: six slots) and
// its slots never merge with later writes, so a writer finds (16 - 6) * 4096 bytes of room, not
// capacity - bytes. The last chunk is a whole page on purpose: whether a partial LAST slot
// accepts merged writes cannot be observed without writing into the pipe (kernel-facts.md), so a
// restore has to guess it, and a write()-filled pipe would want the opposite guess; a full last
// slot takes no merge either way, so the room depends on the slot count alone. The program measures that room on a twin pipe built the same way, and after
// SIGUSR1 expects the same room and every byte. Each mapping is unmapped right after its
// vmsplice (the pipe then holds the only reference to its pages; kernel-facts.md: until then
// later writes to the memory would show in the pipe).
#include <sys/mman.h>
#include <sys/uio.h>

#include "zdtmlite.h"

namespace {
constexpr int kR = 130, kW = 131;
constexpr size_t kChunks[] = {4096, 100, 5000, 1, 4096};
constexpr uint32_t kSeed = 150;

size_t fill(int w) {
  size_t off = 0;
  for (size_t n : kChunks) {
    size_t len = (n + 4095) / 4096 * 4096;
    void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) ZDTM_SYSFAIL("mmap");
    std::vector<uint8_t> v = zdtm::pattern_bytes(kSeed, off, n);
    memcpy(m, v.data(), n);
    struct iovec iov = {m, n};
    ssize_t got = vmsplice(w, &iov, 1, 0);
    if (got != static_cast<ssize_t>(n)) ZDTM_SYSFAIL("vmsplice(%zu bytes) gave %zd", n, got);
    munmap(m, len);
    off += n;
  }
  return off;
}

void make(int p[2]) {
  if (pipe(p) != 0) ZDTM_SYSFAIL("pipe");
}
}  // namespace

int main() {
  zdtm::init("vmsplice");
  int t[2];
  make(t);
  size_t bytes = fill(t[1]);
  zdtm::setfl(t[1], O_NONBLOCK);
  size_t want_free = zdtm::count_free(t[1], 'z');
  close(t[0]);
  close(t[1]);

  int p[2];
  make(p);
  zdtm::move_fd(p[0], kR);
  zdtm::move_fd(p[1], kW);
  fill(kW);
  zdtm::setfl(kW, O_NONBLOCK);

  zdtm::Expect e;
  e.process(getpid());
  e.pipe("P", 65536, static_cast<long>(bytes)).slots = {4096, 100, 4096, 904, 1, 4096};
  e.file("r", "P", "read");
  e.file("w", "P", "write", O_NONBLOCK);
  e.fd(getpid(), kR, "r");
  e.fd(getpid(), kW, "w");
  e.write();
  zdtm::ready();
  zdtm::wait_for_signal();

  zdtm::expect_fd(kR, O_RDONLY, 0, false, "read end");
  zdtm::expect_fd(kW, O_WRONLY, O_NONBLOCK, false, "write end");
  ZDTM_CHECK(zdtm::fionread(kR) == static_cast<int>(bytes), "%d bytes queued, expected %zu", zdtm::fionread(kR),
             bytes);
  size_t got = zdtm::count_free(kW, 'z');
  ZDTM_CHECK(got == want_free, "a writer found room for %zu bytes, expected %zu (the twin's): slot layout changed",
             got, want_free);
  zdtm::expect_pattern(kR, kSeed, 0, bytes, "vmspliced bytes");
  zdtm::expect_filler(kR, 'z', got, "bytes written after");
  zdtm::pass();
}
