#include "sys/syscalls.hpp"

#include <fcntl.h>
#include <linux/capability.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>

#include <fmt/format.h>

#ifndef KCMP_FILE
#define KCMP_FILE 0
#endif
#ifndef KCMP_FILES
#define KCMP_FILES 2
#endif

namespace pipecr::sys {

Error call_error(const char* call, const std::string& args) {
  return errno_error(errno, fmt::format("{}({})", call, args));
}

Expected<PipePair> make_pipe(int flags) {
  int fds[2];
  if (::pipe2(fds, flags) < 0) return tl::unexpected(call_error("pipe2", fmt::format("flags={:#o}", flags)));
  return PipePair{UniqueFd(fds[0]), UniqueFd(fds[1])};
}

Expected<int> get_pipe_size(int fd) {
  int r = ::fcntl(fd, F_GETPIPE_SZ);
  if (r < 0) return tl::unexpected(call_error("fcntl", fmt::format("fd={}, F_GETPIPE_SZ", fd)));
  return r;
}

Expected<int> set_pipe_size(int fd, int size) {
  int r = ::fcntl(fd, F_SETPIPE_SZ, size);
  if (r < 0) return tl::unexpected(call_error("fcntl", fmt::format("fd={}, F_SETPIPE_SZ, {}", fd, size)));
  return r;
}

Expected<int> bytes_queued(int fd) {
  int n = 0;
  if (::ioctl(fd, FIONREAD, &n) < 0) return tl::unexpected(call_error("ioctl", fmt::format("fd={}, FIONREAD", fd)));
  return n;
}

Expected<int> get_fl(int fd) {
  int r = ::fcntl(fd, F_GETFL);
  if (r < 0) return tl::unexpected(call_error("fcntl", fmt::format("fd={}, F_GETFL", fd)));
  return r;
}

Expected<void> set_fl(int fd, int flags) {
  if (::fcntl(fd, F_SETFL, flags) < 0)
    return tl::unexpected(call_error("fcntl", fmt::format("fd={}, F_SETFL, {:#o}", fd, flags)));
  return {};
}

Expected<int> get_fd_flags(int fd) {
  int r = ::fcntl(fd, F_GETFD);
  if (r < 0) return tl::unexpected(call_error("fcntl", fmt::format("fd={}, F_GETFD", fd)));
  return r;
}

Expected<size_t> tee_nb(int in, int out, size_t len) {
  for (;;) {
    ssize_t r = ::tee(in, out, len, SPLICE_F_NONBLOCK);
    if (r >= 0) return static_cast<size_t>(r);
    if (errno == EINTR) continue;
    return tl::unexpected(call_error("tee", fmt::format("in={}, out={}, len={}", in, out, len)));
  }
}

Expected<size_t> splice_nb(int in, int out, size_t len) {
  for (;;) {
    ssize_t r = ::splice(in, nullptr, out, nullptr, len, SPLICE_F_NONBLOCK);
    if (r >= 0) return static_cast<size_t>(r);
    if (errno == EINTR) continue;
    return tl::unexpected(call_error("splice", fmt::format("in={}, out={}, len={}", in, out, len)));
  }
}

Expected<size_t> read_some(int fd, std::span<std::byte> buf) {
  for (;;) {
    ssize_t r = ::read(fd, buf.data(), buf.size());
    if (r >= 0) return static_cast<size_t>(r);
    if (errno == EINTR) continue;
    return tl::unexpected(call_error("read", fmt::format("fd={}, len={}", fd, buf.size())));
  }
}

Expected<void> write_all(int fd, std::span<const std::byte> buf, const char* what) {
  while (!buf.empty()) {
    ssize_t r = ::write(fd, buf.data(), buf.size());
    if (r < 0) {
      if (errno == EINTR) continue;
      return tl::unexpected(call_error(what, fmt::format("fd={}, len={}", fd, buf.size())));
    }
    buf = buf.subspan(static_cast<size_t>(r));
  }
  return {};
}

Expected<int> kcmp_file(pid_t pid1, int fd1, pid_t pid2, int fd2) {
  long r = ::syscall(SYS_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2);
  if (r < 0)
    return tl::unexpected(
        call_error("kcmp", fmt::format("pid1={}, pid2={}, KCMP_FILE, fd1={}, fd2={}", pid1, pid2, fd1, fd2)));
  return r == 0 ? 0 : (r == 1 ? -1 : 1);
}

Expected<int> kcmp_files(pid_t a, pid_t b) {
  long r = ::syscall(SYS_kcmp, a, b, KCMP_FILES, 0, 0);
  if (r < 0) {
    Error e = call_error("kcmp", fmt::format("pid1={}, pid2={}, KCMP_FILES", a, b));
    if (e.err == ESRCH) e.kind = Errc::gone;
    return tl::unexpected(e);
  }
  return r == 0 ? 0 : r == 1 ? -1 : 1;
}

Expected<void> write_remote(pid_t pid, uint64_t addr, const void* data, size_t len) {
  iovec local{const_cast<void*>(data), len};
  iovec remote{reinterpret_cast<void*>(addr), len};
  ssize_t n = ::process_vm_writev(pid, &local, 1, &remote, 1, 0);
  if (n != static_cast<ssize_t>(len))
    return fail_errno(n < 0 ? errno : EFAULT, fmt::format("process_vm_writev(pid={}, addr={:#x}, len={})", pid, addr, len));
  return {};
}

Expected<void> read_remote(pid_t pid, uint64_t addr, void* data, size_t len) {
  iovec local{data, len};
  iovec remote{reinterpret_cast<void*>(addr), len};
  ssize_t n = ::process_vm_readv(pid, &local, 1, &remote, 1, 0);
  if (n != static_cast<ssize_t>(len))
    return fail_errno(n < 0 ? errno : EFAULT, fmt::format("process_vm_readv(pid={}, addr={:#x}, len={})", pid, addr, len));
  return {};
}

Expected<UniqueFd> pidfd_open(pid_t pid) {
  long r = ::syscall(SYS_pidfd_open, pid, 0);
  // A thread that is not a leader (one with its own fd table): a pidfd of that thread (PIDFD_THREAD,
  // Linux 6.9+), so that pidfd_getfd() reads that thread's table.
  if (r < 0 && (errno == ENOENT || errno == EINVAL)) r = ::syscall(SYS_pidfd_open, pid, O_EXCL /* PIDFD_THREAD */);
  if (r < 0) return tl::unexpected(call_error("pidfd_open", fmt::format("pid={}", pid)));
  return UniqueFd(static_cast<int>(r));
}

Expected<UniqueFd> pidfd_getfd(int pidfd, int fd, pid_t pid_for_errors) {
  long r = ::syscall(SYS_pidfd_getfd, pidfd, fd, 0);
  if (r < 0) return tl::unexpected(call_error("pidfd_getfd", fmt::format("pid={}, fd={}", pid_for_errors, fd)));
  return UniqueFd(static_cast<int>(r));
}

CpuApart::CpuApart(int cpu) {
  if (cpu < 0 || cpu >= CPU_SETSIZE || ::sched_getaffinity(0, sizeof old_, &old_) != 0) return;
  if (!CPU_ISSET(cpu, &old_) || CPU_COUNT(&old_) < 2) return;
  cpu_set_t apart = old_;
  CPU_CLR(cpu, &apart);
  moved_ = ::sched_setaffinity(0, sizeof apart, &apart) == 0;
}

uint64_t effective_caps() {
  __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {};
  if (::syscall(SYS_capget, &hdr, data) != 0) return 0;
  return uint64_t{data[1].effective} << 32 | data[0].effective;
}

bool pipe_quota_exempt() {
  const uint64_t eff = effective_caps();
  return (eff >> CAP_SYS_RESOURCE & 1) || (eff >> CAP_SYS_ADMIN & 1);
}

CpuApart::~CpuApart() {
  if (moved_) (void)::sched_setaffinity(0, sizeof old_, &old_);
}

}  // namespace pipecr::sys
