// epoll_links: pipes watched by epoll instances, in a parent and its child; the watches must still
// report after a restore (issue 7: an event loop that stops hearing its pipe after a restore).
//
//   P1 (read 30, write 31, 1,000 bytes): E1 (fd 40) watches the read end, level-triggered, data
//      0xA1; the child's own epoll E3 (fd 50) watches the same read end (its inherited fd 30),
//      data 0xE5.
//   P2 (read at the high fd 700, write 32, 3,000 bytes): E1 watches it edge-triggered (0xB2) and a
//      second epoll E2 (fd 41) one-shot (0xC3): one file, two epolls.
//   P3 (read 33, write 34, 100 bytes): E2 watches the write end for EPOLLOUT (0xD4), and the read
//      end through a dup at fd 900 that is closed at once (0xF6; as CRIU's zdtm epoll): the watch is
//      keyed by (file, 900) and lives while the read end does; 900 must stay closed.
// The kernel drops a watch when its file is released, so a restore that puts new pipes at these
// numbers leaves every epoll deaf (epoll_wait reports nothing): only a restore that keeps the
// open files (in place) or re-adds the watches passes. Then every queued byte is checked, and
// one-shot and edge-triggered watches must report exactly once.
#include <sys/epoll.h>
#include <sys/socket.h>

#include <map>

#include "zdtmlite.h"

namespace {

constexpr int kR1 = 30, kW1 = 31, kW2 = 32, kR3 = 33, kW3 = 34, kR2 = 700;
constexpr int kE1 = 40, kE2 = 41, kE3 = 50, kDup = 900;
constexpr size_t kB1 = 1000, kB2 = 3000, kB3 = 100;

void watch(int ep, int fd, uint32_t events, uint64_t data) {
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = data;
  if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) ZDTM_SYSFAIL("epoll_ctl(%d, ADD, %d)", ep, fd);
}

// What one epoll_wait() with timeout 0 reports: data -> events.
std::map<uint64_t, uint32_t> ready_now(int ep) {
  epoll_event evs[16];
  int n;
  do n = epoll_wait(ep, evs, 16, 0);
  while (n < 0 && errno == EINTR);
  if (n < 0) ZDTM_SYSFAIL("epoll_wait(%d)", ep);
  std::map<uint64_t, uint32_t> out;
  for (int i = 0; i < n; ++i) out[evs[i].data.u64] = evs[i].events;
  return out;
}

std::string show(const std::map<uint64_t, uint32_t>& m) {
  std::string s = "{";
  for (auto& [d, ev] : m) {
    char b[48];
    snprintf(b, sizeof b, "%s0x%llx:%#x", s.size() > 1 ? " " : "", static_cast<unsigned long long>(d), ev);
    s += b;
  }
  return s + "}";
}

void expect_ready(int ep, const std::map<uint64_t, uint32_t>& want, const char* what) {
  auto got = ready_now(ep);
  ZDTM_CHECK(got == want, "%s: epoll %d reports %s, expected %s", what, ep, show(got).c_str(), show(want).c_str());
}

}  // namespace

int main() {
  zdtm::init("epoll_links");
  int p[2];
  if (pipe(p) != 0) ZDTM_SYSFAIL("pipe");
  zdtm::move_fd(p[0], kR1);
  zdtm::move_fd(p[1], kW1);
  if (pipe(p) != 0) ZDTM_SYSFAIL("pipe");
  zdtm::move_fd(p[0], kR2);
  zdtm::move_fd(p[1], kW2);
  if (pipe(p) != 0) ZDTM_SYSFAIL("pipe");
  zdtm::move_fd(p[0], kR3);
  zdtm::move_fd(p[1], kW3);
  zdtm::write_pattern(kW1, 21, 0, kB1, kB1, "w1");
  zdtm::write_pattern(kW2, 22, 0, kB2, kB2, "w2");
  zdtm::write_pattern(kW3, 23, 0, kB3, kB3, "w3");
  int e1 = epoll_create1(0), e2 = epoll_create1(0);
  if (e1 < 0 || e2 < 0) ZDTM_SYSFAIL("epoll_create1");
  zdtm::move_fd(e1, kE1);
  zdtm::move_fd(e2, kE2);
  watch(kE1, kR1, EPOLLIN, 0xA1);
  watch(kE1, kR2, EPOLLIN | EPOLLET, 0xB2);
  watch(kE2, kR2, EPOLLIN | EPOLLONESHOT, 0xC3);
  watch(kE2, kW3, EPOLLOUT, 0xD4);
  if (dup2(kR3, kDup) != kDup) ZDTM_SYSFAIL("dup2(%d, %d)", kR3, kDup);
  watch(kE2, kDup, EPOLLIN, 0xF6);
  close(kDup);

  int sync[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sync) != 0) ZDTM_SYSFAIL("socketpair");
  pid_t child = zdtm::fork_child();
  if (child == 0) {
    int e3 = epoll_create1(0);
    if (e3 < 0) ZDTM_SYSFAIL("epoll_create1");
    zdtm::move_fd(e3, kE3);
    watch(kE3, kR1, EPOLLIN, 0xE5);
    zdtm::write_all(sync[1], "k", 1, "sync");
    close(sync[0]);
    close(sync[1]);
    zdtm::wait_for_signal();
    expect_ready(kE3, {{0xE5, EPOLLIN}}, "child's epoll on P1");
    zdtm::pass();
  }
  char c;
  if (read(sync[0], &c, 1) != 1) ZDTM_SYSFAIL("sync read");
  close(sync[0]);
  close(sync[1]);

  zdtm::Expect e;
  e.process(getpid());
  e.process(child);
  e.pipe("P1", 65536, kB1);
  e.pipe("P2", 65536, kB2);
  e.pipe("P3", 65536, kB3);
  e.file("r1", "P1", "read");
  e.file("w1", "P1", "write");
  e.file("r2", "P2", "read");
  e.file("w2", "P2", "write");
  e.file("r3", "P3", "read");
  e.file("w3", "P3", "write");
  for (pid_t pid : {getpid(), child}) {
    e.fd(pid, kR1, "r1");
    e.fd(pid, kW1, "w1");
    e.fd(pid, kW2, "w2");
    e.fd(pid, kR3, "r3");
    e.fd(pid, kW3, "w3");
    e.fd(pid, kR2, "r2");
  }
  e.write();
  zdtm::ready();
  zdtm::wait_for_signal();

  // The child first, while P1 still holds its bytes.
  if (kill(child, SIGUSR1) != 0) ZDTM_SYSFAIL("kill(child)");
  ZDTM_CHECK(zdtm::reap(child) == 0, "the child failed");
  expect_ready(kE1, {{0xA1, EPOLLIN}, {0xB2, EPOLLIN}}, "E1 (level P1, edge P2)");
  ZDTM_CHECK(fcntl(kDup, F_GETFD) < 0 && errno == EBADF, "fd %d is open", kDup);
  expect_ready(kE2, {{0xC3, EPOLLIN}, {0xD4, EPOLLOUT}, {0xF6, EPOLLIN}}, "E2 (one-shot P2, EPOLLOUT P3, P3 via 900)");
  // Edge-triggered and one-shot report once; level-triggered again.
  expect_ready(kE1, {{0xA1, EPOLLIN}}, "E1 again");
  expect_ready(kE2, {{0xD4, EPOLLOUT}, {0xF6, EPOLLIN}}, "E2 again");
  zdtm::expect_pattern(kR1, 21, 0, kB1, "P1");
  zdtm::expect_pattern(kR2, 22, 0, kB2, "P2");
  zdtm::expect_pattern(kR3, 23, 0, kB3, "P3");
  expect_ready(kE1, {}, "E1 with P1 and P2 empty");
  expect_ready(kE2, {{0xD4, EPOLLOUT}}, "E2 with P3 empty");
  // New bytes wake the edge-triggered watch again: the watches are on the pipes the writers use.
  zdtm::write_pattern(kW2, 24, 0, 10, 10, "w2 after");
  expect_ready(kE1, {{0xB2, EPOLLIN}}, "E1 after a write to P2");
  zdtm::pass();
}
