// table_sharer.hpp: a second process on the caller's fd table, for tests of tables shared across
// processes (clone(CLONE_FILES) without CLONE_THREAD).
#pragma once

#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

namespace pipecr::testing {

// A child of the calling process that uses its very fd table and pauses until it is killed, or
// until the caller dies (PR_SET_PDEATHSIG); its pid, or -1. One per process: its stack is static.
inline pid_t spawn_table_sharer() {
  static char stack[64 * 1024];
  return ::clone(
      [](void*) -> int {
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);
        for (;;) ::pause();
      },
      stack + sizeof stack, CLONE_FILES | SIGCHLD, nullptr);
}

}  // namespace pipecr::testing
