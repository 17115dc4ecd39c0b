// dump/open_file.hpp: the open-file layer of a dump, the same for every kind of file.
//
// What an open file description holds apart from its object (a pipe, an epoll instance, a socket):
// access mode and status flags, signal owner and signal. Each kind reads its object in its own file
// (dump/pipe.*, ...) and this state here; FD_CLOEXEC, a property of the fd slot, comes from fdinfo
// (dump/process.cpp). restore/open_file.hpp sets it back.
#pragma once

#include "pipecr/error.hpp"
#include "pipecr/image.hpp"

namespace pipecr::dump {

// The state of the open file description behind fd: access mode and status flags, signal owner
// (F_GETOWN_EX, F_GETOWNER_UIDS where the kernel has it) and signal (F_GETSIG). id and pipe_id are
// left 0 for the caller to fill in.
// with_flags=false skips F_GETFL (for callers that read the flags from /proc/PID/fdinfo already).
[[nodiscard]] Expected<FileRecord> file_state(int fd, bool with_flags = true);

}  // namespace pipecr::dump
