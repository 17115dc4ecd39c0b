// restore/open_file.hpp: the open-file layer of a restore, the same for every kind of file.
//
// An open file description has state of its own, apart from the object behind it (a pipe, a FIFO,
// an epoll instance, a socket): status flags (O_NONBLOCK, O_DIRECT, O_ASYNC), the signal owner
// (F_SETOWN_EX, set under the recorded uid/euid) and the signal (F_SETSIG); the fd slot adds
// FD_CLOEXEC. Each kind of file makes its object and its open files in its own file
// (restore/pipe.*, restore/fifo.*, ...); this layer then sets that state, in the order every kind
// follows: flags, owner and signal once the file is made (apply_file_state); O_ASYNC last, at the
// fd's final number (set_async: SIGIO's si_fd is the number O_ASYNC was set through). FD_CLOEXEC is
// set where an fd is installed (dup3() in this process, the agent in a target).
#pragma once

#include <string>
#include <vector>

#include "pipecr/error.hpp"
#include "pipecr/image.hpp"
#include "sys/unique_fd.hpp"

namespace pipecr::restore {

// Status flags (O_NONBLOCK, O_DIRECT; not O_ASYNC), signal owner (with its uid/euid where the
// caller may switch to them) and F_SETSIG of file, applied to fd. O_ASYNC is cleared, or with
// keep_async left as it is (a file restored in place: see restore/inplace.hpp).
[[nodiscard]] Expected<void> set_file_state(int fd, const FileRecord& file, bool keep_async = false);

// set_file_state(), where an owner that cannot be set is a line in `notes` (the file is restored
// without an owner), not a failure.
[[nodiscard]] Expected<void> apply_file_state(int fd, const FileRecord& file, std::vector<std::string>& notes);

// Sets O_ASYNC on fd if file has it. Call once fd is at its final number.
[[nodiscard]] Expected<void> set_async(int fd, const FileRecord& file);

// A new open file description of the object behind fd (/proc/self/fd/N opened again), with access
// mode `mode` (O_RDONLY, O_WRONLY, O_RDWR), O_NONBLOCK and O_CLOEXEC: a file of its own, with its own
// flags, on the same pipe or FIFO.
[[nodiscard]] Expected<sys::UniqueFd> reopen(int fd, int mode);

}  // namespace pipecr::restore
