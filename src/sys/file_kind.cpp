// file_kind.cpp: see file_kind.hpp.
#include "sys/file_kind.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

#include <fmt/format.h>

namespace pipecr::sys {

const char* file_kind_name(FileKind k) {
  switch (k) {
    case FileKind::pipe: return "pipe";
    case FileKind::fifo: return "fifo";
    case FileKind::epoll: return "epoll";
    case FileKind::unix_socket: return "unix socket";
    case FileKind::other: return "other";
  }
  return "other";
}

dev_t pipefs_dev() {
  static const dev_t dev = [] {
    int fds[2];
    struct stat st {};
    if (::pipe2(fds, O_CLOEXEC) < 0) return dev_t(0);
    bool ok = ::fstat(fds[0], &st) == 0;
    ::close(fds[0]);
    ::close(fds[1]);
    return ok ? st.st_dev : dev_t(0);
  }();
  return dev;
}

namespace {

// An anonymous inode has no file type bits; its kind is in its /proc link, "anon_inode:[eventpoll]".
bool is_epoll(int fd) {
  char path[32];
  *fmt::format_to_n(path, sizeof path - 1, "/proc/self/fd/{}", fd).out = '\0';
  char link[64];
  ssize_t n = ::readlink(path, link, sizeof link);
  static constexpr char kEpoll[] = "anon_inode:[eventpoll]";
  return n == static_cast<ssize_t>(sizeof kEpoll - 1) && std::memcmp(link, kEpoll, sizeof kEpoll - 1) == 0;
}

}  // namespace

FileKind classify(int fd, const struct stat& st) {
  switch (st.st_mode & S_IFMT) {
    case S_IFIFO: return st.st_dev == pipefs_dev() ? FileKind::pipe : FileKind::fifo;
    case S_IFSOCK: {
      int domain = 0;
      socklen_t len = sizeof domain;
      if (::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0 && domain == AF_UNIX) return FileKind::unix_socket;
      return FileKind::other;
    }
    case 0: return is_epoll(fd) ? FileKind::epoll : FileKind::other;
    default: return FileKind::other;
  }
}

FileKind classify(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) < 0) return FileKind::other;
  return classify(fd, st);
}

}  // namespace pipecr::sys
