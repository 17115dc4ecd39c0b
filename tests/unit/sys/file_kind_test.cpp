// file_kind_test.cpp: classify() on real files of each kind, and on the look-alikes it must not
// confuse with them (an eventfd is an anonymous inode like an epoll; a TCP socket is a socket).
#include "sys/file_kind.hpp"

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

#include <gtest/gtest.h>

#include "sys/syscalls.hpp"
#include "sys/unique_fd.hpp"

namespace pipecr::sys {
namespace {

TEST(FileKind, EachKindIsToldApart) {
  auto p = make_pipe(O_CLOEXEC);
  ASSERT_TRUE(p);
  EXPECT_EQ(classify(p->read.get()), FileKind::pipe);
  EXPECT_EQ(classify(p->write.get()), FileKind::pipe);

  char dir[] = "/tmp/pipecr-kind-XXXXXX";
  ASSERT_NE(::mkdtemp(dir), nullptr);
  std::string fifo = std::string(dir) + "/f";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  UniqueFd f(::open(fifo.c_str(), O_RDWR | O_CLOEXEC));
  ASSERT_TRUE(f);
  EXPECT_EQ(classify(f.get()), FileKind::fifo);
  UniqueFd reg(::open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  EXPECT_EQ(classify(reg.get()), FileKind::other);
  ::unlink(fifo.c_str());
  ::rmdir(dir);

  UniqueFd ep(::epoll_create1(EPOLL_CLOEXEC));
  ASSERT_TRUE(ep);
  EXPECT_EQ(classify(ep.get()), FileKind::epoll);
  UniqueFd ev(::eventfd(0, EFD_CLOEXEC));
  ASSERT_TRUE(ev);
  EXPECT_EQ(classify(ev.get()), FileKind::other);

  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
  UniqueFd a(sv[0]), b(sv[1]);
  EXPECT_EQ(classify(a.get()), FileKind::unix_socket);
  UniqueFd tcp(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_TRUE(tcp);
  EXPECT_EQ(classify(tcp.get()), FileKind::other);
  EXPECT_EQ(classify(-1), FileKind::other);
}

}  // namespace
}  // namespace pipecr::sys
