// restore/in_flight.hpp: ends in flight in unix sockets (record IN_FLIGHT), as the restore sees them.
//
// An end in flight is in no fd table, so a restore never installs or replaces it: it stays the
// open file it is, on the pipe it is on. Refilled in place (inplace.hpp), that is the restored
// pipe, and the end works when its receiver takes it. Replaced, it is the old pipe, which the
// targets no longer hold: the restore says so, per end, rather than cut the link in silence.
// An end in flight also counts as a holder of its pipe for the in-place rule ("every holder is a
// target"): the socket's process must be one of this restore's --into targets.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_set>
#include <vector>

#include "pipecr/image.hpp"

namespace pipecr::restore {

struct Plan;

// Why pipe_id cannot be refilled in place because of an end in flight: one held by a recorded
// process that is not among `restored` (recorded pids of the --into targets). "" when none.
[[nodiscard]] std::string in_flight_outside(const Image& img, uint64_t pipe_id,
                                            const std::unordered_set<int32_t>& restored);

// One note per end in flight on a pipe the plan replaces or leaves out.
[[nodiscard]] std::vector<std::string> in_flight_notes(const Plan& plan);

}  // namespace pipecr::restore
