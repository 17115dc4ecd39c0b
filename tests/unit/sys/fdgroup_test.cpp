// fdgroup_test.cpp: grouping by open file description with real kcmp: dup and fork share one,
// a reopen of /proc/self/fd/N makes a new one; across two processes; and the number of kcmp calls
// for 2,000 fds stays n log n.
#include "sys/fdgroup.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "sys/syscalls.hpp"

namespace pipecr::sys {
namespace {

struct ChildGuard {
  pid_t pid = -1;
  explicit ChildGuard(pid_t p) : pid(p) {}
  ChildGuard(const ChildGuard&) = delete;
  ChildGuard& operator=(const ChildGuard&) = delete;
  ~ChildGuard() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
      }
    }
  }
};

bool kcmp_available() {
  auto p = make_pipe(O_CLOEXEC);
  return p && kcmp_file(::getpid(), p->read.get(), ::getpid(), p->read.get()).has_value();
}

UniqueFd reopen(int fd, int flags) {
  return UniqueFd(::open(fmt::format("/proc/self/fd/{}", fd).c_str(), flags | O_CLOEXEC));
}

uint64_t inode_of(int fd) {
  struct stat st {};
  return ::fstat(fd, &st) == 0 ? st.st_ino : 0;
}

// The group index of each input entry, for compact assertions.
std::vector<size_t> group_index(const std::vector<FdGroup>& groups, const std::vector<FdRef>& in) {
  std::vector<size_t> idx(in.size(), SIZE_MAX);
  for (size_t g = 0; g < groups.size(); ++g)
    for (const FdRef& m : groups[g].members)
      for (size_t i = 0; i < in.size(); ++i)
        if (in[i] == m) idx[i] = g;
  return idx;
}

class FdGroupTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!kcmp_available()) GTEST_SKIP() << "kcmp(KCMP_FILE) not available (CONFIG_KCMP)";
  }
};

TEST_F(FdGroupTest, DupSharesReopenDoesNot) {
  auto p = make_pipe(O_CLOEXEC);
  ASSERT_TRUE(p);
  UniqueFd dup(::fcntl(p->read.get(), F_DUPFD_CLOEXEC, 0));
  UniqueFd re = reopen(p->read.get(), O_RDONLY);
  ASSERT_TRUE(dup && re);
  pid_t me = ::getpid();
  std::vector<FdRef> in = {{me, p->write.get()}, {me, p->read.get()}, {me, re.get()}, {me, dup.get()}};
  auto groups = group_by_open_file(in);
  ASSERT_TRUE(groups) << groups.error().what;
  ASSERT_EQ(groups->size(), 3u);
  // Stable: groups by first appearance, members in input order.
  EXPECT_EQ(group_index(*groups, in), (std::vector<size_t>{0, 1, 2, 1}));
  EXPECT_EQ((*groups)[1].members[0].fd, p->read.get());
  EXPECT_EQ((*groups)[1].members[1].fd, dup.get());
}

TEST_F(FdGroupTest, ForkSharesAcrossProcesses) {
  auto p = make_pipe(O_CLOEXEC);
  ASSERT_TRUE(p);
  UniqueFd re = reopen(p->write.get(), O_WRONLY);
  ASSERT_TRUE(re);
  int sync[2];
  ASSERT_EQ(::pipe2(sync, O_CLOEXEC), 0);
  pid_t pid = ::fork();
  if (pid == 0) {
    char c = 'r';
    (void)!::write(sync[1], &c, 1);
    for (;;) ::pause();
  }
  ChildGuard child(pid);
  ::close(sync[1]);
  char c;
  ASSERT_EQ(::read(sync[0], &c, 1), 1);
  ::close(sync[0]);

  pid_t me = ::getpid();
  uint64_t ino = inode_of(p->read.get());
  // The child inherited every fd: its copies share our open file descriptions.
  std::vector<FdRef> in = {{pid, p->read.get(), ino}, {me, re.get(), ino},     {me, p->write.get(), ino},
                           {pid, re.get(), ino},      {me, p->read.get(), ino}, {pid, p->write.get(), ino}};
  auto groups = group_by_open_file(in);
  ASSERT_TRUE(groups) << groups.error().what;
  ASSERT_EQ(groups->size(), 3u);
  EXPECT_EQ(group_index(*groups, in), (std::vector<size_t>{0, 1, 2, 1, 0, 2}));
}

TEST_F(FdGroupTest, DifferentInodesAreNeverCompared) {
  auto a = make_pipe(O_CLOEXEC);
  auto b = make_pipe(O_CLOEXEC);
  ASSERT_TRUE(a && b);
  pid_t me = ::getpid();
  std::vector<FdRef> in = {{me, a->read.get(), inode_of(a->read.get())}, {me, b->read.get(), inode_of(b->read.get())}};
  int calls = 0;
  FileCompare counting = [&](const FdRef& x, const FdRef& y) {
    ++calls;
    return kcmp_file(x.pid, x.fd, y.pid, y.fd);
  };
  auto groups = group_by_open_file(in, counting);
  ASSERT_TRUE(groups);
  EXPECT_EQ(groups->size(), 2u);
  EXPECT_EQ(calls, 0);
  EXPECT_EQ((*groups)[0].members[0].fd, a->read.get());
}

TEST_F(FdGroupTest, EmptyAndDuplicates) {
  auto none = group_by_open_file({});
  ASSERT_TRUE(none);
  EXPECT_TRUE(none->empty());
  auto p = make_pipe(O_CLOEXEC);
  ASSERT_TRUE(p);
  std::vector<FdRef> in = {{::getpid(), p->read.get()}, {::getpid(), p->read.get()}};
  auto groups = group_by_open_file(in);
  ASSERT_TRUE(groups);
  ASSERT_EQ(groups->size(), 1u);
  EXPECT_EQ((*groups)[0].members.size(), 2u);
}

TEST_F(FdGroupTest, ErrorsPropagate) {
  pid_t pid = ::fork();
  if (pid == 0) ::_exit(0);
  ASSERT_GT(pid, 0);
  ASSERT_EQ(::waitpid(pid, nullptr, 0), pid);
  auto p = make_pipe(O_CLOEXEC);
  ASSERT_TRUE(p);
  std::vector<FdRef> in = {{::getpid(), p->read.get()}, {pid, 0}};
  auto groups = group_by_open_file(in);
  ASSERT_FALSE(groups);
  EXPECT_EQ(groups.error().kind, Errc::gone) << groups.error().what;
  EXPECT_NE(groups.error().what.find("kcmp"), std::string::npos);
}

TEST_F(FdGroupTest, TwoThousandFdsTakeNLogNCalls) {
  // 1,000 pipes' read ends plus a dup of each: 2,000 fds, 1,000 open file descriptions, all with
  // ino unknown so that every fd lands in one bucket (the worst case for the sort).
  std::vector<PipePair> pipes;
  std::vector<UniqueFd> dups;
  std::vector<FdRef> in;
  pid_t me = ::getpid();
  for (int i = 0; i < 1000; ++i) {
    auto p = make_pipe(O_CLOEXEC);
    ASSERT_TRUE(p);
    dups.emplace_back(::fcntl(p->read.get(), F_DUPFD_CLOEXEC, 0));
    in.push_back({me, p->read.get()});
    pipes.push_back(std::move(*p));
  }
  for (const UniqueFd& d : dups) in.push_back({me, d.get()});
  long calls = 0;
  FileCompare counting = [&](const FdRef& x, const FdRef& y) {
    ++calls;
    return kcmp_file(x.pid, x.fd, y.pid, y.fd);
  };
  auto groups = group_by_open_file(in, counting);
  ASSERT_TRUE(groups) << groups.error().what;
  ASSERT_EQ(groups->size(), 1000u);
  for (size_t g = 0; g < groups->size(); ++g) {
    ASSERT_EQ((*groups)[g].members.size(), 2u);
    EXPECT_EQ((*groups)[g].members[0].fd, pipes[g].read.get());
    EXPECT_EQ((*groups)[g].members[1].fd, dups[g].get());
  }
  const double n = static_cast<double>(in.size());
  const long bound = static_cast<long>(n * std::ceil(std::log2(n)));  // 22,000; n^2/2 would be 2,000,000
  EXPECT_LE(calls, bound);
  RecordProperty("kcmp_calls_2000", static_cast<int>(calls));
  std::printf("kcmp calls for 2000 fds: %ld (n log2 n bound %ld)\n", calls, bound);

  // With inodes known, each bucket holds one read end and its dup: one call per pipe.
  for (size_t i = 0; i < 1000; ++i) in[i].ino = in[i + 1000].ino = inode_of(pipes[i].read.get());
  calls = 0;
  groups = group_by_open_file(in, counting);
  ASSERT_TRUE(groups);
  EXPECT_EQ(groups->size(), 1000u);
  EXPECT_EQ(calls, 1000);
}

}  // namespace
}  // namespace pipecr::sys
