// pipecr/error.hpp: how every fallible pipecr call reports failure.
//
// A call returns Expected<T>: the value, or an Error that says what failed (the call and its
// arguments, e.g. "pidfd_getfd(pid=123, fd=4)"), the errno behind it, and a kind that a caller
// (the CLI, the C API) maps to its own codes. The library never prints and never exits.
#pragma once

#include <string>
#include <utility>

#include <tl/expected.hpp>

#include "pipecr/export.h"

namespace pipecr {

// What went wrong, in the terms a caller acts on. Each kind maps to one CLI exit code and one
// C API errno (see docs and src/cli/exit_codes.hpp).
enum class Errc {
  system,           // a system call failed for another reason (EX_OSERR 71)
  bad_image,        // the image is corrupt or truncated (EX_DATAERR 65, -EBADMSG)
  image_version,    // the image needs a format version or record this build does not know (65, -EPROTONOSUPPORT)
  unsupported,      // the kernel or the object is not supported: not a pipe, notification pipe (EX_UNAVAILABLE 69)
  capacity,         // a pipe capacity this kernel will not allow without privilege (69)
  gone,             // a target process does not exist or exited (EX_TEMPFAIL 75)
  permission,       // not allowed: ptrace refused, EPERM/EACCES (EX_NOPERM 77)
  invalid_argument, // the caller passed something meaningless (EX_USAGE 64, -EINVAL)
  no_space,         // the caller's buffer is too small (-ENOSPC)
  not_found,        // a file the caller named does not exist (EX_NOINPUT 66)
  cannot_create,    // an output file cannot be created (EX_CANTCREAT 73)
};

struct Error {
  Errc kind = Errc::system;
  int err = 0;        // the errno behind it, 0 when none
  std::string what;   // one line: "<call>(<args>): <reason>" or a plain sentence

  // A negative errno for C callers, chosen by kind where the kind says more than err.
  [[nodiscard]] PIPECR_API int negative_errno() const;
};

template <class T>
using Expected = tl::expected<T, Error>;

[[nodiscard]] inline tl::unexpected<Error> fail(Errc kind, int err, std::string what) {
  return tl::unexpected<Error>(Error{kind, err, std::move(what)});
}

// The errno of a failed call becomes the kind a caller acts on: ESRCH -> gone, EPERM/EACCES ->
// permission, ENOENT -> not_found, others -> system. `what` names the call and its arguments;
// the errno's text is appended.
[[nodiscard]] PIPECR_API Error errno_error(int err, std::string what);
[[nodiscard]] inline tl::unexpected<Error> fail_errno(int err, std::string what) {
  return tl::unexpected<Error>(errno_error(err, std::move(what)));
}

}  // namespace pipecr
