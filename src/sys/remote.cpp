// remote.cpp: system calls run inside a stopped thread (the agent's bootstrap, remote.hpp).
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

Expected<std::unique_ptr<RemoteSyscalls>> RemoteSyscalls::create(StoppedProcess& process, pid_t tid, Insn insn,
                                                                 uint64_t vdso_hint) {
  const auto& t = process.threads();
  if (std::find(t.begin(), t.end(), tid) == t.end())
    return fail(Errc::invalid_argument, EINVAL,
                fmt::format("RemoteSyscalls(pid={}, tid={}): not a stopped thread of the process", process.pid(), tid));
  if (auto ok = process.may_run_code(tid); !ok) return tl::unexpected(ok.error());  // its seccomp filters
  std::unique_ptr<RemoteSyscalls> r(new RemoteSyscalls(process, tid));
  auto ok = r->prepare(insn, vdso_hint);
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

}  // namespace pipecr::sys
