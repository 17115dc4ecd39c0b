// sys/seccomp.cpp: reading a stopped thread's seccomp filters and running them over the calls
// pipecr would make there (seccomp.hpp).
#include "sys/seccomp.hpp"

#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "sys/arch.hpp"
#include "sys/proc.hpp"

#ifndef PTRACE_SECCOMP_GET_FILTER
#define PTRACE_SECCOMP_GET_FILTER 0x420c
#endif
#ifndef SECCOMP_RET_ACTION_FULL
#define SECCOMP_RET_ACTION_FULL 0xffff0000U
#endif
#ifndef SECCOMP_RET_LOG
#define SECCOMP_RET_LOG 0x7ffc0000U
#endif
#ifndef SECCOMP_RET_KILL_PROCESS
#define SECCOMP_RET_KILL_PROCESS 0x80000000U
#endif
#ifndef SECCOMP_RET_USER_NOTIF
#define SECCOMP_RET_USER_NOTIF 0x7fc00000U
#endif

namespace pipecr::sys {
namespace {

// The kernel's values (the agent is freestanding and spells them itself; so do we, for the ABI).
constexpr uint64_t kAfUnix = 1, kSockSeqpacket = 5, kSockCloexec = 02000000, kOCloexec = 02000000;
constexpr uint64_t kProtRw = 3, kProtRx = 5, kMapShared = 1, kMapPrivateAnon = 0x22, kMapFixedNoreplace = 0x100000;
constexpr uint64_t kMsgNosignal = 0x4000, kMsgDontwait = 0x40, kMsgCmsgCloexec = 0x40000000;
constexpr uint64_t kFDupfdCloexec = 1030, kFGetfd = 1, kFSetfd = 2, kFGetfl = 3, kFSetfl = 4;
constexpr uint64_t kFionread = 0x541B, kSiocoutq = 0x5411, kEpollCtlAdd = 1, kSpliceFNonblock = 2;
constexpr uint64_t kSigBlock = 0, kSigSetmask = 2, kPrSetVma = 0x53564d41, kRlimitNofile = 7;
constexpr uint64_t kAtFdcwd = static_cast<uint64_t>(-100), kSigsetSize = 8;
constexpr std::nullopt_t any = std::nullopt;

using A = std::optional<uint64_t>;
SyscallCase c(int nr, const char* name, A a0 = any, A a1 = any, A a2 = any, A a3 = any, A a4 = any, A a5 = any) {
  return SyscallCase{nr, {a0, a1, a2, a3, a4, a5}, name};
}

const std::vector<SyscallCase>& all_cases() {
  static const std::vector<SyscallCase> cases = {
      // The bootstrap (rt_sigframe and fallback), the remote syscalls, the return.
      c(SYS_mmap, "mmap", any, any, kProtRw, kMapPrivateAnon | kMapFixedNoreplace, static_cast<uint64_t>(-1), 0),
      c(SYS_mmap, "mmap", any, any, kProtRw, kMapPrivateAnon, static_cast<uint64_t>(-1), 0),
      c(SYS_mprotect, "mprotect", any, any, kProtRx),
      c(SYS_munmap, "munmap"),
      c(SYS_rt_sigreturn, "rt_sigreturn"),
      c(SYS_dup3, "dup3", any, any, 0),  // the fd table's pre-grow
      // The agent.
      c(SYS_rt_sigprocmask, "rt_sigprocmask", kSigBlock, any, 0, kSigsetSize),
      c(SYS_rt_sigprocmask, "rt_sigprocmask", kSigSetmask, any, 0, kSigsetSize),
      c(SYS_prctl, "prctl", kPrSetVma, 0 /* PR_SET_VMA_ANON_NAME */),
      c(SYS_socketpair, "socketpair", kAfUnix, kSockSeqpacket | kSockCloexec, 0),
      c(SYS_mmap, "mmap", 0, 4096, kProtRw, kMapShared, any, 0),  // the commit page
      c(SYS_sendmsg, "sendmsg", any, any, kMsgNosignal),
      c(SYS_sendmsg, "sendmsg", any, any, kMsgNosignal | kMsgDontwait),
      c(SYS_recvmsg, "recvmsg", any, any, kMsgCmsgCloexec),
      c(SYS_recvmsg, "recvmsg", any, any, kMsgDontwait | kMsgCmsgCloexec),
      c(SYS_recvmsg, "recvmsg", any, any, kMsgDontwait),
      c(SYS_ppoll, "ppoll", any, any, any, 0, kSigsetSize),
      c(SYS_fcntl, "fcntl", any, kFDupfdCloexec),
      c(SYS_fcntl, "fcntl", any, kFGetfd),
      c(SYS_fcntl, "fcntl", any, kFSetfd),
      c(SYS_fcntl, "fcntl", any, kFGetfl),
      c(SYS_fcntl, "fcntl", any, kFSetfl),
      c(SYS_dup3, "dup3", any, any, kOCloexec),
      c(SYS_close, "close"),
      c(SYS_close_range, "close_range", any, any, 0),
      c(SYS_epoll_ctl, "epoll_ctl", any, kEpollCtlAdd),
      c(SYS_ioctl, "ioctl", any, kFionread),
      c(SYS_ioctl, "ioctl", any, kSiocoutq),
      c(SYS_tee, "tee", any, any, uint64_t{1} << 30, kSpliceFNonblock),
      c(SYS_openat, "openat", kAtFdcwd, any, kOCloexec /* O_RDONLY | O_CLOEXEC */, 0),
      c(SYS_read, "read"),
      c(SYS_fstat, "fstat"),
      c(SYS_prlimit64, "prlimit64", 0, kRlimitNofile, 0),
      c(SYS_rt_sigpending, "rt_sigpending", any, kSigsetSize),
      c(SYS_rt_sigtimedwait, "rt_sigtimedwait", any, 0, any, kSigsetSize),
      c(SYS_getcpu, "getcpu", any, 0, 0),
      c(SYS_sched_yield, "sched_yield"),
  };
  return cases;
}

std::string action_text(uint32_t action) {
  switch (action & SECCOMP_RET_ACTION_FULL) {
    case SECCOMP_RET_KILL_PROCESS: return "kill the process";
    case SECCOMP_RET_KILL_THREAD: return "kill the thread";
    case SECCOMP_RET_TRAP: return "send it SIGSYS";
    case SECCOMP_RET_ERRNO: return fmt::format("fail it with errno {}", action & SECCOMP_RET_DATA);
    case SECCOMP_RET_USER_NOTIF: return "hand it to a supervisor";
    case SECCOMP_RET_TRACE: return "hand it to a tracer";
  }
  return fmt::format("answer {:#x}", action);
}

bool allowed(uint32_t action) {
  const uint32_t a = action & SECCOMP_RET_ACTION_FULL;
  return a == SECCOMP_RET_ALLOW || a == SECCOMP_RET_LOG;
}

// A 32-bit word of the seccomp_data a call gives (offsets as in <linux/seccomp.h>), if known.
std::optional<uint32_t> data_word(const SyscallCase& call, uint32_t arch, uint32_t off) {
  if (off == 0) return static_cast<uint32_t>(call.nr);
  if (off == 4) return arch;
  if (off < 16 || off >= 64 || off % 4 != 0) return std::nullopt;  // the instruction pointer, or malformed
  const auto& a = call.args[(off - 16) / 8];
  if (!a) return std::nullopt;
  return static_cast<uint32_t>(off % 8 == 0 ? *a : *a >> 32);
}

}  // namespace

std::span<const SyscallCase> injected_syscalls() { return all_cases(); }

// Classic BPF as seccomp accepts it (kernel/seccomp.c, seccomp_check_filter): loads of the data
// (absolute, 32-bit), of the length, of immediates and scratch memory; stores; ALU; jumps; returns.
// Every value carries whether it is known; a jump or return on an unknown one gives no verdict.
std::optional<uint32_t> seccomp_verdict(const SeccompProgram& prog, const SyscallCase& call, uint32_t arch) {
  struct Val {
    uint32_t v = 0;
    bool known = true;
  };
  Val a, x;
  Val mem[BPF_MEMWORDS];
  for (size_t pc = 0, steps = 0; pc < prog.size() && steps <= prog.size(); ++pc, ++steps) {
    const auto [code, jt, jf, k] = prog[pc];
    switch (BPF_CLASS(code)) {
      case BPF_LD:
      case BPF_LDX: {
        Val v;
        if (code == (BPF_LD | BPF_W | BPF_ABS)) {
          auto w = data_word(call, arch, k);
          v = w ? Val{*w, true} : Val{0, false};
        } else if (BPF_MODE(code) == BPF_LEN) {
          v = Val{64, true};  // sizeof(struct seccomp_data)
        } else if (BPF_MODE(code) == BPF_IMM) {
          v = Val{k, true};
        } else if (BPF_MODE(code) == BPF_MEM && k < BPF_MEMWORDS) {
          v = mem[k];
        } else {
          return std::nullopt;
        }
        (BPF_CLASS(code) == BPF_LD ? a : x) = v;
        break;
      }
      case BPF_ST:
      case BPF_STX:
        if (k >= BPF_MEMWORDS) return std::nullopt;
        mem[k] = BPF_CLASS(code) == BPF_ST ? a : x;
        break;
      case BPF_ALU: {
        const Val s = BPF_SRC(code) == BPF_X ? x : Val{k, true};
        if (BPF_OP(code) == BPF_NEG) {
          a.v = -a.v;
          break;
        }
        if (!a.known || !s.known) {
          a.known = false;
          break;
        }
        switch (BPF_OP(code)) {
          case BPF_ADD: a.v += s.v; break;
          case BPF_SUB: a.v -= s.v; break;
          case BPF_MUL: a.v *= s.v; break;
          case BPF_DIV: if (!s.v) return std::nullopt; a.v /= s.v; break;
          case BPF_MOD: if (!s.v) return std::nullopt; a.v %= s.v; break;
          case BPF_AND: a.v &= s.v; break;
          case BPF_OR: a.v |= s.v; break;
          case BPF_XOR: a.v ^= s.v; break;
          case BPF_LSH: a.v = s.v < 32 ? a.v << s.v : 0; break;
          case BPF_RSH: a.v = s.v < 32 ? a.v >> s.v : 0; break;
          default: return std::nullopt;
        }
        break;
      }
      case BPF_JMP: {
        if (BPF_OP(code) == BPF_JA) {
          pc += k;
          break;
        }
        const Val s = BPF_SRC(code) == BPF_X ? x : Val{k, true};
        if (!a.known || !s.known) return std::nullopt;
        bool taken;
        switch (BPF_OP(code)) {
          case BPF_JEQ: taken = a.v == s.v; break;
          case BPF_JGT: taken = a.v > s.v; break;
          case BPF_JGE: taken = a.v >= s.v; break;
          case BPF_JSET: taken = (a.v & s.v) != 0; break;
          default: return std::nullopt;
        }
        pc += taken ? jt : jf;
        break;
      }
      case BPF_RET:
        if (BPF_RVAL(code) == BPF_K) return k;
        if (BPF_RVAL(code) == BPF_A && a.known) return a.v;
        return std::nullopt;
      case BPF_MISC:
        if (BPF_MISCOP(code) == BPF_TAX) x = a;
        else a = x;
        break;
      default:
        return std::nullopt;
    }
  }
  return std::nullopt;  // ran off its end (the kernel refuses such a program)
}

Expected<void> seccomp_allows(pid_t pid, pid_t tid, std::span<const SyscallCase> calls) {
  auto st = read_status(pid, tid);
  if (!st) return tl::unexpected(st.error());
  const auto where = [&] { return fmt::format("process {} (thread {})", pid, tid); };
  if (st->seccomp <= 0) return {};  // none (no Seccomp line: a kernel without seccomp at all)
  if (st->seccomp == 1)
    return fail(Errc::unsupported, EPERM,
                fmt::format("{} runs in strict seccomp mode, which allows no system call pipecr needs there; "
                            "nothing was changed",
                            where()));
  for (long index = 0;; ++index) {
    const long n = ::ptrace(static_cast<__ptrace_request>(PTRACE_SECCOMP_GET_FILTER), tid,
                            reinterpret_cast<void*>(index), nullptr);
    if (n < 0 && errno == ENOENT && index > 0) return {};  // every filter said yes
    if (n <= 0) {
      const int err = n < 0 ? errno : EINVAL;
      // The kernel shows filters only to a tracer with CAP_SYS_ADMIN that is under none itself.
      std::string why;
      if (err == EACCES || err == EPERM) {
        auto own = read_status(::getpid());
        why = own && own->seccomp > 0 ? ": pipecr itself runs under seccomp, and the kernel shows filters only to a "
                                        "tracer under none"
                                      : ": it needs CAP_SYS_ADMIN";
      }
      return fail(Errc::unsupported, err,
                  fmt::format("{} runs under a seccomp filter that pipecr cannot read (PTRACE_SECCOMP_GET_FILTER: {}{}), "
                              "so it cannot tell whether the filter would kill it for the calls pipecr makes there; "
                              "nothing was changed",
                              where(), std::strerror(err), why));
    }
    SeccompProgram prog(static_cast<size_t>(n));
    if (::ptrace(static_cast<__ptrace_request>(PTRACE_SECCOMP_GET_FILTER), tid, reinterpret_cast<void*>(index),
                 prog.data()) != n)
      return fail(Errc::unsupported, errno, fmt::format("{}: PTRACE_SECCOMP_GET_FILTER: {}", where(), std::strerror(errno)));
    for (const SyscallCase& call : calls) {
      auto v = seccomp_verdict(prog, call, arch::kAuditArch);
      if (v && allowed(*v)) continue;
      return fail(Errc::unsupported, EPERM,
                  v ? fmt::format("{}: its seccomp filter would {} for {}(), which pipecr must make there; nothing "
                                  "was changed",
                                  where(), action_text(*v), call.name)
                    : fmt::format("{}: its seccomp filter decides on {}() by an argument pipecr cannot know "
                                  "beforehand, so it might kill the process for it; nothing was changed",
                                  where(), call.name));
    }
  }
}

}  // namespace pipecr::sys
