// scm_inflight: pipe ends in flight in unix sockets (sent with SCM_RIGHTS, not received yet) must
// still work after a restore (issue 7 item 3; zdtm scm00/scm01/scm09 die of SIGPIPE or read EOF
// when the end in flight is left on a pipe whose other end was replaced).
//
//   P1 (read 30, write 31, 3,000 bytes): the read end, also still held at fd 30 (one open file),
//      waits in the stream socket received at fd 41 (sent from fd 40), the first message with files.
//   P2 (read 32, 1,000 bytes): its write end was sent over the seqpacket socket received at fd 43
//      (message 1, after a message without files) and closed: it is in no fd table at all.
// After SIGUSR1 the program receives both: the read end must be fd 30's open file and read P1's
// bytes, then what fd 31 writes; P2 must hold its bytes, then what the received write end writes.
// A restore that replaces the pipes leaves both ends in flight on the old pipes (restore says so
// in a note), and the checks fail: the scenario needs the links kept.
#include <sys/socket.h>

#include "zdtmlite.h"

namespace {

constexpr int kR1 = 30, kW1 = 31, kR2 = 32;
constexpr int kStreamTx = 40, kStreamRx = 41, kSeqTx = 42, kSeqRx = 43;
constexpr size_t kB1 = 3000, kB2 = 1000;

void send_fd(int sock, const char* data, int fd) {
  struct iovec iov = {const_cast<char*>(data), strlen(data)};
  alignas(struct cmsghdr) char ctl[CMSG_SPACE(sizeof(int))] = {};
  struct msghdr m = {};
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  if (fd >= 0) {
    m.msg_control = ctl;
    m.msg_controllen = sizeof ctl;
    struct cmsghdr* c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
  }
  if (sendmsg(sock, &m, 0) != static_cast<ssize_t>(iov.iov_len)) ZDTM_SYSFAIL("sendmsg(%d)", sock);
}

// One message: its data, and its file (-1 when none).
int recv_fd(int sock, std::string* data) {
  char buf[64];
  struct iovec iov = {buf, sizeof buf};
  alignas(struct cmsghdr) char ctl[CMSG_SPACE(sizeof(int) * 4)];
  struct msghdr m = {};
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  m.msg_control = ctl;
  m.msg_controllen = sizeof ctl;
  ssize_t n = recvmsg(sock, &m, MSG_DONTWAIT);
  if (n < 0) ZDTM_SYSFAIL("recvmsg(%d)", sock);
  data->assign(buf, static_cast<size_t>(n));
  int fd = -1;
  for (struct cmsghdr* c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) memcpy(&fd, CMSG_DATA(c), sizeof fd);
  return fd;
}

}  // namespace

int main() {
  zdtm::init("scm_inflight");
  int p[2], sv[2];
  if (pipe(p) != 0) ZDTM_SYSFAIL("pipe");
  zdtm::move_fd(p[0], kR1);
  zdtm::move_fd(p[1], kW1);
  if (pipe(p) != 0) ZDTM_SYSFAIL("pipe");
  zdtm::move_fd(p[0], kR2);
  int w2 = p[1];
  zdtm::write_pattern(kW1, 41, 0, kB1, kB1, "w1");
  zdtm::write_pattern(w2, 42, 0, kB2, kB2, "w2");
  if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) ZDTM_SYSFAIL("socketpair(stream)");
  zdtm::move_fd(sv[0], kStreamTx);
  zdtm::move_fd(sv[1], kStreamRx);
  if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv) != 0) ZDTM_SYSFAIL("socketpair(seqpacket)");
  zdtm::move_fd(sv[0], kSeqTx);
  zdtm::move_fd(sv[1], kSeqRx);
  send_fd(kStreamTx, "r", kR1);
  send_fd(kSeqTx, "no files here", -1);
  send_fd(kSeqTx, "w", w2);
  close(w2);

  zdtm::Expect e;
  e.process(getpid());
  e.pipe("P1", 65536, kB1);
  e.pipe("P2", 65536, kB2);
  e.file("r1", "P1", "read");
  e.file("w1", "P1", "write");
  e.file("r2", "P2", "read");
  e.file("w2", "P2", "write");
  e.fd(getpid(), kR1, "r1");
  e.fd(getpid(), kW1, "w1");
  e.fd(getpid(), kR2, "r2");
  e.in_flight(getpid(), kStreamRx, "r1", 0, 0);
  e.in_flight(getpid(), kSeqRx, "w2", 1, 0);
  e.write();
  zdtm::ready();
  zdtm::wait_for_signal();

  std::string data;
  int r1 = recv_fd(kStreamRx, &data);
  ZDTM_CHECK(r1 >= 0 && data == "r", "stream socket: got \"%s\" and fd %d, expected \"r\" with a file", data.c_str(), r1);
  zdtm::expect_shared(r1, kR1, true, "the received read end and fd 30");
  ZDTM_CHECK(zdtm::fionread(r1) == static_cast<int>(kB1), "P1 holds %d bytes, expected %zu", zdtm::fionread(r1), kB1);
  zdtm::expect_pattern(r1, 41, 0, kB1, "P1 through the received read end");
  zdtm::write_pattern(kW1, 44, 0, 10, 10, "w1 after");
  zdtm::expect_pattern(r1, 44, 0, 10, "P1 written after the restore");

  int none = recv_fd(kSeqRx, &data);
  ZDTM_CHECK(none < 0 && data == "no files here", "seqpacket message 0: got \"%s\" and fd %d", data.c_str(), none);
  int w = recv_fd(kSeqRx, &data);
  ZDTM_CHECK(w >= 0 && data == "w", "seqpacket message 1: got \"%s\" and fd %d, expected \"w\" with a file",
             data.c_str(), w);
  ZDTM_CHECK(zdtm::inode_of(w) == zdtm::inode_of(kR2), "the received write end is not on the pipe at fd 32");
  ZDTM_CHECK(zdtm::fionread(kR2) == static_cast<int>(kB2), "P2 holds %d bytes, expected %zu", zdtm::fionread(kR2),
             kB2);
  zdtm::expect_pattern(kR2, 42, 0, kB2, "P2");
  zdtm::write_pattern(w, 43, 0, 100, 100, "through the received write end");
  zdtm::expect_pattern(kR2, 43, 0, 100, "P2 written through the received write end");
  zdtm::pass();
}
