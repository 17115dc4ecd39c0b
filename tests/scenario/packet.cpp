// packet: a packet-mode pipe (pipe2(O_DIRECT)) holding packets of 1, 10, 100, 3000 and 4096 bytes.
//
// Each read() of a packet pipe returns at most one packet, so the boundaries are part of the
// state: a restore that refills the bytes as a stream passes a byte comparison but fails here,
// where each read with a large buffer must return exactly one packet. pipe2(O_DIRECT) sets
// O_DIRECT on the write end only; a restore must keep it there and off the read end. After the
// queued packets, a 5000-byte write must still split into packets of 4096 and 904.
#include "zdtmlite.h"

namespace {
constexpr int kR = 50, kW = 51;
constexpr long kSizes[] = {1, 10, 100, 3000, 4096};
}  // namespace

int main() {
  zdtm::init("packet");
  int p[2];
  if (pipe2(p, O_DIRECT) != 0) ZDTM_SYSFAIL("pipe2(O_DIRECT)");
  zdtm::move_fd(p[0], kR);
  zdtm::move_fd(p[1], kW);
  long total = 0;
  uint32_t seed = 60;
  for (long n : kSizes) {
    zdtm::write_pattern(kW, seed++, 0, static_cast<size_t>(n), static_cast<size_t>(n), "packet");
    total += n;
  }

  zdtm::Expect e;
  e.process(getpid());
  zdtm::Expect::Pipe& pipe = e.pipe("P", 65536, total);
  pipe.packets.assign(std::begin(kSizes), std::end(kSizes));
  pipe.slots = pipe.packets;
  e.file("r", "P", "read");
  e.file("w", "P", "write", O_DIRECT);
  e.fd(getpid(), kR, "r");
  e.fd(getpid(), kW, "w");
  e.write();
  zdtm::ready();
  zdtm::wait_for_signal();

  zdtm::expect_fd(kR, O_RDONLY, 0, false, "read end");
  zdtm::expect_fd(kW, O_WRONLY, O_DIRECT, false, "write end");
  ZDTM_CHECK(zdtm::fionread(kR) == total, "%d bytes queued, expected %ld", zdtm::fionread(kR), total);
  std::vector<uint8_t> buf(65536);
  seed = 60;
  for (long n : kSizes) {
    ssize_t r = read(kR, buf.data(), buf.size());
    ZDTM_CHECK(r == n, "packet of %ld bytes read back as %zd bytes", n, r);
    std::vector<uint8_t> want = zdtm::pattern_bytes(seed++, 0, static_cast<size_t>(n));
    ZDTM_CHECK(memcmp(buf.data(), want.data(), want.size()) == 0, "packet of %ld bytes has wrong content", n);
  }
  ZDTM_CHECK(zdtm::fionread(kR) == 0, "bytes left after the packets: %d", zdtm::fionread(kR));
  zdtm::write_pattern(kW, 70, 0, 5000, 5000, "new packet");
  ssize_t r1 = read(kR, buf.data(), buf.size());
  ssize_t r2 = read(kR, buf.data(), buf.size());
  ZDTM_CHECK(r1 == 4096 && r2 == 904, "a 5000-byte write read back as %zd + %zd, expected 4096 + 904", r1, r2);
  zdtm::pass();
}
