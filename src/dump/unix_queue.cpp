// dump/unix_queue.cpp: see unix_queue.hpp.
#include "dump/unix_queue.hpp"

#include <unordered_set>

#include <fmt/format.h>

#include "sys/unix_peek.hpp"

namespace pipecr::dump {

Expected<QueueScan> scan_unix_queues(std::span<const HeldSocket> sockets) {
  QueueScan out;
  std::unordered_set<uint64_t> seen;
  for (size_t i = 0; i < sockets.size(); ++i) {
    const HeldSocket& s = sockets[i];
    if (!seen.insert(s.ino).second) continue;
    auto q = sys::peek_unix_queue(s.copy.get());
    if (!q) {
      Error e = q.error();
      e.what = fmt::format("process {} unix socket fd {}: {}", s.pid, s.fd, e.what);
      return tl::unexpected(e);
    }
    if (q->listening) continue;
    ++out.sockets;
    out.messages += q->messages;
    if (!q->incomplete.empty())
      out.notes.push_back(fmt::format("process {} socket fd {}: queue read in part ({})", s.pid, s.fd, q->incomplete));
    for (sys::PeekedMessage& m : q->with_files) {
      if (m.truncated)
        out.notes.push_back(fmt::format("process {} socket fd {} message {}: some files in flight could not be taken "
                                        "(MSG_CTRUNC: pipecr's fd limit)",
                                        s.pid, s.fd, m.index));
      for (size_t k = 0; k < m.fds.size(); ++k) {
        InFlightEnd e;
        if (::fstat(m.fds[k].get(), &e.st) < 0) continue;
        e.kind = sys::classify(m.fds[k].get(), e.st);
        if (e.kind != sys::FileKind::pipe && e.kind != sys::FileKind::fifo) {
          ++out.other_files;
          continue;
        }
        e.socket = i;
        e.msg = m.index;
        e.slot = static_cast<uint32_t>(k);
        e.end = m.end;
        e.copy = std::move(m.fds[k]);
        out.ends.push_back(std::move(e));
      }
    }
  }
  return out;
}

}  // namespace pipecr::dump
