// epoll_dump_test.cpp: the dump's record of epoll watches on pipe ends (dump/epoll.hpp): the fdinfo
// parser, and real processes whose epolls watch pipes at low and high fds, through two fds of one
// instance, one-shot and edge-triggered, a watch whose fd was reused for another pipe end since it
// was added (not attributable), and a watch on an eventfd (another kind of file).
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>

#include <algorithm>
#include <tuple>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "dump/epoll.hpp"
#include "dump_child.hpp"
#include "image/validate.hpp"
#include "sys/proc.hpp"

namespace pipecr {
namespace {

using testing::DumpChild;
using ::testing::HasSubstr;

TEST(EpollFdinfo, ParsesTheKernelsLines) {
  const char* text =
      "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t2071\n"
      "tfd:        5 events:       19 data:                5  pos:0 ino:2b sdev:e\n"
      "tfd:      300 events: c0000004 data: deadbeefcafef00d  pos:0 ino:2c sdev:e\n";
  auto e = dump::parse_epoll_fdinfo(text);
  ASSERT_TRUE(e) << e.error().what;
  ASSERT_EQ(e->size(), 2u);
  EXPECT_EQ((*e)[0], (dump::EpollFdinfoEntry{5, 0x19, 5, 0x2b}));
  EXPECT_EQ((*e)[1], (dump::EpollFdinfoEntry{300, 0xc0000004u, 0xdeadbeefcafef00dull, 0x2c}));
  auto none = dump::parse_epoll_fdinfo("pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t2071\n");
  ASSERT_TRUE(none);
  EXPECT_TRUE(none->empty());
  auto bad = dump::parse_epoll_fdinfo("tfd:        5 events: zz data: 5\n");
  ASSERT_FALSE(bad);
  EXPECT_THAT(bad.error().what, HasSubstr("tfd:        5 events: zz"));
}

TEST(EpollFdinfo, MatchesWhatThisKernelPrints) {
  int p[2];
  ASSERT_EQ(pipe2(p, O_CLOEXEC), 0);
  int ep = epoll_create1(EPOLL_CLOEXEC);
  ASSERT_GE(ep, 0);
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLET | EPOLLRDHUP;
  ev.data.u64 = 0x123456789abcdef0ull;
  ASSERT_EQ(epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &ev), 0);
  ev.events = EPOLLOUT | EPOLLONESHOT;
  ev.data.u64 = 7;
  ASSERT_EQ(epoll_ctl(ep, EPOLL_CTL_ADD, p[1], &ev), 0);
  auto text = sys::read_proc_file("/proc/self/fdinfo/" + std::to_string(ep));
  ASSERT_TRUE(text);
  auto e = dump::parse_epoll_fdinfo(*text);
  ASSERT_TRUE(e) << e.error().what;
  ASSERT_EQ(e->size(), 2u);
  auto at = [&](int fd) { return std::find_if(e->begin(), e->end(), [&](auto& x) { return x.tfd == fd; }); };
  ASSERT_NE(at(p[0]), e->end());
  // EPOLL_CTL_ADD always adds EPOLLERR and EPOLLHUP.
  EXPECT_EQ(at(p[0])->events, static_cast<uint32_t>(EPOLLIN | EPOLLET | EPOLLRDHUP | EPOLLERR | EPOLLHUP));
  EXPECT_EQ(at(p[0])->data, 0x123456789abcdef0ull);
  ASSERT_NE(at(p[1]), e->end());
  EXPECT_EQ(at(p[1])->events, static_cast<uint32_t>(EPOLLOUT | EPOLLONESHOT | EPOLLERR | EPOLLHUP));
  EXPECT_EQ(at(p[1])->data, 7u);
  close(ep), close(p[0]), close(p[1]);
}

void add(int ep, int fd, uint32_t events, uint64_t data) {
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = data;
  if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) _exit(20);
}

// Child: pipe a at 10 (read) / 11 (write), 11 also at 300; epoll E1 at 20 watches 10 (IN|ET) and
// 11 (OUT); epoll E2 at 400, also at 401, watches 300 (OUT|ONESHOT) and 10 (IN|EXCLUSIVE); pipe b
// read end watched by E1 at 12, then 12 reused for pipe c's read end (b's read end kept at 13: the
// watch is recorded, keyed by 12, on b's read end); a second description of a's read end watched
// at 17 and then held only by a grandchild (not attributable); an eventfd at 14 watched by E1.
int epoll_child(int ready) {
  testing::block_usr1();
  int a[2], b[2], c[2];
  if (pipe(a) || pipe(b) || pipe(c)) return 10;
  dup2(a[0], 10), dup2(a[1], 11), dup2(a[1], 300);
  dup2(b[0], 12), dup2(b[0], 13), dup2(c[0], 15), dup2(c[1], 16);
  int e1 = epoll_create1(0), e2 = epoll_create1(0);
  dup2(e1, 20), dup2(e2, 400), dup2(e2, 401);
  for (int fd : {a[0], a[1], b[0], b[1], c[0], c[1], e1, e2}) close(fd);
  add(20, 10, EPOLLIN | EPOLLET, 1010);
  add(20, 11, EPOLLOUT, 1111);
  add(400, 300, EPOLLOUT | EPOLLONESHOT, 300300);
  add(400, 10, EPOLLIN | EPOLLEXCLUSIVE, 4010);
  add(20, 12, EPOLLIN, 1212);
  dup2(15, 12);  // 12 is c's read end now; the watch stays on b's read end (held at 13)
  // A second description of a's read end, watched at 17, then held only by a grandchild: the
  // process holds a's inode, but not that file.
  int x = open("/proc/self/fd/10", O_RDONLY | O_NONBLOCK);
  dup2(x, 17);
  close(x);
  add(20, 17, EPOLLIN, 1717);
  if (fork() == 0) {
    close(ready);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() == 1) _exit(0);
    for (;;) pause();
  }
  close(17);
  int ev = eventfd(0, 0);
  dup2(ev, 14);
  close(ev);
  add(20, 14, EPOLLIN, 1414);
  close(ready);
  testing::wait_usr1();
  // The epolls still work after the dump: E1 reports fd 11 writable.
  epoll_event out[8];
  int n = epoll_wait(20, out, 8, 1000);
  for (int i = 0; i < n; ++i)
    if (out[i].data.u64 == 1111) return 0;
  return 30;
}

TEST(EpollDump, RecordsWatchesOnPipeEnds) {
  DumpChild child(epoll_child);
  ASSERT_TRUE(child.ready());
  std::vector<std::byte> bytes;
  dump::DumpStats stats;
  auto img = testing::dump_image({child.pid()}, bytes, &stats);
  ASSERT_TRUE(img) << img.error().what;
  testing::expect_running(child.pid());
  auto file_at = [&](int fd) -> uint64_t {
    for (const FdRecord& f : img->fds)
      if (f.fd == fd) return f.file_id;
    return 0;
  };
  ASSERT_NE(file_at(10), 0u);
  ASSERT_NE(file_at(11), 0u);
  EXPECT_EQ(file_at(11), file_at(300));
  std::vector<EpollWatch> w = img->epoll_watches;
  std::sort(w.begin(), w.end(), [](const EpollWatch& x, const EpollWatch& y) {
    return std::tie(x.epoll_fd, x.fd) < std::tie(y.epoll_fd, y.fd);
  });
  ASSERT_EQ(w.size(), 7u);
  const pid_t pid = child.pid();
  constexpr uint32_t kAlways = EPOLLERR | EPOLLHUP;  // EPOLL_CTL_ADD adds them
  uint64_t e1 = w[0].epoll_id, e2 = w[3].epoll_id;
  EXPECT_NE(e1, e2);
  ASSERT_NE(file_at(13), 0u);
  EXPECT_NE(file_at(13), file_at(12));
  EXPECT_EQ(w[0], (EpollWatch{e1, pid, 20, file_at(10), 10, EPOLLIN | EPOLLET | kAlways, 1010}));
  EXPECT_EQ(w[1], (EpollWatch{e1, pid, 20, file_at(11), 11, EPOLLOUT | kAlways, 1111}));
  EXPECT_EQ(w[2], (EpollWatch{e1, pid, 20, file_at(13), 12, EPOLLIN | kAlways, 1212}));  // keyed by 12, file at 13
  EXPECT_EQ(w[3], (EpollWatch{e2, pid, 400, file_at(10), 10, EPOLLIN | EPOLLEXCLUSIVE | kAlways, 4010}));
  EXPECT_EQ(w[4], (EpollWatch{e2, pid, 400, file_at(11), 300, EPOLLOUT | EPOLLONESHOT | kAlways, 300300}));
  EXPECT_EQ(w[5], (EpollWatch{e2, pid, 401, file_at(10), 10, EPOLLIN | EPOLLEXCLUSIVE | kAlways, 4010}));
  EXPECT_EQ(w[6], (EpollWatch{e2, pid, 401, file_at(11), 300, EPOLLOUT | EPOLLONESHOT | kAlways, 300300}));
  EXPECT_EQ(stats.epolls, 2u);
  EXPECT_EQ(stats.epoll_watches, 5u);
  EXPECT_EQ(stats.epoll_unattributed, 1u);  // fd 17: a's inode, but a description the process no longer holds
  EXPECT_EQ(stats.epoll_other, 1u);         // fd 14: an eventfd
  ASSERT_EQ(stats.notes.size(), 1u);
  EXPECT_THAT(stats.notes[0], HasSubstr("epoll fd 20 of process"));
  EXPECT_THAT(stats.notes[0], HasSubstr("1 watch not recorded: the process no longer holds the watched pipe end"));
  EXPECT_TRUE(image::validate(*img).has_value());
  EXPECT_EQ(child.finish(), 0);
}

// Two processes: the parent's epoll at 52 (inherited by the child, which holds it too) watches the
// read end at 50; the child's own epoll at 53 watches its copy of the read end at 900.
int family_child(int ready) {
  testing::block_usr1();
  int p[2];
  if (pipe(p)) return 10;
  dup2(p[0], 50), dup2(p[1], 51);
  close(p[0]), close(p[1]);
  int e = epoll_create1(0);
  dup2(e, 52);
  close(e);
  add(52, 50, EPOLLIN, 55);
  pid_t kid = fork();
  if (kid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    dup2(50, 900);
    int mine = epoll_create1(0);
    dup2(mine, 53);
    close(mine);
    add(53, 900, EPOLLIN | EPOLLET, 900);
    close(ready);
    testing::wait_usr1();
    _exit(0);
  }
  close(ready);
  testing::wait_usr1();
  kill(kid, SIGKILL);
  waitpid(kid, nullptr, 0);
  return 0;
}

TEST(EpollDump, EpollsOfParentAndChild) {
  DumpChild parent(family_child);
  ASSERT_TRUE(parent.ready());
  std::vector<std::byte> bytes;
  image::MemorySink sink;
  auto st = dump::dump_processes(dump::DumpOptions{.pids = {parent.pid()}, .tree = true}, sink);
  ASSERT_TRUE(st) << st.error().what;
  auto img = image::parse(sink.bytes());
  ASSERT_TRUE(img) << img.error().what;
  ASSERT_EQ(img->processes.size(), 2u);
  pid_t kid = img->processes[1].pid;
  std::vector<EpollWatch> w = img->epoll_watches;
  std::sort(w.begin(), w.end(), [](const EpollWatch& x, const EpollWatch& y) {
    return std::tie(x.pid, x.epoll_fd, x.fd) < std::tie(y.pid, y.epoll_fd, y.fd);
  });
  // Parent's epoll at 52 watches 50; the child holds it at 52 too (same instance, same file at 50);
  // the child's own epoll at 53 watches 900.
  ASSERT_EQ(w.size(), 3u) << "watches: " << w.size();
  auto find = [&](pid_t pid, int epfd) {
    return std::find_if(w.begin(), w.end(), [&](auto& x) { return x.pid == pid && x.epoll_fd == epfd; });
  };
  ASSERT_NE(find(parent.pid(), 52), w.end());
  ASSERT_NE(find(kid, 52), w.end());
  ASSERT_NE(find(kid, 53), w.end());
  EXPECT_EQ(find(parent.pid(), 52)->epoll_id, find(kid, 52)->epoll_id);
  EXPECT_NE(find(kid, 53)->epoll_id, find(kid, 52)->epoll_id);
  EXPECT_EQ(find(kid, 53)->fd, 900);
  EXPECT_EQ(find(kid, 53)->events, static_cast<uint32_t>(EPOLLIN | EPOLLET | EPOLLERR | EPOLLHUP));
  EXPECT_EQ(find(kid, 52)->file_id, find(kid, 53)->file_id);  // one open file: the read end
  EXPECT_EQ(st->epolls, 2u);
  EXPECT_TRUE(image::validate(*img).has_value());
  EXPECT_EQ(parent.finish(), 0);
}

}  // namespace
}  // namespace pipecr
