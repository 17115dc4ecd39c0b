// cpu_apart_test.cpp: CpuApart against the real scheduler: the calling thread leaves a CPU while
// one lives and has its affinity back after; where it cannot leave, nothing changes.
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "sys/proc.hpp"
#include "sys/syscalls.hpp"

namespace pipecr::sys {
namespace {

cpu_set_t affinity() {
  cpu_set_t s;
  CPU_ZERO(&s);
  EXPECT_EQ(::sched_getaffinity(0, sizeof s, &s), 0);
  return s;
}

int last_cpu() {
  auto st = read_task_stat(::getpid(), static_cast<pid_t>(::syscall(SYS_gettid)));
  return st ? st->processor : -2;
}

TEST(CpuApart, LeavesTheCpuWhileItLivesAndGivesTheAffinityBack) {
  const cpu_set_t all = affinity();
  const int here = ::sched_getcpu();
  ASSERT_GE(here, 0);
  {
    CpuApart apart(here);
    const cpu_set_t during = affinity();
    if (CPU_COUNT(&all) < 2) {  // nowhere to go: nothing changes
      EXPECT_FALSE(apart.moved());
      EXPECT_TRUE(CPU_EQUAL(&during, &all));
    } else {
      EXPECT_TRUE(apart.moved());
      EXPECT_FALSE(CPU_ISSET(here, &during));
      EXPECT_EQ(CPU_COUNT(&during), CPU_COUNT(&all) - 1);
      EXPECT_NE(::sched_getcpu(), here);  // sched_setaffinity() moved this thread before it returned
      EXPECT_NE(last_cpu(), here);
    }
  }
  const cpu_set_t after = affinity();
  EXPECT_TRUE(CPU_EQUAL(&after, &all));
}

TEST(CpuApart, DoesNothingWhereItCannotLeave) {
  const cpu_set_t all = affinity();
  {
    CpuApart none(-1);  // the CPU was not known
    EXPECT_FALSE(none.moved());
    CpuApart beyond(CPU_SETSIZE);
    EXPECT_FALSE(beyond.moved());
  }
  const int here = ::sched_getcpu();
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(here, &one);
  ASSERT_EQ(::sched_setaffinity(0, sizeof one, &one), 0);
  {
    CpuApart only(here);  // the one CPU this thread may use
    EXPECT_FALSE(only.moved());
    const cpu_set_t during = affinity();
    EXPECT_TRUE(CPU_EQUAL(&during, &one));
    EXPECT_EQ(::sched_getcpu(), here);
  }
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (cpu == here) continue;
    CpuApart elsewhere(cpu);  // a CPU it may not use anyway
    EXPECT_FALSE(elsewhere.moved());
    break;
  }
  const cpu_set_t still = affinity();
  EXPECT_TRUE(CPU_EQUAL(&still, &one));
  ASSERT_EQ(::sched_setaffinity(0, sizeof all, &all), 0);
}

}  // namespace
}  // namespace pipecr::sys
