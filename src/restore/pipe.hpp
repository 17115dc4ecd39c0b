// restore/pipe.hpp: rebuilding one pipe from its record.
//
// The order matters and is the same for every caller (the in-process API and restores into
// other processes): set the capacity first (shrinking a pipe below its used slots is EBUSY),
// refill slot by slot, set the inode owner, then each end's status flags, owner and signal, and
// O_ASYNC last of all, once the fd stands at its final number (SIGIO's si_fd is the fd number at
// the moment O_ASYNC is set).
#pragma once

#include <cstdint>
#include <span>

#include "pipecr/error.hpp"
#include "pipecr/image.hpp"
#include "restore/open_file.hpp"  // the per-file state every kind shares
#include "sys/unique_fd.hpp"

namespace pipecr::restore {

struct RefillOptions {
  bool allow_smaller_capacity = false;  // see pipecr::RestoreOptions
  bool no_vmsplice = false;             // refill with splice(memfd) or write() only
};

// Set the capacity of the (empty) pipe behind fd to the recorded one. Errc::capacity, naming the size
// and the sysctl, when the kernel refuses it; with allow_smaller_capacity the largest capacity that
// can be set is taken instead, as long as it holds every recorded slot.
[[nodiscard]] Expected<uint32_t> set_capacity(int fd, const PipeRecord& pipe, const RefillOptions& opts);

// Refill the empty pipe behind write_fd with pipe.slots / pipe.data so that a reader and a writer see
// what they saw before:
//   - a packet slot is a write() through the write end with O_DIRECT set;
//   - a run of full-page stream slots is one write() (a full page cannot take a merge);
//   - every other stream slot but the last is a buffer of exactly its length that does not merge
//     later writes: vmsplice() of a fresh page (or, where vmsplice is refused, splice() from a memfd);
//   - a last stream slot is a write(), which leaves it mergeable at page offset 0, as a pipe filled
//     by write() has it; unless two stream slots in a row after the head fit in one page together,
//     which write() never leaves (docs/design.md section 3): the pipe was filled by vmsplice() or
//     splice(), and its last slot is rebuilt unmergeable too.
// Slot lengths are checked against the page size of this machine first (Errc::bad_image): no
// record makes refill write past a page.
// Where neither vmsplice nor splice can be used, stream slots are written with write(); the bytes and
// packet boundaries stay exact (a packet that would merge into a preceding stream slot is refused).
// write_fd's status flags are changed during refill: the caller sets the final ones afterwards.
[[nodiscard]] Expected<void> refill(int write_fd, const PipeRecord& pipe, const RefillOptions& opts);

// set_capacity() then refill(): the buffer of a new, empty pipe or FIFO, through fd.
[[nodiscard]] Expected<void> fill(int fd, const PipeRecord& pipe, const RefillOptions& opts);

// fchown/fchmod the pipe inode behind fd to the recorded owner and mode, where they differ.
[[nodiscard]] Expected<void> set_inode_owner(int fd, const PipeRecord& pipe);

}  // namespace pipecr::restore
