// remote.cpp: system calls run inside a stopped thread, and fd injection over SCM_RIGHTS.
//
// The injection, step by step (see remote.hpp for why each step is so):
//   1. check every target fd is below the target's RLIMIT_NOFILE: nothing is changed before that;
//   2. target: socketpair(AF_UNIX, SOCK_STREAM|SOCK_CLOEXEC) -> a, b; tool: pidfd_getfd(a); target:
//      close(a);
//   3. per batch of <= 253 fds: tool sendmsg(1 byte + SCM_RIGHTS); target recvmsg(b) into the
//      scratch page (MSG_CMSG_CLOEXEC), then dup3(temp, target_fd, O_CLOEXEC or 0), close(temp);
//   4. target: close(b).
// Temporaries land on the lowest free numbers, which may be target numbers still to be filled: such
// a temporary is first moved above the largest target number (F_DUPFD_CLOEXEC), else a dup3 would
// replace it.
#include "sys/remote.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <cstdio>
#include <fstream>
#include <optional>
#include <string>

#include <fmt/format.h>

#include "sys/syscalls.hpp"

namespace pipecr::sys {
namespace {

constexpr size_t kMaxFdsPerMessage = 253;  // SCM_MAX_FD

bool is_errno_result(long v) { return v < 0 && v >= -4095; }

Expected<long> peek(pid_t pid, pid_t tid, uint64_t addr) {
  errno = 0;
  long w = ::ptrace(PTRACE_PEEKDATA, tid, reinterpret_cast<void*>(addr), nullptr);
  if (errno != 0) return fail_errno(errno, fmt::format("ptrace(PTRACE_PEEKDATA, pid={}, tid={}, addr={:#x})", pid, tid, addr));
  return w;
}

Expected<void> poke(pid_t pid, pid_t tid, uint64_t addr, long word) {
  if (::ptrace(PTRACE_POKEDATA, tid, reinterpret_cast<void*>(addr), reinterpret_cast<void*>(word)) < 0)
    return fail_errno(errno, fmt::format("ptrace(PTRACE_POKEDATA, pid={}, tid={}, addr={:#x})", pid, tid, addr));
  return {};
}

}  // namespace

// ---------------------------------------------------------------- RemoteSyscalls

Expected<RemoteSyscalls> RemoteSyscalls::attach(StoppedProcess& process, pid_t tid, Insn insn, uint64_t vdso_hint) {
  const auto& t = process.threads();
  if (std::find(t.begin(), t.end(), tid) == t.end())
    return fail(Errc::invalid_argument, EINVAL,
                fmt::format("RemoteSyscalls(pid={}, tid={}): not a stopped thread of the process", process.pid(), tid));
  RemoteSyscalls r(process, tid);

  auto ok = r.prepare(insn, vdso_hint);
  if (!ok) return tl::unexpected(ok.error());
  return r;
}

uint64_t vdso_syscall_address(pid_t pid) {
  std::ifstream maps(fmt::format("/proc/{}/maps", pid));
  std::string line;
  while (std::getline(maps, line)) {
    if (line.find("[vdso]") == std::string::npos) continue;
    unsigned long lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx", &lo, &hi) != 2 || hi <= lo || hi - lo > (1ul << 20)) return 0;
    std::vector<unsigned char> bytes(hi - lo);
    iovec local{bytes.data(), bytes.size()};
    iovec remote{reinterpret_cast<void*>(lo), bytes.size()};
    if (::process_vm_readv(pid, &local, 1, &remote, 1, 0) != static_cast<ssize_t>(bytes.size())) return 0;
    auto at = std::search(bytes.begin(), bytes.end(), arch::kSyscallInsn.begin(), arch::kSyscallInsn.end());
    return at == bytes.end() ? 0 : lo + static_cast<uint64_t>(at - bytes.begin());
  }
  return 0;
}

// Finds or makes the syscall instruction: one in the [vdso] (nothing written), else the one a thread
// stopped on a syscall's way out just ran (its ip is just past it), else two patched bytes at ip.
Expected<void> RemoteSyscalls::prepare(Insn insn, uint64_t vdso_hint) {
  auto regs = process_->regs(tid_);
  if (!regs) return tl::unexpected(regs.error());
  saved_ = *regs;
  const pid_t pid = pid_;
  const uint64_t ip = saved_.ip();
  if (insn == Insn::vdso_first && vdso_hint) {
    unsigned char at[2] = {};
    iovec local{at, sizeof at};
    iovec remote{reinterpret_cast<void*>(vdso_hint), sizeof at};
    if (::process_vm_readv(pid, &local, 1, &remote, 1, 0) == 2 && at[0] == arch::kSyscallInsn[0] &&
        at[1] == arch::kSyscallInsn[1]) {
      insn_addr_ = vdso_hint;
      done_ = false;
      return {};
    }
  }
  if (uint64_t v = insn == Insn::vdso_first ? vdso_syscall_address(pid) : 0) {
    insn_addr_ = v;
    done_ = false;
    return {};
  }
  const unsigned long insn_word = arch::kSyscallInsn[0] | (static_cast<unsigned long>(arch::kSyscallInsn[1]) << 8);
  if (saved_.syscall_nr() >= 0 && ip >= arch::kSyscallInsnLen) {
    auto w = peek(pid, tid_, ip - arch::kSyscallInsnLen);
    if (w && (static_cast<unsigned long>(*w) & 0xffff) == insn_word) {
      insn_addr_ = ip - arch::kSyscallInsnLen;
      done_ = false;
      return {};
    }
  }
  // Write the instruction over the two bytes at ip. The word is read at ip, or ending at ip+2 when
  // ip is near the end of its mapping.
  uint64_t word_addr = ip;
  auto w = peek(pid, tid_, word_addr);
  if (!w) {
    word_addr = ip - 6;
    w = peek(pid, tid_, word_addr);
    if (!w) return tl::unexpected(w.error());
  }
  unsigned shift = static_cast<unsigned>(ip - word_addr) * 8;
  unsigned long patched = (static_cast<unsigned long>(*w) & ~(0xffffUL << shift)) | (insn_word << shift);
  auto ok = poke(pid, tid_, word_addr, static_cast<long>(patched));
  if (!ok) return ok;
  patched_ = true;
  patched_word_addr_ = word_addr;
  original_word_ = *w;
  insn_addr_ = ip;
  done_ = false;
  return {};
}

RemoteSyscalls::RemoteSyscalls(RemoteSyscalls&& o) noexcept
    : pid_(o.pid_),
      tid_(o.tid_),
      saved_(o.saved_),
      insn_addr_(o.insn_addr_),
      patched_(o.patched_),
      patched_word_addr_(o.patched_word_addr_),
      original_word_(o.original_word_),
      scratch_(o.scratch_),
      ran_(o.ran_),
      done_(o.done_) {
  o.done_ = true;
  o.scratch_ = 0;
  StoppedProcess* p = o.process_;
  o.unlink();
  link(p);
}

RemoteSyscalls::~RemoteSyscalls() {
  (void)restore();
  unlink();
}

Expected<long> RemoteSyscalls::call(long nr, unsigned long a1, unsigned long a2, unsigned long a3, unsigned long a4,
                                    unsigned long a5, unsigned long a6) {
  if (done_ || !process_)
    return fail(Errc::invalid_argument, EINVAL, fmt::format("remote syscall {} in pid {}: restored or detached already", nr, pid_));
  Regs regs = saved_;
  regs.set_syscall(nr, {a1, a2, a3, a4, a5, a6}, insn_addr_);  // no restart logic on our registers
  auto ok = process_->set_regs(tid_, regs);
  if (!ok) return tl::unexpected(ok.error());
  ran_ = true;
  ok = process_->run_syscall(tid_, nr);
  if (!ok) return tl::unexpected(ok.error());
  auto after = process_->regs(tid_);
  if (!after) return tl::unexpected(after.error());
  return after->ret();
}

Expected<long> RemoteSyscalls::call_checked(const char* what, long nr, unsigned long a1, unsigned long a2,
                                            unsigned long a3, unsigned long a4, unsigned long a5, unsigned long a6) {
  auto r = call(nr, a1, a2, a3, a4, a5, a6);
  if (r && is_errno_result(*r)) return fail_errno(static_cast<int>(-*r), fmt::format("{} in pid {}", what, pid()));
  return r;
}

Expected<void> RemoteSyscalls::restore() {
  if (done_ || !process_) return {};
  std::optional<Error> error;
  if (scratch_) {
    auto ok = munmap(scratch_, kScratchSize);
    if (!ok) error = ok.error();
    scratch_ = 0;
  }
  done_ = true;
  const pid_t pid = pid_;
  if (patched_) {
    auto ok = poke(pid, tid_, patched_word_addr_, original_word_);
    if (!ok && !error) error = ok.error();
  }
  if (ran_) {
    auto ok = process_->set_regs(tid_, saved_);
    if (ok) ok = process_->repark(tid_);
    if (!ok && !error) error = ok.error();
  }
  if (error) return tl::unexpected(*error);
  return {};
}

Expected<void> RemoteSyscalls::release() {
  if (done_ || !process_) return {};
  done_ = true;
  unlink();
  if (patched_) return poke(pid_, tid_, patched_word_addr_, original_word_);
  return {};
}

// ---------------------------------------------------------------- memory

Expected<void> RemoteSyscalls::write_memory(uint64_t addr, std::span<const std::byte> data) {
  if (data.empty()) return {};
  iovec local{const_cast<std::byte*>(data.data()), data.size()};
  iovec remote{reinterpret_cast<void*>(addr), data.size()};
  if (::process_vm_writev(pid(), &local, 1, &remote, 1, 0) == static_cast<ssize_t>(data.size())) return {};
  // Fallback (no process_vm_writev, or a read-only page): word by word, merging partial words.
  for (size_t off = 0; off < data.size(); off += sizeof(long)) {
    size_t n = std::min(sizeof(long), data.size() - off);
    long word = 0;
    if (n < sizeof(long)) {
      auto w = peek(pid(), tid_, addr + off);
      if (!w) return tl::unexpected(w.error());
      word = *w;
    }
    std::memcpy(&word, data.data() + off, n);
    auto ok = poke(pid(), tid_, addr + off, word);
    if (!ok) return ok;
  }
  return {};
}

Expected<void> RemoteSyscalls::read_memory(uint64_t addr, std::span<std::byte> out) {
  if (out.empty()) return {};
  iovec local{out.data(), out.size()};
  iovec remote{reinterpret_cast<void*>(addr), out.size()};
  if (::process_vm_readv(pid(), &local, 1, &remote, 1, 0) == static_cast<ssize_t>(out.size())) return {};
  for (size_t off = 0; off < out.size(); off += sizeof(long)) {
    auto w = peek(pid(), tid_, addr + off);
    if (!w) return tl::unexpected(w.error());
    long word = *w;
    std::memcpy(out.data() + off, &word, std::min(sizeof(long), out.size() - off));
  }
  return {};
}

Expected<uint64_t> RemoteSyscalls::mmap_anon(size_t len) {
  auto r = call_checked("mmap(NULL, len, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS)", SYS_mmap, 0, len,
                        PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, static_cast<unsigned long>(-1L), 0);
  if (!r) return tl::unexpected(r.error());
  return static_cast<uint64_t>(*r);
}

Expected<void> RemoteSyscalls::munmap(uint64_t addr, size_t len) {
  auto r = call_checked("munmap", SYS_munmap, addr, len);
  if (!r) return tl::unexpected(r.error());
  return {};
}

Expected<uint64_t> RemoteSyscalls::scratch_page() {
  if (scratch_) return scratch_;
  auto a = mmap_anon(kScratchSize);
  if (!a) return a;
  scratch_ = *a;
  return scratch_;
}

// ---------------------------------------------------------------- fd helpers

Expected<long> remote_fcntl(RemoteSyscalls& r, int fd, int cmd, long arg) {
  return r.call(SYS_fcntl, static_cast<unsigned long>(fd), static_cast<unsigned long>(cmd), static_cast<unsigned long>(arg));
}

Expected<uint64_t> remote_nofile_limit(RemoteSyscalls& r) {
  rlimit lim{};
  if (::prlimit(r.pid(), RLIMIT_NOFILE, nullptr, &lim) == 0) return static_cast<uint64_t>(lim.rlim_cur);
  if (errno != EPERM)
    return fail_errno(errno, fmt::format("prlimit(pid={}, RLIMIT_NOFILE)", r.pid()));
  // Another uid and no CAP_SYS_RESOURCE: ask from inside.
  auto page = r.scratch_page();
  if (!page) return tl::unexpected(page.error());
  auto ok = r.call_checked("prlimit64(0, RLIMIT_NOFILE, NULL, scratch)", SYS_prlimit64, 0, RLIMIT_NOFILE, 0, *page);
  if (!ok) return tl::unexpected(ok.error());
  auto rd = r.read_memory(*page, std::as_writable_bytes(std::span(&lim, 1)));
  if (!rd) return tl::unexpected(rd.error());
  return static_cast<uint64_t>(lim.rlim_cur);
}

namespace {

// fds open in the target that we must close: closed (errors ignored) when this goes away.
class RemoteTemps {
 public:
  explicit RemoteTemps(RemoteSyscalls& r) : r_(r) {}
  ~RemoteTemps() { close_all(); }
  RemoteTemps(const RemoteTemps&) = delete;
  RemoteTemps& operator=(const RemoteTemps&) = delete;
  std::vector<int>& fds() { return fds_; }
  void close_all() {
    for (int fd : fds_) (void)r_.call(SYS_close, static_cast<unsigned long>(fd));
    fds_.clear();
  }

 private:
  RemoteSyscalls& r_;
  std::vector<int> fds_;
};

Expected<int> remote_close(RemoteSyscalls& r, int fd) {
  auto res = r.call_checked("close", SYS_close, static_cast<unsigned long>(fd));
  if (!res) return tl::unexpected(res.error());
  return 0;
}

// Moves each temporary that sits on a target number above `highest` (sorted_targets is sorted).
Expected<void> move_off_targets(RemoteSyscalls& r, std::vector<int>& temps, const std::vector<int>& sorted_targets) {
  const int highest = sorted_targets.back();
  for (int& fd : temps) {
    if (!std::binary_search(sorted_targets.begin(), sorted_targets.end(), fd)) continue;
    auto moved = remote_fcntl(r, fd, F_DUPFD_CLOEXEC, highest + 1);
    if (!moved) return tl::unexpected(moved.error());
    if (is_errno_result(*moved))
      return fail_errno(static_cast<int>(-*moved), fmt::format("fcntl({}, F_DUPFD_CLOEXEC, {}) in pid {}", fd, highest + 1, r.pid()));
    int old = fd;
    fd = static_cast<int>(*moved);
    (void)r.call(SYS_close, static_cast<unsigned long>(old));
  }
  return {};
}

// Scratch page layout for recvmsg.
constexpr uint64_t kMsgOff = 0, kIovOff = 64, kDataOff = 96, kCtlOff = 128;
constexpr size_t kCtlSize = CMSG_SPACE(kMaxFdsPerMessage * sizeof(int));
static_assert(kCtlOff + kCtlSize <= RemoteSyscalls::kScratchSize);

Expected<void> send_batch(int sock, std::span<const FdInstall> batch) {
  alignas(cmsghdr) char ctl[kCtlSize] = {};
  char byte = 'F';
  iovec iov{&byte, 1};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = ctl;
  msg.msg_controllen = CMSG_SPACE(batch.size() * sizeof(int));
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(batch.size() * sizeof(int));
  for (size_t i = 0; i < batch.size(); ++i) std::memcpy(CMSG_DATA(c) + i * sizeof(int), &batch[i].source_fd, sizeof(int));
  for (;;) {
    if (::sendmsg(sock, &msg, MSG_NOSIGNAL) == 1) return {};
    if (errno != EINTR) return fail_errno(errno, fmt::format("sendmsg(SCM_RIGHTS, {} fds)", batch.size()));
  }
}

// recvmsg(sock) in the target; the fds received are appended to temps (so they are closed on error).
Expected<void> receive_batch(RemoteSyscalls& r, int sock, uint64_t page, size_t count, std::vector<int>& temps) {
  msghdr msg{};
  iovec iov{reinterpret_cast<void*>(page + kDataOff), 1};
  msg.msg_iov = reinterpret_cast<iovec*>(page + kIovOff);
  msg.msg_iovlen = 1;
  msg.msg_control = reinterpret_cast<void*>(page + kCtlOff);
  msg.msg_controllen = CMSG_SPACE(count * sizeof(int));
  auto ok = r.write_memory(page + kMsgOff, std::as_bytes(std::span(&msg, 1)));
  if (ok) ok = r.write_memory(page + kIovOff, std::as_bytes(std::span(&iov, 1)));
  if (!ok) return ok;
  auto n = r.call_checked("recvmsg(MSG_CMSG_CLOEXEC|MSG_DONTWAIT)", SYS_recvmsg, static_cast<unsigned long>(sock), page + kMsgOff,
                          MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
  if (!n) return tl::unexpected(n.error());
  alignas(cmsghdr) char ctl[kCtlSize] = {};
  ok = r.read_memory(page + kMsgOff, std::as_writable_bytes(std::span(&msg, 1)));
  if (ok) ok = r.read_memory(page + kCtlOff, std::as_writable_bytes(std::span(ctl, kCtlSize)));
  if (!ok) return ok;
  msg.msg_control = ctl;
  msg.msg_controllen = std::min<size_t>(msg.msg_controllen, kCtlSize);
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < k; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
      temps.push_back(fd);
    }
  }
  if ((msg.msg_flags & MSG_CTRUNC) || temps.size() != count)
    return fail(Errc::system, EMFILE,
                fmt::format("recvmsg(SCM_RIGHTS) in pid {}: {} of {} fds arrived (RLIMIT_NOFILE?)", r.pid(), temps.size(), count));
  return {};
}

Expected<void> check_install_args(std::span<const FdInstall> fds, std::vector<int>& sorted_targets) {
  for (const FdInstall& f : fds) {
    if (f.target_fd < 0 || ::fcntl(f.source_fd, F_GETFD) < 0)
      return fail(Errc::invalid_argument, EINVAL,
                  fmt::format("install_fds: bad pair source_fd={} target_fd={}", f.source_fd, f.target_fd));
    sorted_targets.push_back(f.target_fd);
  }
  std::sort(sorted_targets.begin(), sorted_targets.end());
  if (std::adjacent_find(sorted_targets.begin(), sorted_targets.end()) != sorted_targets.end())
    return fail(Errc::invalid_argument, EINVAL, "install_fds: a target fd is named twice");
  return {};
}

// Makes the socketpair in the target; returns the tool's copy of one end, and the target's other end
// in temps.
Expected<UniqueFd> open_channel(RemoteSyscalls& r, uint64_t page, const std::vector<int>& sorted_targets,
                                std::vector<int>& temps) {
  auto ok = r.call_checked("socketpair(AF_UNIX, SOCK_STREAM|SOCK_CLOEXEC)", SYS_socketpair, AF_UNIX,
                           SOCK_STREAM | SOCK_CLOEXEC, 0, page);
  if (!ok) return tl::unexpected(ok.error());
  int pair[2];
  auto rd = r.read_memory(page, std::as_writable_bytes(std::span(pair)));
  if (!rd) return tl::unexpected(rd.error());
  temps.push_back(pair[0]);
  temps.push_back(pair[1]);
  auto moved = move_off_targets(r, temps, sorted_targets);
  if (!moved) return tl::unexpected(moved.error());
  auto pidfd = pidfd_open(r.tid());  // the table of the thread driven (a thread may have its own)
  if (!pidfd) return tl::unexpected(pidfd.error());
  auto mine = pidfd_getfd(pidfd->get(), temps[0], r.pid());
  if (!mine) return tl::unexpected(mine.error());
  auto closed = remote_close(r, temps[0]);
  temps.erase(temps.begin());
  if (!closed) return tl::unexpected(closed.error());
  return mine;
}

}  // namespace

Expected<void> install_fds(RemoteSyscalls& r, std::span<const FdInstall> fds) {
  std::vector<int> targets;
  auto ok = check_install_args(fds, targets);
  if (!ok || fds.empty()) return ok;
  auto limit = remote_nofile_limit(r);
  if (!limit) return tl::unexpected(limit.error());
  if (static_cast<uint64_t>(targets.back()) >= *limit)
    return fail(Errc::system, EMFILE,
                fmt::format("install_fds(pid={}): fd {} is not below the process's RLIMIT_NOFILE ({})", r.pid(),
                            targets.back(), *limit));
  auto page = r.scratch_page();
  if (!page) return tl::unexpected(page.error());
  RemoteTemps channel(r);
  auto mine = open_channel(r, *page, targets, channel.fds());
  if (!mine) return tl::unexpected(mine.error());
  const int sock = channel.fds()[0];
  for (size_t at = 0; at < fds.size(); at += kMaxFdsPerMessage) {
    auto batch = fds.subspan(at, std::min(kMaxFdsPerMessage, fds.size() - at));
    RemoteTemps temps(r);
    ok = send_batch(mine->get(), batch);
    if (ok) ok = receive_batch(r, sock, *page, batch.size(), temps.fds());
    if (ok) ok = move_off_targets(r, temps.fds(), targets);
    if (!ok) return ok;
    for (size_t i = 0; i < batch.size(); ++i) {
      auto d = r.call_checked("dup3", SYS_dup3, static_cast<unsigned long>(temps.fds()[i]),
                              static_cast<unsigned long>(batch[i].target_fd), batch[i].cloexec ? O_CLOEXEC : 0);
      if (!d) return tl::unexpected(d.error());
    }
  }
  return {};
}

}  // namespace pipecr::sys
