// remote_test.cpp: syscalls injected into real stopped children (the agent's bootstrap): the
// syscall instruction found or patched and put back, memory, restart of an interrupted nanosleep,
// signals not eaten, injectors owned by their process; and the agent's generic operations.
// Children are killed and reaped by guards declared before the StoppedProcess that uses them.
#include "sys/remote.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "sys/agent.hpp"
#include "sys/syscalls.hpp"
#include "unit/sys/child_helpers.hpp"

namespace pipecr::sys {
namespace {

using namespace std::chrono_literals;

std::string maps_of(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/maps");
  return std::string(std::istreambuf_iterator<char>(in), {});
}

bool same_file(int my_fd, pid_t pid, int fd) {
  auto k = kcmp_file(::getpid(), my_fd, pid, fd);
  return k && *k == 0;
}

// A StoppedProcess and a RemoteSyscalls on its main thread, which the process owns.
struct Seized {
  std::unique_ptr<StoppedProcess> owned_process;
  StoppedProcess& process;
  RemoteSyscalls& remote;
};

std::unique_ptr<Seized> seize_main(pid_t pid, RemoteSyscalls::Insn insn = RemoteSyscalls::Insn::thread_only) {
  auto sp = StoppedProcess::seize(pid);
  EXPECT_TRUE(sp) << sp.error().what;
  if (!sp) return nullptr;
  auto process = std::move(*sp);
  auto r = process->inject<RemoteSyscalls>(pid, insn);
  EXPECT_TRUE(r) << r.error().what;
  if (!r) return nullptr;
  StoppedProcess& pref = *process;
  RemoteSyscalls& rref = **r;
  return std::unique_ptr<Seized>(new Seized{std::move(process), pref, rref});
}

TEST(Remote, GetpidInBlockedThreadReusesItsSyscallInstruction) {
  ReaderChild rc = start_reader();
  ASSERT_TRUE(eventually([&] { return blocked_in(rc.child.pid, rc.child.pid, SYS_read, 5); }));
  {
    auto s = seize_main(rc.child.pid);
    ASSERT_TRUE(s);
    EXPECT_FALSE(s->remote.patched_code());
    EXPECT_EQ(s->remote.syscall_address(), s->remote.saved_regs().raw.rip - 2);
    auto pid = s->remote.call(SYS_getpid);
    ASSERT_TRUE(pid) << pid.error().what;
    EXPECT_EQ(*pid, rc.child.pid);
    auto bad = s->remote.call(SYS_close, 999);
    ASSERT_TRUE(bad);
    EXPECT_EQ(*bad, -EBADF);  // a negative errno is a value
    auto checked = s->remote.call_checked("close(999)", SYS_close, 999);
    ASSERT_FALSE(checked);
    EXPECT_NE(checked.error().what.find("close(999)"), std::string::npos);
    ASSERT_TRUE(s->remote.restore());
    auto regs = s->process.regs(rc.child.pid);
    ASSERT_TRUE(regs);
    EXPECT_EQ(regs->raw.rip, s->remote.saved_regs().raw.rip);
    EXPECT_EQ(regs->raw.rax, s->remote.saved_regs().raw.rax);
    EXPECT_EQ(regs->raw.orig_rax, s->remote.saved_regs().raw.orig_rax);
    ASSERT_TRUE(s->process.resume());
  }
  // The read was restarted by the kernel, not returned as -ERESTARTSYS.
  ASSERT_TRUE(eventually([&] { return blocked_in(rc.child.pid, rc.child.pid, SYS_read, 5); }));
  ASSERT_TRUE(write_all(rc.input.write.get(), std::as_bytes(std::span("after", 5))));
  EXPECT_EQ(read_report(rc.report.read.get()), "after");
}

TEST(Remote, ThreadInUserCodeGetsAPatchedInstructionPutBack) {
  SharedCounter counter;
  auto* value = counter.value;
  Child child = spawn([value] {
    for (;;) value->fetch_add(1);
  });
  ASSERT_TRUE(eventually([&] { return counter.get() > 1000; }));
  uint64_t rip = 0;
  unsigned char before[8], after[8];
  {
    auto s = seize_main(child.pid);
    ASSERT_TRUE(s);
    auto st = s->process.syscall_state(child.pid);
    ASSERT_TRUE(st);
    if (st->nr >= 0) GTEST_SKIP() << "the child happened to stop in a syscall";
    EXPECT_TRUE(s->remote.patched_code());
    rip = s->remote.saved_regs().raw.rip;
    EXPECT_EQ(s->remote.syscall_address(), rip);
    unsigned char now[2];
    ASSERT_TRUE(s->remote.read_memory(rip, std::as_writable_bytes(std::span(now))));
    EXPECT_EQ(now[0], 0x0f);
    EXPECT_EQ(now[1], 0x05);
    auto pid = s->remote.call(SYS_getpid);
    ASSERT_TRUE(pid) << pid.error().what;
    EXPECT_EQ(*pid, child.pid);
    auto tid = s->remote.call(SYS_gettid);
    ASSERT_TRUE(tid);
    EXPECT_EQ(*tid, child.pid);
    ASSERT_TRUE(s->remote.restore());
    ASSERT_TRUE(s->remote.read_memory(rip, std::as_writable_bytes(std::span(after))));
    ASSERT_TRUE(s->process.resume());
  }
  // Compare with the same bytes in our own copy of the code (the child is a fork of us).
  std::memcpy(before, reinterpret_cast<const void*>(rip), sizeof before);
  EXPECT_EQ(std::memcmp(before, after, sizeof before), 0);
  long now = counter.get();
  EXPECT_TRUE(eventually([&] { return counter.get() > now + 1000; }));
}

TEST(Remote, MemoryRoundTrip) {
  ReaderChild rc = start_reader();
  auto s = seize_main(rc.child.pid);
  ASSERT_TRUE(s);
  auto page = s->remote.mmap_anon(8192);
  ASSERT_TRUE(page) << page.error().what;
  EXPECT_NE(maps_of(rc.child.pid).find(fmt::format("{:x}-", *page)), std::string::npos);
  std::string text(5000, 'x');
  for (size_t i = 0; i < text.size(); ++i) text[i] = static_cast<char>('a' + i % 26);
  ASSERT_TRUE(s->remote.write_memory(*page + 3, std::as_bytes(std::span(text))));
  std::string back(text.size(), '\0');
  ASSERT_TRUE(s->remote.read_memory(*page + 3, std::as_writable_bytes(std::span(back))));
  EXPECT_EQ(back, text);
  ASSERT_TRUE(s->remote.munmap(*page, 8192));
  EXPECT_EQ(maps_of(rc.child.pid).find(fmt::format("{:x}-", *page)), std::string::npos);
  auto scratch = s->remote.scratch_page();
  ASSERT_TRUE(scratch);
  EXPECT_EQ(*s->remote.scratch_page(), *scratch);
  ASSERT_TRUE(s->remote.restore());
  EXPECT_EQ(maps_of(rc.child.pid).find(fmt::format("{:x}-", *scratch)), std::string::npos);
}

TEST(Remote, NanosleepIsRestartedWithItsRestartBlock) {
  PipePair report = *make_pipe(0);
  int out = report.write.get();
  Child child = spawn([out] {
    auto t0 = std::chrono::steady_clock::now();
    timespec ts{0, 300'000'000};
    int r = ::nanosleep(&ts, nullptr);
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
    std::string msg = fmt::format("{} {}", r, ms);
    if (::write(out, msg.data(), msg.size()) < 0) ::_exit(2);
  });
  report.write.reset();
  ASSERT_TRUE(eventually([&] { return blocked_in(child.pid, child.pid, SYS_nanosleep, 0) || state_of(child.pid, child.pid) == 'S'; }));
  std::this_thread::sleep_for(20ms);
  {
    auto s = seize_main(child.pid);
    ASSERT_TRUE(s);
    auto st = s->process.syscall_state(child.pid);
    ASSERT_TRUE(st);
    EXPECT_TRUE(st->in_syscall);
    EXPECT_EQ(st->ret, kErestartRestartBlock);
    ASSERT_TRUE(s->remote.call(SYS_getpid));
    ASSERT_TRUE(s->remote.restore());
    ASSERT_TRUE(s->process.resume());
  }
  std::string msg = read_report(report.read.get());
  EXPECT_EQ(msg.substr(0, 2), "0 ") << msg;
  EXPECT_GE(std::stol(msg.substr(2)), 295) << msg;
}

// A signal that comes while the thread runs injected code is held back and delivered on detach;
// the interrupted read then goes on (SA_RESTART).
TEST(Remote, SignalDuringInjectionIsNotEaten) {
  SharedCounter counter;
  static std::atomic<long>* handled;
  handled = counter.value;
  PipePair input = *make_pipe(0), report = *make_pipe(0);
  int in = input.read.get(), out = report.write.get();
  Child child = spawn([in, out] {
    struct sigaction sa {};
    sa.sa_handler = [](int) { handled->fetch_add(1); };
    sa.sa_flags = SA_RESTART;
    ::sigaction(SIGUSR1, &sa, nullptr);
    ::dup2(in, 5);
    char buf[64];
    ssize_t n = ::read(5, buf, sizeof buf);
    if (n > 0 && ::write(out, buf, static_cast<size_t>(n)) < 0) ::_exit(11);
  });
  input.read.reset();
  report.write.reset();
  ASSERT_TRUE(eventually([&] { return blocked_in(child.pid, child.pid, SYS_read, 5); }));
  {
    auto s = seize_main(child.pid);
    ASSERT_TRUE(s);
    ASSERT_EQ(::kill(child.pid, SIGUSR1), 0);  // pending: every thread is stopped
    auto pid = s->remote.call(SYS_getpid);     // the thread meets it here
    ASSERT_TRUE(pid) << pid.error().what;
    EXPECT_EQ(*pid, child.pid);
    ASSERT_TRUE(s->remote.call(SYS_getppid));
    EXPECT_EQ(counter.get(), 0);
    ASSERT_TRUE(s->remote.restore());
  }
  EXPECT_TRUE(eventually([&] { return counter.get() == 1; }));
  ASSERT_TRUE(eventually([&] { return blocked_in(child.pid, child.pid, SYS_read, 5); }));
  ASSERT_TRUE(write_all(input.write.get(), std::as_bytes(std::span("still", 5))));
  EXPECT_EQ(read_report(report.read.get()), "still");
}

// The StoppedProcess resumes while a RemoteSyscalls is still open on it: the thread is restored
// before it is let go, and the remote then refuses to run.
TEST(Remote, ResumeRestoresAnOpenRemoteFirst) {
  ReaderChild rc = start_reader();
  ASSERT_TRUE(eventually([&] { return blocked_in(rc.child.pid, rc.child.pid, SYS_read, 5); }));
  auto sp = StoppedProcess::seize(rc.child.pid);
  ASSERT_TRUE(sp);
  auto made = (*sp)->inject<RemoteSyscalls>(rc.child.pid);
  ASSERT_TRUE(made);
  RemoteSyscalls* r = *made;
  ASSERT_TRUE(r->scratch_page());
  StoppedProcess& process = **sp;
  auto pid = r->call(SYS_getpid);
  ASSERT_TRUE(pid) << pid.error().what;
  EXPECT_EQ(*pid, rc.child.pid);
  ASSERT_TRUE(process.resume());
  auto late = r->call(SYS_getpid);
  ASSERT_FALSE(late);
  EXPECT_EQ(late.error().kind, Errc::invalid_argument);
  ASSERT_TRUE(eventually([&] { return blocked_in(rc.child.pid, rc.child.pid, SYS_read, 5); }));
  ASSERT_TRUE(write_all(rc.input.write.get(), std::as_bytes(std::span("later", 5))));
  EXPECT_EQ(read_report(rc.report.read.get()), "later");
}

// discard() ends an injector early: the thread's registers and the scratch page are put back at
// once (the process stays stopped), a second injector can then use the same thread, and an
// injector the process does not own is refused.
TEST(Remote, DiscardPutsTheThreadBackAtOnce) {
  ReaderChild rc = start_reader();
  ASSERT_TRUE(eventually([&] { return blocked_in(rc.child.pid, rc.child.pid, SYS_read, 5); }));
  auto sp = StoppedProcess::seize(rc.child.pid);
  ASSERT_TRUE(sp);
  StoppedProcess& process = **sp;
  auto before = process.regs(rc.child.pid);
  ASSERT_TRUE(before);
  auto first = process.inject<RemoteSyscalls>(rc.child.pid);
  ASSERT_TRUE(first) << first.error().what;
  auto scratch = (*first)->scratch_page();
  ASSERT_TRUE(scratch);
  ASSERT_TRUE((*first)->call(SYS_getpid));
  ASSERT_TRUE(process.discard(*first));
  auto after = process.regs(rc.child.pid);
  ASSERT_TRUE(after);
  EXPECT_EQ(after->ip(), before->ip());
  EXPECT_EQ(after->syscall_nr(), before->syscall_nr());
  EXPECT_EQ(after->ret(), before->ret());
  EXPECT_EQ(maps_of(rc.child.pid).find(fmt::format("{:x}-", *scratch)), std::string::npos);
  EXPECT_FALSE(process.discard(*first));  // gone already
  auto second = process.inject<RemoteSyscalls>(rc.child.pid);
  ASSERT_TRUE(second) << second.error().what;
  auto pid = (*second)->call(SYS_getpid);
  ASSERT_TRUE(pid);
  EXPECT_EQ(*pid, rc.child.pid);
  ASSERT_TRUE(process.resume());
  ASSERT_TRUE(eventually([&] { return blocked_in(rc.child.pid, rc.child.pid, SYS_read, 5); }));
  ASSERT_TRUE(write_all(rc.input.write.get(), std::as_bytes(std::span("again", 5))));
  EXPECT_EQ(read_report(rc.report.read.get()), "again");
}

// Injection into a second thread while the main thread stays blocked.
TEST(Remote, InjectIntoAnotherThread) {
  ReaderChild rc;
  rc.input = *make_pipe(0);
  rc.report = *make_pipe(0);
  int in = rc.input.read.get(), out = rc.report.write.get();
  rc.child = spawn([in, out] {
    ::dup2(in, 5);
    std::thread([] {
      for (;;) ::pause();
    }).detach();
    char buf[64];
    ssize_t n = ::read(5, buf, sizeof buf);
    if (n > 0 && ::write(out, buf, static_cast<size_t>(n)) < 0) ::_exit(11);
  });
  rc.input.read.reset();
  rc.report.write.reset();
  ASSERT_TRUE(eventually([&] { return tasks_of(rc.child.pid).size() == 2 && blocked_in(rc.child.pid, rc.child.pid, SYS_read, 5); }));
  {
    auto sp = StoppedProcess::seize(rc.child.pid);
    ASSERT_TRUE(sp);
    ASSERT_EQ((*sp)->threads().size(), 2u);
    pid_t other = (*sp)->threads()[1];
    auto r = (*sp)->inject<RemoteSyscalls>(other);
    ASSERT_TRUE(r) << r.error().what;
    auto tid = (*r)->call(SYS_gettid);
    ASSERT_TRUE(tid);
    EXPECT_EQ(*tid, other);
    EXPECT_FALSE((*sp)->inject<RemoteSyscalls>(1));
  }
  ASSERT_TRUE(write_all(rc.input.write.get(), std::as_bytes(std::span("both", 4))));
  EXPECT_EQ(read_report(rc.report.read.get()), "both");
}


// The agent's generic operations (install, epoll_ctl ADD, F_SETFL), committed and aborted, into a
// child blocked in read(5): after an abort nothing changed; after a commit fd 10 is the given pipe
// (FD_CLOEXEC, O_NONBLOCK), watched by the epoll at 20 with the given data, and the read goes on.
TEST(Agent, GenericOperationsCommitOrAbortAsOne) {
  PipePair input = *make_pipe(0), report = *make_pipe(0);
  int in = input.read.get(), out = report.write.get();
  Child child = spawn([in, out] {
    int in_hi = ::fcntl(in, F_DUPFD, 100), out_hi = ::fcntl(out, F_DUPFD, 100);
    ::dup2(in_hi, 5);
    int ep = ::epoll_create1(0);
    ::dup2(ep, 20);
    ::close(ep);
    ::close(10);
    char buf[8];
    ssize_t n = ::read(5, buf, sizeof buf);  // blocks until the test says go
    epoll_event ev{};
    int k = ::epoll_wait(20, &ev, 1, 1000);
    int fl = ::fcntl(10, F_GETFL), fd = ::fcntl(10, F_GETFD);
    std::string m = fmt::format("read {} epoll {} data {:#x} nonblock {} cloexec {}", n, k,
                                static_cast<unsigned long>(ev.data.u64), (fl & O_NONBLOCK) != 0, (fd & FD_CLOEXEC) != 0);
    (void)!::write(out_hi, m.data(), m.size());
  });
  input.read.reset();
  report.write.reset();
  ASSERT_TRUE(eventually([&] { return blocked_in(child.pid, child.pid, SYS_read, 5); }));
  PipePair gift = *make_pipe(0);
  std::vector<AgentOp> ops = {
      {AgentOp::install, 10, 1, 0, 0, gift.read.get()},
      {AgentOp::epoll_add, 10, 20, EPOLLIN, 0x1234, -1},
      {AgentOp::setfl_or, 10, 0, O_NONBLOCK, 0, -1},
  };
  auto maps_of = [&] {  // every mapping but the stack (the agent runs on it, which may grow it)
    std::ifstream in(fmt::format("/proc/{}/maps", child.pid));
    std::string line, out;
    while (std::getline(in, line))
      if (line.find("[stack]") == std::string::npos) out += line + "\n";
    return out;
  };
  const std::string maps_before = maps_of();
  for (bool commit : {false, true}) {
    SCOPED_TRACE(commit ? "commit" : "abort");
    auto table = fd_table(child.pid);
    auto sp = StoppedProcess::seize(child.pid);
    ASSERT_TRUE(sp) << sp.error().what;
    auto process = std::move(*sp);
    auto cp = CommitPoint::create();
    ASSERT_TRUE(cp) << cp.error().what;
    auto agent = process->inject<Agent>(child.pid, *cp, ops, 21);
    ASSERT_TRUE(agent) << agent.error().what;
    ASSERT_TRUE((*agent)->send_files());
    ASSERT_TRUE((*agent)->prepare());
    EXPECT_EQ(fd_table(child.pid).count(10), 0u);  // nothing installed before the commit
    EXPECT_NE(maps_of(), maps_before);              // the agent is mapped
    if (commit)
      ASSERT_TRUE(cp->commit());
    else
      cp->abort();
    auto done = (*agent)->decide();
    ASSERT_TRUE(done) << done.error().what;
    EXPECT_EQ(*done, commit);
    ASSERT_TRUE((*agent)->restore());
    ASSERT_TRUE(process->resume());  // waits for the agent to return (it is still registered)
    if (!commit) {
      EXPECT_EQ(fd_table(child.pid), table);
    }
  }
  EXPECT_TRUE(same_file(gift.read.get(), child.pid, 10));
  EXPECT_EQ(maps_of(), maps_before) << "a mapping was left";
  ASSERT_TRUE(write_all(gift.write.get(), std::as_bytes(std::span("x", 1))));
  ASSERT_TRUE(write_all(input.write.get(), std::as_bytes(std::span("go", 2))));
  EXPECT_EQ(read_report(report.read.get()), "read 2 epoll 1 data 0x1234 nonblock true cloexec true");
}

}  // namespace
}  // namespace pipecr::sys
