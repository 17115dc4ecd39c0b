// agent_leak_test.cpp: pipecr's death at each step of the agent's bootstrap leaves nothing in the
// target. A forked "pipecr" seizes a child blocked in read() and starts an agent in it; a hook stops
// that helper at one step (the registers at the gadget for the mmap, the mmap done, the image written,
// the mprotect done, the registers at the agent's entry) and the test SIGKILLs it there, as a death
// would. The child must then hold no new mapping, the same general registers (read through ptrace
// before and after), vector registers, signal mask and sigaltstack (it checks those itself), no new
// fd, and its read() must go on and return what is written. With the address chosen before the mmap
// (the usual case) the bootstrap runs on the chain and has no leak window at all; where another
// process shares the child's address space (clone(CLONE_VM)) it takes the old path, whose window
// (two ptrace calls after the mmap) the leak counter reports. Real children, real ptrace; every
// child and helper is killed and reaped.
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <ostream>
#include <span>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "sys/agent.hpp"
#include "sys/proc.hpp"
#include "sys/syscalls.hpp"
#include "unit/sys/child_helpers.hpp"
#include "unit/sys/vector_helpers.hpp"

namespace pipecr::sys {
namespace {

using testing::read_and_report;

// Shared with the forked "pipecr" (MAP_SHARED): the leak-window counter and what the hook saw.
struct Shared {
  std::atomic<uint64_t> leak{0};
  std::atomic<uint64_t> harm{0};
  std::atomic<uint64_t> harm_ns{0};
  std::atomic<int> chained{-1};
  std::atomic<uint64_t> address{0};
  std::atomic<pid_t> sibling{0};  // the victim's clone(CLONE_VM) sibling, made late (LateSibling)
};

Shared* g_shared = nullptr;
int g_stop_fd = -1;           // the helper writes the step it stopped at here, then waits to die
int g_stop_at = -1;           // an AgentBootStep, or -1: run through

void stop_hook(AgentBootStep step, uint64_t address, bool chained) {
  g_shared->chained = chained ? 1 : 0;
  if (address) g_shared->address = address;
  if (static_cast<int>(step) != g_stop_at) return;
  const char c = static_cast<char>('0' + static_cast<int>(step));
  (void)!::write(g_stop_fd, &c, 1);
  for (;;) ::pause();  // SIGKILLed here
}

struct SharedMem {
  Shared* s;
  SharedMem() {
    void* m = ::mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    s = new (m) Shared;
  }
  ~SharedMem() { ::munmap(s, sizeof(Shared)); }
};

// The victim: fd 5 is a pipe it reads (blocked in read() holding known vector registers, with an
// unusual mask and sigaltstack), fd 10 is free; it reports what read() returned and whether its state
// stayed. With share_mm, a second process made by clone(CLONE_VM) (without CLONE_THREAD) shares its
// address space and sleeps; it dies with its parent.
Child start_victim(int in, int out, bool share_mm) {
  return spawn([in, out, share_mm] {
    int in_hi = ::fcntl(in, F_DUPFD, 100), out_hi = ::fcntl(out, F_DUPFD, 100);
    ::dup2(in_hi, 5);
    ::close(10);
    if (share_mm) {
      static char stack[64 * 1024] __attribute__((aligned(16)));
      static pid_t parent;
      static std::atomic<int> started{0};
      parent = ::getpid();
      auto sleeper = [](void*) -> int {
        ::syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
        if (::syscall(SYS_getppid) != parent) ::syscall(SYS_exit, 0);
        started = 1;
        for (;;) ::syscall(SYS_pause);
      };
      if (::clone(sleeper, stack + sizeof stack, CLONE_VM | SIGCHLD, nullptr) < 0) ::_exit(7);
      // Its start done (under ASan the prctl interceptor may map memory) before the test reads the maps.
      while (!started) ::sched_yield();
    }
    read_and_report(5, out_hi);
  });
}

// The general registers of pid's main thread, seen through ptrace (the thread is let go again).
user_regs_struct regs_of(pid_t pid) {
  auto sp = StoppedProcess::seize(pid);
  EXPECT_TRUE(sp) << sp.error().what;
  if (!sp) return {};
  auto r = (*sp)->regs(pid);
  EXPECT_TRUE(r);
  EXPECT_TRUE((*sp)->resume());
  return r ? r->raw : user_regs_struct{};
}

std::string regs_diff(const user_regs_struct& a, const user_regs_struct& b) {
  const auto* x = reinterpret_cast<const unsigned long*>(&a);
  const auto* y = reinterpret_cast<const unsigned long*>(&b);
  std::string out;
  for (size_t i = 0; i < sizeof a / sizeof(unsigned long); ++i)
    if (x[i] != y[i]) out += fmt::format("word {}: {:#x} -> {:#x}; ", i, x[i], y[i]);
  return out;
}

// Runs a "pipecr" in a forked helper: seize pid, start an agent on it that would install `gift` at
// fd 10, commit and resume. With stop_at >= 0, the helper stops at that step and is SIGKILLed there;
// returns the step it reached ('0' + step), or 'd' when it ran to the end, 'f' when it failed.
char run_pipecr(pid_t pid, int gift, int stop_at, Shared* shared, const AgentGadgets* gadgets = nullptr) {
  PipePair told = *make_pipe(0);
  const int tell = told.write.get();
  pid_t helper = ::fork();
  if (helper == 0) {
    g_shared = shared;
    g_stop_fd = tell;
    g_stop_at = stop_at;
    set_harm_window({&shared->harm, &shared->harm_ns, &shared->leak});
    set_agent_boot_hook(stop_hook);
    auto sp = StoppedProcess::seize(pid);
    if (!sp) ::_exit(1);
    auto cp = CommitPoint::create();
    if (!cp) ::_exit(1);
    std::vector<AgentOp> ops = {{AgentOp::install, 10, 0, 0, 0, gift}};
    auto agent = (*sp)->inject<Agent>(pid, *cp, ops, 11, kAgentBatch, uint64_t{0}, UniqueFd(), gadgets);
    if (!agent || !(*agent)->send_files() || !(*agent)->prepare() || !cp->commit()) ::_exit(1);
    auto done = (*agent)->decide();
    if (!done || !*done || !(*agent)->restore() || !(*sp)->resume()) ::_exit(1);
    const char c = 'd';
    (void)!::write(tell, &c, 1);
    ::_exit(0);
  }
  told.write.reset();
  char got = 'f';
  pollfd p{told.read.get(), POLLIN, 0};
  if (::poll(&p, 1, 20'000) == 1 && ::read(told.read.get(), &got, 1) != 1) got = 'f';
  ::kill(helper, SIGKILL);
  while (::waitpid(helper, nullptr, 0) < 0 && errno == EINTR) {
  }
  return got;
}

struct Case {
  int stop_at;
  bool share_mm;
};
void PrintTo(const Case& c, std::ostream* os) { *os << "step " << c.stop_at << (c.share_mm ? ", shared mm" : ""); }

class AgentLeak : public ::testing::TestWithParam<Case> {};

// pipecr SIGKILLed at one step of the bootstrap: the child is exactly as it was, and its read goes on.
TEST_P(AgentLeak, KilledAtABootstrapStepLeavesTheChildWhole) {
  const Case c = GetParam();
  SharedMem shared;
  PipePair input = *make_pipe(0), report = *make_pipe(0);
  Child child = start_victim(input.read.get(), report.write.get(), c.share_mm);
  input.read.reset();
  report.write.reset();
  ASSERT_TRUE(eventually([&] { return blocked_in(child.pid, child.pid, SYS_read, 5); }));
  const std::string maps_before = maps_without_stack(child.pid);
  const auto fds_before = fd_table(child.pid);
  const user_regs_struct regs_before = regs_of(child.pid);
  ASSERT_TRUE(eventually([&] { return blocked_in(child.pid, child.pid, SYS_read, 5); }));

  PipePair gift = *make_pipe(0);
  const char reached = run_pipecr(child.pid, gift.read.get(), c.stop_at, shared.s);
  ASSERT_EQ(reached, '0' + c.stop_at);
  EXPECT_EQ(shared.s->chained.load(), c.share_mm ? 0 : 1);
  const bool in_leak_window = shared.s->leak.load() % 2 == 1;
  // The thread finishes the bootstrap's syscall, returns through the frames (or runs the agent,
  // which sees no tracer and returns by itself) and blocks in its read again: by then every munmap
  // has run (each comes before the rt_sigreturn that puts the thread back).
  ASSERT_TRUE(eventually([&] { return tracer_of(child.pid) == 0 && blocked_in(child.pid, child.pid, SYS_read, 5); }));
  const std::string maps_after = maps_without_stack(child.pid);
  if (c.share_mm && c.stop_at == static_cast<int>(AgentBootStep::mmap_set)) {
    // The old path's window, between its mmap and the chain: the mapping stays, and the counter says so.
    EXPECT_TRUE(in_leak_window);
    EXPECT_NE(maps_after, maps_before) << "the mmap ran in the leak window, yet no mapping was left";
  } else {
    EXPECT_FALSE(in_leak_window);
    EXPECT_EQ(maps_after, maps_before);
  }
  EXPECT_EQ(fd_table(child.pid), fds_before);
  EXPECT_EQ(regs_diff(regs_before, regs_of(child.pid)), "");
  ASSERT_TRUE(write_all(input.write.get(), std::as_bytes(std::span("go", 2))));
  EXPECT_EQ(read_report(report.read.get()), "read 2 vectors same state same");
}

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  static const char* steps[] = {"MmapSet", "Mapped", "Written", "Protected", "EntrySet"};
  return fmt::format("{}{}", steps[info.param.stop_at], info.param.share_mm ? "SharedMm" : "");
}

INSTANTIATE_TEST_SUITE_P(Steps, AgentLeak,
                         ::testing::Values(Case{0, false}, Case{1, false}, Case{2, false}, Case{3, false},
                                           Case{4, false}, Case{0, true}, Case{1, true}, Case{4, true}),
                         case_name);

// Unkilled: the agent installs, the bootstrap ran on the chain (no leak window opened) at the address
// it chose, far from the stack; with a shared address space it took the old path and its short window.
TEST(AgentLeakWindow, CountsOnlyWhereTheOldPathRuns) {
  for (bool share : {false, true}) {
    SCOPED_TRACE(share ? "shared mm" : "own mm");
    SharedMem shared;
    PipePair input = *make_pipe(0), report = *make_pipe(0);
    Child child = start_victim(input.read.get(), report.write.get(), share);
    input.read.reset();
    report.write.reset();
    ASSERT_TRUE(eventually([&] { return blocked_in(child.pid, child.pid, SYS_read, 5); }));
    const std::string maps_before = maps_without_stack(child.pid);
    PipePair gift = *make_pipe(0);
    ASSERT_EQ(run_pipecr(child.pid, gift.read.get(), -1, shared.s), 'd');
    EXPECT_EQ(shared.s->chained.load(), share ? 0 : 1);
    EXPECT_EQ(shared.s->leak.load(), share ? 2u : 0u);  // opened and closed once, or never
    if (!share) {
      const uint64_t at = shared.s->address.load();
      EXPECT_NE(at, 0u);
      EXPECT_EQ(at % 4096, 0u);
      EXPECT_EQ(maps_before.find(fmt::format("{:x}-", at)), std::string::npos);
      // Far below the main stack: its rlimit (8 MiB here, 128 MiB at least) and the guard gap.
      std::ifstream in(fmt::format("/proc/{}/maps", child.pid));
      uint64_t stack_lo = 0;
      for (std::string line; std::getline(in, line);)
        if (line.find("[stack]") != std::string::npos) stack_lo = std::stoull(line, nullptr, 16);
      ASSERT_NE(stack_lo, 0u);
      EXPECT_LE(at + (uint64_t{129} << 20), stack_lo);
    }
    EXPECT_TRUE(eventually([&] { return maps_without_stack(child.pid) == maps_before; }))
        << "before:\n" << maps_before << "now:\n" << maps_without_stack(child.pid);
    EXPECT_TRUE(eventually([&] { return fd_table(child.pid).count(10) == 1; }));
    ASSERT_TRUE(write_all(input.write.get(), std::as_bytes(std::span("go", 2))));
    EXPECT_EQ(read_report(report.read.get()), "read 2 vectors same state same");
  }
}

// The victim makes its clone(CLONE_VM) sibling only after find_agent_gadgets() looked (before the
// stop, as restore and dump do), when told on `go`: the bootstrap's check at the stop, which then
// only looks at the children of the target and of its parent, must still see it and keep the old
// path; with CLONE_PARENT the sibling is the test's child. Without the sibling it takes the chain.
TEST(AgentLeakWindow, ASharerMadeAfterTheGadgetsWereFoundIsSeenAtTheStop) {
  for (int mode : {0, 1, 2}) {  // no sibling, a child sharing the mm, a CLONE_PARENT sibling
    SCOPED_TRACE(mode);
    SharedMem shared;
    PipePair input = *make_pipe(0), report = *make_pipe(0), go = *make_pipe(0);
    const int in = input.read.get(), out = report.write.get(), go_r = go.read.get();
    Shared* sh = shared.s;
    Child child = spawn([in, out, go_r, mode, sh] {
      int in_hi = ::fcntl(in, F_DUPFD, 100), out_hi = ::fcntl(out, F_DUPFD, 100), go_hi = ::fcntl(go_r, F_DUPFD, 100);
      ::dup2(in_hi, 5);
      ::close(10);
      char c;
      if (::read(go_hi, &c, 1) != 1) ::_exit(6);
      if (mode) {
        static char stack[64 * 1024] __attribute__((aligned(16)));
        static std::atomic<int> started{0};
        auto sleeper = [](void*) -> int {
          started = 1;
          for (;;) ::syscall(SYS_pause);
        };
        const int flags = CLONE_VM | SIGCHLD | (mode == 2 ? CLONE_PARENT : 0);
        const pid_t sib = ::clone(sleeper, stack + sizeof stack, flags, nullptr);
        if (sib < 0) ::_exit(7);
        sh->sibling = sib;
        while (!started) ::sched_yield();
      }
      char buf[8] = {};
      const long r = ::read(5, buf, sizeof buf);
      const std::string m = fmt::format("read {}", r);
      (void)!::write(out_hi, m.data(), m.size());
    });
    input.read.reset();
    report.write.reset();
    go.read.reset();
    ASSERT_TRUE(eventually([&] { return state_of(child.pid, child.pid) == 'S'; }));
    const AgentGadgets gadgets = find_agent_gadgets(child.pid);
    EXPECT_EQ(gadgets.mm_shared, 0);
    ASSERT_EQ(::write(go.write.get(), "g", 1), 1);
    ASSERT_TRUE(eventually([&] { return blocked_in(child.pid, child.pid, SYS_read, 5); }));
    const pid_t sibling = shared.s->sibling.load();
    EXPECT_EQ(sibling != 0, mode != 0);
    PipePair gift = *make_pipe(0);
    EXPECT_EQ(run_pipecr(child.pid, gift.read.get(), -1, shared.s, &gadgets), 'd');
    EXPECT_EQ(shared.s->chained.load(), mode ? 0 : 1);
    EXPECT_EQ(shared.s->leak.load(), mode ? 2u : 0u);
    EXPECT_TRUE(eventually([&] { return fd_table(child.pid).count(10) == 1; }));
    ASSERT_TRUE(write_all(input.write.get(), std::as_bytes(std::span("go", 2))));
    EXPECT_EQ(read_report(report.read.get()), "read 2");
    if (sibling > 0) {
      ::kill(sibling, SIGKILL);
      if (mode == 2)  // the test's own child
        while (::waitpid(sibling, nullptr, 0) < 0 && errno == EINTR) {
        }
    }
  }
}


// The agent's address, asked of the kernel with PROCMAP_QUERY and read out of /proc/PID/maps: the
// same answer, in a child whose mappings crowd the place the rule looks first. The child maps a
// "stack" S (the sp given), so that the agent must stay 129 MiB (the least stack reserve, 128 MiB,
// and the guard gap) below it, and puts a one-page mapping every MiB in the 48 MiB below that, so
// that no gap there fits the agent and its guards: both ways must step down past every one of them.
// The answer must lie below that crowd, with a MiB free on each side in the child's maps.
TEST(AgentAddress, TheKernelsQueryAndTheListingAgreeBelowACrowd) {
  constexpr uint64_t kMiB = 1 << 20, kLen = 5 * 4096;
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  Child child = spawn([&] {
    void* s = ::mmap(nullptr, 8 * kMiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint64_t stack = reinterpret_cast<uint64_t>(s);
    const uint64_t crowd_hi = stack - 129 * kMiB;
    for (uint64_t at = crowd_hi - 48 * kMiB; at < crowd_hi; at += kMiB)
      (void)::mmap(reinterpret_cast<void*>(at), 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                   -1, 0);
    (void)!::write(ready[1], &stack, sizeof stack);
    ::pause();
  });
  ::close(ready[1]);
  uint64_t stack = 0;
  ASSERT_EQ(::read(ready[0], &stack, sizeof stack), static_cast<ssize_t>(sizeof stack));
  ::close(ready[0]);
  auto stat = read_stat(child.pid);
  ASSERT_TRUE(stat) << stat.error().what;
  ASSERT_NE(stat->start_stack, 0u);
  const uint64_t sp = stack + 4 * kMiB;
  auto by_query = agent_address_by_query(child.pid, kLen, sp, stat->start_stack);
  const uint64_t by_listing = agent_address_by_listing(child.pid, kLen, sp);
  if (!by_query) GTEST_SKIP() << "PROCMAP_QUERY (Linux 6.11) missing: the listing is the only way";
  EXPECT_EQ(*by_query, by_listing);
  EXPECT_EQ(choose_agent_address(child.pid, kLen, sp, stat->start_stack), by_listing);
  const uint64_t at = by_listing;
  ASSERT_NE(at, 0u);
  EXPECT_LT(at + kLen + kMiB, stack - 129 * kMiB - 48 * kMiB + 4096);
  std::ifstream maps(fmt::format("/proc/{}/maps", child.pid));
  std::string line;
  while (std::getline(maps, line)) {
    unsigned long lo = 0, hi = 0;
    ASSERT_EQ(std::sscanf(line.c_str(), "%lx-%lx", &lo, &hi), 2);
    EXPECT_TRUE(hi + kMiB <= at || lo >= at + kLen + kMiB) << line;
  }
  // Without the main stack's place (start_stack unknown), the query does not answer.
  EXPECT_FALSE(agent_address_by_query(child.pid, kLen, sp, 0));
}

}  // namespace
}  // namespace pipecr::sys
