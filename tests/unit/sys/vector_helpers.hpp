// vector_helpers.hpp: what a test victim checks about itself across a restore or dump: its vector
// registers (xmm8..15, ymm8..15 with AVX) held across a blocking syscall, its signal mask and its
// sigaltstack. Used by the agent tests (sys) and the kill test (api).
#pragma once

#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <string>

#include <fmt/format.h>

namespace pipecr::sys::testing {

inline bool has_avx() { return __builtin_cpu_supports("avx"); }

// Runs syscall nr(a0, a1, a2, a3) with xmm8..xmm15 (ymm8..ymm15 with AVX) loaded with known values,
// and tells whether they are the same once it returned.
struct VectorSyscall {
  long ret = 0;
  bool same = false;
};
inline VectorSyscall syscall_holding_vectors(long nr, long a0, long a1, long a2, long a3) {
  alignas(32) unsigned char in[8 * 32], out[8 * 32];
  for (size_t i = 0; i < sizeof in; ++i) in[i] = static_cast<unsigned char>(i * 7 + 3);
  std::memset(out, 0, sizeof out);
  register long r10 asm("r10") = a3;
  long ret = nr;
  if (has_avx()) {
    asm volatile(
        "vmovdqu 0(%[in]), %%ymm8\n vmovdqu 32(%[in]), %%ymm9\n vmovdqu 64(%[in]), %%ymm10\n"
        "vmovdqu 96(%[in]), %%ymm11\n vmovdqu 128(%[in]), %%ymm12\n vmovdqu 160(%[in]), %%ymm13\n"
        "vmovdqu 192(%[in]), %%ymm14\n vmovdqu 224(%[in]), %%ymm15\n"
        "syscall\n"
        "vmovdqu %%ymm8, 0(%[out])\n vmovdqu %%ymm9, 32(%[out])\n vmovdqu %%ymm10, 64(%[out])\n"
        "vmovdqu %%ymm11, 96(%[out])\n vmovdqu %%ymm12, 128(%[out])\n vmovdqu %%ymm13, 160(%[out])\n"
        "vmovdqu %%ymm14, 192(%[out])\n vmovdqu %%ymm15, 224(%[out])\n vzeroupper\n"
        : "+a"(ret)
        : "D"(a0), "S"(a1), "d"(a2), "r"(r10), [in] "r"(in), [out] "r"(out)
        : "rcx", "r11", "memory", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
    return {ret, std::memcmp(in, out, sizeof in) == 0};
  }
  asm volatile(
      "movdqu 0(%[in]), %%xmm8\n movdqu 32(%[in]), %%xmm9\n movdqu 64(%[in]), %%xmm10\n"
      "movdqu 96(%[in]), %%xmm11\n movdqu 128(%[in]), %%xmm12\n movdqu 160(%[in]), %%xmm13\n"
      "movdqu 192(%[in]), %%xmm14\n movdqu 224(%[in]), %%xmm15\n"
      "syscall\n"
      "movdqu %%xmm8, 0(%[out])\n movdqu %%xmm9, 32(%[out])\n movdqu %%xmm10, 64(%[out])\n"
      "movdqu %%xmm11, 96(%[out])\n movdqu %%xmm12, 128(%[out])\n movdqu %%xmm13, 160(%[out])\n"
      "movdqu %%xmm14, 192(%[out])\n movdqu %%xmm15, 224(%[out])\n"
      : "+a"(ret)
      : "D"(a0), "S"(a1), "d"(a2), "r"(r10), [in] "r"(in), [out] "r"(out)
      : "rcx", "r11", "memory", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
  bool same = true;
  for (int i = 0; i < 8; ++i) same = same && std::memcmp(in + i * 32, out + i * 32, 16) == 0;
  return {ret, same};
}

// The child's own view of what must not change: its signal mask and sigaltstack.
inline std::string own_state() {
  sigset_t cur;
  ::pthread_sigmask(SIG_BLOCK, nullptr, &cur);
  stack_t alt{};
  ::sigaltstack(nullptr, &alt);
  return fmt::format("mask usr2 {} winch {} usr1 {} alt {:#x}/{}/{}", sigismember(&cur, SIGUSR2), sigismember(&cur, SIGWINCH),
                     sigismember(&cur, SIGUSR1), reinterpret_cast<uintptr_t>(alt.ss_sp), alt.ss_size, alt.ss_flags);
}

// Sets an unusual mask and an altstack (checked by own_state() afterwards).
inline void unusual_state() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR2);
  sigaddset(&set, SIGWINCH);
  sigaddset(&set, SIGUSR1);
  ::pthread_sigmask(SIG_SETMASK, &set, nullptr);
  static char alt_mem[64 * 1024];
  stack_t alt{};
  alt.ss_sp = alt_mem;
  alt.ss_size = sizeof alt_mem;
  ::sigaltstack(&alt, nullptr);
}

// A child's body: with the unusual mask and altstack set, blocks in read(fd) holding known vector
// registers, then writes to `out` what it came back with: "read N vectors same|CHANGED state
// same|<before> -> <after>".
inline void read_and_report(int fd, int out) {
  unusual_state();
  const std::string before = own_state();
  char buf[8] = {};
  VectorSyscall r = syscall_holding_vectors(SYS_read, fd, reinterpret_cast<long>(buf), sizeof buf, 0);
  const std::string after = own_state();
  std::string m = fmt::format("read {} vectors {} state {}", r.ret, r.same ? "same" : "CHANGED",
                              before == after ? "same" : before + " -> " + after);
  (void)!::write(out, m.data(), m.size());
}

}  // namespace pipecr::sys::testing
