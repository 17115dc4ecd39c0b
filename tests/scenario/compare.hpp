// compare.hpp: does a description of pipes (pipecr show --json, or the live state read from /proc)
// match what a scenario program says it holds?
//
// The program's description (zdtmlite.h, Expect) names its pipes and open files with its own
// names; an image names them with numeric ids. The match is structural: fd slots are matched by
// (pid, fd); the file behind each matched slot is mapped to the expected file name, one-to-one
// (two fds that share an open file description must map to one expected file, and separate
// opens to separate ones); likewise pipes. Then every field the description gives is compared,
// and nothing may be left over on either side. Only the status flags that change what a pipe end
// does are compared (O_NONBLOCK, O_DIRECT, O_ASYNC): open() adds O_LARGEFILE and pipe2() does not,
// which the program does not pin down.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace zdtm_harness {

// Every difference, one line each; empty when they match. With `strict`, a field the expected
// description gives must be present in `actual` (an image); without, a field `actual` lacks is
// not compared (the live view cannot see packets, slots or the FIFO reader state).
[[nodiscard]] std::vector<std::string> compare(const nlohmann::json& expected, const nlohmann::json& actual,
                                               bool strict);

// The live state of the expected processes, read from /proc (readlink, fdinfo, syscall) and from
// the open file descriptions themselves (pidfd_getfd: FIONREAD, F_GETPIPE_SZ, F_GETOWN_EX,
// F_GETSIG; copies closed at once), grouped by kcmp(KCMP_FILE), in the shape of show --json.
[[nodiscard]] nlohmann::json live_view(const nlohmann::json& expected);

}  // namespace zdtm_harness
