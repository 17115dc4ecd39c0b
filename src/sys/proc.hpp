// proc.hpp: small readers of /proc/PID for processes, threads and fds.
//
// Each reader opens one file once, reads it whole into a stack buffer (or one growing string for
// the rare large file) and parses it in place: no iostreams, no second pass. Directory listings
// (/proc, task/, fd/) use getdents64 over one open directory fd and, for fds, readlinkat relative
// to that fd, so listing 10,000 fds costs one open plus one readlink per fd.
//
// Errors: when /proc/PID itself is gone (ENOENT/ESRCH) the error is Errc::gone; EACCES/EPERM is
// Errc::permission; a missing file below a live process (a closed fd) is Errc::not_found.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "pipecr/error.hpp"
#include "pipecr/image.hpp"
#include "sys/unique_fd.hpp"

namespace pipecr::sys {

// Every numeric directory of /proc (thread-group leaders), ascending.
[[nodiscard]] Expected<std::vector<pid_t>> list_pids();
// The thread ids of pid (/proc/PID/task), ascending; the leader is among them.
[[nodiscard]] Expected<std::vector<pid_t>> list_threads(pid_t pid);

// /proc/PID/comm without the trailing newline.
[[nodiscard]] Expected<std::string> read_comm(pid_t pid);
// /proc/PID/cmdline split at NULs. Empty for kernel threads and zombies.
[[nodiscard]] Expected<std::vector<std::string>> read_cmdline(pid_t pid);

// The fields of /proc/PID/stat pipecr uses. comm may hold spaces and parentheses, so the fields
// after it are parsed from the last ')'.
struct ProcStat {
  pid_t pid = 0;
  std::string comm;
  char state = '?';  // R S D T t Z X ...
  pid_t ppid = 0;
  pid_t pgrp = 0;
  pid_t session = 0;
  int processor = -1;  // the CPU it last ran on (or runs on); -1 when the line has no such field
  uint64_t start_stack = 0;  // where the main stack starts (its [stack] mapping holds it); 0: not told
};
[[nodiscard]] Expected<ProcStat> read_stat(pid_t pid);
// Same, for one thread (/proc/PID/task/TID/stat).
[[nodiscard]] Expected<ProcStat> read_task_stat(pid_t pid, pid_t tid);
// The state letter of /proc/PID/task/TID/stat ('R', 'S', 'T', 't', 'Z'...), or nullopt when the task
// does not exist (or its stat cannot be read).
[[nodiscard]] std::optional<char> task_state(pid_t pid, pid_t tid);
[[nodiscard]] Expected<pid_t> read_ppid(pid_t pid);

// The fields of /proc/PID/status (of one thread: /proc/PID/task/TID/status) pipecr uses, read with
// one open and parsed in one pass.
struct TaskStatus {
  std::optional<uint32_t> fd_size;  // FDSize: the slots of its fd table (none: the task is gone)
  int seccomp = -1;                 // Seccomp: 0 none, 1 strict, 2 filter; -1 without the line
  uint32_t threads = 0;             // Threads: of its thread group
  pid_t tracer = 0;                 // TracerPid
  uint64_t pending = 0;             // SigPnd | ShdPnd: signals pending for it or its group
  uint64_t blocked = 0;             // SigBlk
};
[[nodiscard]] TaskStatus parse_status(std::string_view text);
// tid 0: the process's own file.
[[nodiscard]] Expected<TaskStatus> read_status(pid_t pid, pid_t tid = 0);

// One mapping of a process's address space, [start, end).
struct MapRange {
  uint64_t start = 0, end = 0;
};
// PROCMAP_QUERY (an ioctl on an open /proc/PID/maps, Linux 6.11): the mapping that holds addr, or
// with or_next the first one above it if none does; nullopt: there is none. One call, however many
// mappings the process has, where the text of /proc/PID/maps costs about 0.5 us a mapping. An
// Error where the kernel cannot answer (ENOTTY before 6.11).
[[nodiscard]] Expected<std::optional<MapRange>> query_mapping(int maps_fd, uint64_t addr, bool or_next);

// One executable mapping of a process: its range, where it starts in its file, the file (device as
// /proc/PID/maps writes it, "fd:01", and inode; inode 0: none, as [vdso]) and its path or name.
struct ExecMapping {
  uint64_t start = 0, end = 0, offset = 0;
  std::string dev;
  uint64_t inode = 0;
  std::string name;
  bool operator==(const ExecMapping&) const = default;
};
// The executable mappings of pid, in address order ([vsyscall], which no process maps, left out):
// asked with PROCMAP_QUERY for the executable ones only (a few dozen ioctls in a process of
// thousands of mappings), else read from the text of /proc/PID/maps. Both ways are public for the
// tests, which hold them to one answer; the query gives nullopt where the kernel cannot answer.
[[nodiscard]] std::vector<ExecMapping> executable_mappings(pid_t pid);
[[nodiscard]] std::optional<std::vector<ExecMapping>> executable_mappings_by_query(pid_t pid);
[[nodiscard]] std::vector<ExecMapping> executable_mappings_by_listing(pid_t pid);
// The fds open in the table of thread tid of pid (tid 0: of pid), as the kernel counts them (st_size
// of /proc/PID/task/TID/fd, Linux 6.2: no listing); 0 when it does not count them (or none is open).
[[nodiscard]] uint32_t open_fd_count(pid_t pid, pid_t tid = 0);
[[nodiscard]] Expected<char> read_state(pid_t pid);
// Parse the text of a stat file (exposed for tests).
[[nodiscard]] Expected<ProcStat> parse_stat(std::string_view text);

// Direct children of pid: from /proc/PID/task/*/children (CONFIG_PROC_CHILDREN), else by scanning
// every process's ppid. Ascending.
[[nodiscard]] Expected<std::vector<pid_t>> children(pid_t pid);
// Every descendant of pid (not pid itself), parents before their children.
[[nodiscard]] Expected<std::vector<pid_t>> descendants(pid_t pid);

struct FdEntry {
  int fd = -1;
  std::string target;  // readlink(/proc/PID/fd/N): "pipe:[123]", "/path/to/fifo", "socket:[9]" ...
};
// The open fds of pid, ascending. With with_targets=false targets are left empty (one syscall per
// directory block instead of one per fd). An fd closed between the listing and its readlink is
// skipped.
[[nodiscard]] Expected<std::vector<FdEntry>> list_fds(pid_t pid, bool with_targets = true);
// The fd numbers of the fd table thread tid of pid uses (/proc/PID/task/TID/fd: a thread that called
// unshare(CLONE_FILES) has its own), in directory order, with nothing read per fd; `dir` is left open
// on that directory for fstatat()/readlinkat() relative to it. One getdents64 per block of entries.
[[nodiscard]] Expected<std::vector<int>> list_task_fds(pid_t pid, pid_t tid, UniqueFd& dir);
// readlink(/proc/PID/fd/FD).
[[nodiscard]] Expected<std::string> read_fd_target(pid_t pid, int fd);

struct FdInfo {
  uint64_t pos = 0;
  int flags = 0;   // octal in the file; O_CLOEXEC here mirrors FD_CLOEXEC of that process
  int mnt_id = 0;
  uint64_t ino = 0;
};
[[nodiscard]] Expected<FdInfo> read_fdinfo(pid_t pid, int fd);
// Parse the text of an fdinfo file (exposed for tests).
[[nodiscard]] Expected<FdInfo> parse_fdinfo(std::string_view text);

// "pipe:[123]" -> 123; anything else -> nullopt.
[[nodiscard]] std::optional<uint64_t> pipe_inode_from_link(std::string_view link);

// What a thread is doing, from /proc/PID/task/TID/syscall (readable without ptrace for a process we
// may inspect): the syscall number and its arguments while it is blocked in one, nr = -1 while in
// user space ("running"), nullopt fields when the kernel hides it.
struct TaskSyscall {
  pid_t tid = 0;
  long nr = -1;          // -1: running in user space
  uint64_t args[6] = {};
  std::string wchan;     // /proc/PID/task/TID/wchan: "pipe_read", "pipe_write", "wait_for_partner", ...
};
[[nodiscard]] Expected<TaskSyscall> read_task_syscall(pid_t pid, pid_t tid);
// Parse the text of a syscall file (exposed for tests).
[[nodiscard]] Expected<TaskSyscall> parse_task_syscall(std::string_view text);

// Which fd, if any, a thread is blocked on for reading or writing: the read and write families,
// sendfile, and splice/tee/vmsplice, whose side is the one its wait channel names
// (pipe_wait_readable or pipe_wait_writable). Syscall numbers are the arch file's
// (arch::pipe_io_args).
struct BlockedIo {
  pid_t tid = 0;
  int fd = -1;
  Blocked dir = Blocked::none;
  std::string wchan;
  const char* call = "";  // "read", "splice", ...
};
[[nodiscard]] std::optional<BlockedIo> blocked_io(const TaskSyscall& s);
// Every thread of pid blocked in read*/write* on some fd (threads that vanish are skipped).
[[nodiscard]] Expected<std::vector<BlockedIo>> list_blocked_io(pid_t pid);

// Read a whole small /proc file (at most max bytes). Errors as described at the top.
[[nodiscard]] Expected<std::string> read_proc_file(const std::string& path, size_t max = 1 << 20);

}  // namespace pipecr::sys
