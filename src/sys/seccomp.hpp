// sys/seccomp.hpp: whether a stopped thread's seccomp filters let pipecr run its code there.
//
// Everything pipecr runs inside a target (the agent, the bootstrap's mmap and mprotect, the fd table's
// pre-grow, remote syscalls) makes system calls as that thread, under its seccomp filters. A filter
// that kills on one of them (SECCOMP_RET_KILL_PROCESS is what systemd's SystemCallFilter= does by
// default) would kill the target for pipecr's sake. So before the first of them, the thread's
// filters are read (PTRACE_SECCOMP_GET_FILTER: CAP_SYS_ADMIN, the thread stopped by us) and run, by
// a classic-BPF interpreter here, over every call pipecr may make, with the arguments it knows; every
// filter must answer ALLOW (or LOG) for every call. An argument pipecr cannot know beforehand (a file
// descriptor, an address) that a filter decides on makes the answer "cannot tell", which refuses.
#pragma once

#include <linux/filter.h>
#include <sys/types.h>

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "pipecr/error.hpp"

namespace pipecr::sys {

// One system call as a filter sees it: its number and the arguments known (nullopt: any value),
// and its name, for the refusal's message.
struct SyscallCase {
  int nr = -1;
  std::array<std::optional<uint64_t>, 6> args{};
  const char* name = "?";
};

// Every call pipecr may run in a target: the agent's (src/sys/agent/agent.c), the rt_sigframe
// bootstrap's and return's, the fd table's pre-grow, and the remote syscalls of the fallbacks.
[[nodiscard]] std::span<const SyscallCase> injected_syscalls();

// One classic-BPF seccomp program, as the kernel gives it (PTRACE_SECCOMP_GET_FILTER) and takes it.
using SeccompProgram = std::vector<sock_filter>;

// What a program answers for one call: the action (SECCOMP_RET_* with its data), or nullopt when it
// decides on something not known (an unknown argument, the instruction pointer) or is malformed.
[[nodiscard]] std::optional<uint32_t> seccomp_verdict(const SeccompProgram& prog, const SyscallCase& call,
                                                      uint32_t arch);

// Whether thread tid of pid (stopped by this process's ptrace) may run every call of `calls`: its
// Seccomp mode is 0, or its filters all answer ALLOW or LOG for each. Else an Error (Errc::unsupported)
// that names the call and what the filter would do, or why the filters could not be read.
[[nodiscard]] Expected<void> seccomp_allows(pid_t pid, pid_t tid, std::span<const SyscallCase> calls);

}  // namespace pipecr::sys
