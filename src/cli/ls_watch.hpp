// ls_watch.hpp: `pipecr ls --watch [SECONDS]`: the --graph view redrawn every SECONDS, with the
// bytes per second each process moves (rchar and wchar of /proc/PID/io between two frames).
//
// On a terminal each frame is drawn over the last without clearing the screen (no flicker): cursor
// home, every line followed by clear-to-end-of-line, then clear-to-end-of-screen; the cursor is
// hidden meanwhile and shown again at the end. Not on a terminal, frames follow one another,
// separated by a blank line; with --json, one JSON document per line and frame. SIGINT, SIGTERM
// and SIGHUP are waited for with sigtimedwait (blocked meanwhile), so an interrupt ends the loop
// cleanly, with the terminal restored, and exit status 0.
#pragma once

#include <sys/types.h>

#include <vector>

#include "cli/command.hpp"
#include "cli/ls_graph.hpp"

namespace pipecr::cli {

struct WatchOptions {
  std::vector<pid_t> pids;  // as ls -t; empty: every process
  double seconds = 2;       // between frames
  int count = 0;            // stop after this many frames; 0: until interrupted
  bool json = false;
  GraphStyle style;
};

[[nodiscard]] Expected<int> watch_pipes(const WatchOptions& o, CommandContext& ctx);

}  // namespace pipecr::cli
