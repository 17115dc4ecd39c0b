// unix_peek_test.cpp: sys::peek_unix_queue on real socket pairs: stream, datagram and seqpacket
// queues with several messages, several files per message and messages without files; the queue
// and the socket's SO_PEEK_OFF must be exactly as they were after the walk.
#include "sys/unix_peek.hpp"

#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstddef>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "unit/send_fds.hpp"

namespace pipecr::sys {
namespace {

struct Pair {
  UniqueFd a, b;  // a sends, b receives
};

Pair socket_pair(int type) {
  int sv[2];
  EXPECT_EQ(::socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv), 0);
  return Pair{UniqueFd(sv[0]), UniqueFd(sv[1])};
}

void send_with(int sock, const std::string& data, const std::vector<int>& fds) {
  ASSERT_TRUE(::pipecr::testing::send_fds(sock, data, fds));
}

// One real receive: the data and the fds (which the caller owns).
struct Received {
  std::string data;
  std::vector<UniqueFd> fds;
};
Received receive(int sock, size_t max) {
  Received r;
  std::vector<char> buf(max);
  iovec iov{buf.data(), buf.size()};
  alignas(cmsghdr) char ctl[CMSG_SPACE(sizeof(int) * 16)];
  msghdr m{};
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  m.msg_control = ctl;
  m.msg_controllen = sizeof ctl;
  ssize_t n = ::recvmsg(sock, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  if (n < 0) return r;
  r.data.assign(buf.data(), static_cast<size_t>(n));
  for (cmsghdr* c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
      for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
        r.fds.emplace_back(fd);
      }
  return r;
}

bool same_file(int a, int b) { return ::syscall(SYS_kcmp, ::getpid(), ::getpid(), 0 /*KCMP_FILE*/, a, b) == 0; }

int peek_off(int sock) {
  int v = 0;
  socklen_t len = sizeof v;
  EXPECT_EQ(::getsockopt(sock, SOL_SOCKET, SO_PEEK_OFF, &v, &len), 0);
  return v;
}

int queued(int sock) {
  int n = -1;
  EXPECT_EQ(::ioctl(sock, FIONREAD, &n), 0);
  return n;
}

struct Files {
  UniqueFd r, w, ev;
};
Files some_files() {
  int p[2];
  EXPECT_EQ(::pipe2(p, O_CLOEXEC), 0);
  return Files{UniqueFd(p[0]), UniqueFd(p[1]), UniqueFd(::eventfd(0, EFD_CLOEXEC))};
}

TEST(UnixPeek, StreamQueueWithSeveralMessages) {
  Pair s = socket_pair(SOCK_STREAM);
  Files f = some_files();
  send_with(s.a.get(), "0123456789", {});
  send_with(s.a.get(), "abc", {f.r.get(), f.w.get()});
  send_with(s.a.get(), "hello", {});
  send_with(s.a.get(), "x", {f.ev.get()});
  send_with(s.a.get(), "tail123", {});
  const int before = queued(s.b.get());
  ASSERT_EQ(before, 26);
  ASSERT_EQ(peek_off(s.b.get()), -1);

  auto q = peek_unix_queue(s.b.get());
  ASSERT_TRUE(q) << q.error().what;
  EXPECT_EQ(q->type, SOCK_STREAM);
  EXPECT_FALSE(q->listening);
  EXPECT_TRUE(q->incomplete.empty()) << q->incomplete;
  EXPECT_EQ(q->bytes, 26u);
  ASSERT_EQ(q->with_files.size(), 2u);
  EXPECT_EQ(q->with_files[0].index, 0u);
  EXPECT_EQ(q->with_files[0].end, 13u);  // "0123456789abc": a receive glues data up to the files
  ASSERT_EQ(q->with_files[0].fds.size(), 2u);
  EXPECT_TRUE(same_file(q->with_files[0].fds[0].get(), f.r.get()));
  EXPECT_TRUE(same_file(q->with_files[0].fds[1].get(), f.w.get()));
  EXPECT_EQ(q->with_files[1].index, 1u);
  EXPECT_EQ(q->with_files[1].end, 19u);
  ASSERT_EQ(q->with_files[1].fds.size(), 1u);
  EXPECT_TRUE(same_file(q->with_files[1].fds[0].get(), f.ev.get()));
  EXPECT_EQ(::fcntl(q->with_files[0].fds[0].get(), F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);

  // Nothing consumed, peek offset as it was: the receiver gets exactly what was sent.
  EXPECT_EQ(peek_off(s.b.get()), -1);
  EXPECT_EQ(queued(s.b.get()), before);
  Received r1 = receive(s.b.get(), 100);
  EXPECT_EQ(r1.data, "0123456789abc");
  ASSERT_EQ(r1.fds.size(), 2u);
  EXPECT_TRUE(same_file(r1.fds[0].get(), f.r.get()));
  Received r2 = receive(s.b.get(), 100);
  EXPECT_EQ(r2.data, "hellox");
  ASSERT_EQ(r2.fds.size(), 1u);
  Received r3 = receive(s.b.get(), 100);
  EXPECT_EQ(r3.data, "tail123");
  EXPECT_TRUE(r3.fds.empty());
}

TEST(UnixPeek, PeekOffsetOfTheTargetIsKept) {
  Pair s = socket_pair(SOCK_STREAM);
  Files f = some_files();
  send_with(s.a.get(), "abcdef", {f.r.get()});
  send_with(s.a.get(), "ghij", {});
  int off = 2;
  ASSERT_EQ(::setsockopt(s.b.get(), SOL_SOCKET, SO_PEEK_OFF, &off, sizeof off), 0);
  auto q = peek_unix_queue(s.b.get());
  ASSERT_TRUE(q) << q.error().what;
  ASSERT_EQ(q->with_files.size(), 1u);
  EXPECT_EQ(q->with_files[0].end, 6u);  // walked from the head, whatever the target's offset
  EXPECT_EQ(peek_off(s.b.get()), 2);
  // The target's own next peek starts where it left off.
  char buf[16];
  ssize_t n = ::recv(s.b.get(), buf, sizeof buf, MSG_PEEK | MSG_DONTWAIT);
  ASSERT_GT(n, 0);
  EXPECT_EQ(std::string(buf, static_cast<size_t>(n)), "cdef");
}

class UnixPeekDatagrams : public ::testing::TestWithParam<int> {};

TEST_P(UnixPeekDatagrams, EveryDatagramStepsOnce) {
  Pair s = socket_pair(GetParam());
  Files f = some_files();
  std::string big(5000, 'B');  // longer than any fixed buffer guess
  send_with(s.a.get(), "0123456789", {});
  send_with(s.a.get(), "yy", {f.r.get(), f.w.get()});
  send_with(s.a.get(), big, {});
  send_with(s.a.get(), big, {f.w.get(), f.ev.get(), f.r.get()});
  send_with(s.a.get(), "end", {});

  auto q = peek_unix_queue(s.b.get());
  ASSERT_TRUE(q) << q.error().what;
  EXPECT_EQ(q->type, GetParam());
  EXPECT_TRUE(q->incomplete.empty()) << q->incomplete;
  EXPECT_EQ(q->messages, 5u);
  EXPECT_EQ(q->bytes, 10u + 2u + 5000u + 5000u + 3u);
  ASSERT_EQ(q->with_files.size(), 2u);
  EXPECT_EQ(q->with_files[0].index, 1u);
  EXPECT_EQ(q->with_files[0].end, 12u);
  ASSERT_EQ(q->with_files[0].fds.size(), 2u);
  EXPECT_TRUE(same_file(q->with_files[0].fds[0].get(), f.r.get()));
  EXPECT_TRUE(same_file(q->with_files[0].fds[1].get(), f.w.get()));
  EXPECT_EQ(q->with_files[1].index, 3u);
  EXPECT_EQ(q->with_files[1].end, 10012u);
  ASSERT_EQ(q->with_files[1].fds.size(), 3u);  // once: a long datagram is not peeked twice
  EXPECT_TRUE(same_file(q->with_files[1].fds[0].get(), f.w.get()));
  EXPECT_TRUE(same_file(q->with_files[1].fds[1].get(), f.ev.get()));
  EXPECT_TRUE(same_file(q->with_files[1].fds[2].get(), f.r.get()));
  EXPECT_EQ(peek_off(s.b.get()), -1);

  // A second walk sees the same (nothing was consumed).
  auto again = peek_unix_queue(s.b.get());
  ASSERT_TRUE(again);
  EXPECT_EQ(again->messages, 5u);
  EXPECT_EQ(again->with_files.size(), 2u);

  std::vector<std::string> want = {"0123456789", "yy", big, big, "end"};
  std::vector<size_t> nfds = {0, 2, 0, 3, 0};
  for (size_t i = 0; i < want.size(); ++i) {
    Received r = receive(s.b.get(), 8192);
    EXPECT_EQ(r.data, want[i]) << i;
    EXPECT_EQ(r.fds.size(), nfds[i]) << i;
  }
  EXPECT_EQ(receive(s.b.get(), 16).data, "");
}

INSTANTIATE_TEST_SUITE_P(Types, UnixPeekDatagrams, ::testing::Values(SOCK_DGRAM, SOCK_SEQPACKET),
                         [](const auto& info) { return info.param == SOCK_DGRAM ? "dgram" : "seqpacket"; });

TEST(UnixPeek, EmptyQueueAndListeningSocket) {
  Pair s = socket_pair(SOCK_STREAM);
  auto q = peek_unix_queue(s.b.get());
  ASSERT_TRUE(q) << q.error().what;
  EXPECT_TRUE(q->with_files.empty());
  EXPECT_EQ(q->messages, 0u);

  UniqueFd l(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::snprintf(addr.sun_path + 1, sizeof addr.sun_path - 1, "pipecr-peek-test-%d", ::getpid());  // abstract
  socklen_t len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + std::strlen(addr.sun_path + 1));
  ASSERT_EQ(::bind(l.get(), reinterpret_cast<sockaddr*>(&addr), len), 0);
  ASSERT_EQ(::listen(l.get(), 4), 0);
  auto ql = peek_unix_queue(l.get());
  ASSERT_TRUE(ql) << ql.error().what;
  EXPECT_TRUE(ql->listening);
}

}  // namespace
}  // namespace pipecr::sys
