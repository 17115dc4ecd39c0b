// child_helpers.hpp: forked children and /proc probes shared by the ptrace and remote tests.
// Every child is killed and reaped by its destructor, on every path.
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "sys/syscalls.hpp"

namespace pipecr::sys {

using namespace std::chrono_literals;

// fd -> link target of /proc/PID/fd.
inline std::map<int, std::string> fd_table(pid_t pid) {
  std::map<int, std::string> out;
  std::string dir = "/proc/" + std::to_string(pid) + "/fd";
  DIR* d = ::opendir(dir.c_str());
  if (!d) return out;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    char buf[256] = {};
    ssize_t n = ::readlink((dir + "/" + e->d_name).c_str(), buf, sizeof buf - 1);
    out[std::stoi(e->d_name)] = std::string(buf, n > 0 ? static_cast<size_t>(n) : 0);
  }
  ::closedir(d);
  return out;
}

// Every mapping but the stack (the agent runs on it, which may grow it).
inline std::string maps_without_stack(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/maps");
  std::string line, out;
  while (std::getline(in, line))
    if (line.find("[stack]") == std::string::npos) out += line + "\n";
  return out;
}

// FD_CLOEXEC of fd in pid, from its fdinfo.
inline bool fd_cloexec(pid_t pid, int fd) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/fdinfo/" + std::to_string(fd));
  std::string key, value;
  while (in >> key >> value)
    if (key == "flags:") return (std::stoul(value, nullptr, 8) & O_CLOEXEC) != 0;
  return false;
}

// A forked child, killed and reaped in every path.
struct Child {
  pid_t pid = -1;
  Child() = default;
  explicit Child(pid_t p) : pid(p) {}
  Child(Child&& o) noexcept : pid(o.pid) { o.pid = -1; }
  Child& operator=(Child&& o) noexcept {
    std::swap(pid, o.pid);
    return *this;
  }
  ~Child() {
    if (pid <= 0) return;
    ::kill(pid, SIGKILL);
    while (::waitpid(pid, nullptr, __WALL) < 0 && errno == EINTR) {
    }
  }
  // SIGKILLs it now and reaps it (the destructor then has nothing to do): its wait status, or
  // nullopt when waitpid() did not return it.
  std::optional<int> kill_and_reap() {
    ::kill(pid, SIGKILL);
    int status = 0;
    pid_t got;
    while ((got = ::waitpid(pid, &status, 0)) < 0 && errno == EINTR) {
    }
    if (got != pid) return std::nullopt;
    pid = -1;
    return status;
  }
};

inline Child spawn(const std::function<void()>& body) {
  const pid_t parent = ::getpid();
  pid_t p = ::fork();
  if (p == 0) {
    // Dies with the test, whatever ends it: an orphan would keep ctest's output pipe open and turn
    // a crash into a timeout.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(1);
    body();
    ::_exit(0);
  }
  return Child(p);
}

// A counter shared with children (MAP_SHARED survives fork).
struct SharedCounter {
  std::atomic<long>* value;
  SharedCounter() {
    void* m = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    value = new (m) std::atomic<long>(0);
  }
  ~SharedCounter() { ::munmap(value, 4096); }
  long get() const { return value->load(); }
};

inline char state_of(pid_t pid, pid_t tid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/task/" + std::to_string(tid) + "/stat");
  std::string line;
  if (!std::getline(in, line)) return '?';
  return line[line.rfind(')') + 2];
}

inline std::vector<pid_t> tasks_of(pid_t pid) {
  std::vector<pid_t> out;
  DIR* d = ::opendir(("/proc/" + std::to_string(pid) + "/task").c_str());
  if (!d) return out;
  while (dirent* e = ::readdir(d))
    if (e->d_name[0] != '.') out.push_back(std::stoi(e->d_name));
  ::closedir(d);
  return out;
}

inline int tracer_of(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("TracerPid:", 0) == 0) return std::stoi(line.substr(10));
  return -1;
}

// Waits (up to 5 s) until pred() holds.
inline bool eventually(const std::function<bool()>& pred) {
  for (int i = 0; i < 5000; ++i) {
    if (pred()) return true;
    std::this_thread::sleep_for(1ms);
  }
  return pred();
}

// /proc/PID/task/TID/syscall starts with the syscall number and its first argument in hex.
inline bool blocked_in(pid_t pid, pid_t tid, long nr, long arg0) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/task/" + std::to_string(tid) + "/syscall");
  long n = -2;
  std::string a0;
  if (!(in >> n >> a0)) return false;
  return n == nr && std::stol(a0, nullptr, 16) == arg0 && state_of(pid, tid) == 'S';
}

inline std::string read_report(int fd) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, 5000) != 1) return "<timeout>";
  char buf[256];
  ssize_t n = ::read(fd, buf, sizeof buf);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string("<eof>");
}

// A child whose main thread blocks in read(5) on a pipe and reports what it reads on `report`.
struct ReaderChild {
  PipePair input, report;
  Child child;
};

inline ReaderChild start_reader() {
  ReaderChild rc;
  rc.input = *make_pipe(0);
  rc.report = *make_pipe(0);
  int in = rc.input.read.get(), out = rc.report.write.get();
  rc.child = spawn([in, out]() mutable {
    // Under a test runner the pipes themselves may sit at 5: move them out of the way first.
    in = ::fcntl(in, F_DUPFD, 100);
    out = ::fcntl(out, F_DUPFD, 100);
    ::dup2(in, 5);
    char buf[256];
    for (;;) {
      ssize_t n = ::read(5, buf, sizeof buf);
      if (n <= 0) ::_exit(3);
      if (::write(out, buf, static_cast<size_t>(n)) < 0) ::_exit(4);
    }
  });
  rc.input.read.reset();
  rc.report.write.reset();
  return rc;
}

}  // namespace pipecr::sys
