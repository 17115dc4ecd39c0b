// fdgroup_test.cpp: grouping by open file description with real kcmp: dup and fork share one,
// a reopen of /proc/self/fd/N makes a new one; across two processes; and the number of kcmp calls
// for 2,000 fds stays n log n. F_DUPFD_QUERY grouping (own_file_equal) against kcmp on real dup'd,
// forked (taken with pidfd_getfd) and reopened fds, the access-mode split, the fall-back to the
// sort for a bucket of many descriptions, open_file_ids() (the same answer, one number per fd),
// and close_fds() over runs.
#include "sys/fdgroup.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "sys/features.hpp"
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
  // The same answer as one number per fd, with F_DUPFD_QUERY between our own fds where it works.
  auto ids = open_file_ids(in, kcmp_compare(), own_file_equal());
  ASSERT_TRUE(ids) << ids.error().what;
  EXPECT_EQ(*ids, (std::vector<size_t>{0, 1, 2, 1, 0, 2}));
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


// Groups as sets of fds, to compare two groupings of the same input.
std::vector<std::vector<int>> as_fd_sets(const std::vector<FdGroup>& groups) {
  std::vector<std::vector<int>> out;
  for (const FdGroup& g : groups) {
    std::vector<int> fds;
    for (const FdRef& m : g.members) fds.push_back(m.fd);
    out.push_back(fds);
  }
  return out;
}

class DupfdQueryTest : public FdGroupTest {
 protected:
  void SetUp() override {
    FdGroupTest::SetUp();
    if (IsSkipped()) return;
    if (!dupfd_query_works()) GTEST_SKIP() << "fcntl(F_DUPFD_QUERY) not in this kernel (Linux 6.10+)";
  }
};

TEST_F(DupfdQueryTest, AnswersLikeKcmpOnDupForkedAndReopenedFds) {
  // A pipe, a dup of each end, a reopen of the read end, and the ends as a forked child holds them,
  // taken back with pidfd_getfd: the child's fds are the very descriptions, the reopen is not.
  auto p = make_pipe(O_CLOEXEC);
  ASSERT_TRUE(p);
  UniqueFd dup_r(::fcntl(p->read.get(), F_DUPFD_CLOEXEC, 0));
  UniqueFd dup_w(::fcntl(p->write.get(), F_DUPFD_CLOEXEC, 0));
  UniqueFd re = reopen(p->read.get(), O_RDONLY);
  ASSERT_TRUE(dup_r && dup_w && re);
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
  auto pidfd = pidfd_open(pid);
  ASSERT_TRUE(pidfd) << pidfd.error().what;
  auto child_r = pidfd_getfd(pidfd->get(), p->read.get(), pid);
  auto child_re = pidfd_getfd(pidfd->get(), re.get(), pid);
  ASSERT_TRUE(child_r && child_re);

  EXPECT_EQ(same_open_file(p->read.get(), dup_r.get()).value_or(false), true);
  EXPECT_EQ(same_open_file(p->read.get(), child_r->get()).value_or(true), true);
  EXPECT_EQ(same_open_file(p->read.get(), re.get()).value_or(true), false);
  EXPECT_EQ(same_open_file(p->read.get(), p->write.get()).value_or(true), false);
  EXPECT_FALSE(same_open_file(p->read.get(), 100000));  // EBADF: an error, not "different"

  pid_t me = ::getpid();
  uint64_t ino = inode_of(p->read.get());
  std::vector<FdRef> in = {{me, p->read.get(), ino}, {me, re.get(), ino},        {me, p->write.get(), ino},
                           {me, dup_w.get(), ino},   {me, child_re->get(), ino}, {me, dup_r.get(), ino},
                           {me, child_r->get(), ino}, {pid, p->write.get(), ino}};  // the last: kcmp
  auto by_kcmp = group_by_open_file(in);
  ASSERT_TRUE(by_kcmp) << by_kcmp.error().what;
  long equal_calls = 0;
  FileEqual eq = own_file_equal();
  ASSERT_TRUE(eq);
  FileEqual counting = [&](const FdRef& a, const FdRef& b) {
    ++equal_calls;
    return eq(a, b);
  };
  auto by_query = group_by_open_file(in, kcmp_compare(), counting);
  ASSERT_TRUE(by_query) << by_query.error().what;
  ASSERT_EQ(by_query->size(), 3u);
  EXPECT_EQ(group_index(*by_query, in), (std::vector<size_t>{0, 1, 2, 2, 1, 0, 0, 2}));
  EXPECT_EQ(as_fd_sets(*by_query), as_fd_sets(*by_kcmp));
  EXPECT_GT(equal_calls, 0);
}

TEST_F(DupfdQueryTest, OneCallPerFdAndNoneAcrossAccessModes) {
  // 1,000 pipes: read end, write end, a dup of the read end. By equality each fd is compared with
  // one member of each group so far in its bucket: 2 calls per pipe; with the access modes known
  // the write end is alone in its bucket: 1 call per pipe (the dup against its read end).
  std::vector<PipePair> pipes;
  std::vector<UniqueFd> dups;
  std::vector<FdRef> in;
  pid_t me = ::getpid();
  for (int i = 0; i < 1000; ++i) {
    auto p = make_pipe(O_CLOEXEC);
    ASSERT_TRUE(p);
    dups.emplace_back(::fcntl(p->read.get(), F_DUPFD_CLOEXEC, 0));
    uint64_t ino = inode_of(p->read.get());
    in.push_back({me, p->read.get(), ino});
    in.push_back({me, p->write.get(), ino});
    in.push_back({me, dups.back().get(), ino});
    pipes.push_back(std::move(*p));
  }
  long equal_calls = 0, kcmp_calls = 0;
  FileEqual eq = own_file_equal();
  FileEqual counting = [&](const FdRef& a, const FdRef& b) {
    ++equal_calls;
    return eq(a, b);
  };
  FileCompare counting_kcmp = [&](const FdRef& x, const FdRef& y) {
    ++kcmp_calls;
    return kcmp_file(x.pid, x.fd, y.pid, y.fd);
  };
  auto groups = group_by_open_file(in, counting_kcmp, counting);
  ASSERT_TRUE(groups) << groups.error().what;
  ASSERT_EQ(groups->size(), 2000u);
  EXPECT_EQ(equal_calls, 2000);
  EXPECT_EQ(kcmp_calls, 0);

  for (size_t i = 0; i < in.size(); i += 3) {
    in[i].access = O_RDONLY;
    in[i + 1].access = O_WRONLY;
    in[i + 2].access = O_RDONLY;
  }
  equal_calls = 0;
  auto split = group_by_open_file(in, counting_kcmp, counting);
  ASSERT_TRUE(split) << split.error().what;
  EXPECT_EQ(as_fd_sets(*split), as_fd_sets(*groups));
  EXPECT_EQ(equal_calls, 1000);
  EXPECT_EQ(kcmp_calls, 0);
  for (size_t g = 0; g < split->size(); g += 2) {
    EXPECT_EQ((*split)[g].members.size(), 2u);  // read end and its dup
    EXPECT_EQ((*split)[g + 1].members.size(), 1u);
  }
}

TEST_F(DupfdQueryTest, ABucketOfManyDescriptionsIsSorted) {
  // 40 reopens of one pipe's read end (40 descriptions of one inode) and a dup of each: the
  // equality pass gives up after 8 groups (at most 36 calls) and the kcmp sort groups the bucket.
  auto p = make_pipe(O_CLOEXEC);
  ASSERT_TRUE(p);
  std::vector<UniqueFd> fds;
  std::vector<FdRef> in;
  pid_t me = ::getpid();
  uint64_t ino = inode_of(p->read.get());
  for (int i = 0; i < 40; ++i) fds.push_back(reopen(p->read.get(), O_RDONLY | O_NONBLOCK));
  for (int i = 0; i < 40; ++i) fds.emplace_back(::fcntl(fds[static_cast<size_t>(i)].get(), F_DUPFD_CLOEXEC, 0));
  for (const UniqueFd& f : fds) {
    ASSERT_TRUE(f);
    in.push_back({me, f.get(), ino});
  }
  long equal_calls = 0, kcmp_calls = 0;
  FileEqual eq = own_file_equal();
  FileEqual counting = [&](const FdRef& a, const FdRef& b) {
    ++equal_calls;
    return eq(a, b);
  };
  FileCompare counting_kcmp = [&](const FdRef& x, const FdRef& y) {
    ++kcmp_calls;
    return kcmp_file(x.pid, x.fd, y.pid, y.fd);
  };
  auto groups = group_by_open_file(in, counting_kcmp, counting);
  ASSERT_TRUE(groups) << groups.error().what;
  ASSERT_EQ(groups->size(), 40u);
  for (size_t g = 0; g < 40; ++g) {
    ASSERT_EQ((*groups)[g].members.size(), 2u);
    EXPECT_EQ((*groups)[g].members[1].fd, fds[g + 40].get());
  }
  EXPECT_LE(equal_calls, 36);
  EXPECT_GT(kcmp_calls, 0);
}

TEST(CloseFds, ClosesRunsWithCloseRangeAndNothingElse) {
  // 30 fds in a row; the list leaves out the 11th and the 21st: three runs, one call each.
  std::vector<UniqueFd> held;
  int first = ::fcntl(0, F_DUPFD_CLOEXEC, 1000);  // a free region, away from other fds
  ASSERT_GE(first, 0);
  held.emplace_back(first);
  for (int i = 1; i < 30; ++i) {
    int fd = ::fcntl(0, F_DUPFD_CLOEXEC, first + i);
    ASSERT_EQ(fd, first + i) << "fd numbers after " << first << " are not free";
    held.emplace_back(fd);
  }
  std::vector<int> list;
  for (int i = 29; i >= 0; --i)  // unsorted on purpose
    if (i != 10 && i != 20 && i != 0) list.push_back(first + i);
  list.push_back(first);
  std::vector<int> closing = list;
  size_t calls = close_fds(closing);
  for (int i = 0; i < 30; ++i) {
    bool open = ::fcntl(first + i, F_GETFD) >= 0;
    EXPECT_EQ(open, i == 10 || i == 20) << "fd " << first + i;
  }
  EXPECT_EQ(calls, 3u);
  for (int fd : list)
    for (UniqueFd& h : held)
      if (h.get() == fd) (void)h.release();  // closed already
  // A lone fd: one close.
  int lone = ::fcntl(0, F_DUPFD_CLOEXEC, first + 100);
  std::vector<int> one = {lone};
  EXPECT_EQ(close_fds(one), 1u);
  EXPECT_LT(::fcntl(lone, F_GETFD), 0);
}

}  // namespace
}  // namespace pipecr::sys
