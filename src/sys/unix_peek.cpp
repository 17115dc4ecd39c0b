// unix_peek.cpp: see unix_peek.hpp.
#include "sys/unix_peek.hpp"

#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include <fmt/format.h>

#include "sys/proc.hpp"
#include "sys/syscalls.hpp"

#ifndef SCM_PIDFD
#define SCM_PIDFD 0x04
#endif
#ifndef SIOCINQ
#define SIOCINQ FIONREAD
#endif

namespace pipecr::sys {
namespace {

// SCM_MAX_FD (253) fds, credentials, a pidfd (SO_PASSPIDFD) and a security label fit.
constexpr size_t kControl = 4096;
// A queue is bounded by the socket's buffer; this bounds the walk if it is not.
constexpr uint32_t kMaxSteps = 1u << 20;

int sockopt_int(int sock, int opt, const char* name, Error* err) {
  int v = 0;
  socklen_t len = sizeof v;
  if (::getsockopt(sock, SOL_SOCKET, opt, &v, &len) < 0)
    *err = call_error("getsockopt", fmt::format("fd={}, {}", sock, name));
  return v;
}

// SO_PEEK_OFF set to 0 for the walk and back to its value after.
class PeekOffset {
 public:
  explicit PeekOffset(int sock) : sock_(sock) {}
  Expected<void> begin() {
    Error err;
    old_ = sockopt_int(sock_, SO_PEEK_OFF, "SO_PEEK_OFF", &err);
    if (err.err) return tl::unexpected(err);
    return set(0);
  }
  Expected<void> set(int v) {
    if (::setsockopt(sock_, SOL_SOCKET, SO_PEEK_OFF, &v, sizeof v) < 0)
      return tl::unexpected(call_error("setsockopt", fmt::format("fd={}, SO_PEEK_OFF, {}", sock_, v)));
    armed_ = true;
    return {};
  }
  Expected<void> end() {
    if (!armed_) return {};
    armed_ = false;
    if (::setsockopt(sock_, SOL_SOCKET, SO_PEEK_OFF, &old_, sizeof old_) < 0)
      return tl::unexpected(call_error("setsockopt", fmt::format("fd={}, SO_PEEK_OFF, {}", sock_, old_)));
    return {};
  }
  ~PeekOffset() {
    if (armed_) ::setsockopt(sock_, SOL_SOCKET, SO_PEEK_OFF, &old_, sizeof old_);
  }
  PeekOffset(const PeekOffset&) = delete;
  PeekOffset& operator=(const PeekOffset&) = delete;

 private:
  int sock_;
  int old_ = -1;
  bool armed_ = false;
};

struct Step {
  ssize_t n = 0;          // bytes peeked; -1 with errno_ set: nothing there
  int errno_ = 0;
  std::vector<UniqueFd> fds;
  bool truncated = false;
};

// One recvmsg(MSG_PEEK) of up to buf.size() bytes, with files when `control`.
Step peek_once(int sock, std::vector<char>& buf, bool control, int extra_flags) {
  Step s;
  alignas(cmsghdr) char ctl[kControl];
  iovec iov{buf.data(), buf.size()};
  msghdr m{};
  m.msg_iov = buf.empty() ? nullptr : &iov;
  m.msg_iovlen = buf.empty() ? 0 : 1;
  m.msg_control = control ? ctl : nullptr;
  m.msg_controllen = control ? sizeof ctl : 0;
  for (;;) {
    s.n = ::recvmsg(sock, &m, MSG_PEEK | MSG_DONTWAIT | MSG_CMSG_CLOEXEC | extra_flags);
    if (s.n >= 0 || errno != EINTR) break;
  }
  if (s.n < 0) {
    s.errno_ = errno;
    return s;
  }
  if (!control) return s;
  s.truncated = (m.msg_flags & MSG_CTRUNC) != 0;
  for (cmsghdr* c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
    if (c->cmsg_level != SOL_SOCKET) continue;
    if (c->cmsg_type != SCM_RIGHTS && c->cmsg_type != SCM_PIDFD) continue;
    size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const unsigned char* p = CMSG_DATA(c);
    for (size_t i = 0; i < n; ++i) {
      int fd;
      std::memcpy(&fd, p + i * sizeof(int), sizeof fd);
      UniqueFd owned(fd);
      if (c->cmsg_type == SCM_RIGHTS) s.fds.push_back(std::move(owned));  // a pidfd is closed here
    }
  }
  return s;
}

bool end_of_queue(int e) { return e == EAGAIN || e == EWOULDBLOCK || e == EINVAL || e == ENOTCONN; }

Error step_error(int sock, int e) {
  errno = e;
  return call_error("recvmsg", fmt::format("fd={}, MSG_PEEK", sock));
}

Expected<void> walk_stream(int sock, PeekedQueue& q) {
  int queued = 0;
  if (::ioctl(sock, SIOCINQ, &queued) < 0) return tl::unexpected(call_error("ioctl", fmt::format("fd={}, SIOCINQ", sock)));
  if (queued <= 0) return {};
  // Larger than the queue: a peek ends at a message with files or at the end (unix_peek.hpp).
  std::vector<char> buf(static_cast<size_t>(queued) + 1);
  uint32_t with_files = 0;
  while (q.bytes < static_cast<uint64_t>(queued)) {
    if (q.messages >= kMaxSteps) {
      q.incomplete = fmt::format("stopped after {} messages", kMaxSteps);
      return {};
    }
    Step s = peek_once(sock, buf, true, 0);
    if (s.n < 0) {
      if (end_of_queue(s.errno_)) return {};
      return tl::unexpected(step_error(sock, s.errno_));
    }
    if (s.n == 0) return {};  // the peer shut down and the queue is empty
    ++q.messages;
    q.bytes += static_cast<uint64_t>(s.n);
    if (s.fds.empty() && !s.truncated) continue;
    PeekedMessage m{.index = with_files++, .end = q.bytes, .fds = std::move(s.fds), .truncated = s.truncated};
    q.with_files.push_back(std::move(m));
  }
  return {};
}

Expected<void> walk_datagrams(int sock, PeekedQueue& q) {
  std::vector<char> none;
  std::vector<char> buf;
  for (uint32_t index = 0;; ++index) {
    if (index >= kMaxSteps) {
      q.incomplete = fmt::format("stopped after {} messages", kMaxSteps);
      return {};
    }
    // Its length first (nothing copied, the offset does not move), then the whole datagram.
    Step len = peek_once(sock, none, false, MSG_TRUNC);
    if (len.n < 0) {
      if (end_of_queue(len.errno_)) return {};
      return tl::unexpected(step_error(sock, len.errno_));
    }
    buf.resize(static_cast<size_t>(len.n));
    Step s = peek_once(sock, buf, true, 0);
    if (s.n < 0) {
      if (end_of_queue(s.errno_)) return {};
      return tl::unexpected(step_error(sock, s.errno_));
    }
    q.bytes += static_cast<uint64_t>(s.n);
    if (s.n > 0 || !s.fds.empty()) ++q.messages;
    if (!s.fds.empty() || s.truncated)
      q.with_files.push_back(PeekedMessage{.index = index, .end = q.bytes, .fds = std::move(s.fds),
                                           .truncated = s.truncated});
    if (s.n == 0) {
      // A zero-length datagram (or the end of a shut-down seqpacket queue): a peek offset cannot
      // step past it. Only a datagram that carried files is known to be one.
      if (!q.with_files.empty() && q.with_files.back().index == index)
        q.incomplete = fmt::format("message {} has no data: a peek cannot step past it", index);
      return {};
    }
  }
}

}  // namespace

std::string socket_tagging_groups(pid_t pid) {
  auto text = read_proc_file(fmt::format("/proc/{}/cgroup", pid), 1 << 16);
  if (!text) return "?";
  std::string out;
  for (size_t at = 0; at < text->size();) {
    size_t eol = text->find('\n', at);
    if (eol == std::string::npos) eol = text->size();
    std::string_view line(text->data() + at, eol - at);
    if (line.find("net_cls") != std::string_view::npos || line.find("net_prio") != std::string_view::npos)
      out.append(line).push_back('\n');
    at = eol + 1;
  }
  return out;
}

Expected<PeekedQueue> peek_unix_queue(int sock) {
  PeekedQueue q;
  Error err;
  q.type = sockopt_int(sock, SO_TYPE, "SO_TYPE", &err);
  if (err.err) return tl::unexpected(err);
  q.listening = sockopt_int(sock, SO_ACCEPTCONN, "SO_ACCEPTCONN", &err) != 0;
  if (err.err) return tl::unexpected(err);
  if (q.listening) return q;
  PeekOffset off(sock);
  if (auto r = off.begin(); !r) return tl::unexpected(r.error());
  Expected<void> walked = q.type == SOCK_STREAM ? walk_stream(sock, q) : walk_datagrams(sock, q);
  Expected<void> put_back = off.end();
  if (!walked) return tl::unexpected(walked.error());
  if (!put_back) return tl::unexpected(put_back.error());
  return q;
}

}  // namespace pipecr::sys
