// in_flight_test.cpp: pipe ends in flight in unix sockets (SCM_RIGHTS sent, not received) are
// found by the dump, recorded as IN_FLIGHT records, their pipes dumped, and the queue left as it
// was: the process receives them after the dump and reads the same bytes.
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "dump_child.hpp"
#include "unit/send_fds.hpp"

namespace pipecr::testing {
namespace {

const std::string kBytes = "bytes queued in a pipe whose ends are in flight";

std::vector<int> recv_fds(int sock) {
  char buf[256];
  iovec iov{buf, sizeof buf};
  alignas(cmsghdr) char ctl[CMSG_SPACE(sizeof(int) * 8)];
  msghdr m{};
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  m.msg_control = ctl;
  m.msg_controllen = sizeof ctl;
  std::vector<int> out;
  if (::recvmsg(sock, &m, MSG_DONTWAIT) <= 0) return out;
  for (cmsghdr* c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
    if (c->cmsg_type == SCM_RIGHTS)
      for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
        out.push_back(fd);
      }
  return out;
}

// The child: a pipe holding kBytes whose two ends wait in the queue of socket fd 10 (message 1,
// after a message carrying an eventfd), and are closed in its fd table. After SIGUSR1 it receives
// them and checks the bytes and that a write through the received end reaches the received reader.
int in_flight_child(int ready, int type) {
  block_usr1();
  int sv[2], p[2];
  if (socketpair(AF_UNIX, type, 0, sv) != 0 || pipe(p) != 0) return 10;
  if (dup2(sv[1], 10) < 0 || close(sv[1]) != 0) return 11;
  if (write(p[1], kBytes.data(), kBytes.size()) != static_cast<ssize_t>(kBytes.size())) return 12;
  int ev = eventfd(0, 0);
  if (!send_fds(sv[0], "e", {ev}) || !send_fds(sv[0], "p", {p[0], p[1]})) return 13;
  close(p[0]);
  close(p[1]);
  close(ev);
  close(ready);
  wait_usr1();
  if (recv_fds(10).size() != 1) return 20;
  std::vector<int> ends = recv_fds(10);
  if (ends.size() != 2) return 21;
  char buf[256];
  ssize_t n = read(ends[0], buf, sizeof buf);
  if (n != static_cast<ssize_t>(kBytes.size()) || std::memcmp(buf, kBytes.data(), kBytes.size()) != 0) return 22;
  if (write(ends[1], "more", 4) != 4 || read(ends[0], buf, sizeof buf) != 4) return 23;
  return 0;
}

class InFlightDump : public ::testing::TestWithParam<int> {};

TEST_P(InFlightDump, EndsInFlightAreRecordedAndTheQueueIsUnchanged) {
  const int type = GetParam();
  DumpChild child([type](int ready) { return in_flight_child(ready, type); });
  ASSERT_TRUE(child.ready());
  std::vector<std::byte> bytes;
  dump::DumpStats stats;
  auto img = dump_image({child.pid()}, bytes, &stats);
  ASSERT_TRUE(img) << img.error().what;
  expect_running(child.pid());

  EXPECT_EQ(stats.in_flight, 2u);
  EXPECT_EQ(stats.other_in_flight, 1u);  // the eventfd: counted, not recorded
  ASSERT_EQ(img->pipes.size(), 1u);
  const PipeRecord& pipe = img->pipes[0];
  EXPECT_EQ(pipe.bytes(), kBytes.size());
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(pipe.data.data()), pipe.data.size()), kBytes);
  EXPECT_GT(pipe.capacity, 0u);
  EXPECT_TRUE(img->fds.empty());  // neither end is in an fd table
  ASSERT_EQ(img->files.size(), 2u);
  ASSERT_EQ(img->in_flight.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const InFlightRecord& f = img->in_flight[i];
    EXPECT_EQ(f.pid, child.pid());
    EXPECT_EQ(f.sock_fd, 10);
    EXPECT_NE(f.sock_ino, 0u);
    EXPECT_EQ(f.msg, 1u);  // stream: the second message with files; datagram, seqpacket: the second one
    EXPECT_EQ(f.slot, i);
    EXPECT_EQ(f.end, 2u);
    const FileRecord* file = img->find_file(f.file_id);
    ASSERT_NE(file, nullptr);
    EXPECT_EQ(file->pipe_id, pipe.id);
    EXPECT_EQ(static_cast<int>(file->flags & O_ACCMODE), i == 0 ? O_RDONLY : O_WRONLY);
  }
  EXPECT_EQ(child.finish(), 0);  // received after the dump: same pipe, same bytes
}

INSTANTIATE_TEST_SUITE_P(Types, InFlightDump, ::testing::Values(SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET),
                         [](const auto& info) {
                           return info.param == SOCK_STREAM ? "stream" : info.param == SOCK_DGRAM ? "dgram" : "seqpacket";
                         });

// An end both held at an fd and in flight is one open file: one FILE, an FD and an IN_FLIGHT.
TEST(InFlightDump, EndHeldAndInFlightIsOneOpenFile) {
  DumpChild child([](int ready) {
    block_usr1();
    int sv[2], p[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0 || pipe(p) != 0) return 10;
    if (write(p[1], "xyz", 3) != 3 || !send_fds(sv[0], "r", {p[0]})) return 11;
    close(ready);
    wait_usr1();
    return 0;
  });
  ASSERT_TRUE(child.ready());
  std::vector<std::byte> bytes;
  auto img = dump_image({child.pid()}, bytes);
  ASSERT_TRUE(img) << img.error().what;
  ASSERT_EQ(img->pipes.size(), 1u);
  EXPECT_EQ(img->pipes[0].bytes(), 3u);
  ASSERT_EQ(img->in_flight.size(), 1u);
  ASSERT_EQ(img->files.size(), 2u);  // the read end (held and in flight) and the write end
  const uint64_t flying = img->in_flight[0].file_id;
  size_t fds_on_it = 0;
  for (const FdRecord& d : img->fds) fds_on_it += d.file_id == flying;
  EXPECT_EQ(fds_on_it, 1u);
  EXPECT_EQ(static_cast<int>(img->find_file(flying)->flags & O_ACCMODE), O_RDONLY);
  EXPECT_EQ(child.finish(), 0);
}

}  // namespace
}  // namespace pipecr::testing
