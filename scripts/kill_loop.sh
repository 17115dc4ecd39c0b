#!/usr/bin/env bash
# kill_loop.sh [KILLS] [BUILD_DIR]: pipecr SIGKILLed KILLS times (default 200) at random moments of
# `restore --into` (300 pipes) and as many of `dump`, against one live victim that checks its own
# blocked sigwaitinfo() and read() and its pipes (tests/unit/api/agent_kill_heavy_test.cpp; the ctest
# runs 30). Prints the outcomes, the time spent in harm windows, and fails on any harm outside them.
# Then the fd table's growth before the stop, killed KILLS times at random moments of its loop
# (tests/unit/sys/fdtable_grow_test.cpp, FdTableGrow.KilledAtRandomMoments...; the ctest runs 30).
set -euo pipefail
kills=${1:-200}
build=${2:-build}
PIPECR_KILLS=$kills PIPECR_KILL_VERBOSE=1 "$build/tests/api_agent_kill_heavy_test"
PIPECR_KILLS=$kills "$build/tests/sys_fdtable_grow_test" --gtest_filter='FdTableGrow.KilledAtRandomMoments*'
