// remote.hpp: run system calls inside a stopped thread: the agent's bootstrap (its mmap and
// mprotect when the target has no `syscall; ret` of its own, and the fallback take-back munmap).
// Everything else runs in the agent (agent.hpp); files are installed only there.
//
// Technique (the reptyr / CRIU parasite-free way): on one thread of a StoppedProcess, save its
// registers; find a `syscall` instruction: one in the target's [vdso] (read with process_vm_readv:
// nothing is written), else the one at rip-2 when the thread stopped on a syscall's way out (bytes
// checked), else write one over the two bytes at rip (the original word is kept and written back;
// every thread is stopped, so nobody executes it meanwhile); per call set
// rax = nr, rdi, rsi, rdx, r10, r8, r9 = args, rip = that instruction, orig_rax = -1 (so the kernel
// applies no restart logic to our registers) and let the thread run to the syscall-exit-stop.
// restore() writes back code and registers and re-parks the thread in an interrupt stop, so that
// on detach the kernel restarts an interrupted syscall itself: a thread blocked in read(5) reads
// fd 5 again, whatever file fd 5 now is.
//
// Registers go through sys/arch (x86_64 today).
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "pipecr/error.hpp"
#include "sys/ptrace.hpp"

namespace pipecr::sys {

class RemoteSyscalls : public Injector {
 public:
  // Made by StoppedProcess::inject<RemoteSyscalls>(tid, insn, vdso_hint), which owns it: saves tid's
  // registers and prepares a syscall instruction. tid must be one of process.threads() (else
  // Errc::invalid_argument). process.resume() restore()s it first if it is still open, and once the
  // process is resumed every call fails (Errc::invalid_argument).
  // Where the syscall instruction comes from: the [vdso] first (nothing written), or only the
  // thread's own code (its last syscall instruction, else two patched bytes; tests use this).
  // vdso_hint: a vdso_syscall_address() found before the process was stopped (checked, then used
  // without reading the [vdso] again); 0 to look it up.
  enum class Insn { vdso_first, thread_only };

  RemoteSyscalls(RemoteSyscalls&&) = delete;
  RemoteSyscalls& operator=(RemoteSyscalls&&) = delete;
  RemoteSyscalls(const RemoteSyscalls&) = delete;
  RemoteSyscalls& operator=(const RemoteSyscalls&) = delete;
  // Calls restore() if it was not called (errors ignored).
  ~RemoteSyscalls() override;

  // Runs syscall nr with the given arguments in the target thread. Returns the raw result: a
  // negative errno (-4095..-1) is a value, not an Error; Error only when ptrace fails or the
  // thread died (Errc::gone).
  [[nodiscard]] Expected<long> call(long nr, unsigned long a1 = 0, unsigned long a2 = 0, unsigned long a3 = 0,
                                    unsigned long a4 = 0, unsigned long a5 = 0, unsigned long a6 = 0);
  // Like call(), but a negative errno result becomes an Error naming `what` (e.g. "dup3(7, 5, 0)")
  // and the target pid.
  [[nodiscard]] Expected<long> call_checked(const char* what, long nr, unsigned long a1 = 0, unsigned long a2 = 0,
                                            unsigned long a3 = 0, unsigned long a4 = 0, unsigned long a5 = 0,
                                            unsigned long a6 = 0);

  // Memory of the target (process_vm_readv/writev, falling back to PTRACE_PEEKDATA/POKEDATA).
  [[nodiscard]] Expected<void> write_memory(uint64_t addr, std::span<const std::byte> data);
  [[nodiscard]] Expected<void> read_memory(uint64_t addr, std::span<std::byte> out);
  // Anonymous private RW mapping in the target / its removal.
  [[nodiscard]] Expected<uint64_t> mmap_anon(size_t len);
  [[nodiscard]] Expected<void> munmap(uint64_t addr, size_t len);
  // One page of scratch memory in the target, mapped on first use, unmapped by restore().
  [[nodiscard]] Expected<uint64_t> scratch_page();
  static constexpr size_t kScratchSize = 4096;

  // Puts back the code bytes (if patched), unmaps the scratch page, restores the registers and
  // re-parks the thread (see StoppedProcess::repark). Idempotent. Does not detach.
  [[nodiscard]] Expected<void> restore() override;
  // Ends the use of the thread without putting its registers back: the caller set them and runs the
  // thread itself (the agent). Puts back patched code bytes; the scratch page must not be in use.
  [[nodiscard]] Expected<void> release();
  // Makes restore() put these registers back instead of those saved at attach() (the agent's
  // takeover: the thread then continues where it was before the agent ran).
  void restore_to(const Regs& regs) {
    saved_ = regs;
    ran_ = true;
  }

  [[nodiscard]] pid_t pid() const { return pid_; }
  [[nodiscard]] pid_t tid() const { return tid_; }
  [[nodiscard]] const Regs& saved_regs() const { return saved_; }
  // Address of the syscall instruction used, and whether it was written there by us.
  [[nodiscard]] uint64_t syscall_address() const { return insn_addr_; }
  [[nodiscard]] bool patched_code() const { return patched_; }

 private:
  friend class StoppedProcess;  // inject()
  [[nodiscard]] static Expected<std::unique_ptr<RemoteSyscalls>> create(StoppedProcess& process, pid_t tid,
                                                                        Insn insn = Insn::vdso_first,
                                                                        uint64_t vdso_hint = 0);
  RemoteSyscalls(StoppedProcess& p, pid_t tid) : pid_(p.pid()), tid_(tid) { link(&p); }
  [[nodiscard]] Expected<void> prepare(Insn insn, uint64_t vdso_hint);

  pid_t pid_ = -1;
  pid_t tid_ = -1;
  Regs saved_{};
  uint64_t insn_addr_ = 0;
  bool patched_ = false;
  uint64_t patched_word_addr_ = 0;
  long original_word_ = 0;
  uint64_t scratch_ = 0;
  bool ran_ = false;    // some syscall ran: registers must be put back
  bool done_ = true;    // restore() ran or nothing to restore
};

// The address of a syscall instruction in pid's [vdso], or 0 when there is none (or no vdso).
[[nodiscard]] uint64_t vdso_syscall_address(pid_t pid);

}  // namespace pipecr::sys
