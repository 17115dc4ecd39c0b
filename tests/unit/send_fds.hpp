// send_fds.hpp: a message with files attached (SCM_RIGHTS), for tests that put pipe ends in flight
// or hand files to a peer.
#pragma once

#include <sys/socket.h>

#include <cstring>
#include <string_view>
#include <vector>

namespace pipecr::testing {

// Sends `data` (at least one byte) with `fds` attached (SCM_RIGHTS, at most kMaxFds; none: a plain
// message) in one message on sock: whether all of it went.
inline bool send_fds(int sock, std::string_view data, const std::vector<int>& fds) {
  constexpr size_t kMaxFds = 16;
  if (data.empty() || fds.size() > kMaxFds) return false;
  iovec iov{const_cast<char*>(data.data()), data.size()};
  alignas(cmsghdr) char ctl[CMSG_SPACE(sizeof(int) * kMaxFds)] = {};
  msghdr m{};
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  if (!fds.empty()) {
    m.msg_control = ctl;
    m.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  return ::sendmsg(sock, &m, 0) == static_cast<ssize_t>(data.size());
}

}  // namespace pipecr::testing
