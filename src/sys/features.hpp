// features.hpp: what this kernel and this caller can do, probed once and cached.
//
// Each probe performs the real operation on objects of our own (a pipe, a forked child) rather than
// trusting version numbers: a seccomp profile, a config option or a missing capability all show up
// the same way, as a failing call. The first call to kernel_features() runs every probe (a few
// milliseconds, one short-lived child for PTRACE_SEIZE); later calls return the cached result.
// Thread-safe (a function-local static).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace pipecr::sys {

// One line of `pipecr check`.
struct Feature {
  std::string name;     // "tee", "pidfd_getfd", "cap_sys_ptrace", ...
  bool ok = false;
  std::string detail;   // what was observed: "works", "ENOSYS", "1048576 bytes", ...
  std::string fix;      // how to get it when missing ("" when ok or nothing to do)
  bool dump_needs = false;     // `pipecr dump` cannot work without it
  bool restore_needs = false;  // `pipecr restore` cannot work without it
};

struct KernelFeatures {
  bool tee = false;
  bool pidfd_open = false;
  bool pidfd_getfd = false;
  bool kcmp = false;
  bool dupfd_query = false;        // fcntl(F_DUPFD_QUERY), Linux 6.10
  bool proc_fd_count = false;      // st_size of /proc/PID/fd counts the open fds, Linux 6.2
  bool procmap_query = false;      // ioctl(PROCMAP_QUERY) on /proc/PID/maps, Linux 6.11
  bool own_seccomp_free = false;   // pipecr itself under no seccomp filter (it can read a target's)
  bool ptrace_seize = false;
  bool getowner_uids = false;      // F_GETOWNER_UIDS
  bool packet_pipes = false;       // pipe2(O_DIRECT)
  bool vmsplice = false;
  bool vmsplice_gift = false;      // vmsplice(SPLICE_F_GIFT)
  bool notification_pipes = false; // pipe2(O_NOTIFICATION_PIPE) (CONFIG_WATCH_QUEUE)
  uint32_t pipe_max_size = 0;      // /proc/sys/fs/pipe-max-size
  uint64_t pipe_user_pages_soft = 0, pipe_user_pages_hard = 0;  // 0 = no limit
  bool cap_sys_ptrace = false, cap_sys_resource = false, cap_checkpoint_restore = false, cap_sys_admin = false;
  uint64_t nofile_soft = 0, nofile_hard = 0;  // RLIMIT_NOFILE
  int yama_ptrace_scope = -1;                 // -1: no Yama
  std::vector<Feature> report;                // every probe, in a fixed order, for `pipecr check`

  // True when every feature `dump` (resp. `restore`) needs is present.
  [[nodiscard]] bool dump_ready() const;
  [[nodiscard]] bool restore_ready() const;
  [[nodiscard]] const Feature* find(std::string_view name) const;
};

// Probed on first call, then cached.
[[nodiscard]] const KernelFeatures& kernel_features();

// fcntl(F_DUPFD_QUERY) (Linux 6.10) gives right answers on a pipe of ours: a dup is the same file,
// the other end is not. dupfd_query_works() probes once (three fcntls on a pipe, no child: cheap
// enough for the dump to ask without running every probe above); dupfd_query_answers() probes
// now, with errno of the failing call in *err.
[[nodiscard]] bool dupfd_query_works();
[[nodiscard]] bool dupfd_query_answers(int* err);

// Run every probe now, uncached (for tests).
[[nodiscard]] KernelFeatures probe_kernel_features();

}  // namespace pipecr::sys
