// fd_limit_test.cpp: restores that need many fds, in pipecr and in the target, and their rollback.
//
// pipecr must not hold both ends of every pipe (an end no restored fd takes is closed once the pipe
// is built), must not need the target's old fds twice over in the target (the stash is taken into
// pipecr, a chunk at a time), must raise its own soft RLIMIT_NOFILE to the hard one, and must say so
// early when the fds cannot fit. The restoring side runs in a forked child so that its hard limit can
// be lowered (that cannot be undone without CAP_SYS_RESOURCE); the child reports through a pipe and is
// killed and reaped in every path. PIPECR_TEST_MANY_PIPES=N (with a hard limit above 2N) runs the
// big case at N pipes and prints the time the target stood stopped.
#include <sys/resource.h>

#include <chrono>
#include <cstdlib>

#include <gtest/gtest.h>

#include "restore/process.hpp"
#include "restore_helpers.hpp"

namespace pipecr::restore {
namespace {

using testing::ImageBuilder;
using testing::Scenario;

constexpr int32_t kRec = 6161;
constexpr int32_t kRec2 = 6262;
constexpr int kFirstFd = 100;

// Runs fn in a forked child with RLIMIT_NOFILE {soft, hard} and returns what fn returned.
class Restorer {
 public:
  Restorer(rlim_t soft, rlim_t hard, const std::function<std::string()>& fn) {
    int p[2];
    if (::pipe2(p, O_CLOEXEC) < 0) throw std::runtime_error("pipe2");
    pid_ = ::fork();
    if (pid_ == 0) {
      ::close(p[0]);
      rlimit rl{soft, hard};
      std::string out = ::setrlimit(RLIMIT_NOFILE, &rl) == 0 ? fn() : std::string("setrlimit failed");
      (void)!::write(p[1], out.data(), out.size());
      ::_exit(0);
    }
    ::close(p[1]);
    std::string buf(65536, '\0');
    size_t got = 0;
    for (;;) {
      ssize_t n = ::read(p[0], buf.data() + got, buf.size() - got);
      if (n > 0) got += static_cast<size_t>(n);
      if (n == 0 || (n < 0 && errno != EINTR) || got == buf.size()) break;
    }
    ::close(p[0]);
    out_ = buf.substr(0, got);
  }
  ~Restorer() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    while (::waitpid(pid_, nullptr, 0) < 0 && errno == EINTR) {
    }
  }
  Restorer(const Restorer&) = delete;
  Restorer& operator=(const Restorer&) = delete;
  [[nodiscard]] const std::string& out() const { return out_; }

 private:
  pid_t pid_ = -1;
  std::string out_;
};

// The fd of pipe i: kFirstFd + i, stepping over 900 and 901 (a Scenario child's own pipes).
int fd_of(int i) { return kFirstFd + i + (kFirstFd + i >= 900 ? 2 : 0); }

// n pipes of one byte each, the read end at fd_of(i), the write end held by a process not restored.
ImageBuilder read_ends(int n) {
  ImageBuilder b;
  b.process(kRec).process(kRec2);
  for (int i = 0; i < n; ++i) {
    auto p = b.pipe({{std::string(1, static_cast<char>(i & 0xff)), false}});
    b.fd(kRec, fd_of(i), b.file(p, O_RDONLY)).fd(kRec2, fd_of(i), b.file(p, O_WRONLY));
  }
  return b;
}

// /dev/null at fd_of(0) .. fd_of(n - 1).
void dev_null_pipes(int n) {
  int low = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  int z = ::fcntl(low, F_DUPFD_CLOEXEC, fd_of(n - 1) + 1);  // not inside the range it fills
  ::close(low);
  for (int i = 0; i < n; ++i) ::dup2(z, fd_of(i));
  ::close(z);
}

// In the target: every restored read end holds its byte, then EOF (no writer survived).
std::string check_read_ends(int n) {
  for (int i = 0; i < n; ++i) {
    int fd = fd_of(i);
    char c[2];
    ssize_t r = ::read(fd, c, 2);
    if (r != 1 || c[0] != static_cast<char>(i & 0xff)) return fmt::format("fd {}: read {}", fd, r);
    if ((r = ::read(fd, c, 1)) != 0) return fmt::format("fd {}: read {} after the byte, want EOF", fd, r);
  }
  return "";
}

int many_pipes() {
  const char* env = std::getenv("PIPECR_TEST_MANY_PIPES");
  return env ? std::atoi(env) : 1000;
}

// 1000 pipes: 2000 ends would not fit under pipecr's hard limit of 1400, 1000 old fds stashed in the
// target would not fit under its limit of 1200 (it holds 1000 at the numbers already).
TEST(RestoreFdLimit, ManyPipesFitUnderLowLimits) {
  const int n = many_pipes();
  const rlim_t target_limit = n + 200, restorer_hard = n + 400;
  ImageBuilder b = read_ends(n);
  Image img = b.parsed();
  Scenario child(
      [n, target_limit] {
        rlimit rl{target_limit, target_limit};
        ::setrlimit(RLIMIT_NOFILE, &rl);
        dev_null_pipes(n);
      },
      [n] { return check_read_ends(n); });
  ASSERT_TRUE(child.ready());
  const pid_t target = child.pid();
  Restorer restorer(256, restorer_hard, [&]() -> std::string {
    using clock = std::chrono::steady_clock;
    clock::time_point seized, resumed;
    ProcessRestoreOptions opts;
    opts.hook = [&](Stage s) {
      if (s == Stage::seized) seized = clock::now();
      if (s == Stage::resumed) resumed = clock::now();
    };
    auto r = restore_processes(img, {{{target, kRec}}, std::nullopt}, opts);
    if (!r) return "error: " + r.error().what;
    rlimit rl{};
    ::getrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_cur != 256) return fmt::format("soft limit left at {}", rl.rlim_cur);
    return fmt::format("ok {}", std::chrono::duration_cast<std::chrono::microseconds>(resumed - seized).count());
  });
  ASSERT_EQ(restorer.out().rfind("ok ", 0), 0u) << restorer.out();
  std::cout << "[ stopped  ] " << n << " pipes: target stopped (seized to resumed) " << restorer.out().substr(3)
            << " us\n";
  EXPECT_EQ(testing::traced_or_stopped(target), "");
  EXPECT_EQ(child.finish(), "");
}

// A hard limit the restore cannot fit under: refused before any pipe is made or any target touched,
// with a message that says what is needed and how to get it.
TEST(RestoreFdLimit, TooManyForTheHardLimitFailsEarly) {
  const int n = 1000;
  ImageBuilder b = read_ends(n);
  Image img = b.parsed();
  Scenario child(
      [n] {
        rlimit rl{2048, 2048};
        ::setrlimit(RLIMIT_NOFILE, &rl);
        dev_null_pipes(n);
      },
      [n]() -> std::string {
        for (int i = 0; i < n; ++i)
          if (!testing::is_dev_null(fd_of(i))) return fmt::format("fd {} is no longer /dev/null", fd_of(i));
                   return "";
                 });
  ASSERT_TRUE(child.ready());
  const pid_t target = child.pid();
  Restorer restorer(256, 600, [&]() -> std::string {
    bool built = false;
    ProcessRestoreOptions opts;
    opts.hook = [&](Stage s) { built = built || s == Stage::built; };
    auto r = restore_processes(img, {{{target, kRec}}, std::nullopt}, opts);
    if (r) return "restored";
    return fmt::format("{} {} {}", r.error().err, built ? "built" : "-", r.error().what);
  });
  EXPECT_EQ(restorer.out().rfind(fmt::format("{} - ", EMFILE), 0), 0u) << restorer.out();
  EXPECT_NE(restorer.out().find("RLIMIT_NOFILE"), std::string::npos) << restorer.out();
  EXPECT_NE(restorer.out().find("hard 600"), std::string::npos) << restorer.out();
  EXPECT_EQ(testing::traced_or_stopped(target), "");
  EXPECT_EQ(child.finish(), "");
}

// A rollback after several chunks: every old fd is back at its number with its FD_CLOEXEC, numbers
// that were free are free again. The second target dies before its turn.
TEST(RestoreFdLimit, RollbackAfterManyChunksPutsEveryOldFdBack) {
  constexpr int kOpen = 600, kFree = 10;  // 600 > two chunks of 253
  ImageBuilder b;
  b.process(kRec).process(kRec2);
  auto shared = b.pipe({{"s", false}});
  for (int i = 0; i < kOpen + kFree; ++i) {
    auto p = b.pipe({{"x", false}});
    b.fd(kRec, kFirstFd + i, b.file(p, O_RDONLY));
  }
  b.fd(kRec2, 11, b.file(shared, O_WRONLY)).fd(kRec, kFirstFd + kOpen + kFree, b.file(shared, O_RDONLY));
  Image img = b.parsed();
  Scenario a(
      [] {
        dev_null_pipes(kOpen);
        for (int fd = kFirstFd; fd < kFirstFd + kOpen; fd += 2) ::fcntl(fd, F_SETFD, FD_CLOEXEC);
      },
      []() -> std::string {
        for (int fd = kFirstFd; fd < kFirstFd + kOpen; ++fd) {
          if (!testing::is_dev_null(fd)) return fmt::format("fd {} is no longer /dev/null", fd);
          bool want = (fd - kFirstFd) % 2 == 0;
          if (((::fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0) != want) return fmt::format("fd {}: FD_CLOEXEC changed", fd);
        }
        for (int fd = kFirstFd + kOpen; fd <= kFirstFd + kOpen + kFree; ++fd)
          if (::fcntl(fd, F_GETFD) != -1) return fmt::format("fd {} was free and is open now", fd);
        return "";
      });
  Scenario victim([] {}, [] { return std::string(); });
  ASSERT_TRUE(a.ready() && victim.ready());
  ProcessRestoreOptions opts;
  opts.hook = [&](Stage s) {
    if (s == Stage::stashed) ::kill(victim.pid(), SIGKILL);
  };
  auto r = restore_processes(img, {{{a.pid(), kRec}, {victim.pid(), kRec2}}, std::nullopt}, opts);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().kind, Errc::gone) << r.error().what;
  EXPECT_EQ(testing::traced_or_stopped(a.pid()), "");
  EXPECT_EQ(a.finish(), "");
}

}  // namespace
}  // namespace pipecr::restore
