// epoll_restore_test.cpp: epoll watches follow a replaced pipe end (restore/epoll.hpp), into real
// children whose epolls the restore must feed: the recorded events (edge-triggered, one-shot,
// EPOLLOUT on a write end at a high fd, two epolls on one file, one at a high fd) and data come
// back on the new pipe; an epoll the target closed since the dump and an epoll of a process that
// is not restored are notes; a watch the kernel refuses fails the restore with nothing changed.
#include <sys/epoll.h>
#include <sys/stat.h>

#include <map>

#include <gtest/gtest.h>

#include "restore/process.hpp"
#include "restore_helpers.hpp"

namespace pipecr::restore {
namespace {

using testing::ImageBuilder;
using testing::Scenario;

constexpr int32_t kRec = 4242, kOther = 4343;
constexpr int kR = 11, kW = 12, kWHigh = 200, kE1 = 20, kE2 = 300, kNotEpoll = 21;

// data -> events, from one epoll_wait with timeout 0.
std::map<uint64_t, uint32_t> ready(int ep) {
  epoll_event evs[8];
  int n = ::epoll_wait(ep, evs, 8, 0);
  std::map<uint64_t, uint32_t> out;
  for (int i = 0; i < n; ++i) out[evs[i].data.u64] = evs[i].events;
  return out;
}

std::string show(const std::map<uint64_t, uint32_t>& m) {
  std::string s;
  for (auto& [d, e] : m) s += fmt::format("{:#x}:{:#x} ", d, e);
  return "{" + s + "}";
}

std::string expect_ready(int ep, const std::map<uint64_t, uint32_t>& want, const char* what) {
  auto got = ready(ep);
  if (got == want) return "";
  return fmt::format("{}: epoll {} reports {}, want {}", what, ep, show(got), show(want));
}

// The child: /dev/null at the pipe's numbers (what the restore replaces), two empty epolls, and
// /dev/null at kNotEpoll.
void child_setup() {
  testing::dev_null_at({kR, kW, kWHigh, kNotEpoll});
  int a = ::epoll_create1(0), b = ::epoll_create1(0);
  ::dup2(a, kE1);
  ::dup2(b, kE2);
  ::close(a);
  ::close(b);
}

// One pipe holding "recorded": read end at kR, write end at kW and kWHigh (one file); watches:
// E1 on kR (IN|ET, 0xA1), E1 on kWHigh (OUT|ONESHOT, 0xB2), E2 on kR (IN, 0xC3), plus `extra`.
ImageBuilder image(std::vector<EpollWatch> extra = {}, bool other_process = false) {
  ImageBuilder b;
  b.process(kRec);
  if (other_process) b.process(kOther);
  uint64_t p = b.pipe({{"recorded", false}});
  uint64_t r = b.file(p, O_RDONLY), w = b.file(p, O_WRONLY);
  b.fd(kRec, kR, r).fd(kRec, kW, w).fd(kRec, kWHigh, w);
  if (other_process) b.fd(kOther, kR, r);
  auto& ws = b.raw().epoll_watches;
  ws.push_back({1, kRec, kE1, r, kR, EPOLLIN | EPOLLET, 0xA1});
  ws.push_back({1, kRec, kE1, w, kWHigh, EPOLLOUT | EPOLLONESHOT, 0xB2});
  ws.push_back({2, kRec, kE2, r, kR, EPOLLIN, 0xC3});
  for (EpollWatch& e : extra) ws.push_back(e);
  return b;
}

bool noted(const ProcessRestoreSummary& sum, const std::string& text) {
  for (const std::string& n : sum.notes)
    if (n.find(text) != std::string::npos) return true;
  return false;
}

std::string all_notes(const ProcessRestoreSummary& sum) {
  std::string s;
  for (const std::string& n : sum.notes) s += n + "\n";
  return s;
}

TEST(EpollRestore, WatchesComeBackOnTheNewPipe) {
  ImageBuilder b = image();
  Image img = b.parsed();
  Scenario child(child_setup, []() -> std::string {
    std::string e = expect_ready(kE1, {{0xA1, EPOLLIN}, {0xB2, EPOLLOUT}}, "E1");
    if (e.empty()) e = expect_ready(kE1, {}, "E1 again (edge-triggered and one-shot report once)");
    if (e.empty()) e = expect_ready(kE2, {{0xC3, EPOLLIN}}, "E2");
    if (e.empty()) e = expect_ready(kE2, {{0xC3, EPOLLIN}}, "E2 again (level-triggered)");
    if (e.empty()) e = testing::expect_bytes(kR, "recorded");
    if (e.empty()) e = expect_ready(kE2, {}, "E2 with the pipe empty");
    // The watch is keyed by the restored fd number: the program's own MOD and DEL find it.
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = 0xD4;
    if (e.empty() && ::epoll_ctl(kE1, EPOLL_CTL_MOD, kR, &ev) != 0) e = "EPOLL_CTL_MOD on the re-added watch failed";
    if (e.empty() && ::epoll_ctl(kE2, EPOLL_CTL_DEL, kR, nullptr) != 0) e = "EPOLL_CTL_DEL on the re-added watch failed";
    if (e.empty() && ::write(kW, "x", 1) != 1) e = "write";
    if (e.empty()) e = expect_ready(kE1, {{0xD4, EPOLLIN}}, "E1 after MOD and a write");
    return e;
  });
  ASSERT_TRUE(child.ready());
  auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt});
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_EQ(sum->epoll_readded, 3u);
  EXPECT_TRUE(noted(*sum, fmt::format("epoll fd {} of process {}: 2 watches re-added on the restored pipe ends (fd {}, {})",
                                      kE1, child.pid(), kR, kWHigh)))
      << all_notes(*sum);
  EXPECT_TRUE(noted(*sum, fmt::format("epoll fd {} of process {}: 1 watch re-added", kE2, child.pid()))) << all_notes(*sum);
  EXPECT_FALSE(noted(*sum, "will not hear")) << all_notes(*sum);
  EXPECT_EQ(testing::traced_or_stopped(child.pid()), "");
  EXPECT_EQ(child.finish(), "");
}

TEST(EpollRestore, WhatCannotFollowIsANote) {
  // A watch by an "epoll" at kNotEpoll (/dev/null in the target: closed since the dump), and one by
  // an epoll of a recorded process that is not restored.
  ImageBuilder b = image({{3, kRec, kNotEpoll, 1, kR, EPOLLIN, 0xE5}, {4, kOther, 7, 1, kR, EPOLLIN, 0xF6}}, true);
  Image img = b.parsed();
  Scenario child(child_setup, []() -> std::string {
    std::string e = expect_ready(kE2, {{0xC3, EPOLLIN}}, "E2");
    if (e.empty()) e = testing::expect_bytes(kR, "recorded");
    return e;
  });
  ASSERT_TRUE(child.ready());
  auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt});
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_EQ(sum->epoll_readded, 3u);
  EXPECT_TRUE(noted(*sum, fmt::format("epoll fd {} of process {} is closed or no longer an epoll: its watch of fd {} is "
                                      "not re-added",
                                      kNotEpoll, child.pid(), kR)))
      << all_notes(*sum);
  EXPECT_TRUE(noted(*sum, fmt::format("epoll fd 7 of recorded process {} watched fd {} (file 1): that process is not "
                                      "restored",
                                      kOther, kR)))
      << all_notes(*sum);
  EXPECT_EQ(child.finish(), "");
}

TEST(EpollRestore, AWatchTheKernelRefusesChangesNothing) {
  // EPOLLEXCLUSIVE with EPOLLONESHOT: EINVAL. Found before the commit: every fd stays as it was.
  ImageBuilder b = image({{2, kRec, kE2, 2, kW, EPOLLOUT | EPOLLEXCLUSIVE | EPOLLONESHOT, 0x99}});
  Image img = b.parsed();
  Scenario child(child_setup, []() -> std::string {
    for (int fd : {kR, kW, kWHigh})
      if (!testing::is_dev_null(fd)) return fmt::format("fd {} changed by a failed restore", fd);
    std::string e = expect_ready(kE1, {}, "E1");
    if (e.empty()) e = expect_ready(kE2, {}, "E2");
    return e;
  });
  ASSERT_TRUE(child.ready());
  auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt});
  ASSERT_FALSE(sum);
  EXPECT_NE(sum.error().what.find("EPOLL_CTL_ADD"), std::string::npos) << sum.error().what;
  EXPECT_NE(sum.error().what.find("nothing was changed"), std::string::npos) << sum.error().what;
  EXPECT_EQ(testing::traced_or_stopped(child.pid()), "");
  EXPECT_EQ(child.finish(), "");
}

TEST(EpollRestore, EpollOfAnotherTargetReAddsOnce) {
  // Two targets hold one epoll instance (as after a fork): recorded under both, added once, by the
  // first target; the second target's copy of the instance reports it too.
  ImageBuilder b;
  b.process(kRec);
  b.process(kOther);
  uint64_t p = b.pipe({{"shared", false}});
  uint64_t r = b.file(p, O_RDONLY);
  b.fd(kRec, kR, r).fd(kOther, kR, r);
  b.raw().epoll_watches.push_back({1, kRec, kE1, r, kR, EPOLLIN, 0x11});
  b.raw().epoll_watches.push_back({1, kOther, kE1, r, kR, EPOLLIN, 0x11});
  Image img = b.parsed();
  // The parent makes the epoll and forks the second target, which inherits it.
  int ep = ::epoll_create1(0);
  ASSERT_GE(ep, 0);
  auto setup = [ep] {
    testing::dev_null_at({kR});
    ::dup2(ep, kE1);
  };
  // The image holds no write end: the restored pipe has no writer, so EPOLLHUP comes with EPOLLIN.
  auto check = []() -> std::string { return expect_ready(kE1, {{0x11, EPOLLIN | EPOLLHUP}}, "the shared epoll"); };
  Scenario first(setup, check), second(setup, check);
  ::close(ep);
  ASSERT_TRUE(first.ready());
  ASSERT_TRUE(second.ready());
  auto sum = restore_processes(img, {{{first.pid(), kRec}, {second.pid(), kOther}}, std::nullopt});
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_EQ(sum->epoll_readded, 1u) << all_notes(*sum);
  EXPECT_EQ(first.finish(), "");
  EXPECT_EQ(second.finish(), "");
}

TEST(EpollRestore, AWatchKeyedByAReusedFdNumberComesBack) {
  // As CRIU's zdtm epoll01: the epoll watches P0's read end through fd 702, which was closed and
  // reused for P1's read end, also watched there; P0's read end lives at 5. And as zdtm epoll: a
  // watch of P0's read end keyed by fd 999, closed since: the agent puts the file at 999 for the ADD
  // and closes 999 again, so the watch comes back and 999 stays empty.
  ImageBuilder b;
  b.process(kRec);
  uint64_t p0 = b.pipe({}), p1 = b.pipe({});
  uint64_t r0 = b.file(p0, O_RDONLY), w0 = b.file(p0, O_WRONLY), r1 = b.file(p1, O_RDONLY), w1 = b.file(p1, O_WRONLY);
  b.fd(kRec, 5, r0).fd(kRec, 6, w0).fd(kRec, 702, r1).fd(kRec, 7, w1);
  b.raw().epoll_watches.push_back({1, kRec, kE1, r0, 702, EPOLLIN | EPOLLERR | EPOLLHUP, 0});
  b.raw().epoll_watches.push_back({1, kRec, kE1, r1, 702, EPOLLIN | EPOLLERR | EPOLLHUP, 1});
  b.raw().epoll_watches.push_back({2, kRec, kE2, r0, 999, EPOLLIN, 9});
  Image img = b.parsed();
  Scenario child(
      [] {
        testing::dev_null_at({5, 6, 7, 702});
        child_setup();
      },
      []() -> std::string {
        struct stat a {}, c {};
        if (::fstat(702, &a) != 0 || ::fstat(7, &c) != 0 || a.st_ino != c.st_ino) return "fd 702 is not P1's read end";
        if (::fcntl(999, F_GETFD) >= 0) return "fd 999 is open";
        std::string e = expect_ready(kE1, {}, "E1 before any write");
        if (e.empty()) e = expect_ready(kE2, {}, "E2 before any write");
        if (e.empty() && ::write(6, "a", 1) != 1) e = "write P0";
        if (e.empty()) e = expect_ready(kE1, {{0, EPOLLIN}}, "E1 after a write to P0");
        if (e.empty()) e = expect_ready(kE2, {{9, EPOLLIN}}, "E2 after a write to P0 (its watch keyed by 999)");
        if (e.empty()) e = testing::expect_bytes(5, "a");
        if (e.empty() && ::write(7, "b", 1) != 1) e = "write P1";
        if (e.empty()) e = expect_ready(kE1, {{1, EPOLLIN}}, "E1 after a write to P1");
        return e;
      });
  ASSERT_TRUE(child.ready());
  auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt});
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_EQ(sum->epoll_readded, 3u) << all_notes(*sum);
  EXPECT_EQ(child.finish(), "");
}

TEST(EpollRestore, AWatchKeyedByANumberInUseNowIsANote) {
  // The watch was keyed by fd 999, closed at the dump; the target has opened something there since:
  // the number is the target's own now, so the watch is not re-added (a note) and 999 is untouched.
  ImageBuilder b;
  b.process(kRec);
  uint64_t p0 = b.pipe({});
  uint64_t r0 = b.file(p0, O_RDONLY), w0 = b.file(p0, O_WRONLY);
  b.fd(kRec, 5, r0).fd(kRec, 6, w0);
  b.raw().epoll_watches.push_back({2, kRec, kE2, r0, 999, EPOLLIN, 9});
  Image img = b.parsed();
  Scenario child(
      [] {
        testing::dev_null_at({5, 6, 999});
        child_setup();
      },
      []() -> std::string {
        struct stat st {};
        if (::fstat(999, &st) != 0 || !S_ISCHR(st.st_mode)) return "fd 999 is not /dev/null any more";
        return expect_ready(kE2, {}, "E2 (no watch)");
      });
  ASSERT_TRUE(child.ready());
  auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt});
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_EQ(sum->epoll_readded, 0u) << all_notes(*sum);
  EXPECT_TRUE(noted(*sum, fmt::format("epoll fd {} of process {} watched file {} through fd 999, which this restore "
                                      "leaves empty but is in use in the target now",
                                      kE2, child.pid(), r0)))
      << all_notes(*sum);
  EXPECT_EQ(child.finish(), "");
}

}  // namespace
}  // namespace pipecr::restore
