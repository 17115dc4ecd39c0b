// exit_codes.hpp: the exit codes of `pipecr`, from sysexits.h, and the map from Errc to them.
#pragma once

#include "pipecr/error.hpp"

namespace pipecr::cli {

inline constexpr int kExitOk = 0;
inline constexpr int kExitUsage = 64;        // EX_USAGE: bad command line
inline constexpr int kExitBadImage = 65;     // EX_DATAERR: image corrupt or not supported
inline constexpr int kExitNoImage = 66;      // EX_NOINPUT: image not found
inline constexpr int kExitUnsupported = 69;  // EX_UNAVAILABLE: kernel or object not supported
inline constexpr int kExitSystem = 71;       // EX_OSERR: other system error
inline constexpr int kExitCantCreate = 73;   // EX_CANTCREAT: cannot create the output
inline constexpr int kExitGone = 75;         // EX_TEMPFAIL: a target process is gone
inline constexpr int kExitPermission = 77;   // EX_NOPERM: permission denied

[[nodiscard]] int exit_code_for(Errc kind);
[[nodiscard]] int exit_code_for(const Error& e);

// The table printed as the footer of `pipecr --help`.
[[nodiscard]] const char* exit_codes_help();

}  // namespace pipecr::cli
