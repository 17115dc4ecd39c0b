// size_arg.cpp: see size_arg.hpp.
#include "cli/size_arg.hpp"

#include <cctype>
#include <charconv>

#include <fmt/format.h>

#include "sys/syscalls.hpp"

namespace pipecr::cli {

Expected<PidFd> parse_pid_fd(const std::string& s) {
  PidFd t;
  size_t colon = s.find(':');
  auto bad = [&] { return fail(Errc::invalid_argument, EINVAL, fmt::format("'{}' is not PID:FD", s)); };
  if (colon == std::string::npos) return bad();
  const char* b = s.data();
  auto r1 = std::from_chars(b, b + colon, t.pid);
  auto r2 = std::from_chars(b + colon + 1, b + s.size(), t.fd);
  if (r1.ec != std::errc() || r1.ptr != b + colon || r2.ec != std::errc() || r2.ptr != b + s.size() ||
      t.pid <= 0 || t.fd < 0)
    return bad();
  return t;
}

Expected<sys::UniqueFd> grab_pid_fd(const PidFd& t) {
  auto pidfd = sys::pidfd_open(t.pid);
  if (!pidfd) {
    Error e = pidfd.error();
    if (e.err == ESRCH) {
      e.kind = Errc::gone;
      e.what = fmt::format("process {} does not exist", t.pid);
    }
    return tl::unexpected(e);
  }
  auto fd = sys::pidfd_getfd(pidfd->get(), t.fd, t.pid);
  if (!fd && fd.error().err == EBADF)
    return fail(Errc::invalid_argument, EBADF, fmt::format("{}:{} is not an open fd", t.pid, t.fd));
  if (!fd && fd.error().err == ESRCH) return fail(Errc::gone, ESRCH, fmt::format("process {} exited", t.pid));
  return fd;
}

Expected<uint64_t> parse_size(const std::string& s) {
  auto bad = [&] {
    return fail(Errc::invalid_argument, EINVAL, fmt::format("'{}' is not a size (bytes, or with a suffix: 64k, 1M)", s));
  };
  uint64_t n = 0;
  const char* b = s.data();
  const char* e = b + s.size();
  auto r = std::from_chars(b, e, n);
  if (r.ec != std::errc() || r.ptr == b) return bad();
  std::string suffix(r.ptr, e);
  for (char& c : suffix) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  int shift = 0;
  if (suffix.empty() || suffix == "b") shift = 0;
  else if (suffix == "k" || suffix == "kib") shift = 10;
  else if (suffix == "m" || suffix == "mib") shift = 20;
  else if (suffix == "g" || suffix == "gib") shift = 30;
  else return bad();
  if (shift && n > (UINT64_MAX >> 1) >> shift) return bad();
  return n << shift;
}

}  // namespace pipecr::cli
