// inplace_test.cpp: refill in place (restore/inplace.hpp) into real children.
//
// The child holds a live pipe made by the test (the test lets go of its own ends once the child
// has them, so the child is its only holder); the image names that very pipe (its inode, this
// boot). The restore must keep the child's open file (same description: an epoll watch on it
// still reports), refill it and set capacity and flags; a failure after the refill must put the old
// bytes back; --replace and a second holder must make it a replacement.
#include <pthread.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#include <atomic>
#include <functional>

#include <gtest/gtest.h>

#include "image/info.hpp"
#include "restore/process.hpp"
#include "restore_helpers.hpp"
#include "sys/syscalls.hpp"
#include "unit/table_sharer.hpp"

namespace pipecr::restore {
namespace {

using testing::ImageBuilder;
using testing::Scenario;

#define EXPECT_UNTRACED(pid) EXPECT_EQ(testing::traced_or_stopped(pid), "")

constexpr int32_t kRec = 4242;
constexpr int32_t kRec2 = 4343;
constexpr int kR = 11, kW = 12, kEp = 20;

// A pipe of the test holding `old`: its ends, at numbers the child moves to kR and kW.
struct LivePipe {
  int r = -1, w = -1;
  uint64_t inode = 0;
  explicit LivePipe(const std::string& old) {
    int p[2];
    if (::pipe(p) != 0) throw std::runtime_error("pipe");
    r = p[0];
    w = p[1];
    if (!old.empty() && ::write(w, old.data(), old.size()) != static_cast<ssize_t>(old.size()))
      throw std::runtime_error("write");
    struct stat st {};
    ::fstat(r, &st);
    inode = st.st_ino;
  }
  // In the child: the ends at kR and kW, an epoll at kEp watching kR (level, data 7).
  void take() const {
    ::dup2(r, kR);
    ::dup2(w, kW);
    ::close(r);
    ::close(w);
    int ep = ::epoll_create1(0);
    ::dup2(ep, kEp);
    ::close(ep);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = 7;
    ::epoll_ctl(kEp, EPOLL_CTL_ADD, kR, &ev);
  }
  void let_go() {
    ::close(r);
    ::close(w);
  }
};

// A pipe record in b for the live pipe: its inode, on this boot (what makes it one to refill in place).
uint64_t live_pipe(ImageBuilder& b, const LivePipe& live, std::vector<std::pair<std::string, bool>> slots,
                   uint32_t capacity = 65536) {
  uint64_t p = b.pipe(std::move(slots), capacity);
  b.raw().pipes.back().inode = live.inode;
  b.raw().info.boot_id = image::boot_id();
  return p;
}

// The image of the child holding `pipe` with `bytes` queued, at capacity 16384, read end O_NONBLOCK.
ImageBuilder image_of(const LivePipe& live, const std::string& bytes) {
  ImageBuilder b;
  b.process(kRec);
  uint64_t p = live_pipe(b, live, {{bytes, false}}, 16384);
  b.fd(kRec, kR, b.file(p, O_RDONLY | O_NONBLOCK)).fd(kRec, kW, b.file(p, O_WRONLY));
  return b;
}

std::string epoll_reports_in() {
  epoll_event ev{};
  int n = ::epoll_wait(kEp, &ev, 1, 0);
  if (n == 1 && ev.data.u64 == 7 && (ev.events & EPOLLIN)) return "";
  return fmt::format("the epoll watch on fd {} does not report (epoll_wait {}, events {:#x})", kR, n,
                     static_cast<unsigned>(ev.events));
}

// Restores img into child (recorded as kRec): its one pipe refilled in place with `kept` fds kept,
// the child left untraced, and the child's own checks passed.
void refill_in_place(const Image& img, Scenario& child, size_t kept) {
  auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt});
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_EQ(sum->in_place, 1u);
  ASSERT_EQ(sum->outcomes.size(), 1u);
  EXPECT_TRUE(sum->outcomes[0].in_place) << sum->outcomes[0].why;
  EXPECT_EQ(sum->outcomes[0].kept, kept);
  EXPECT_UNTRACED(child.pid());
  EXPECT_EQ(child.finish(), "");
}

TEST(RestoreInPlace, KeepsTheOpenFileAndRefillsIt) {
  LivePipe live("old bytes");
  ImageBuilder b = image_of(live, "recorded");
  Image img = b.parsed();
  Scenario child([&] { live.take(); },
                 []() -> std::string {
                   if (auto e = epoll_reports_in(); !e.empty()) return e;
                   if (::fcntl(kR, F_GETPIPE_SZ) != 16384) return "capacity not set";
                   if (!(::fcntl(kR, F_GETFL) & O_NONBLOCK)) return "O_NONBLOCK not set on the kept read end";
                   return testing::expect_bytes(kR, "recorded");
                 });
  ASSERT_TRUE(child.ready());
  live.let_go();
  refill_in_place(img, child, 2);
}

TEST(RestoreInPlace, FailureAfterTheRefillPutsTheOldBytesBack) {
  LivePipe live("old bytes");
  ImageBuilder b = image_of(live, "recorded");
  b.process(kRec2);
  b.fd(kRec2, 13, b.file(b.pipe({{"x", false}}), O_RDONLY));
  Image img = b.parsed();
  Scenario child([&] { live.take(); },
                 []() -> std::string {
                   if (::fcntl(kR, F_GETPIPE_SZ) != 65536) return "capacity not put back";
                   if (::fcntl(kR, F_GETFL) & O_NONBLOCK) return "O_NONBLOCK not put back";
                   if (auto e = epoll_reports_in(); !e.empty()) return e;
                   return testing::expect_bytes(kR, "old bytes");
                 });
  Scenario victim([] {}, [] { return std::string(); });
  ASSERT_TRUE(child.ready() && victim.ready());
  live.let_go();
  ProcessRestoreOptions opts;
  opts.hook = [&](Stage s) {
    if (s == Stage::stashed) ::kill(victim.pid(), SIGKILL);  // the refill in place runs next, then the victim fails
  };
  auto r = restore_processes(img, {{{child.pid(), kRec}, {victim.pid(), kRec2}}, std::nullopt}, opts);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().kind, Errc::gone) << r.error().what;
  EXPECT_UNTRACED(child.pid());
  EXPECT_EQ(child.finish(), "");
}

// A pipe another process holds too (here: the test itself) is left as it is where the target still
// holds it: a new pipe would cut that holder off (a supervisor's stdout pipe). --replace gives a new pipe.
TEST(RestoreInPlace, AnotherHolderLeavesItOrReplaceMeansANewPipe) {
  for (bool force : {false, true}) {
    LivePipe live("old bytes");
    ImageBuilder b = image_of(live, "recorded");
    Image img = b.parsed();
    Scenario child([&] { live.take(); },
                   [force]() -> std::string {
                     epoll_event ev{};
                     if (force) {
                       if (::epoll_wait(kEp, &ev, 1, 0) != 0) return "the watch on the replaced file still reports";
                       return testing::expect_bytes(kR, "recorded");
                     }
                     if (::epoll_wait(kEp, &ev, 1, 0) != 1) return "the watch on the pipe left as it is is gone";
                     return testing::expect_bytes(kR, "old bytes");
                   });
    ASSERT_TRUE(child.ready());
    if (force) live.let_go();  // else the test itself is the other holder
    ProcessRestoreOptions opts;
    opts.replace = force;
    auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt}, opts);
    ASSERT_TRUE(sum) << sum.error().what;
    EXPECT_EQ(sum->in_place, 0u);
    if (force) {
      ASSERT_EQ(sum->outcomes.size(), 1u);
      EXPECT_EQ(sum->outcomes[0].why, "--replace");
    } else {
      EXPECT_EQ(sum->fds, 0u);
      bool noted = false;
      for (const std::string& n : sum->notes) noted |= n.find("left as it is") != std::string::npos;
      EXPECT_TRUE(noted);
    }
    if (!force) live.let_go();
    EXPECT_EQ(child.finish(), "");
  }
}


// A process that uses the target's very fd table (clone(CLONE_FILES) without CLONE_THREAD) and is
// not restored holds every pipe of that table: the fds are left as they are, and the note names it
// as the table's other user and says what to do, not merely "held outside".
TEST(RestoreInPlace, AProcessSharingTheTableIsNamedInTheNote) {
  LivePipe live("old bytes");
  ImageBuilder b = image_of(live, "recorded");
  Image img = b.parsed();
  Scenario child(
      [&] {
        live.take();
        if (testing::spawn_table_sharer() < 0) ::_exit(3);
      },
      [] { return testing::expect_bytes(kR, "old bytes"); });
  ASSERT_TRUE(child.ready());
  live.let_go();  // the sharer is the only other holder
  auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt}, {});
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_EQ(sum->fds, 0u);
  size_t named = 0;
  for (const std::string& n : sum->notes)
    named += n.find("left as it is") != std::string::npos &&
             n.find("uses the same fd table (clone(CLONE_FILES))") != std::string::npos;
  EXPECT_EQ(named, 2u) << fmt::format("{}", fmt::join(sum->notes, "\n"));
  EXPECT_EQ(child.finish(), "");
}

// The image of the child holding `live` with "recorded" queued: kR reads (file flags rd_flags,
// FD_CLOEXEC rd_cloexec), kW writes (FD_CLOEXEC wr_cloexec).
ImageBuilder plain_image(const LivePipe& live, uint32_t rd_flags = O_RDONLY, bool rd_cloexec = false,
                         bool wr_cloexec = false, Owner rd_owner = {}) {
  ImageBuilder b;
  b.process(kRec);
  uint64_t p = live_pipe(b, live, {{"recorded", false}});
  b.fd(kRec, kR, b.file(p, rd_flags, rd_owner), rd_cloexec).fd(kRec, kW, b.file(p, O_WRONLY), wr_cloexec);
  return b;
}

std::string fd_flags_are(int fd, int want) {
  int got = ::fcntl(fd, F_GETFD);
  if (got == want) return "";
  return fmt::format("fd {}: F_GETFD {}, want {}", fd, got, want);
}

// FD_CLOEXEC belongs to the fd, not to the description: a kept fd gets the recorded one back (the
// agent sets it at the target's number), and stays the same description (its epoll watch reports).
TEST(RestoreInPlace, KeptFdsGetTheRecordedCloexec) {
  LivePipe live("old bytes");
  ImageBuilder b = plain_image(live, O_RDONLY, /*rd_cloexec=*/false, /*wr_cloexec=*/true);
  Image img = b.parsed();
  Scenario child(
      [&] {
        live.take();
        ::fcntl(kR, F_SETFD, FD_CLOEXEC);  // both flipped since the dump
        ::fcntl(kW, F_SETFD, 0);
      },
      []() -> std::string {
        if (auto e = fd_flags_are(kR, 0); !e.empty()) return e;
        if (auto e = fd_flags_are(kW, FD_CLOEXEC); !e.empty()) return e;
        if (auto e = epoll_reports_in(); !e.empty()) return e;
        return testing::expect_bytes(kR, "recorded");
      });
  ASSERT_TRUE(child.ready());
  live.let_go();
  refill_in_place(img, child, 2);
}

// Signals pending for this process now, SIGIO flushed first if `flush`.
bool sigio_pending() {
  sigset_t pending;
  sigpending(&pending);
  return sigismember(&pending, SIGIO);
}
void flush_sigio() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGIO);
  timespec zero{0, 0};
  while (::sigtimedwait(&set, nullptr, &zero) == SIGIO) {
  }
}

// O_ASYNC set on a kept description since the dump goes again: the flags come back exactly, and
// new data in the pipe raises no SIGIO any more. (The refill itself may raise one while O_ASYNC is
// still on: it is flushed before the check.)
TEST(RestoreInPlace, OAsyncSetSinceTheDumpIsCleared) {
  LivePipe live("old bytes");
  ImageBuilder b = plain_image(live, O_RDONLY);
  Image img = b.parsed();
  Scenario child(
      [&] {
        live.take();
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGIO);
        ::sigprocmask(SIG_BLOCK, &set, nullptr);
        ::fcntl(kR, F_SETOWN, ::getpid());
        ::fcntl(kR, F_SETFL, O_ASYNC | O_NONBLOCK);
      },
      []() -> std::string {
        int fl = ::fcntl(kR, F_GETFL);
        if (fl & (O_ASYNC | O_NONBLOCK)) return fmt::format("fd {}: flags {:#o}: O_ASYNC or O_NONBLOCK left", kR, fl);
        flush_sigio();
        if (::write(kW, "x", 1) != 1) return "write";
        if (sigio_pending()) return "SIGIO still comes for new data";
        if (auto e = epoll_reports_in(); !e.empty()) return e;
        return testing::expect_bytes(kR, "recordedx");
      });
  ASSERT_TRUE(child.ready());
  live.let_go();
  refill_in_place(img, child, 2);
}

constexpr int kDup = 21;

// Whether a and b are one open file description in this process.
bool shares(int a, int b) { return testing::same_file(a, b); }

// The read end made an open of the pipe (O_LARGEFILE, as every open adds): a separate open made
// later has the same status flags, so only kcmp tells the two descriptions apart.
void reopen_read_end(LivePipe& live) {
  int n = ::open(fmt::format("/proc/self/fd/{}", live.r).c_str(), O_RDONLY | O_CLOEXEC);
  if (n < 0 || ::dup2(n, live.r) < 0) throw std::runtime_error("reopen");
  ::close(n);
}

// The image's sharing of descriptions is restored on kept fds too. joined: the image has kDup as a
// dup of kR, which the process made a separate open since (it gets kR's description back). split:
// the image has kDup as a separate open with O_NONBLOCK, which the process made a dup of kR since
// (kR keeps its description and its flags, kDup gets a description of its own).
TEST(RestoreInPlace, KeptFdsFollowTheRecordedSharing) {
  for (bool joined : {true, false}) {
    SCOPED_TRACE(joined ? "joined" : "split");
    LivePipe live("old bytes");
    reopen_read_end(live);
    ImageBuilder b;
    b.process(kRec);
    uint64_t p = live_pipe(b, live, {{"recorded", false}});
    uint64_t rd = b.file(p, O_RDONLY);
    b.fd(kRec, kR, rd).fd(kRec, kW, b.file(p, O_WRONLY)).fd(kRec, kDup, joined ? rd : b.file(p, O_RDONLY | O_NONBLOCK));
    Image img = b.parsed();
    Scenario child(
        [&] {
          live.take();
          if (joined) {  // the same status flags as kR: only kcmp tells them apart
            int n = ::open(fmt::format("/proc/self/fd/{}", kR).c_str(), O_RDONLY);
            ::dup2(n, kDup);
            ::close(n);
          } else {
            ::dup2(kR, kDup);
          }
        },
        [joined]() -> std::string {
          if (shares(kR, kDup) != joined) return joined ? "kDup is not kR's description" : "kDup is still kR's description";
          if (auto e = epoll_reports_in(); !e.empty()) return e;  // kR kept its description
          if ((::fcntl(kR, F_GETFL) & O_NONBLOCK) != 0) return "kR has O_NONBLOCK";
          if (((::fcntl(kDup, F_GETFL) & O_NONBLOCK) != 0) == joined) return "kDup: O_NONBLOCK wrong";
          return testing::expect_bytes(kR, "recorded");
        });
    ASSERT_TRUE(child.ready());
    live.let_go();
    refill_in_place(img, child, 2);  // kR and kW; kDup installed anew
  }
}

// The same across processes: one recorded file held by two targets must be one description in
// both (joined: the second made its kR a separate open since), and two recorded files two
// (split: both inherited one description, the image has two).
TEST(RestoreInPlace, KeptFdsFollowTheRecordedSharingAcrossTargets) {
  for (bool joined : {true, false}) {
    SCOPED_TRACE(joined ? "joined" : "split");
    LivePipe live("old bytes");
    reopen_read_end(live);
    ImageBuilder b;
    b.process(kRec).process(kRec2);
    uint64_t p = live_pipe(b, live, {{"recorded", false}});
    uint64_t rd = b.file(p, O_RDONLY);
    b.fd(kRec, kR, rd).fd(kRec, kW, b.file(p, O_WRONLY)).fd(kRec2, kR, joined ? rd : b.file(p, O_RDONLY | O_NONBLOCK));
    Image img = b.parsed();
    Scenario first([&] { live.take(); },
                   []() -> std::string {
                     if (auto e = epoll_reports_in(); !e.empty()) return e;
                     if ((::fcntl(kR, F_GETFL) & O_NONBLOCK) != 0) return "kR has O_NONBLOCK";
                     return testing::expect_bytes(kR, "recorded");
                   });
    Scenario second(
        [&] {
          live.take();
          ::close(kW);
          if (joined) {
            int n = ::open(fmt::format("/proc/self/fd/{}", kR).c_str(), O_RDONLY);
            ::dup2(n, kR);
            ::close(n);
          }
        },
        [joined]() -> std::string {
          if (((::fcntl(kR, F_GETFL) & O_NONBLOCK) != 0) == joined) return "kR: O_NONBLOCK wrong";
          return "";
        });
    ASSERT_TRUE(first.ready() && second.ready());
    live.let_go();
    ASSERT_EQ(sys::kcmp_file(first.pid(), kR, second.pid(), kR).value_or(-2) == 0, !joined);
    auto sum = restore_processes(img, {{{first.pid(), kRec}, {second.pid(), kRec2}}, std::nullopt});
    ASSERT_TRUE(sum) << sum.error().what;
    ASSERT_EQ(sum->outcomes.size(), 1u);
    EXPECT_TRUE(sum->outcomes[0].in_place) << sum->outcomes[0].why;
    EXPECT_EQ(sum->outcomes[0].kept, 2u);  // the first's kR and kW; the second's kR installed anew
    EXPECT_EQ(sys::kcmp_file(first.pid(), kR, second.pid(), kR).value_or(-2) == 0, joined);
    EXPECT_UNTRACED(first.pid());
    EXPECT_UNTRACED(second.pid());
    EXPECT_EQ(first.finish(), "");
    EXPECT_EQ(second.finish(), "");
  }
}

// A page shared with the child (two thread ids).
struct SharedWord {
  std::atomic<pid_t>* word = nullptr;
  SharedWord() {
    void* m = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error("mmap");
    word = new (m) std::atomic<pid_t>[2]{0, 0};
  }
  ~SharedWord() { ::munmap(word, 4096); }
};

void* sleep_forever(void* arg) {
  static_cast<std::atomic<pid_t>*>(arg)->store(static_cast<pid_t>(::syscall(SYS_gettid)));
  for (;;) ::pause();
  return nullptr;
}

// pid 0: no owner, whatever the type.
std::string owner_is(int fd, int type, pid_t pid) {
  f_owner_ex o{};
  ::fcntl(fd, F_GETOWN_EX, &o);
  if (o.pid == pid && (pid == 0 || o.type == type)) return "";
  return fmt::format("fd {}: owner type {} pid {}, want type {} pid {}", fd, static_cast<int>(o.type), o.pid, type, pid);
}

// A kept description whose recorded owner is not a restored process but still exists (a thread
// other than the main one; a process group outside the restore) gets that owner, left as it is or
// set again where the process changed it since the dump. changed: the process made itself the
// owner (F_OWNER_PID) since.
TEST(RestoreInPlace, KeptDescriptionKeepsAnOwnerThatStillExists) {
  for (int type : {F_OWNER_TID, F_OWNER_PGRP})
    for (bool changed : {false, true}) {
      SCOPED_TRACE(fmt::format("type {}, changed {}", type, changed));
      LivePipe live("old bytes");
      SharedWord tid;
      const pid_t pgrp = ::getpgrp();  // the test's group: the child's, not a restored process
      Scenario child(
          [&] {
            live.take();
            pthread_t t;
            ::pthread_create(&t, nullptr, sleep_forever, tid.word);
            while (tid.word->load() == 0) ::usleep(1000);
            f_owner_ex o{static_cast<__pid_type>(type), type == F_OWNER_TID ? tid.word->load() : pgrp};
            ::fcntl(kR, F_SETOWN_EX, &o);
            ::fcntl(kR, F_SETSIG, SIGRTMIN);
            if (changed) ::fcntl(kR, F_SETOWN, ::getpid());
          },
          [&]() -> std::string {
            if (auto e = owner_is(kR, type, type == F_OWNER_TID ? tid.word->load() : pgrp); !e.empty()) return e;
            if (::fcntl(kR, F_GETSIG) != SIGRTMIN) return "F_GETSIG";
            return testing::expect_bytes(kR, "recorded");
          });
      ASSERT_TRUE(child.ready());
      live.let_go();
      ASSERT_NE(tid.word->load(), child.pid());
      ImageBuilder b;
      b.process(kRec);
      uint64_t p = live_pipe(b, live, {{"recorded", false}});
      Owner own{type, type == F_OWNER_TID ? tid.word->load() : pgrp, false, 0, 0};
      b.fd(kRec, kR, b.file(p, O_RDONLY, own, SIGRTMIN)).fd(kRec, kW, b.file(p, O_WRONLY));
      Image img = b.parsed();
      auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt});
      ASSERT_TRUE(sum) << sum.error().what;
      ASSERT_EQ(sum->outcomes.size(), 1u);
      EXPECT_TRUE(sum->outcomes[0].in_place) << sum->outcomes[0].why;
      for (const std::string& n : sum->notes) EXPECT_EQ(n.find("owner"), std::string::npos) << n;
      EXPECT_UNTRACED(child.pid());
      EXPECT_EQ(child.finish(), "");
    }
}

// An owner gone since the dump is cleared on a kept description, with a note: its number may name
// another process by now. A new description (--replace) gets no owner that is not a restored
// process, as before.
TEST(RestoreInPlace, OwnerGoneOrNewDescriptionGetsNone) {
  for (bool replace : {false, true}) {
    SCOPED_TRACE(replace ? "--replace" : "in place");
    LivePipe live("old bytes");
    SharedWord tid;
    Scenario child(
        [&] {
          live.take();
          pthread_t t;
          ::pthread_create(&t, nullptr, sleep_forever, tid.word);
          while (tid.word->load() == 0) ::usleep(1000);
          f_owner_ex o{F_OWNER_TID, tid.word->load()};
          ::fcntl(kR, F_SETOWN_EX, &o);
          if (replace) return;
          // A thread that is gone: one that exits at once.
          std::atomic<pid_t>* gone = tid.word + 1;
          ::pthread_create(&t, nullptr, [](void* a) -> void* {
            static_cast<std::atomic<pid_t>*>(a)->store(static_cast<pid_t>(::syscall(SYS_gettid)));
            return nullptr;
          }, gone);
          ::pthread_join(t, nullptr);
          tid.word->store(gone->load());
        },
        []() -> std::string {
          if (auto e = owner_is(kR, F_OWNER_PID, 0); !e.empty()) return e;
          return testing::expect_bytes(kR, "recorded");
        });
    ASSERT_TRUE(child.ready());
    live.let_go();
    ImageBuilder b;
    b.process(kRec);
    uint64_t p = live_pipe(b, live, {{"recorded", false}});
    b.fd(kRec, kR, b.file(p, O_RDONLY, Owner{F_OWNER_TID, tid.word->load(), false, 0, 0})).fd(kRec, kW, b.file(p, O_WRONLY));
    Image img = b.parsed();
    ProcessRestoreOptions opts;
    opts.replace = replace;
    auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt}, opts);
    ASSERT_TRUE(sum) << sum.error().what;
    ASSERT_EQ(sum->outcomes.size(), 1u);
    EXPECT_EQ(sum->outcomes[0].in_place, !replace) << sum->outcomes[0].why;
    bool noted = false;
    for (const std::string& n : sum->notes)
      noted |= n.find(replace ? "is not a restored process: owner not set" : "no longer exists: owner cleared") !=
               std::string::npos;
    EXPECT_TRUE(noted);
    EXPECT_UNTRACED(child.pid());
    EXPECT_EQ(child.finish(), "");
  }
}


// A thread of the child with an fd table of its own (unshare(CLONE_FILES)): setup runs in that
// table, then the thread publishes its tid and waits; asked to, it runs check in its table.
struct OwnTableThread {
  std::atomic<pid_t>* tid = nullptr;  // shared with the test
  std::function<void()> setup;
  std::function<std::string()> check;
  std::atomic<int> step{0};  // 1: check now; 2: checked, result set
  std::string result;
};

void* own_table_main(void* arg) {
  auto* t = static_cast<OwnTableThread*>(arg);
  if (::unshare(CLONE_FILES) != 0) t->result = "unshare(CLONE_FILES) failed";
  else t->setup();
  t->tid->store(static_cast<pid_t>(::syscall(SYS_gettid)));
  while (t->step.load() != 1) ::usleep(1000);
  if (t->result.empty()) t->result = t->check();
  t->step = 2;
  for (;;) ::pause();
  return nullptr;
}

// Fds recorded in a thread's own fd table are kept only where that table holds the recorded file,
// not where the process's (the leader's) table holds something at the same numbers. Since the
// dump, the leader's table got kR and kW: another pipe (other), or new opens of the very pipe
// (same). The thread's table still holds its recorded ends (both kept), or it replaced them with
// /dev/null (installed anew, in place). The thread's table ends as recorded; the leader's is left
// as it is (its mark, F_SETSIG, and its flags).
TEST(RestoreInPlace, ThreadOwnTableIsMatchedAgainstItsOwnFds) {
  struct Case {
    bool same_pipe, thread_closed;
    size_t kept;
  };
  for (Case c : {Case{false, false, 2}, Case{true, false, 2}, Case{true, true, 0}}) {
    SCOPED_TRACE(fmt::format("leader holds {}, thread {}", c.same_pipe ? "the pipe anew" : "another pipe",
                             c.thread_closed ? "closed its ends" : "holds its ends"));
    LivePipe live("old bytes");
    SharedWord tid;
    OwnTableThread* own = nullptr;  // the child's
    auto thread_check = [&live, c]() -> std::string {
      struct stat st {};
      for (int fd : {kR, kW})
        if (::fstat(fd, &st) != 0 || st.st_ino != live.inode) return fmt::format("fd {} is not the pipe", fd);
      if (!(::fcntl(kR, F_GETFL) & O_NONBLOCK)) return "kR lacks the recorded O_NONBLOCK";
      if ((::fcntl(kW, F_GETFL) & O_ACCMODE) != O_WRONLY) return "kW is not the write end";
      if (!c.thread_closed)
        if (auto e = epoll_reports_in(); !e.empty()) return e;  // kept: its description, watched
      const pid_t me = static_cast<pid_t>(::syscall(SYS_gettid));
      if (::syscall(SYS_kcmp, ::getpid(), me, 0 /* KCMP_FILE */, kR, kR) == 0) return "kR is the leader's description";
      return testing::expect_bytes(kR, "recorded");
    };
    Scenario child(
        [&] {
          live.take();
          ::fcntl(kR, F_SETFL, O_NONBLOCK);  // the thread's read end as recorded
          own = new OwnTableThread;
          own->tid = tid.word;
          own->setup = [c] {
            if (c.thread_closed) testing::dev_null_at({kR, kW});
          };
          own->check = thread_check;
          pthread_t t;
          ::pthread_create(&t, nullptr, own_table_main, own);
          while (tid.word->load() == 0) ::usleep(1000);
          if (c.same_pipe) {  // new descriptions on the very pipe
            for (auto [fd, acc] : {std::pair{kR, O_RDONLY}, std::pair{kW, O_WRONLY}}) {
              int n = ::open(fmt::format("/proc/self/fd/{}", fd).c_str(), acc);
              ::dup2(n, fd);
              ::close(n);
            }
          } else {
            int q[2];
            if (::pipe(q) != 0 || ::write(q[1], "leader", 6) != 6) ::_exit(3);
            ::dup2(q[0], kR);
            ::dup2(q[1], kW);
            ::close(q[0]);
            ::close(q[1]);
          }
          ::fcntl(kR, F_SETSIG, SIGRTMIN + 1);  // the leader's mark
        },
        [&]() -> std::string {
          own->step = 1;
          while (own->step.load() != 2) ::usleep(1000);
          if (!own->result.empty()) return "thread: " + own->result;
          if (::fcntl(kR, F_GETSIG) != SIGRTMIN + 1) return "leader: kR lost its F_SETSIG";
          if (::fcntl(kR, F_GETFL) & O_NONBLOCK) return "leader: kR got O_NONBLOCK";
          return testing::expect_bytes(kR, c.same_pipe ? "" : "leader");  // the thread read "recorded"
        });
    ASSERT_TRUE(child.ready());
    live.let_go();
    ImageBuilder b;
    b.process(kRec);
    uint64_t p = live_pipe(b, live, {{"recorded", false}});
    b.fd(kRec, kR, b.file(p, O_RDONLY | O_NONBLOCK)).fd(kRec, kW, b.file(p, O_WRONLY));
    for (FdRecord& d : b.raw().fds) d.tid = tid.word->load();  // the thread's own table
    Image img = b.parsed();
    refill_in_place(img, child, c.kept);
  }
}

// The same for a pipe held outside the restore (here: by the test), which is left as it is where
// the target still holds it: a thread's recorded fds are looked up in the thread's own table, not
// in the leader's, which holds another pipe at those numbers since the dump.
TEST(RestoreInPlace, ThreadOwnTableKeepsAPipeHeldOutside) {
  LivePipe live("old bytes");
  SharedWord tid;
  OwnTableThread* own = nullptr;  // the child's
  Scenario child(
      [&] {
        live.take();
        own = new OwnTableThread;
        own->tid = tid.word;
        own->setup = [] {};
        own->check = [&live]() -> std::string {
          struct stat st {};
          if (::fstat(kR, &st) != 0 || st.st_ino != live.inode) return "kR is not the pipe";
          if (auto e = epoll_reports_in(); !e.empty()) return e;
          return testing::expect_bytes(kR, "old bytes");
        };
        pthread_t t;
        ::pthread_create(&t, nullptr, own_table_main, own);
        while (tid.word->load() == 0) ::usleep(1000);
        int q[2];
        if (::pipe(q) != 0 || ::write(q[1], "leader", 6) != 6) ::_exit(3);
        ::dup2(q[0], kR);
        ::dup2(q[1], kW);
        ::close(q[0]);
        ::close(q[1]);
      },
      [&]() -> std::string {
        own->step = 1;
        while (own->step.load() != 2) ::usleep(1000);
        if (!own->result.empty()) return "thread: " + own->result;
        return testing::expect_bytes(kR, "leader");
      });
  ASSERT_TRUE(child.ready());
  ImageBuilder b;
  b.process(kRec);
  uint64_t p = live_pipe(b, live, {{"recorded", false}});
  b.fd(kRec, kR, b.file(p, O_RDONLY)).fd(kRec, kW, b.file(p, O_WRONLY));
  for (FdRecord& d : b.raw().fds) d.tid = tid.word->load();
  Image img = b.parsed();
  auto sum = restore_processes(img, {{{child.pid(), kRec}}, std::nullopt});
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_EQ(sum->in_place, 0u);
  EXPECT_EQ(sum->fds, 0u);
  live.let_go();
  EXPECT_UNTRACED(child.pid());
  EXPECT_EQ(child.finish(), "");
}

}  // namespace
}  // namespace pipecr::restore
