// syscalls.hpp: thin wrappers over the system calls pipecr depends on.
//
// Each returns Expected<>; a failure carries the call, its arguments and errno, e.g.
// "tee(in=5, out=7, len=65536): Resource temporarily unavailable". Calls glibc lacks
// (kcmp, pidfd_open, pidfd_getfd) go through syscall(2).
#pragma once

#include <sched.h>
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "pipecr/error.hpp"
#include "sys/unique_fd.hpp"

namespace pipecr::sys {

struct PipePair {
  UniqueFd read;
  UniqueFd write;
};

[[nodiscard]] Expected<PipePair> make_pipe(int flags);
[[nodiscard]] Expected<int> get_pipe_size(int fd);
[[nodiscard]] Expected<int> set_pipe_size(int fd, int size);
[[nodiscard]] Expected<int> bytes_queued(int fd);  // FIONREAD
// This process's effective capabilities (capget: bit N is capability N; 0 when it cannot be read).
[[nodiscard]] uint64_t effective_caps();
// Whether this process's pipes are exempt from pipe-user-pages-soft and -hard (CAP_SYS_RESOURCE
// or CAP_SYS_ADMIN in effect: the kernel's pipe_is_unprivileged_user() is false).
[[nodiscard]] bool pipe_quota_exempt();
[[nodiscard]] Expected<int> get_fl(int fd);
[[nodiscard]] Expected<void> set_fl(int fd, int flags);
[[nodiscard]] Expected<int> get_fd_flags(int fd);  // F_GETFD

// tee/splice with SPLICE_F_NONBLOCK. A return of 0 means the source had nothing (and no writer).
[[nodiscard]] Expected<size_t> tee_nb(int in, int out, size_t len);
[[nodiscard]] Expected<size_t> splice_nb(int in, int out, size_t len);

// Read exactly up to buf.size() once (retrying EINTR); 0 at EOF.
[[nodiscard]] Expected<size_t> read_some(int fd, std::span<std::byte> buf);
// Write all of buf (retrying EINTR and short writes).
[[nodiscard]] Expected<void> write_all(int fd, std::span<const std::byte> buf, const char* what = "write");

// kcmp(KCMP_FILE): <0, 0, >0 like strcmp: orders open file descriptions across processes.
[[nodiscard]] Expected<int> kcmp_file(pid_t pid1, int fd1, pid_t pid2, int fd2);
// kcmp(KCMP_FILES): the same for the fd tables two threads (of any processes) use; Errc::gone when
// one of them does not exist.
[[nodiscard]] Expected<int> kcmp_files(pid_t a, pid_t b);
// len bytes at addr in pid's memory, written from data / read into data in one process_vm_writev /
// process_vm_readv; an error (EFAULT for a short one) names the call.
[[nodiscard]] Expected<void> write_remote(pid_t pid, uint64_t addr, const void* data, size_t len);
[[nodiscard]] Expected<void> read_remote(pid_t pid, uint64_t addr, void* data, size_t len);
[[nodiscard]] Expected<UniqueFd> pidfd_open(pid_t pid);
[[nodiscard]] Expected<UniqueFd> pidfd_getfd(int pidfd, int fd, pid_t pid_for_errors);

// While alive, the calling thread runs anywhere its affinity allows but on `cpu`, so that a thread
// it works with (an agent in a target, which pipecr may not pin) has that CPU to itself; the old
// affinity comes back at the end. A unix socket's wakeups are "sync": the woken thread is put on
// the waker's CPU, and two busy threads then share one CPU until the load balancer parts them
// (1-2 ms, measured). Does nothing when cpu < 0, when pipecr may run on `cpu` only, or when the
// kernel refuses (the work is then only slower).
class CpuApart {
 public:
  explicit CpuApart(int cpu);
  ~CpuApart();
  CpuApart(const CpuApart&) = delete;
  CpuApart& operator=(const CpuApart&) = delete;
  [[nodiscard]] bool moved() const { return moved_; }

 private:
  cpu_set_t old_{};
  bool moved_ = false;
};

// An errno from a call named `call` with printf-style arguments already formatted in `args`.
[[nodiscard]] Error call_error(const char* call, const std::string& args);

}  // namespace pipecr::sys
