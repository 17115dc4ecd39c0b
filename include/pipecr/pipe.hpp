// pipecr/pipe.hpp: checkpoint and restore one pipe held by the calling process (C++ API).
//
// checkpoint_pipe() reads a pipe's queued bytes without consuming them (tee() into a scratch pipe),
// learns its slot layout and packet boundaries, and records the end behind the fd. restore_pipe()
// makes a new pipe that nothing can tell from the original: same capacity, bytes, slots, packets,
// flags, owner and signal, installed at the fd numbers asked for. Both leave the caller's fds as
// they were when they fail.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "pipecr/error.hpp"
#include "pipecr/export.h"
#include "pipecr/image.hpp"

namespace pipecr {

// Checkpoint the pipe or FIFO behind fd into a self-contained image (one pipe, one file, one fd).
[[nodiscard]] PIPECR_API Expected<std::vector<std::byte>> checkpoint_pipe(int fd);

struct RestoreOptions {
  // When the recorded capacity cannot be set here (above pipe-max-size without CAP_SYS_RESOURCE),
  // accept the largest capacity that can be set, as long as it still holds the queued data.
  bool allow_smaller_capacity = false;
  // Refill without vmsplice() (as under a seccomp profile that blocks it): write() only.
  bool no_vmsplice = false;
};

struct RestoredPipe {
  int read_fd = -1;
  int write_fd = -1;
};

// Restore the single pipe in image. want_read/want_write: the fd numbers to use (whatever is open
// there is replaced), or -1 for any free number. On failure no fd of the caller is changed.
[[nodiscard]] PIPECR_API Expected<RestoredPipe> restore_pipe(std::span<const std::byte> image, int want_read = -1,
                                                  int want_write = -1, const RestoreOptions& opts = {});

}  // namespace pipecr
