// agent_install_test.cpp: the agent's install of a batch into real children, one case per path of
// agent.c's install_batch(), fill_below() and room_for(): files received at their own numbers (mixed
// close-on-exec in one batch; fresh numbers above free ones), replaced files handed back to pipecr (and no longer held by the
// target), temporaries that land on another operation's number (in order and out of order, the
// latter through the one-at-a-time path), more than one batch of 253, and an fd limit that leaves
// no room (PREPARE fails, nothing changes). Real children, real ptrace; every child is killed and
// reaped by its guard.
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "sys/agent.hpp"
#include "sys/syscalls.hpp"
#include "unit/send_fds.hpp"
#include "unit/sys/child_helpers.hpp"

namespace pipecr::sys {
namespace {

bool same_file(int my_fd, pid_t pid, int fd) {
  auto k = kcmp_file(::getpid(), my_fd, pid, fd);
  return k && *k == 0;
}

// Whether pid holds my_fd's open file at any number.
bool holds(pid_t pid, int my_fd) {
  for (const auto& [fd, link] : fd_table(pid))
    if (same_file(my_fd, pid, fd)) return true;
  return false;
}

// The child's fd table: 0-2 as inherited, its input pipe at 5 (it blocks in read(5) and echoes what
// it reads to a report pipe at 901), `place` (a file of ours -> its number there, below 400; at most
// 500 of them), `fill` numbers
// holding /dev/null, then RLIMIT_NOFILE `nofile` (0: as inherited). Nothing else.
struct Layout {
  std::vector<std::pair<int, int>> place;
  std::vector<int> fill;
  rlim_t nofile = 0;
};

struct Target {
  PipePair input, report;
  Child child;
};

Target start_target(const Layout& l) {
  Target t;
  t.input = *make_pipe(0);
  t.report = *make_pipe(0);
  const int in = t.input.read.get(), out = t.report.write.get();
  t.child = spawn([&l, in, out] {
    ::dup2(in, 900);
    ::dup2(out, 901);
    std::vector<std::pair<int, int>> moved;
    for (size_t i = 0; i < l.place.size(); ++i) {  // out of the way first (every number placed < 400)
      ::dup2(l.place[i].first, 400 + static_cast<int>(i));
      moved.emplace_back(400 + static_cast<int>(i), l.place[i].second);
    }
    ::close_range(3, 399, 0);
    ::dup2(900, 5);
    for (auto [from, to] : moved) ::dup2(from, to);
    ::close_range(400, 899, 0);
    for (int n : l.fill) {
      int fd = ::open("/dev/null", O_RDONLY);
      if (fd != n) {
        ::dup2(fd, n);
        ::close(fd);
      }
    }
    if (l.nofile) {
      rlimit lim{l.nofile, l.nofile};
      if (::setrlimit(RLIMIT_NOFILE, &lim) != 0) ::_exit(10);
    }
    char buf[256];
    for (;;) {
      ssize_t n = ::read(5, buf, sizeof buf);
      if (n <= 0) ::_exit(3);
      if (::write(901, buf, static_cast<size_t>(n)) < 0) ::_exit(4);
    }
  });
  t.input.read.reset();
  t.report.write.reset();
  EXPECT_TRUE(eventually([&] { return blocked_in(t.child.pid, t.child.pid, SYS_read, 5); }));
  return t;
}

// The child still reads and reports.
void expect_alive(Target& t) {
  ASSERT_TRUE(write_all(t.input.write.get(), std::as_bytes(std::span("ping", 4))));
  EXPECT_EQ(read_report(t.report.read.get()), "ping");
}

// The lowest `n` numbers free in pid at or above `from`.
std::vector<int> free_numbers(pid_t pid, int from, size_t n) {
  auto table = fd_table(pid);
  std::vector<int> out;
  for (int fd = from; out.size() < n; ++fd)
    if (!table.count(fd)) out.push_back(fd);
  return out;
}

// One install transaction: the process, and the agent it owns.
struct Installed {
  std::unique_ptr<StoppedProcess> process;
  Agent* agent = nullptr;
  Expected<void> prepared;
  // Destroys the agent (resumed already), which frees what the installs replaced.
  void drop_agent() {
    if (agent) {
      EXPECT_TRUE(process->discard(agent));
    }
    agent = nullptr;
  }
};

// Seizes pid, starts an agent with ops (files sent in messages of `batch`), prepares; when that
// succeeded commits, else aborts; gives the thread back and resumes. The agent stays alive (it holds
// what the installs replaced until drop_agent()).
Installed install(pid_t pid, const std::vector<AgentOp>& ops, size_t batch = kAgentBatch) {
  Installed r;
  int floor = 0;
  for (const AgentOp& op : ops) floor = std::max(floor, op.fd + 1);
  auto sp = StoppedProcess::seize(pid);
  EXPECT_TRUE(sp) << sp.error().what;
  if (!sp) return r;
  r.process = std::move(*sp);
  auto cp = CommitPoint::create();
  EXPECT_TRUE(cp) << cp.error().what;
  auto agent = r.process->inject<Agent>(pid, *cp, ops, floor, batch);
  EXPECT_TRUE(agent) << agent.error().what;
  if (!agent) return r;
  r.agent = *agent;
  EXPECT_TRUE(r.agent->send_files());
  r.prepared = r.agent->prepare();
  if (r.prepared) {
    EXPECT_TRUE(cp->commit());
  } else {
    cp->abort();
  }
  auto done = r.agent->decide();
  EXPECT_TRUE(done) << done.error().what;
  if (done) {
    EXPECT_EQ(*done, static_cast<bool>(r.prepared));
  }
  auto back = r.agent->restore();
  EXPECT_TRUE(back) << back.error().what;
  auto resumed = r.process->resume();
  EXPECT_TRUE(resumed) << resumed.error().what;
  return r;
}

// A new pipe end (read and write ends alternate) for number `fd` of the target.
struct Gift {
  UniqueFd file;
  int fd = -1;
  bool cloexec = false;
  [[nodiscard]] int source() const { return file.get(); }
};

std::vector<Gift> gifts(const std::vector<int>& numbers, const std::function<bool(size_t)>& cloexec) {
  std::vector<Gift> out;
  for (size_t i = 0; i < numbers.size(); ++i) {
    PipePair p = *make_pipe(0);
    out.push_back(Gift{i % 2 ? std::move(p.write) : std::move(p.read), numbers[i], cloexec(i)});
  }
  return out;
}

std::vector<AgentOp> ops_of(const std::vector<Gift>& g) {
  std::vector<AgentOp> ops;
  for (const Gift& x : g) ops.push_back(AgentOp{AgentOp::install, x.fd, x.cloexec ? 1 : 0, 0, 0, x.source()});
  return ops;
}

// Every gift at its number, with its close-on-exec; the table is `before` plus the new numbers
// (nothing else added, nothing else changed).
void expect_installed(pid_t pid, const std::vector<Gift>& g, const std::map<int, std::string>& before) {
  auto after = fd_table(pid);
  std::map<int, std::string> expected = before;
  for (const Gift& x : g) {
    EXPECT_TRUE(same_file(x.source(), pid, x.fd)) << "fd " << x.fd;
    EXPECT_EQ(fd_cloexec(pid, x.fd), x.cloexec) << "fd " << x.fd;
    expected[x.fd] = after.count(x.fd) ? after.at(x.fd) : "<missing>";
  }
  EXPECT_EQ(after, expected);
}

// The lowest free numbers, in ascending order: each file is received at its own number (installed
// where it lands), close-on-exec mixed within the batch, the message received with and without it.
TEST(AgentInstall, FreshNumbersInPlaceWithMixedCloexec) {
  for (bool first_cloexec : {false, true}) {
    SCOPED_TRACE(first_cloexec ? "first cloexec" : "first not cloexec");
    Target t = start_target({});
    auto before = fd_table(t.child.pid);
    auto numbers = free_numbers(t.child.pid, 0, 40);
    auto g = gifts(numbers, [&](size_t i) { return (i % 3 == 0) == first_cloexec; });
    Installed r = install(t.child.pid, ops_of(g));
    ASSERT_TRUE(r.prepared) << r.prepared.error().what;
    expect_installed(t.child.pid, g, before);
    expect_alive(t);
  }
}

// Fresh numbers above free ones (the child holds 0-2 and 5; the files go to 60-359, two batches):
// the agent holds the holes below while it receives, so each file lands on its own number, and
// gives them back: nothing but the new files is left.
TEST(AgentInstall, FreshNumbersAboveHoles) {
  Target t = start_target({});
  auto before = fd_table(t.child.pid);
  std::vector<int> numbers;
  for (int n = 60; n < 360; ++n) numbers.push_back(n);
  auto g = gifts(numbers, [](size_t i) { return i % 7 == 3; });
  Installed r = install(t.child.pid, ops_of(g));
  ASSERT_TRUE(r.prepared) << r.prepared.error().what;
  expect_installed(t.child.pid, g, before);
  expect_alive(t);
}

// A batch above holes (60-69: the agent holds 3-59 while it is received), then a batch below them
// (10-19, messages of 10): the holes are given back before the second one, whose files must stay.
TEST(AgentInstall, HeldHolesGoBackBeforeABatchBelowThem) {
  Target t = start_target({});
  auto before = fd_table(t.child.pid);
  std::vector<int> numbers;
  for (int n = 60; n < 70; ++n) numbers.push_back(n);
  for (int n = 10; n < 20; ++n) numbers.push_back(n);
  auto g = gifts(numbers, [](size_t i) { return i % 2 == 0; });
  Installed r = install(t.child.pid, ops_of(g), 10);
  ASSERT_TRUE(r.prepared) << r.prepared.error().what;
  expect_installed(t.child.pid, g, before);
  expect_alive(t);
}

// Numbers holding files already: each gets its new file, the old one is handed to pipecr (alive,
// in flight, until the agent is destroyed) and the target holds it nowhere.
TEST(AgentInstall, ReplacedFilesGoBackToPipecrAndLeaveTheTarget) {
  ::signal(SIGPIPE, SIG_IGN);
  std::vector<PipePair> old;
  Layout l;
  std::vector<int> numbers;
  for (int i = 0; i < 20; ++i) {
    old.push_back(*make_pipe(0));
    l.place.emplace_back(old.back().read.get(), 10 + i);
    numbers.push_back(10 + i);
  }
  Target t = start_target(l);
  for (PipePair& p : old) p.read.reset();  // the child holds the only read ends
  auto before = fd_table(t.child.pid);
  auto g = gifts(numbers, [](size_t i) { return i % 2 == 1; });
  Installed r = install(t.child.pid, ops_of(g));
  ASSERT_TRUE(r.prepared) << r.prepared.error().what;
  expect_installed(t.child.pid, g, before);
  for (PipePair& p : old) {
    EXPECT_FALSE(holds(t.child.pid, p.write.get())) << "an old pipe is still in the target";
    EXPECT_EQ(::write(p.write.get(), "x", 1), 1) << "the old read end is not held (by pipecr) any more";
  }
  r.drop_agent();
  for (PipePair& p : old) {
    EXPECT_EQ(::write(p.write.get(), "x", 1), -1);
    EXPECT_EQ(errno, EPIPE);
  }
  expect_alive(t);
}

// Temporaries land on numbers other operations fill (the targets start two numbers above the lowest
// free ones), and one target below them replaces a file: in ascending order (the batch path) and in
// descending order (one at a time, temporaries moved above the highest number).
TEST(AgentInstall, TemporariesOnAnotherOperationsNumber) {
  for (bool ascending : {true, false}) {
    SCOPED_TRACE(ascending ? "ascending" : "descending");
    PipePair old = *make_pipe(0);
    Layout l;
    l.place.emplace_back(old.read.get(), 3);
    Target t = start_target(l);
    old.read.reset();
    auto before = fd_table(t.child.pid);
    auto fresh = free_numbers(t.child.pid, 0, 30);
    std::vector<int> numbers = {3};  // replaced, below every temporary
    numbers.insert(numbers.end(), fresh.begin() + 2, fresh.end());
    auto g = gifts(numbers, [](size_t i) { return i % 4 == 1; });
    if (!ascending) std::reverse(g.begin(), g.end());
    Installed r = install(t.child.pid, ops_of(g));
    ASSERT_TRUE(r.prepared) << r.prepared.error().what;
    expect_installed(t.child.pid, g, before);
    EXPECT_FALSE(holds(t.child.pid, old.write.get()));
    expect_alive(t);
  }
}

// 600 files, three messages of up to 253: 300 replace files, 300 go to fresh numbers; and the same
// in messages of 7 (batches that end anywhere).
TEST(AgentInstall, MoreThanOneBatch) {
  for (size_t batch : {kAgentBatch, size_t{7}}) {
    SCOPED_TRACE(fmt::format("batch {}", batch));
    std::vector<PipePair> old;
    Layout l;
    std::vector<int> numbers;
    for (int i = 0; i < 300; ++i) {
      old.push_back(*make_pipe(0));
      l.place.emplace_back(old.back().write.get(), 10 + i);
    }
    Target t = start_target(l);
    old.clear();
    auto before = fd_table(t.child.pid);
    for (int i = 0; i < 600; ++i) numbers.push_back(10 + i);
    auto g = gifts(numbers, [](size_t i) { return i % 5 == 0; });
    Installed r = install(t.child.pid, ops_of(g), batch);
    ASSERT_TRUE(r.prepared) << r.prepared.error().what;
    expect_installed(t.child.pid, g, before);
    expect_alive(t);
  }
}

// RLIMIT_NOFILE 64 with 4 numbers free once the agent holds its 2 sockets: 8 files to replace cannot be received. PREPARE says so
// (EMFILE), the transaction aborts, and the target is exactly as it was.
TEST(AgentInstall, NoRoomFailsInPrepareAndChangesNothing) {
  Layout l;
  for (int n = 6; n < 60; ++n) l.fill.push_back(n);
  l.nofile = 64;
  Target t = start_target(l);
  auto before = fd_table(t.child.pid);
  const auto maps = maps_without_stack(t.child.pid);
  std::vector<int> numbers;
  for (int n = 40; n < 48; ++n) numbers.push_back(n);
  auto g = gifts(numbers, [](size_t) { return false; });
  Installed r = install(t.child.pid, ops_of(g));
  ASSERT_FALSE(r.prepared);
  EXPECT_EQ(r.prepared.error().err, EMFILE) << r.prepared.error().what;
  r.drop_agent();
  EXPECT_EQ(fd_table(t.child.pid), before);
  EXPECT_EQ(maps_without_stack(t.child.pid), maps);
  expect_alive(t);
}

}  // namespace
}  // namespace pipecr::sys

namespace pipecr::sys {
namespace {

// The kernel fact the agent's receive relies on (agent.c, recv_msg): when pipecr's end of a
// SOCK_SEQPACKET pair closes with messages of the agent's still unread there (an OLDFILES it had
// just sent), the agent's end gets ECONNRESET (unix_release_sock), which its next receive reports
// once, ahead of the messages pipecr queued to it before: a second receive gets them, files and all.
// Without the second receive a batch was lost (its old files already closed): 1 kill-loop run in 14.
TEST(AgentInstall, APeerClosedWithOurMessagesUnreadResetsOnceThenDelivers) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
  UniqueFd pipecr_end(sv[0]), agent_end(sv[1]);
  auto p = make_pipe(0);
  ASSERT_TRUE(p);
  // pipecr queues a message with a file for the agent...
  ASSERT_TRUE(::pipecr::testing::send_fds(pipecr_end.get(), "F", {p->read.get()}));
  // ...the agent sends one back that pipecr never reads, and pipecr's end closes.
  ASSERT_EQ(::send(agent_end.get(), "O", 1, 0), 1);
  pipecr_end.reset();

  char got = 0;
  iovec riov{&got, 1};
  alignas(cmsghdr) char rctl[CMSG_SPACE(sizeof(int))] = {};
  msghdr r{};
  r.msg_iov = &riov;
  r.msg_iovlen = 1;
  r.msg_control = rctl;
  r.msg_controllen = sizeof rctl;
  errno = 0;
  EXPECT_EQ(::recvmsg(agent_end.get(), &r, MSG_DONTWAIT), -1);
  EXPECT_EQ(errno, ECONNRESET);
  r.msg_controllen = sizeof rctl;
  ASSERT_EQ(::recvmsg(agent_end.get(), &r, MSG_DONTWAIT), 1) << std::strerror(errno);
  EXPECT_EQ(got, 'F');
  cmsghdr* rc = CMSG_FIRSTHDR(&r);
  ASSERT_NE(rc, nullptr);
  int received = -1;
  std::memcpy(&received, CMSG_DATA(rc), sizeof received);
  UniqueFd keep(received);
  struct stat a {}, b {};
  ASSERT_EQ(::fstat(received, &a), 0);
  ASSERT_EQ(::fstat(p->read.get(), &b), 0);
  EXPECT_EQ(a.st_ino, b.st_ino);
  EXPECT_EQ(::recv(agent_end.get(), &got, 1, MSG_DONTWAIT), 0);  // then EOF
}

}  // namespace
}  // namespace pipecr::sys
