// restore/fifo.hpp: the FIFO kind of a restore: what a named pipe needs besides what every pipe
// needs (restore/pipe.hpp: capacity, refill, inode owner) and every open file needs
// (restore/open_file.hpp): its path, opened in the mount namespace of the targets that hold it (or
// made again, for an unlinked FIFO or with --create-fifos), and an open order that keeps each
// reader's "seen a writer" state (FifoReaderState). Stage 2 (build.cpp) calls build_fifo() for
// every FIFO to be replaced; its files are installed like any other.
#pragma once

#include "pipecr/error.hpp"
#include "restore/plan.hpp"

namespace pipecr::restore {

// Builds the FIFO pp: refilled through one read-write open (kept in built.keep until every end is
// installed), each of its files opened in the order that keeps the readers' state, with its flags,
// owner and signal. A FIFO a target holds (PipeChoice::target_holds) is not refilled here: its
// content and capacity are staged for the stop (stage_replaced_fifo(), into built.in_place).
// Errors: Errc::not_found (a missing path without --create-fifos), Errc::unsupported (not a FIFO, a
// symbolic link, already holding data, targets in different mount namespaces, bytes to refill into
// a FIFO a target holds while a reader has not seen a writer), and those of the pipe steps.
[[nodiscard]] Expected<void> build_fifo(const Plan& plan, const PlannedPipe& pp, const ProcessRestoreOptions& opts,
                                        Built& built);

}  // namespace pipecr::restore
