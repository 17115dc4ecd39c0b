// harness.hpp: processes, scratch directories and /proc probes for the scenario driver.
//
// Every process the driver starts is a Process: its own process group (setpgid), killed with its
// parent (PR_SET_PDEATHSIG), and on destruction SIGKILLed as a whole group and reaped, together
// with any of its children that were reparented to the driver (the driver is a child subreaper,
// set in main). So no path out of a test (an assertion, a timeout, an exception) leaves a process
// running, stopped or traced: SIGKILL ends stopped and traced processes too.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

namespace zdtm_harness {

using std::chrono::milliseconds;

// A private directory under /tmp, removed with everything in it on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  [[nodiscard]] const std::string& path() const { return path_; }
  [[nodiscard]] std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

struct SpawnOptions {
  std::vector<std::string> argv;       // argv[0] is the program path
  std::vector<std::string> env;        // extra NAME=VALUE entries
  std::string stdout_path, stderr_path;  // files to create; empty: /dev/null
  int ready_fd = -1;                   // passed to the child as fd 3 (ZDTM_READY_FD=3)
};

class Process {
 public:
  Process() = default;
  explicit Process(const SpawnOptions& opt);
  ~Process() { kill_group(); }
  Process(Process&& o) noexcept;
  Process& operator=(Process&& o) noexcept;
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  [[nodiscard]] pid_t pid() const { return pid_; }
  [[nodiscard]] bool running() const { return pid_ > 0 && !reaped_; }
  // Wait for the process to exit: its exit code, 128 + signal when killed, or -1 on timeout (the
  // process then still runs; the destructor kills it).
  [[nodiscard]] int wait(milliseconds timeout);
  // SIGKILL to the whole group, reap the leader and every reparented member. Idempotent.
  void kill_group();
  // Deliver a signal to the leader only.
  void signal(int sig) const;

 private:
  pid_t pid_ = -1;
  bool reaped_ = false;
  int code_ = -1;
};

struct RunResult {
  int code = -1;  // exit code, 128 + signal, or -1 on timeout
  std::string out, err;
};

// Run a command to completion (killed after `timeout`), capturing stdout and stderr through files
// in `dir`.
[[nodiscard]] RunResult run(const std::vector<std::string>& argv, const std::string& dir, milliseconds timeout,
                            const std::vector<std::string>& env = {});

[[nodiscard]] std::string read_file(const std::string& path);
[[nodiscard]] bool file_exists(const std::string& path);

// /proc/PID/status "State:" letter (0 when the process is gone) and "TracerPid:".
[[nodiscard]] char proc_state(pid_t pid);
[[nodiscard]] int tracer_pid(pid_t pid);
// Waits up to `timeout` for pid to be neither stopped (T, t) nor traced; returns "" when so, else
// what was seen. A process that is gone or a zombie counts as not stopped.
[[nodiscard]] std::string wait_not_stopped(pid_t pid, milliseconds timeout);

// One fd table of a process: its own (tid 0), or a thread's after unshare(CLONE_FILES).
struct Table {
  int pid = 0, tid = 0;
  [[nodiscard]] int task() const { return tid ? tid : pid; }  // for kcmp, which takes any task id
  [[nodiscard]] std::string dir() const {  // its /proc directory: fd/ and fdinfo/ below it
    return "/proc/" + std::to_string(pid) + (tid ? "/task/" + std::to_string(tid) : "");
  }
};
// The process's table, then each thread's own, by tid (kcmp(KCMP_FILES) against the process).
[[nodiscard]] std::vector<Table> tables_of(int pid);

// The wreck: for every fd that is a pipe or FIFO, in every fd table of pid, open its /proc link
// O_RDONLY|O_NONBLOCK and read until EAGAIN or EOF. Returns the bytes drained.
[[nodiscard]] size_t drain(pid_t pid);

}  // namespace zdtm_harness
