// exit_early: a process that exits right after "ready", while pipecr dumps it.
//
// It holds 2,000 pipes with 1 KiB each, so a dump takes long enough to be caught half way; it
// exits after ZDTM_EXIT_DELAY_US microseconds (default 0). The harness expects the dump either to
// finish (it won the race) or to fail with exit 75 and no image, and no process left stopped.
#include <sys/resource.h>

#include "zdtmlite.h"

int main() {
  zdtm::init("exit_early");
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  for (int i = 0; i < 2000; i++) {
    int p[2];
    if (pipe(p) != 0) ZDTM_SYSFAIL("pipe number %d", i);
    zdtm::write_pattern(p[1], static_cast<uint32_t>(i), 0, 1024, 1024, "pipe");
  }
  zdtm::ready();
  int delay = atoi(zdtm::env_or("ZDTM_EXIT_DELAY_US", "0").c_str());
  if (delay > 0) usleep(static_cast<useconds_t>(delay));
  zdtm::pass();
}
