// size_arg.hpp: command-line arguments shared by `pipecr resize` and the views: PID:FD targets and
// sizes with binary suffixes.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

#include "pipecr/error.hpp"
#include "sys/unique_fd.hpp"

namespace pipecr::cli {

struct PidFd {
  pid_t pid = 0;
  int fd = -1;
};

// "1234:5" -> {1234, 5}; anything else is Errc::invalid_argument naming the text.
[[nodiscard]] Expected<PidFd> parse_pid_fd(const std::string& s);

// Our copy of the target's fd (pidfd_open + pidfd_getfd: the same open file description, nothing
// changes in the target), with errors worded for the user (no such process, not an open fd, gone).
[[nodiscard]] Expected<sys::UniqueFd> grab_pid_fd(const PidFd& t);

// "65536", "64k", "64K", "64KiB", "1m", "1M", "1MiB", "1g": bytes, suffixes binary (1k = 1024);
// "kB"-style decimal-looking suffixes are refused rather than guessed.
// Errc::invalid_argument for anything else, and for values past 2^63.
[[nodiscard]] Expected<uint64_t> parse_size(const std::string& s);

}  // namespace pipecr::cli
