// interrupts_test.cpp: a SIGTERM or SIGINT that reaches pipecr while a target runs injected code is
// held back until every target is whole again (pipecr dying there would leave a thread with its
// registers and code bytes): the signal arrives, but only after the restore has finished.
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

TEST(RestoreInterrupts, SignalsWaitUntilTargetsAreWhole) {
  constexpr int32_t kRecorded = 5151;
  ImageBuilder b;
  b.process(kRecorded);
  auto p = b.pipe({{"held", false}});
  b.fd(kRecorded, 11, b.file(p, O_RDONLY));
  Image img = b.parsed();
  Scenario child([] { testing::dev_null_at({11}); }, [] { return testing::expect_bytes(11, "held"); });
  ASSERT_TRUE(child.ready());

  struct sigaction sa {}, old_term {}, old_int {};
  sa.sa_handler = on_signal;
  sigaction(SIGTERM, &sa, &old_term);
  sigaction(SIGINT, &sa, &old_int);
  g_arrived = 0;
  int seen_during = -1;
  ProcessRestoreOptions opts;
  opts.hook = [&](Stage st) {
    if (st == Stage::stashed) {
      ::raise(SIGTERM);
      ::raise(SIGINT);
    }
    if (st == Stage::installed) seen_during = g_arrived.load();
  };
  auto sum = restore_processes(img, {{{child.pid(), kRecorded}}, std::nullopt}, opts);
  int seen_after = g_arrived.load();
  sigaction(SIGTERM, &old_term, nullptr);
  sigaction(SIGINT, &old_int, nullptr);
  ASSERT_TRUE(sum) << sum.error().what;
  EXPECT_EQ(seen_during, 0) << "a signal reached pipecr while the target ran injected code";
  EXPECT_EQ(seen_after, 2);
  EXPECT_EQ(testing::traced_or_stopped(child.pid()), "");
  EXPECT_EQ(child.finish(), "");
}

}  // namespace
}  // namespace pipecr::restore
