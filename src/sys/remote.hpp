// remote.hpp: run system calls inside a stopped thread, and put fds into another process.
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
// fd injection: the target creates a socketpair (injected), the tool takes one end with
// pidfd_getfd (it already has ptrace rights, so this needs nothing more), sends the fds with
// SCM_RIGHTS in batches of at most 253 (SCM_MAX_FD), the target recvmsg()s them into a scratch page,
// dup3()s each to its number and closes the temporaries. A socketpair rather than an abstract
// unix address: no name another process could connect to, and it works across network
// namespaces (abstract addresses are per netns). SCM_RIGHTS passes the same open file
// descriptions (kcmp equal) and needs no privilege of the target over the tool, so a root tool
// can install into an unprivileged target.
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
  // Saves tid's registers and prepares a syscall instruction. tid must be one of
  // process.threads(). The two stay linked: a move of either is followed, process.resume()
  // restore()s this first, and once process is gone every call fails (Errc::invalid_argument).
  // Where the syscall instruction comes from: the [vdso] first (nothing written), or only the
  // thread's own code (its last syscall instruction, else two patched bytes; tests use this).
  enum class Insn { vdso_first, thread_only };
  // vdso_hint: a vdso_syscall_address() found before the process was stopped (checked, then used
  // without reading the [vdso] again); 0 to look it up.
  [[nodiscard]] static Expected<RemoteSyscalls> attach(StoppedProcess& process, pid_t tid, Insn insn = Insn::vdso_first,
                                                      uint64_t vdso_hint = 0);

  RemoteSyscalls(RemoteSyscalls&& o) noexcept;
  RemoteSyscalls& operator=(RemoteSyscalls&& o) = delete;
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

// A convenience: fcntl(fd, cmd, arg) in the target, raw result (negative errno is a value).
[[nodiscard]] Expected<long> remote_fcntl(RemoteSyscalls& r, int fd, int cmd, long arg = 0);

// RLIMIT_NOFILE (soft) of the target: prlimit() from the tool, or, when the tool may not
// (another uid and no CAP_SYS_RESOURCE), an injected prlimit64 in the target.
[[nodiscard]] Expected<uint64_t> remote_nofile_limit(RemoteSyscalls& r);

struct FdInstall {
  int source_fd = -1;  // in this process
  int target_fd = -1;  // number to use in the target; whatever is open there is replaced
  bool cloexec = false;
};

// Installs each source_fd at target_fd in the target (the same open file description, FD_CLOEXEC as
// asked), one remote round trip per fd: for a few fds in tests and tools; a restore installs through
// the agent (agent.hpp), all-or-nothing. target_fd values must be distinct and >= 0. Fails before
// changing any fd of the target when a target_fd is at or above the target's RLIMIT_NOFILE
// (Errc::system, EMFILE) or an argument is invalid (Errc::invalid_argument). Batches of 253 are
// installed one after the other; when a later batch fails, earlier ones stay installed. Temporaries
// in the target are always closed.
[[nodiscard]] Expected<void> install_fds(RemoteSyscalls& r, std::span<const FdInstall> fds);

// The address of a syscall instruction in pid's [vdso], or 0 when there is none (or no vdso).
[[nodiscard]] uint64_t vdso_syscall_address(pid_t pid);

}  // namespace pipecr::sys
