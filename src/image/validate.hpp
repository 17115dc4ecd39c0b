// validate.hpp: the semantic check of a parsed image against what a restore on THIS machine will do.
//
// parse() (reader.cpp) checks the format: framing, checksums, limits, references. An image that
// passes it is still untrusted input: it may have been written on a machine with 64 KiB pages, be
// crafted, or name things restore must not touch. validate() is the one place that decides whether
// a restore here can rebuild the image exactly; every restore path (the C and C++ in-process API,
// `pipecr restore`, and `pipecr show` where it says whether an image restores here) calls it after
// parse() and before anything is created, opened or stopped. Whatever passes it restores exactly or
// fails for a reason of the machine (a capacity above pipe-max-size, a target gone...), never
// because of a record; whatever fails it is Errc::bad_image (exit 65, -EBADMSG) with one sentence
// naming the record and the rule.
//
// The rules (docs/image-format.md, "What restore accepts"):
//   - every slot length is in 1..page size of this machine, whatever INFO says (a pipe_buffer is
//     one page here: a longer slot cannot be rebuilt);
//   - capacity is what F_SETPIPE_SZ gives back when asked for it: a power of two, at least one page
//     of this machine, at most 2^31 (the kernel's limit), and it holds the slots (one page each);
//   - the queued bytes are exactly the sum of the slot lengths;
//   - a FIFO's path is absolute, has no NUL byte, no "." or ".." component and fits PATH_MAX;
//     a pipe has no path; the mode has no bits beyond 0777 (no setuid/setgid/sticky FIFO);
//   - ids are unique and non-zero, every file names a pipe, every fd a file and a recorded
//     process (or pid 0, the caller), no (pid, fd) twice, fd numbers and owner pids not negative,
//     access modes O_RDONLY/O_WRONLY/O_RDWR only.
#pragma once

#include <cstdint>

#include "pipecr/error.hpp"
#include "pipecr/image.hpp"

namespace pipecr::image {

// The largest capacity F_SETPIPE_SZ accepts (fs/pipe.c round_pipe_size(): above 2^31 is EINVAL).
inline constexpr uint64_t kMaxPipeCapacity = uint64_t{1} << 31;

// The page size of this machine (sysconf(_SC_PAGESIZE)), the unit of a pipe_buffer here.
[[nodiscard]] uint32_t host_page_size();

// Errc::bad_image naming the first rule broken, or nothing. page_size 0 means host_page_size().
[[nodiscard]] Expected<void> validate(const Image& img, uint32_t page_size = 0);

}  // namespace pipecr::image
