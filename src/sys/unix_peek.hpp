// unix_peek.hpp: the receive queue of a unix socket, read without consuming it.
//
// A file sent with SCM_RIGHTS and not yet received is in no fd table: it sits in the receiving
// socket's queue. recvmsg(MSG_PEEK) hands the caller copies of the files of the message it
// peeks (the very open file descriptions: the kernel dups the references, net/unix/af_unix.c
// unix_peek_fds), and leaves the message queued. SO_PEEK_OFF makes successive peeks step through
// the queue instead of returning its head again. Facts from af_unix.c this relies on:
//   - datagram and seqpacket (unix_dgram_recvmsg): a peek reads one datagram from the peek offset
//     and moves the offset by the bytes copied, not by the datagram: a short buffer would make the
//     next peek return the rest of the same datagram, and its files again. So each datagram is
//     first measured (MSG_PEEK|MSG_TRUNC with no buffer returns its length and copies nothing),
//     then peeked whole. A zero-length datagram is never skipped by a peek offset (the queue
//     walk skips only datagrams shorter than the offset that have a length): the walk stops there.
//   - stream (unix_stream_read_generic): a peek glues data from successive messages and stops
//     after the first message that carries files; the offset moves by the bytes copied. With a
//     buffer larger than the whole queue (SIOCINQ) each peek therefore ends exactly at a message
//     with files, or at the end of the queue.
// The socket's own SO_PEEK_OFF (the target may use MSG_PEEK itself) is put back as it was.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "pipecr/error.hpp"
#include "sys/unique_fd.hpp"

namespace pipecr::sys {

// One queued message that carries files.
struct PeekedMessage {
  uint32_t index = 0;   // datagram/seqpacket: the datagram's position (0 = received next); stream:
                        // its position among the messages that carry files
  uint64_t end = 0;     // bytes a receiver takes up to and including this message's data
  std::vector<UniqueFd> fds;  // SCM_RIGHTS, in the sender's order; close-on-exec here
  bool truncated = false;     // MSG_CTRUNC: some of its files could not be taken (fd limit)
};

struct PeekedQueue {
  int type = 0;              // SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET
  bool listening = false;    // a listening socket queues connections, not messages: not examined
  uint32_t messages = 0;     // messages (stream: peek steps) stepped over
  uint64_t bytes = 0;        // data bytes stepped over
  std::vector<PeekedMessage> with_files;
  std::string incomplete;    // why the walk stopped before the end of the queue ("" = it did not)
};

// Walks the receive queue of the unix socket `sock` (an fd of this process, e.g. a pidfd_getfd()
// copy of a target's socket). The queue must not be read meanwhile (the targets are stopped).
// Errors: Errc::system naming the call (SO_PEEK_OFF, recvmsg). The peek offset is restored in
// every case.
[[nodiscard]] Expected<PeekedQueue> peek_unix_queue(int sock);

// The cgroup v1 net_cls and net_prio lines of /proc/PID/cgroup ("?" when unreadable). Taking a
// socket with pidfd_getfd() or receiving one with SCM_RIGHTS re-tags it with the taker's class id
// and priority index (net/core/sock.c __receive_sock): harmless only where the taker's lines equal
// the holder's (always, without those v1 controllers).
[[nodiscard]] std::string socket_tagging_groups(pid_t pid);

}  // namespace pipecr::sys
