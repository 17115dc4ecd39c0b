// file_kind.hpp: what kind of file an fd is, decided in one place.
//
// Every part of pipecr that meets an fd it did not make (the dump's probe of a target's fd table,
// `ls`, the restore's check of what a target holds now) asks here, and hands the fd to the code of
// that kind: pipes and FIFOs (src/dump/pipe.*, src/restore/pipe.*), epoll instances and unix sockets
// (their own files). A kind costs what telling it apart costs: an fstat() the caller has made
// already decides pipes, FIFOs and "other"; an anonymous inode needs its /proc link (every
// anon_inode file shares one inode, so stat cannot tell an epoll from an eventfd); a socket needs
// one getsockopt(SO_DOMAIN).
#pragma once

#include <sys/stat.h>
#include <sys/types.h>

#include <cstdint>

namespace pipecr::sys {

enum class FileKind : uint8_t {
  pipe,         // an anonymous pipe (pipefs)
  fifo,         // a named pipe on some filesystem
  epoll,        // anon_inode:[eventpoll]
  unix_socket,  // AF_UNIX, any type
  other,        // everything pipecr does not checkpoint
};

[[nodiscard]] const char* file_kind_name(FileKind k);

// The kind of fd, an fd of this process (one of ours, or a pidfd_getfd() copy of a target's),
// whose fstat() the caller has made. Never fails: what cannot be told is `other`.
[[nodiscard]] FileKind classify(int fd, const struct stat& st);
// Same, with the fstat() made here.
[[nodiscard]] FileKind classify(int fd);

// The device of pipefs (every anonymous pipe's st_dev), found once; 0 if no pipe could be made.
[[nodiscard]] dev_t pipefs_dev();

}  // namespace pipecr::sys
