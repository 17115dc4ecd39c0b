// agent_survey_test.cpp: the dump's survey through the in-target agent (Agent::start_survey,
// Agent::survey). On real children holding real pipes: the open numbers and their FD_CLOEXEC as
// the kernel shows them in /proc, files received that are the very open file descriptions
// (kcmp KCMP_FILE), and the target unchanged afterwards (fds, mappings, not stopped, not traced, its
// blocked read() goes on). And the survey's owner SIGKILLed at random moments, over and over: the
// target is left as it was every time. Every child is killed and reaped by its guard.
#include <fcntl.h>
#include <linux/kcmp.h>
#include <sched.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "sys/agent.hpp"
#include "sys/proc.hpp"
#include "sys/syscalls.hpp"
#include "unit/sys/child_helpers.hpp"

namespace pipecr::sys {
namespace {

constexpr int kFirst = 20;  // the child's pipes start here

// A child holding `n` pipes at kFirst.. (read end, write end), pipe 1 left out (a hole at 22, 23),
// FD_CLOEXEC on the read end of every third, i % 7 bytes queued in pipe i. Its main thread blocks
// in read(5); each byte it reads there makes it check its own table (every number as placed, the
// same inode, FD_CLOEXEC, the bytes still queued) and answer "ok" or what is wrong on `report`.
struct SurveyChild {
  PipePair input, report;
  Child child;
};

SurveyChild start_survey_child(int n) {
  SurveyChild sc;
  sc.input = *make_pipe(0);
  sc.report = *make_pipe(0);
  int in = sc.input.read.get(), out = sc.report.write.get();
  sc.child = spawn([in, out, n]() mutable {
    in = ::fcntl(in, F_DUPFD, kFirst + 2 * n + 10);
    out = ::fcntl(out, F_DUPFD, kFirst + 2 * n + 10);
    ::dup2(in, 5);
    std::vector<ino_t> ino(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
      if (i == 1) continue;
      int p[2];
      if (::pipe(p) < 0) ::_exit(2);
      ::dup2(p[0], kFirst + 2 * i);
      ::dup2(p[1], kFirst + 2 * i + 1);
      ::close(p[0]);
      ::close(p[1]);
      if (i % 3 == 0) ::fcntl(kFirst + 2 * i, F_SETFD, FD_CLOEXEC);
      if (i % 7 && ::write(kFirst + 2 * i + 1, "abcdefg", static_cast<size_t>(i % 7)) < 0) ::_exit(2);
      struct stat st {};
      ::fstat(kFirst + 2 * i, &st);
      ino[static_cast<size_t>(i)] = st.st_ino;
    }
    char buf[64];
    for (;;) {
      ssize_t got = ::read(5, buf, sizeof buf);
      if (got <= 0) ::_exit(3);  // a read that returns what it should not
      std::string verdict = "ok";
      for (int i = 0; i < n && verdict == "ok"; ++i) {
        const int r = kFirst + 2 * i, w = r + 1;
        if (i == 1) {
          if (::fcntl(r, F_GETFD) >= 0 || ::fcntl(w, F_GETFD) >= 0) verdict = fmt::format("{} open", r);
          continue;
        }
        struct stat a {}, b {};
        int queued = -1;
        if (::fstat(r, &a) < 0 || ::fstat(w, &b) < 0 || a.st_ino != ino[static_cast<size_t>(i)] || b.st_ino != a.st_ino)
          verdict = fmt::format("pipe {} changed", i);
        else if (::fcntl(r, F_GETFD) != (i % 3 == 0 ? FD_CLOEXEC : 0) || ::fcntl(w, F_GETFD) != 0)
          verdict = fmt::format("pipe {}: FD_CLOEXEC changed", i);
        else if (::ioctl(r, FIONREAD, &queued) < 0 || queued != i % 7)
          verdict = fmt::format("pipe {}: {} bytes queued", i, queued);
      }
      if (::write(out, verdict.data(), verdict.size()) < 0) ::_exit(4);
    }
  });
  sc.input.read.reset();
  sc.report.write.reset();
  return sc;
}

std::string ask(SurveyChild& sc) {
  if (::write(sc.input.write.get(), "?", 1) != 1) return "<write>";
  return read_report(sc.report.read.get());
}

struct Slot {
  std::string link;
  bool cloexec = false;
  bool operator==(const Slot&) const = default;
};

// The child's fd table as /proc shows it: number -> link target and FD_CLOEXEC (fdinfo flags).
std::map<int, Slot> table_of(pid_t pid) {
  std::map<int, Slot> out;
  auto fds = list_fds(pid, false);
  if (!fds) return out;
  for (const FdEntry& e : *fds) {
    char link[256];
    ssize_t n = ::readlink(fmt::format("/proc/{}/fd/{}", pid, e.fd).c_str(), link, sizeof link);
    if (n < 0) continue;
    std::ifstream info(fmt::format("/proc/{}/fdinfo/{}", pid, e.fd));
    std::string key;
    unsigned long flags = 0;
    while (info >> key)
      if (key == "flags:") {
        info >> std::oct >> flags;
        break;
      }
    out[e.fd] = Slot{std::string(link, static_cast<size_t>(n)), (flags & O_CLOEXEC) != 0};
  }
  return out;
}

// A survey child of n pipes that has answered "ok" (with `parked`, and sits in its read() of fd 5
// again), and its fd table and mappings then, which the test compares it with at the end.
struct ReadyChild {
  SurveyChild sc;
  pid_t pid = -1;
  std::map<int, Slot> before;
  std::string maps;
};

void start_ready(int n, bool parked, ReadyChild* r) {
  r->sc = start_survey_child(n);
  const pid_t pid = r->pid = r->sc.child.pid;
  ASSERT_EQ(ask(r->sc), "ok");
  if (parked) {
    ASSERT_TRUE(eventually([&] { return blocked_in(pid, pid, SYS_read, 5); }));
  }
  r->before = table_of(pid);
  r->maps = maps_without_stack(pid);
}

std::string agent_maps(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/maps", pid));
  std::string line, out;
  while (std::getline(in, line))
    if (line.find("pipecr-agent") != std::string::npos) out += line + "\n";
  return out;
}

uint32_t fd_size(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/status", pid));
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("FDSize:", 0) == 0) return static_cast<uint32_t>(std::stoul(line.substr(7)));
  return 0;
}

// The target is whole: running again, untraced, the same table and mappings (an agent whose pipecr
// died returns by itself within its 10 ms check of its tracer: waited for), its own check passes.
// leak: pipecr died in the leak window (the bootstrap's mmap done, the agent not yet running): one
// unnamed anonymous mapping may be left, as documented; maps_before then takes the new mappings.
void expect_untouched(SurveyChild& sc, const std::map<int, Slot>& before, std::string& maps_before, bool leak = false) {
  const pid_t pid = sc.child.pid;
  auto whole = [&] {
    return tracer_of(pid) == 0 && state_of(pid, pid) == 'S' && agent_maps(pid).empty() && table_of(pid) == before &&
           (leak || maps_without_stack(pid) == maps_before);
  };
  EXPECT_TRUE(eventually(whole)) << "tracer " << tracer_of(pid) << ", state " << state_of(pid, pid) << ", maps:\n"
                                 << maps_without_stack(pid) << "before:\n" << maps_before;
  EXPECT_EQ(table_of(pid), before);
  EXPECT_EQ(ask(sc), "ok");
  if (leak) maps_before = maps_without_stack(pid);
}

TEST(AgentSurvey, ReportsEveryOpenFdItsCloexecAndTheSameOpenFiles) {
  constexpr int kPipes = 300;  // 600 pipe fds: three SCM_RIGHTS messages
  ReadyChild ready;
  ASSERT_NO_FATAL_FAILURE(start_ready(kPipes, true, &ready));
  auto& [sc, pid, before, maps] = ready;
  {
    auto sp = StoppedProcess::seize(pid);
    ASSERT_TRUE(sp) << sp.error().what;
    auto agent = Agent::start_survey(**sp, pid);
    ASSERT_TRUE(agent) << agent.error().what;
    auto got = (*agent)->survey(fd_size(pid));
    ASSERT_TRUE(got) << got.error().what;
    std::vector<int> numbers;
    for (const SurveyedFd& f : *got) {
      numbers.push_back(f.fd);
      auto it = before.find(f.fd);
      ASSERT_NE(it, before.end()) << "fd " << f.fd << " is not the target's";
      EXPECT_EQ(f.cloexec, it->second.cloexec) << "fd " << f.fd;
      ASSERT_TRUE(f.file) << "fd " << f.fd;
      EXPECT_EQ(::syscall(SYS_kcmp, ::getpid(), pid, KCMP_FILE, f.file.get(), f.fd), 0) << "fd " << f.fd;
    }
    std::vector<int> expected;
    for (const auto& [fd, slot] : before) expected.push_back(fd);
    EXPECT_EQ(numbers, expected);
    ASSERT_TRUE((*agent)->restore());
    ASSERT_TRUE((*sp)->resume());
  }
  expect_untouched(sc, before, maps);
}

// The agent tees into the scratch pipes pipecr sends it. If their read ends are gone (pipecr
// died), a tee fails with EPIPE and raises SIGPIPE in the target's thread, held by the agent's mask:
// the agent must take it back, or the target dies of it once the agent returns. Here the read ends
// are closed from the start; the child does not block SIGPIPE.
TEST(AgentSurvey, ATeeIntoAScratchPipeWithoutReadersLeavesNoSigpipe) {
  constexpr int kPipes = 300;
  ReadyChild ready;
  ASSERT_NO_FATAL_FAILURE(start_ready(kPipes, true, &ready));
  auto& [sc, pid, before, maps] = ready;
  std::vector<UniqueFd> writes;
  {
    auto sp = StoppedProcess::seize(pid);
    ASSERT_TRUE(sp) << sp.error().what;
    auto agent = Agent::start_survey(**sp, pid);
    ASSERT_TRUE(agent) << agent.error().what;
    SurveyScratch scratch;
    scratch.want = 4;
    scratch.always = true;
    scratch.make = [&]() -> int {
      auto p = make_pipe(O_CLOEXEC);
      if (!p) return -1;
      writes.push_back(std::move(p->write));  // the read end closes here: no reader
      return writes.back().get();
    };
    size_t teed = 0, seen = 0;
    auto got = (*agent)->survey(
        fd_size(pid),
        [&](std::span<SurveyedFd> batch) -> Expected<void> {
          for (const SurveyedFd& f : batch) teed += f.teed != 0;
          seen += batch.size();
          return {};
        },
        scratch);
    ASSERT_TRUE(got) << got.error().what;
    EXPECT_EQ(seen, before.size());
    EXPECT_EQ(teed, 0u);
    EXPECT_EQ(writes.size(), 4u);
    ASSERT_TRUE((*agent)->restore());
    ASSERT_TRUE((*sp)->resume());
  }
  expect_untouched(sc, before, maps);
  std::ifstream status(fmt::format("/proc/{}/status", pid));
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("SigPnd:", 0) == 0 || line.rfind("ShdPnd:", 0) == 0) {
      EXPECT_EQ(std::stoull(line.substr(7), nullptr, 16) & (1ull << (SIGPIPE - 1)), 0u) << line;
    }
  }
}

// The survey comes a message at a time (at most 253 fds, in fd order) while the agent goes on; a
// message sent while pipecr is still busy with an earlier one carries the agent's fstat() of each
// file (the sink here sleeps, so the third and later ones must), and that is what fstat() says of
// the file received. The first carries none: nothing was queued while the agent made it, so pipecr
// had time for its own. An error from the sink ends the survey; the agent can still survey again.
TEST(AgentSurvey, ComesInMessagesWithTheTargetsFstatWhilePipecrIsBusy) {
  constexpr int kPipes = 400;  // 800 pipe fds: four messages
  ReadyChild ready;
  ASSERT_NO_FATAL_FAILURE(start_ready(kPipes, false, &ready));
  auto& [sc, pid, before, maps] = ready;
  {
    auto sp = StoppedProcess::seize(pid);
    ASSERT_TRUE(sp) << sp.error().what;
    auto agent = Agent::start_survey(**sp, pid);
    ASSERT_TRUE(agent) << agent.error().what;
    std::vector<size_t> sizes;
    std::vector<int> numbers;
    size_t with_stat_late = 0, with_stat_first = 0;
    auto seen = (*agent)->survey(fd_size(pid), [&](std::span<SurveyedFd> batch) -> Expected<void> {
      sizes.push_back(batch.size());
      for (SurveyedFd& f : batch) {
        numbers.push_back(f.fd);
        if (!f.stat_known) continue;
        if (sizes.size() == 1) ++with_stat_first;
        if (sizes.size() >= 3) ++with_stat_late;
        struct stat st {};
        EXPECT_EQ(::fstat(f.file.get(), &st), 0);
        EXPECT_EQ(f.st.st_mode, st.st_mode) << "fd " << f.fd;
        EXPECT_EQ(f.st.st_ino, st.st_ino) << "fd " << f.fd;
        EXPECT_EQ(f.st.st_dev, st.st_dev) << "fd " << f.fd;
        EXPECT_EQ(f.st.st_uid, st.st_uid) << "fd " << f.fd;
        EXPECT_EQ(f.st.st_gid, st.st_gid) << "fd " << f.fd;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));  // busy: the agent queues ahead
      return {};
    });
    ASSERT_TRUE(seen) << seen.error().what;
    EXPECT_EQ(*seen, before.size());
    EXPECT_EQ(numbers.size(), before.size());
    EXPECT_TRUE(std::is_sorted(numbers.begin(), numbers.end()));
    ASSERT_GE(sizes.size(), 4u);
    for (size_t n : sizes) EXPECT_LE(n, kAgentBatch);  // SCM_MAX_FD
    EXPECT_GT(with_stat_late, 0u) << "no message sent while pipecr was busy carried the agent's fstat";
    EXPECT_EQ(with_stat_first, 0u) << "the first message carried fstats that pipecr had the time to make";

    size_t calls = 0;
    auto stopped = (*agent)->survey(fd_size(pid), [&](std::span<SurveyedFd>) -> Expected<void> {
      ++calls;
      return tl::unexpected(Error{Errc::system, EIO, "the sink gives up"});
    });
    ASSERT_FALSE(stopped);
    EXPECT_EQ(stopped.error().what, "the sink gives up");
    EXPECT_EQ(calls, 1u);
    auto again = (*agent)->survey(fd_size(pid));  // still in step with the agent
    ASSERT_TRUE(again) << again.error().what;
    EXPECT_EQ(again->size(), before.size());
    ASSERT_TRUE((*agent)->restore());
    ASSERT_TRUE((*sp)->resume());
  }
  expect_untouched(sc, before, maps);
}

// The survey wants a CPU for the agent and one for pipecr. Here pipecr starts on the very CPU the
// target's thread is bound to (the test may pin its own child; pipecr never touches a target's
// affinity): pipecr moves off it for the survey, takes in every message elsewhere, and has its own
// affinity back afterwards. With one CPU allowed there is nowhere to go, and nothing moves.
TEST(AgentSurvey, PipecrLeavesTheAgentsCpuForTheSurvey) {
  cpu_set_t all;
  ASSERT_EQ(::sched_getaffinity(0, sizeof all, &all), 0);
  const int cpu = ::sched_getcpu();
  ASSERT_GE(cpu, 0);
  SurveyChild sc = start_survey_child(300);
  const pid_t pid = sc.child.pid;
  ASSERT_EQ(ask(sc), "ok");
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(cpu, &one);
  ASSERT_EQ(::sched_setaffinity(pid, sizeof one, &one), 0);  // the child's thread: on `cpu` only
  ASSERT_EQ(ask(sc), "ok");                                  // and it ran there since
  ASSERT_EQ(::sched_setaffinity(0, sizeof one, &one), 0);    // this thread: on `cpu` now...
  ASSERT_EQ(::sched_setaffinity(0, sizeof all, &all), 0);    // ...and free to stay there
  const auto before = table_of(pid);
  std::string maps = maps_without_stack(pid);
  std::vector<int> cpus;
  bool allowed_there = false;
  {
    auto sp = StoppedProcess::seize(pid);
    ASSERT_TRUE(sp) << sp.error().what;
    auto agent = Agent::start_survey(**sp, pid);
    ASSERT_TRUE(agent) << agent.error().what;
    auto seen = (*agent)->survey(fd_size(pid), [&](std::span<SurveyedFd>) -> Expected<void> {
      cpus.push_back(::sched_getcpu());
      cpu_set_t now;
      if (::sched_getaffinity(0, sizeof now, &now) == 0 && CPU_ISSET(cpu, &now)) allowed_there = true;
      return {};
    });
    ASSERT_TRUE(seen) << seen.error().what;
    EXPECT_EQ(*seen, before.size());
    ASSERT_TRUE((*agent)->restore());
    ASSERT_TRUE((*sp)->resume());
  }
  cpu_set_t after;
  ASSERT_EQ(::sched_getaffinity(0, sizeof after, &after), 0);
  EXPECT_TRUE(CPU_EQUAL(&after, &all)) << "pipecr's affinity was not given back";
  ASSERT_GE(cpus.size(), 3u);
  if (CPU_COUNT(&all) < 2) {
    EXPECT_TRUE(allowed_there);
  } else {
    EXPECT_FALSE(allowed_there) << "pipecr could still run on the agent's CPU during the survey";
    for (int c : cpus) EXPECT_NE(c, cpu) << "a message was taken in on the agent's CPU";
  }
  ASSERT_EQ(::sched_setaffinity(pid, sizeof all, &all), 0);
  expect_untouched(sc, before, maps);
}

TEST(AgentSurvey, ASecondSurveyOfTheSameStopGivesTheSameAnswer) {
  ReadyChild ready;
  ASSERT_NO_FATAL_FAILURE(start_ready(10, false, &ready));
  auto& [sc, pid, before, maps] = ready;
  {
    auto sp = StoppedProcess::seize(pid);
    ASSERT_TRUE(sp) << sp.error().what;
    auto agent = Agent::start_survey(**sp, pid);
    ASSERT_TRUE(agent) << agent.error().what;
    auto a = (*agent)->survey(fd_size(pid));
    auto b = (*agent)->survey(fd_size(pid));
    ASSERT_TRUE(a && b);
    ASSERT_EQ(a->size(), b->size());
    for (size_t i = 0; i < a->size(); ++i) {
      EXPECT_EQ((*a)[i].fd, (*b)[i].fd);
      EXPECT_EQ((*a)[i].cloexec, (*b)[i].cloexec);
    }
    // Below a limit: only the numbers under it.
    auto low = (*agent)->survey(kFirst + 1);
    ASSERT_TRUE(low);
    ASSERT_FALSE(low->empty());
    EXPECT_LE(low->back().fd, kFirst);
    ASSERT_TRUE((*agent)->restore());
    ASSERT_TRUE((*sp)->resume());
  }
  expect_untouched(sc, before, maps);
}

// Without a return through an rt_sigframe the survey refuses to start (the fallback's remote
// syscalls would be a harm window the dump otherwise does not have), before touching the target.
TEST(AgentSurvey, RefusesTheRegisterBlockFallback) {
  ReadyChild ready;
  ASSERT_NO_FATAL_FAILURE(start_ready(5, false, &ready));
  auto& [sc, pid, before, maps] = ready;
  {
    auto sp = StoppedProcess::seize(pid);
    ASSERT_TRUE(sp) << sp.error().what;
    set_agent_sigreturn(false);
    auto agent = Agent::start_survey(**sp, pid);
    set_agent_sigreturn(true);
    ASSERT_FALSE(agent);
    EXPECT_EQ(agent.error().err, ENOTSUP) << agent.error().what;
    ASSERT_TRUE((*sp)->resume());
  }
  expect_untouched(sc, before, maps);
}

// The survey's owner (a forked child running seize, agent, survey, return, resume in a loop) is
// SIGKILLed at random moments: the kernel detaches the target, the agent sees its socket close
// (or its tracer gone), drops what it was sending and returns through its frame. The moments are
// drawn from up to three times one cycle as this machine runs it (timed first, here), at least
// 15 ms: on a loaded machine a fixed range could end before the first survey did, every round.
TEST(AgentSurvey, KilledAtRandomMomentsLeavesTheTargetAsItWas) {
  constexpr int kPipes = 600;
  ReadyChild ready;
  ASSERT_NO_FATAL_FAILURE(start_ready(kPipes, false, &ready));
  auto& [sc, pid, before, maps] = ready;
  const uint32_t slots = fd_size(pid);
  const auto t0 = std::chrono::steady_clock::now();
  {
    auto sp = StoppedProcess::seize(pid);
    ASSERT_TRUE(sp) << sp.error().what;
    auto agent = Agent::start_survey(**sp, pid);
    ASSERT_TRUE(agent) << agent.error().what;
    auto got = (*agent)->survey(slots);
    ASSERT_TRUE(got) << got.error().what;
    ASSERT_TRUE((*agent)->restore());
    ASSERT_TRUE((*sp)->resume());
  }
  const auto cycle = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0);
  const int window_us = std::max(15000, static_cast<int>(3 * cycle.count()));
  std::mt19937 rng(std::random_device{}());
  SharedCounter cycles;
  struct Windows {  // the dumper's harm and leak windows (sys::set_harm_window), shared across fork
    std::atomic<uint64_t> count{0}, ns{0}, leak{0};
  };
  void* mem = ::mmap(nullptr, sizeof(Windows), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(mem, MAP_FAILED);
  Windows* windows = new (mem) Windows;
  int leaks = 0;
  for (int round = 0; round < 25; ++round) {
    windows->leak = 0;
    Child dumper = spawn([&] {
      set_harm_window({&windows->count, &windows->ns, &windows->leak});
      for (;;) {
        auto sp = StoppedProcess::seize(pid);
        if (!sp) ::_exit(10);
        auto agent = Agent::start_survey(**sp, pid);
        if (!agent) ::_exit(11);
        auto got = (*agent)->survey(slots);
        if (!got || got->size() != before.size()) ::_exit(12);
        if (!(*agent)->restore()) ::_exit(13);
        if (!(*sp)->resume()) ::_exit(14);
        cycles.value->fetch_add(1);
      }
    });
    std::this_thread::sleep_for(std::chrono::microseconds(std::uniform_int_distribution<int>(0, window_us)(rng)));
    const auto status = dumper.kill_and_reap();
    ASSERT_TRUE(status);
    ASSERT_TRUE(WIFSIGNALED(*status)) << "the dumper failed on its own: exit " << WEXITSTATUS(*status);
    const bool leak = windows->leak.load() % 2 == 1;
    leaks += leak;
    expect_untouched(sc, before, maps, leak);
    if (HasFailure()) break;
  }
  ::munmap(mem, sizeof(Windows));
  RecordProperty("leak_window_kills", leaks);
  EXPECT_GT(cycles.get(), 0) << "no survey ever completed: the kills proved nothing";
}

}  // namespace
}  // namespace pipecr::sys
