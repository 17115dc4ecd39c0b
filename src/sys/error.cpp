// error.cpp: errno -> Errc, and the C API's choice of errno for each kind.
#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "pipecr/error.hpp"

namespace pipecr {

Error errno_error(int err, std::string what) {
  Errc kind = Errc::system;
  switch (err) {
    case ESRCH: kind = Errc::gone; break;
    case EPERM:
    case EACCES: kind = Errc::permission; break;
    case ENOENT: kind = Errc::not_found; break;
    default: break;
  }
  return Error{kind, err, fmt::format("{}: {}", what, std::strerror(err))};
}

int Error::negative_errno() const {
  switch (kind) {
    case Errc::bad_image: return -EBADMSG;
    case Errc::image_version: return -EPROTONOSUPPORT;
    case Errc::invalid_argument: return -EINVAL;
    case Errc::no_space: return -ENOSPC;
    case Errc::unsupported: return err ? -err : -ENOTSUP;
    case Errc::capacity: return -EPERM;
    case Errc::gone: return -ESRCH;
    default: return err ? -err : -EIO;
  }
}

}  // namespace pipecr
