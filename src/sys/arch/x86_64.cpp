// arch/x86_64.cpp: see x86_64.hpp.
#include "sys/arch/x86_64.hpp"

#include <elf.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include <fmt/format.h>

namespace pipecr::sys::arch {

void Regs::set_syscall(long nr, const std::array<unsigned long, 6>& a, uint64_t insn) {
  raw.rax = static_cast<unsigned long>(nr);
  raw.rdi = a[0];
  raw.rsi = a[1];
  raw.rdx = a[2];
  raw.r10 = a[3];
  raw.r8 = a[4];
  raw.r9 = a[5];
  raw.rip = insn;
  clear_syscall_nr();
}

void Regs::set_call(uint64_t entry, uint64_t sp, uint64_t arg0) {
  raw.rip = entry;
  raw.rsp = sp;
  raw.rdi = arg0;
  raw.rax = 0;
  clear_syscall_nr();
}

Expected<Regs> get_regs(pid_t tid) {
  Regs r;
  if (::ptrace(PTRACE_GETREGS, tid, nullptr, &r.raw) < 0)
    return fail_errno(errno, fmt::format("ptrace(PTRACE_GETREGS, tid={})", tid));
  return r;
}

Expected<void> set_regs(pid_t tid, const Regs& r) {
  if (::ptrace(PTRACE_SETREGS, tid, nullptr, &r.raw) < 0)
    return fail_errno(errno, fmt::format("ptrace(PTRACE_SETREGS, tid={})", tid));
  return {};
}

bool is_restart_code(long v) {
  return v == kErestartSys || v == kErestartNoIntr || v == kErestartNoHand || v == kErestartRestartBlock;
}

bool restart_on_eintr(long nr) {
  return nr == SYS_epoll_wait || nr == SYS_epoll_pwait || nr == SYS_epoll_pwait2 || nr == SYS_rt_sigtimedwait;
}

PipeIoArgs pipe_io_args(long nr) {
  switch (nr) {
    case SYS_read: return {0, -1, "read"};
    case SYS_pread64: return {0, -1, "pread64"};
    case SYS_readv: return {0, -1, "readv"};
    case SYS_preadv: return {0, -1, "preadv"};
    case SYS_preadv2: return {0, -1, "preadv2"};
    case SYS_write: return {-1, 0, "write"};
    case SYS_pwrite64: return {-1, 0, "pwrite64"};
    case SYS_writev: return {-1, 0, "writev"};
    case SYS_pwritev: return {-1, 0, "pwritev"};
    case SYS_pwritev2: return {-1, 0, "pwritev2"};
    case SYS_sendfile: return {-1, 0, "sendfile"};
    case SYS_splice: return {0, 2, "splice"};
    case SYS_tee: return {0, 1, "tee"};
    case SYS_vmsplice: return {0, 0, "vmsplice"};
    default: return {};
  }
}

Regs as_restarted(const Regs& r, bool restart_eintr) {
  Regs out = r;
  const long nr = r.syscall_nr();
  if (nr < 0) return out;
  const long ret = r.ret();
  if (ret == kErestartSys || ret == kErestartNoIntr || ret == kErestartNoHand ||
      (restart_eintr && ret == -EINTR && restart_on_eintr(nr))) {
    out.set_ret(nr);
  } else if (ret == kErestartRestartBlock) {
    out.set_ret(SYS_restart_syscall);
  } else {
    return out;
  }
  out.set_ip(r.ip() - kSyscallInsnLen);
  out.clear_syscall_nr();
  return out;
}

std::array<uint64_t, kReturnWords> return_block(const Regs& r) {
  const user_regs_struct& g = r.raw;
  return {g.r15, g.r14, g.r13, g.r12, g.r11, g.r10, g.r9, g.r8, g.rdi,
          g.rsi, g.rbp, g.rbx, g.rdx, g.rcx, g.rax, g.eflags, g.rip};
}

Regs as_resumed_by_sigreturn(const Regs& r, bool restart_eintr) {
  if (r.syscall_nr() >= 0 && r.ret() == kErestartRestartBlock) {
    Regs out = r;
    out.set_ret(r.syscall_nr());
    out.set_ip(r.ip() - kSyscallInsnLen);
    out.clear_syscall_nr();
    return out;
  }
  return as_restarted(r, restart_eintr);
}

namespace {

// The kernel's software bytes at offset 464 of the legacy area (struct _fpx_sw_bytes) and its magic
// words (arch/x86/include/uapi/asm/sigcontext.h).
constexpr uint32_t kFpXstateMagic1 = 0x46505853;
constexpr uint32_t kFpXstateMagic2 = 0x46505845;
constexpr size_t kSwBytesOffset = 464;
constexpr size_t kLegacySize = 512;
constexpr size_t kXsaveHeaderSize = 64;

template <typename T>
void put(std::vector<unsigned char>& b, size_t off, T v) {
  std::memcpy(b.data() + off, &v, sizeof v);
}
template <typename T>
T get(const std::vector<unsigned char>& b, size_t off) {
  T v;
  std::memcpy(&v, b.data() + off, sizeof v);
  return v;
}

// struct rt_sigframe (arch/x86/include/asm/sigframe.h): pretcode, ucontext, siginfo.
constexpr size_t kUcOffset = 8;                    // struct ucontext
constexpr size_t kUcFlags = kUcOffset + 0;
constexpr size_t kUcStackFlags = kUcOffset + 24;   // uc_stack.ss_flags
constexpr size_t kMcontext = kUcOffset + 40;       // struct sigcontext
constexpr size_t kUcSigmask = kUcOffset + 296;
constexpr size_t kFrameSize = 8 + 304 + 128;
constexpr uint64_t kUcFpXstate = 1, kUcSigcontextSs = 2, kUcStrictRestoreSs = 4;

}  // namespace

bool frame_return_allowed(pid_t pid, pid_t tid) {
  std::FILE* f = std::fopen(fmt::format("/proc/{}/task/{}/status", pid, tid).c_str(), "re");
  if (!f) return false;
  char line[512];
  bool ok = true;
  while (std::fgets(line, sizeof line, f))
    if (std::strncmp(line, "x86_Thread_features:", 20) == 0 && std::strstr(line, "shstk")) ok = false;
  std::fclose(f);
  return ok;
}

Expected<std::vector<unsigned char>> fpu_state(pid_t tid) {
  std::vector<unsigned char> buf(64 * 1024);
  iovec io{buf.data(), buf.size()};
  if (::ptrace(PTRACE_GETREGSET, tid, reinterpret_cast<void*>(NT_X86_XSTATE), &io) == 0 &&
      io.iov_len >= kLegacySize + kXsaveHeaderSize) {
    buf.resize(io.iov_len);
    const uint32_t size = static_cast<uint32_t>(io.iov_len);
    if (get<uint32_t>(buf, kSwBytesOffset) != kFpXstateMagic1) {  // older kernels: fill them in
      put<uint32_t>(buf, kSwBytesOffset, kFpXstateMagic1);
      put<uint32_t>(buf, kSwBytesOffset + 4, size + 4);                           // extended_size
      put<uint64_t>(buf, kSwBytesOffset + 8, get<uint64_t>(buf, kLegacySize));   // xfeatures
      put<uint32_t>(buf, kSwBytesOffset + 16, size);                              // xstate_size
    }
    const uint32_t xstate_size = get<uint32_t>(buf, kSwBytesOffset + 16);
    if (xstate_size < kLegacySize + kXsaveHeaderSize || xstate_size > size)
      return fail(Errc::system, EINVAL,
                  fmt::format("ptrace(PTRACE_GETREGSET, tid={}, NT_X86_XSTATE): xstate_size {} of {} bytes", tid,
                              xstate_size, size));
    buf.resize(xstate_size + 4);
    put<uint32_t>(buf, xstate_size, kFpXstateMagic2);
    return buf;
  }
  buf.assign(kLegacySize, 0);
  io = {buf.data(), buf.size()};
  if (::ptrace(PTRACE_GETREGSET, tid, reinterpret_cast<void*>(NT_PRFPREG), &io) < 0)
    return fail_errno(errno, fmt::format("ptrace(PTRACE_GETREGSET, tid={}, NT_PRFPREG)", tid));
  put<uint32_t>(buf, kSwBytesOffset, 0);  // no magic: the kernel restores the legacy area only
  return buf;
}

SigFrame build_sigframe(const Regs& back, uint64_t mask, std::span<const unsigned char> fpu, uint64_t restorer) {
  const uint64_t top = back.sp() - kRedZone;
  const uint64_t fp = (top - fpu.size()) & ~uint64_t{63};  // XRSTOR needs 64-byte alignment
  const uint64_t frame = ((fp - kFrameSize) & ~uint64_t{15}) - 8;  // as the kernel aligns it for a handler
  SigFrame f;
  f.frame = frame;
  f.bytes.assign(fp + fpu.size() - frame, 0);
  auto& b = f.bytes;
  put<uint64_t>(b, 0, restorer);
  put<uint64_t>(b, kUcFlags, (fpu.empty() ? 0 : kUcFpXstate) | kUcSigcontextSs | kUcStrictRestoreSs);
  put<int32_t>(b, kUcStackFlags, 3);  // neither SS_ONSTACK, SS_DISABLE nor 0: sigaltstack untouched
  const user_regs_struct& g = back.raw;
  const uint64_t words[] = {g.r8, g.r9, g.r10, g.r11, g.r12, g.r13, g.r14, g.r15, g.rdi,
                            g.rsi, g.rbp, g.rbx, g.rdx, g.rax, g.rcx, g.rsp, g.rip, g.eflags};
  for (size_t i = 0; i < std::size(words); ++i) put<uint64_t>(b, kMcontext + i * 8, words[i]);
  put<uint16_t>(b, kMcontext + 144, static_cast<uint16_t>(g.cs));
  put<uint16_t>(b, kMcontext + 150, static_cast<uint16_t>(g.ss));
  put<uint64_t>(b, kMcontext + 184, fpu.empty() ? 0 : fp);  // fpstate (none: rt_sigreturn resets the FPU)
  put<uint64_t>(b, kUcSigmask, mask);
  if (!fpu.empty()) std::memcpy(b.data() + (fp - frame), fpu.data(), fpu.size());
  return f;
}

}  // namespace pipecr::sys::arch
