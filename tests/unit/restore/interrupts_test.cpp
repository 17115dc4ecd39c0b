// interrupts_test.cpp: a SIGTERM or SIGINT that reaches pipecr during a restore ends it promptly with
// a rollback: the targets keep exactly their old fds and run on, and the signal is delivered to
// pipecr once every target is whole again (never while a bootstrap could be cut in half).
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>

#include <gtest/gtest.h>

#include "restore/process.hpp"
#include "unit/restore/restore_helpers.hpp"

namespace pipecr::restore {
namespace {

using testing::ImageBuilder;
using testing::Scenario;

std::atomic<int> g_arrived{0};
void on_signal(int) { g_arrived.fetch_add(1); }

TEST(RestoreInterrupts, SignalRollsBackAndArrivesOnceTargetsAreWhole) {
  constexpr int32_t kRecorded = 5151;
  ImageBuilder b;
  b.process(kRecorded);
  auto p = b.pipe({{"held", false}});
  b.fd(kRecorded, 11, b.file(p, O_RDONLY));
  Image img = b.parsed();
  for (Stage when : {Stage::seized, Stage::stashed, Stage::installed}) {
    SCOPED_TRACE(static_cast<int>(when));
    // The child keeps its own pipe at 11 with "old" in it: a rollback leaves exactly that.
    Scenario child(
        [] {
          int fds[2];
          (void)!::pipe(fds);
          (void)!::write(fds[1], "old", 3);
          ::dup2(fds[0], 11);
          ::close(fds[0]);
          ::close(fds[1]);
        },
        [] { return testing::expect_bytes(11, "old"); });
    ASSERT_TRUE(child.ready());
    struct sigaction sa {}, old_term {}, old_int {};
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, &old_term);
    sigaction(SIGINT, &sa, &old_int);
    g_arrived = 0;
    int seen_during = -1;
    ProcessRestoreOptions opts;
    opts.hook = [&](Stage st) {
      if (st == when) {
        ::raise(SIGTERM);
        ::raise(SIGINT);
        seen_during = g_arrived.load();
      }
    };
    auto sum = restore_processes(img, {{{child.pid(), kRecorded}}, std::nullopt}, opts);
    int seen_after = g_arrived.load();
    sigaction(SIGTERM, &old_term, nullptr);
    sigaction(SIGINT, &old_int, nullptr);
    ASSERT_FALSE(sum);
    EXPECT_EQ(sum.error().err, EINTR);
    EXPECT_NE(sum.error().what.find("rolled back"), std::string::npos) << sum.error().what;
    EXPECT_EQ(seen_during, 0) << "a signal reached pipecr while a target was in the transaction";
    EXPECT_EQ(seen_after, 2);
    EXPECT_EQ(testing::traced_or_stopped(child.pid()), "");
    EXPECT_EQ(child.finish(), "");
  }
}

}  // namespace
}  // namespace pipecr::restore
