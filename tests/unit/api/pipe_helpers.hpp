// pipe_helpers.hpp: small tools for the engine tests, on real pipes.
#pragma once

#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <string>
#include <vector>

#include "dump/pipe.hpp"

namespace pipecr::testing {

inline std::string pattern(size_t n, unsigned seed = 1) {
  std::string s(n, '\0');
  uint32_t x = seed * 2654435761u + 1;
  for (auto& c : s) {
    x = x * 1103515245u + 12345u;
    c = static_cast<char>(x >> 24);
  }
  return s;
}

inline int queued(int fd) {
  int n = -1;
  ioctl(fd, FIONREAD, &n);
  return n;
}

// Reads everything queued (the pipe must have no blocking reader semantics: sets O_NONBLOCK).
inline std::string drain(int fd) {
  int fl = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, fl | O_NONBLOCK);
  std::string out;
  char buf[65536];
  for (;;) {
    ssize_t r = read(fd, buf, sizeof buf);
    if (r <= 0) break;
    out.append(buf, static_cast<size_t>(r));
  }
  fcntl(fd, F_SETFL, fl);
  return out;
}

// Each read() with a large buffer: a packet pipe returns one packet per read.
inline std::vector<size_t> read_sizes(int fd) {
  int fl = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, fl | O_NONBLOCK);
  std::vector<size_t> sizes;
  char buf[65536];
  for (;;) {
    ssize_t r = read(fd, buf, sizeof buf);
    if (r <= 0) break;
    sizes.push_back(static_cast<size_t>(r));
  }
  fcntl(fd, F_SETFL, fl);
  return sizes;
}

// How many one-byte write()s the pipe takes before EAGAIN (it is full afterwards).
inline size_t free_space_one_byte(int wfd) {
  int fl = fcntl(wfd, F_GETFL);
  fcntl(wfd, F_SETFL, (fl | O_NONBLOCK) & ~O_DIRECT);
  size_t n = 0;
  char c = 'x';
  while (write(wfd, &c, 1) == 1) ++n;
  fcntl(wfd, F_SETFL, fl);
  return n;
}

// The slot layout of a pipe, learned the way the engine learns it (without consuming).
inline std::vector<Slot> slots_of(int read_fd) {
  int cap = fcntl(read_fd, F_GETPIPE_SZ);
  auto snap = dump::snapshot(read_fd, static_cast<uint32_t>(cap));
  if (!snap) return {};
  auto l = dump::layout(*snap);
  return l ? *l : std::vector<Slot>{};
}

}  // namespace pipecr::testing
