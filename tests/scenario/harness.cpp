// harness.cpp: see harness.hpp. Plain fork/exec with the child's fds laid out by hand: 0 from
// /dev/null, 1 and 2 to files, the ready socket at 3, everything else closed (close_range), so a
// scenario holds no pipe it did not make (ctest itself talks to the driver through pipes).
#include "harness.hpp"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace zdtm_harness {
namespace {

int remove_entry(const char* path, const struct stat*, int, struct FTW*) {
  ::remove(path);
  return 0;
}

int decode(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

// In the child, between fork and exec: only async-signal-safe calls.
[[noreturn]] void exec_child(const SpawnOptions& opt, pid_t parent, const std::vector<char*>& argv,
                             const std::vector<char*>& envp) {
  setpgid(0, 0);
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != parent) _exit(127);
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);
  int in = open("/dev/null", O_RDONLY);
  int out = opt.stdout_path.empty() ? open("/dev/null", O_WRONLY)
                                    : open(opt.stdout_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  int err = opt.stderr_path.empty() ? open("/dev/null", O_WRONLY)
                                    : open(opt.stderr_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (in < 0 || out < 0 || err < 0) _exit(127);
  // Move everything above 10 first, so the dup2s below cannot clobber each other.
  int hi_in = fcntl(in, F_DUPFD, 10), hi_out = fcntl(out, F_DUPFD, 10), hi_err = fcntl(err, F_DUPFD, 10);
  int hi_ready = opt.ready_fd >= 0 ? fcntl(opt.ready_fd, F_DUPFD, 10) : -1;
  if (dup2(hi_in, 0) < 0 || dup2(hi_out, 1) < 0 || dup2(hi_err, 2) < 0) _exit(127);
  int first_closed = 3;
  if (hi_ready >= 0) {
    if (dup2(hi_ready, 3) < 0) _exit(127);
    first_closed = 4;
  }
  syscall(SYS_close_range, first_closed, ~0u, 0);
  execve(argv[0], argv.data(), envp.data());
  _exit(127);
}

}  // namespace

TempDir::TempDir() {
  char tmpl[] = "/tmp/pipecr-scenario-XXXXXX";
  if (!mkdtemp(tmpl)) throw std::runtime_error(std::string("mkdtemp: ") + strerror(errno));
  path_ = tmpl;
}

TempDir::~TempDir() { nftw(path_.c_str(), remove_entry, 16, FTW_DEPTH | FTW_PHYS); }

Process::Process(const SpawnOptions& opt) {
  std::vector<std::string> env_strings;
  for (char** e = environ; *e; e++) env_strings.emplace_back(*e);
  for (const std::string& e : opt.env) env_strings.push_back(e);
  if (opt.ready_fd >= 0) env_strings.emplace_back("ZDTM_READY_FD=3");
  std::vector<char*> argv, envp;
  for (const std::string& a : opt.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  for (const std::string& e : env_strings) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) throw std::runtime_error(std::string("fork: ") + strerror(errno));
  if (pid == 0) exec_child(opt, parent, argv, envp);
  setpgid(pid, pid);  // also here: no race with a kill of the group right after fork
  pid_ = pid;
}

Process::Process(Process&& o) noexcept : pid_(o.pid_), reaped_(o.reaped_), code_(o.code_) { o.pid_ = -1; }

Process& Process::operator=(Process&& o) noexcept {
  if (this != &o) {
    kill_group();
    pid_ = o.pid_;
    reaped_ = o.reaped_;
    code_ = o.code_;
    o.pid_ = -1;
  }
  return *this;
}

int Process::wait(milliseconds timeout) {
  if (pid_ <= 0) return -1;
  if (reaped_) return code_;
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    // WNOWAIT: while the exited leader is an unreaped zombie, its pid and process group id cannot
    // be reused, so killing what is left of its group cannot hit a stranger.
    siginfo_t si = {};
    if (waitid(P_PID, static_cast<id_t>(pid_), &si, WEXITED | WNOHANG | WNOWAIT) == 0 && si.si_pid == pid_) {
      code_ = si.si_code == CLD_EXITED ? si.si_status : 128 + si.si_status;
      ::kill(-pid_, SIGKILL);
      while (waitpid(pid_, nullptr, 0) < 0 && errno == EINTR) {
      }
      reaped_ = true;
      return code_;
    }
    if (std::chrono::steady_clock::now() > deadline) return -1;
    std::this_thread::sleep_for(milliseconds(2));
  }
}

void Process::signal(int sig) const {
  if (pid_ > 0 && !reaped_) ::kill(pid_, sig);
}

void Process::kill_group() {
  if (pid_ <= 0) return;
  if (!reaped_) {
    // The leader is alive or an unreaped zombie: the group id is still ours to signal.
    ::kill(-pid_, SIGKILL);
    int status = 0;
    while (waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    reaped_ = true;
    code_ = decode(status);
  }
  // Members of the group whose parent died are reparented to us (child subreaper): reap them as
  // they arrive (waitpid only ever touches our own children), until none is left.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (std::chrono::steady_clock::now() < deadline) {
    pid_t r = waitpid(-pid_, nullptr, WNOHANG);
    if (r > 0) continue;
    if (::kill(-pid_, 0) != 0 && errno == ESRCH) break;
    std::this_thread::sleep_for(milliseconds(2));
  }
  pid_ = -1;
}

RunResult run(const std::vector<std::string>& argv, const std::string& dir, milliseconds timeout,
              const std::vector<std::string>& env) {
  static int counter = 0;
  std::string base = dir + "/run" + std::to_string(++counter);
  SpawnOptions opt;
  opt.argv = argv;
  opt.env = env;
  opt.stdout_path = base + ".out";
  opt.stderr_path = base + ".err";
  Process p(opt);
  RunResult r;
  r.code = p.wait(timeout);
  p.kill_group();
  r.out = read_file(opt.stdout_path);
  r.err = read_file(opt.stderr_path);
  return r;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

bool file_exists(const std::string& path) {
  struct stat st;
  return lstat(path.c_str(), &st) == 0;
}

namespace {
std::string status_field(pid_t pid, const std::string& key) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key + ":", 0) == 0) {
      size_t i = key.size() + 1;
      while (i < line.size() && (line[i] == ' ' || line[i] == '\t')) i++;
      return line.substr(i);
    }
  return "";
}
}  // namespace

char proc_state(pid_t pid) {
  std::string s = status_field(pid, "State");
  return s.empty() ? 0 : s[0];
}

int tracer_pid(pid_t pid) {
  std::string s = status_field(pid, "TracerPid");
  return s.empty() ? 0 : atoi(s.c_str());
}

std::string wait_not_stopped(pid_t pid, milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    char st = proc_state(pid);
    int tracer = tracer_pid(pid);
    if (st == 0 || st == 'Z' || st == 'X' || ((st != 'T' && st != 't') && tracer == 0)) return "";
    if (std::chrono::steady_clock::now() > deadline)
      return "pid " + std::to_string(pid) + " left in state " + std::string(1, st) + " with TracerPid " +
             std::to_string(tracer);
    std::this_thread::sleep_for(milliseconds(5));
  }
}

std::vector<Table> tables_of(int pid) {
  std::vector<Table> out{{pid, 0}};
  std::string dir = "/proc/" + std::to_string(pid) + "/task";
  DIR* d = opendir(dir.c_str());
  if (!d) return out;
  while (struct dirent* e = readdir(d)) {
    if (e->d_name[0] == '.') continue;
    int tid = atoi(e->d_name);
    if (tid != pid && syscall(SYS_kcmp, pid, tid, 2 /* KCMP_FILES */, 0, 0) != 0) out.push_back({pid, tid});
  }
  closedir(d);
  std::sort(out.begin() + 1, out.end(), [](const Table& a, const Table& b) { return a.tid < b.tid; });
  return out;
}

size_t drain(pid_t pid) {
  std::vector<std::string> paths;
  for (const Table& t : tables_of(pid)) {
    std::string fd_dir = t.dir() + "/fd";
    DIR* d = opendir(fd_dir.c_str());
    if (!d) continue;
    while (struct dirent* e = readdir(d))
      if (e->d_name[0] != '.') paths.push_back(fd_dir + "/" + e->d_name);
    closedir(d);
  }
  size_t total = 0;
  std::vector<char> buf(1 << 16);
  for (const std::string& p : paths) {
    struct stat st;
    if (stat(p.c_str(), &st) != 0 || !S_ISFIFO(st.st_mode)) continue;
    int fd = open(p.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) continue;
    for (;;) {
      ssize_t n = read(fd, buf.data(), buf.size());
      if (n <= 0) break;
      total += static_cast<size_t>(n);
    }
    close(fd);
  }
  return total;
}

}  // namespace zdtm_harness
