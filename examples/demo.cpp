// demo.cpp: the engine at work on one pipe, through the C API.
//
// A pipe caught mid-flight: 256 KiB capacity, a burst of packets written through an O_DIRECT end,
// then a stream tail, a non-blocking read end with a signal owner. The demo checkpoints it with
// pipecr_ckpoint_pipe(), restores it at fds 20 and 21 with pipecr_restore_pipe(), then drains both
// and shows, side by side, that every byte, packet boundary, flag and owner came back. Exit status
// 0 when everything matches.
#include <fcntl.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <vector>

#include "pipecr/pipecr.h"

namespace {

struct State {
  int capacity = 0, queued = 0, rflags = 0, wflags = 0, sig = 0;
  f_owner_ex owner{};
  std::vector<size_t> reads;  // the size of each read(): one per packet
  std::string bytes;
};

State observe(int r, int w) {
  State s;
  s.capacity = fcntl(w, F_GETPIPE_SZ);
  ioctl(r, FIONREAD, &s.queued);
  s.rflags = fcntl(r, F_GETFL);
  s.wflags = fcntl(w, F_GETFL);
  s.sig = fcntl(r, F_GETSIG);
  fcntl(r, F_GETOWN_EX, &s.owner);
  char buf[65536];
  for (ssize_t n; (n = read(r, buf, sizeof buf)) > 0;) {
    s.reads.push_back(static_cast<size_t>(n));
    s.bytes.append(buf, static_cast<size_t>(n));
  }
  return s;
}

std::string flags(int f) {
  std::string out = (f & O_ACCMODE) == O_RDONLY ? "O_RDONLY" : "O_WRONLY";
  if (f & O_NONBLOCK) out += "|O_NONBLOCK";
  if (f & O_DIRECT) out += "|O_DIRECT";
  return out;
}

bool row(const char* what, const std::string& a, const std::string& b) {
  bool same = a == b;
  std::printf("  %-22s %-30s %-30s %s\n", what, a.c_str(), b.c_str(), same ? "same" : "DIFFERENT");
  return same;
}

}  // namespace

int main() {
  int fds[2];
  if (pipe2(fds, O_DIRECT) != 0) return perror("pipe2"), 1;
  int r = fds[0], w = fds[1];
  fcntl(w, F_SETPIPE_SZ, 256 * 1024);  // each packet takes a slot (a page) of its own
  // Mid-flight: 40 records as packets of growing size, then a stream tail.
  for (int i = 0; i < 40; ++i) {
    std::string rec = "record " + std::to_string(i) + ": " + std::string(static_cast<size_t>(i * 97 % 3000), '=');
    if (write(w, rec.data(), rec.size()) < 0) return perror("write"), 1;
  }
  fcntl(w, F_SETFL, 0);
  const char tail[] = "...and a stream tail that is not a packet\n";
  if (write(w, tail, sizeof tail - 1) < 0) return perror("write"), 1;
  fcntl(w, F_SETFL, O_DIRECT);
  fcntl(r, F_SETFL, O_NONBLOCK);
  f_owner_ex own{F_OWNER_PID, getpid()};
  fcntl(r, F_SETOWN_EX, &own);
  fcntl(r, F_SETSIG, SIGRTMIN + 1);
  int queued = 0;
  ioctl(r, FIONREAD, &queued);
  std::printf("pipe %d/%d: %d bytes queued in 41 buffers (40 packets), capacity %d\n", r, w, queued,
              fcntl(w, F_GETPIPE_SZ));

  size_t need = 0;
  pipecr_ckpoint_pipe(r, nullptr, 0, &need);
  std::vector<char> img(need);
  long size = pipecr_ckpoint_pipe(r, img.data(), img.size(), nullptr);
  if (size < 0) return std::fprintf(stderr, "checkpoint: %s\n", pipecr_strerror(static_cast<int>(size))), 1;
  int after = 0;
  ioctl(r, FIONREAD, &after);
  std::printf("checkpoint: image of %ld bytes; the pipe still holds %d bytes (untouched)\n", size, after);

  int restored[2] = {20, 21};
  int rc = pipecr_restore_pipe(restored, img.data(), static_cast<size_t>(size));
  if (rc != 0) return std::fprintf(stderr, "restore: %s\n", pipecr_strerror(rc)), 1;
  std::printf("restore: a new pipe at fds %d (read) and %d (write)\n\n", restored[0], restored[1]);

  State a = observe(r, w), b = observe(restored[0], restored[1]);
  std::printf("  %-22s %-30s %-30s\n", "", "original", "restored");
  bool ok = true;
  ok &= row("capacity", std::to_string(a.capacity), std::to_string(b.capacity));
  ok &= row("bytes queued", std::to_string(a.queued), std::to_string(b.queued));
  ok &= row("read end flags", flags(a.rflags), flags(b.rflags));
  ok &= row("write end flags", flags(a.wflags), flags(b.wflags));
  ok &= row("signal owner", "pid " + std::to_string(a.owner.pid), "pid " + std::to_string(b.owner.pid));
  ok &= row("F_SETSIG", std::to_string(a.sig), std::to_string(b.sig));
  ok &= row("reads (packets)", std::to_string(a.reads.size()), std::to_string(b.reads.size()));
  std::string sizes_a, sizes_b;
  for (size_t i = 0; i < 6; ++i) {
    sizes_a += std::to_string(a.reads[i]) + " ";
    sizes_b += std::to_string(b.reads[i]) + " ";
  }
  ok &= row("first read sizes", sizes_a + "...", sizes_b + "...");
  ok &= a.reads == b.reads;
  ok &= row("every byte", a.bytes == b.bytes ? "equal" : "differ", "equal");
  std::printf("\n%s\n", ok ? "every byte, packet boundary and flag came back." : "MISMATCH");
  return ok ? 0 : 1;
}
