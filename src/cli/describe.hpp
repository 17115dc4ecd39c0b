// describe.hpp: the human-readable names pipecr prints for the raw values of an image, shared by
// `show`, `dump --json` and any other command that presents open files.
//
// One place decides every name, so that the human output and the JSON document agree: access
// mode from O_ACCMODE, status flag names from an F_GETFL word, owner types (F_OWNER_*), signal
// numbers, blocked states, pipe kinds. The names are part of the JSON contract (docs/json.md):
// change them only together with that document.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "pipecr/image.hpp"

namespace pipecr::cli {

// "read", "write" or "readwrite" from the O_ACCMODE bits of flags (3, which the kernel keeps for
// ioctl-only opens and a pipe never has, reads as "readwrite").
[[nodiscard]] const char* access_name(uint32_t flags);

// The status flags of an F_GETFL word other than the access mode, as C names in a fixed order:
// O_NONBLOCK, O_DIRECT, O_ASYNC, O_LARGEFILE, O_APPEND, O_NOATIME, O_CLOEXEC, O_SYNC or O_DSYNC.
// Bits without a name are given together as one octal number ("0200000000") at the end, so that
// nothing is hidden. O_LARGEFILE is the kernel's bit (0100000): glibc defines it as 0 on 64-bit.
[[nodiscard]] std::vector<std::string> flag_names(uint32_t flags);

// "tid", "pid" or "pgrp" for F_OWNER_TID, F_OWNER_PID, F_OWNER_PGRP; "type N" otherwise.
[[nodiscard]] std::string owner_type_name(int32_t type);
// "thread", "process", "process group": the owner type in words, for people.
[[nodiscard]] std::string owner_type_words(int32_t type);
// The owner for people: "pid 123 (process), uid 1000, euid 1000", or "none" when owner.pid is 0.
[[nodiscard]] std::string describe_owner(const Owner& owner);

// The signal's name: "SIGIO", "SIGUSR1", "SIGRTMIN+3" (relative to the C library's SIGRTMIN, as
// `kill -l` counts them), "SIG32" for a number without a name; "" for 0 (F_SETSIG 0: the default,
// SIGIO without siginfo).
[[nodiscard]] std::string signal_name(int32_t sig);

// The bits of an epoll watch's events word as C names in a fixed order (EPOLLIN, EPOLLPRI,
// EPOLLOUT, EPOLLERR, EPOLLHUP, EPOLLRDNORM, EPOLLRDBAND, EPOLLWRNORM, EPOLLWRBAND, EPOLLMSG,
// EPOLLRDHUP, then the input flags EPOLLEXCLUSIVE, EPOLLWAKEUP, EPOLLONESHOT, EPOLLET); bits without
// a name as one hex number ("0x4000") at the end.
[[nodiscard]] std::vector<std::string> epoll_event_names(uint32_t events);

// "reading", "writing", or nullptr for Blocked::none.
[[nodiscard]] const char* blocked_name(Blocked b);
// "pipe" or "fifo".
[[nodiscard]] const char* kind_name(PipeKind k);
// "unknown", "seen_writer", "no_writer_yet".
[[nodiscard]] const char* fifo_reader_name(FifoReaderState s);

// A time as RFC 3339 in UTC to the second, "2025-01-31T12:34:56Z"; "" for 0 (unknown).
[[nodiscard]] std::string utc_time(uint64_t unix_ns);

// s with control characters, DEL and backslash written as \xNN (\\ for a backslash), so that a
// comm, an argument or a path from an image cannot move the cursor of the terminal printing it.
[[nodiscard]] std::string printable(std::string_view s);
// argv as a shell would read it back: words joined by spaces, a word with anything but
// [A-Za-z0-9_@%+=:,./-] in single quotes; control characters escaped as in printable().
[[nodiscard]] std::string command_line(const std::vector<std::string>& argv);

}  // namespace pipecr::cli
