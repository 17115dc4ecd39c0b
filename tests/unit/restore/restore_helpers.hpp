// restore_helpers.hpp: images described in code, and target processes that check themselves.
//
// A Scenario forks a child that builds its own state (setup), says it is ready, waits for SIGUSR1
// (looping on EINTR: a ptrace stop interrupts sigwaitinfo), then checks its own fds (check) and
// exits 0, or 1 with its complaint written to a result pipe. The child is killed and reaped in every
// path. ImageBuilder describes a state as records and encodes it with the image writer.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "image/image_io.hpp"
#include "pipecr/image.hpp"

namespace pipecr::testing {

class ImageBuilder {
 public:
  ImageBuilder& process(int32_t pid) {
    img_.processes.push_back(ProcessRecord{pid, 1, fmt::format("p{}", pid), {}});
    return *this;
  }
  // slots: (bytes, packet)
  uint64_t pipe(std::vector<std::pair<std::string, bool>> slots, uint32_t capacity = 65536,
                PipeKind kind = PipeKind::anonymous, std::string path = "", bool unlinked = false) {
    PipeRecord p;
    p.id = img_.pipes.size() + 1;
    p.kind = kind;
    p.inode = 1000 + p.id;
    p.capacity = capacity;
    p.uid = ::getuid();
    p.gid = ::getgid();
    p.mode = 0600;
    p.path = std::move(path);
    p.unlinked = unlinked;
    std::string& data = data_.emplace_back();
    for (auto& [bytes, packet] : slots) {
      p.slots.push_back(Slot{static_cast<uint32_t>(bytes.size()), packet});
      data += bytes;
    }
    p.data = std::as_bytes(std::span(data.data(), data.size()));
    img_.pipes.push_back(std::move(p));
    return img_.pipes.back().id;
  }
  uint64_t file(uint64_t pipe, uint32_t flags, Owner owner = {}, int32_t sig = 0,
                FifoReaderState fr = FifoReaderState::unknown) {
    FileRecord f;
    f.id = img_.files.size() + 1;
    f.pipe_id = pipe;
    f.flags = flags;
    f.owner = owner;
    f.signal = sig;
    f.fifo_reader = fr;
    img_.files.push_back(f);
    return f.id;
  }
  ImageBuilder& fd(int32_t pid, int32_t fd, uint64_t file, bool cloexec = false) {
    img_.fds.push_back(FdRecord{pid, fd, file, cloexec, Blocked::none});
    return *this;
  }
  // Encodes and parses again: the Image returned views bytes() (keep the builder alive).
  Image parsed() {
    auto enc = image::encode(img_);
    if (!enc) throw std::runtime_error(enc.error().what);
    bytes_ = std::move(*enc);
    auto img = image::parse(bytes_);
    if (!img) throw std::runtime_error(img.error().what);
    return std::move(*img);
  }
  Image& raw() { return img_; }

 private:
  Image img_;
  std::deque<std::string> data_;
  std::vector<std::byte> bytes_;
};

inline std::string pattern(size_t n, unsigned seed = 1) {
  std::string s(n, '\0');
  uint32_t x = seed * 2654435761u + 1;
  for (auto& c : s) {
    x = x * 1103515245u + 12345u;
    c = static_cast<char>(x >> 24);
  }
  return s;
}

// "" when the process is neither traced nor in a ptrace stop; else what it is.
inline std::string traced_or_stopped(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/status", pid));
  std::string line, out;
  while (std::getline(in, line)) {
    if (line.rfind("TracerPid:", 0) == 0 && std::stoi(line.substr(10)) != 0) out += line + " ";
    if (line.rfind("State:", 0) == 0 && line.find("t (tracing stop)") != std::string::npos) out += line + " ";
  }
  return out;
}

inline char state_of(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/stat", pid));
  std::string s;
  std::getline(in, s);
  auto p = s.rfind(')');
  return p == std::string::npos || p + 2 >= s.size() ? '?' : s[p + 2];
}

// The first field of /proc/PID/syscall: the syscall a task is blocked in, -1 running.
inline long blocked_syscall(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/syscall", pid));
  std::string first;
  in >> first;
  if (first.empty() || first == "running") return -1;
  return std::stol(first);
}

class Scenario {
 public:
  // check returns "" when the child's state is right, else what is wrong. With wait_signal false
  // the child goes straight from setup to check (setup may block, e.g. in read()).
  Scenario(const std::function<void()>& setup, const std::function<std::string()>& check, bool wait_signal = true) {
    int ready[2], result[2];
    if (::pipe2(ready, O_CLOEXEC) < 0 || ::pipe2(result, O_CLOEXEC) < 0) throw std::runtime_error("pipe2");
    sigset_t set, old;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    ::sigprocmask(SIG_BLOCK, &set, &old);
    const pid_t parent = ::getpid();
    pid_ = ::fork();
    if (pid_ == 0) {
      // Dies with the test, whatever ends it: an orphan would keep ctest's output pipe open and
      // turn a crash into a timeout.
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(1);
      int r = ::fcntl(result[1], F_DUPFD_CLOEXEC, 900);
      int w = ::fcntl(ready[1], F_DUPFD_CLOEXEC, 901);
      ::close(ready[0]);
      ::close(result[0]);
      ::close(ready[1]);
      ::close(result[1]);
      setup();
      char c = 'r';
      (void)!::write(w, &c, 1);
      if (wait_signal)
        while (::sigwaitinfo(&set, nullptr) != SIGUSR1) {
        }
      std::string msg = check();
      if (!msg.empty()) (void)!::write(r, msg.data(), msg.size());
      ::_exit(msg.empty() ? 0 : 1);
    }
    ::sigprocmask(SIG_SETMASK, &old, nullptr);
    ::close(ready[1]);
    ::close(result[1]);
    result_ = result[0];
    char c;
    ready_ok_ = ::read(ready[0], &c, 1) == 1;
    ::close(ready[0]);
  }
  ~Scenario() {
    if (result_ >= 0) ::close(result_);
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    while (::waitpid(pid_, nullptr, __WALL) < 0 && errno == EINTR) {
    }
  }
  Scenario(const Scenario&) = delete;
  Scenario& operator=(const Scenario&) = delete;

  [[nodiscard]] pid_t pid() const { return pid_; }
  [[nodiscard]] bool ready() const { return ready_ok_; }

  // Waits (up to 5 s) until the child is blocked in syscall nr.
  bool wait_blocked_in(long nr) const {
    for (int i = 0; i < 500; ++i) {
      if (state_of(pid_) == 'S' && blocked_syscall(pid_) == nr) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }

  // Signals the child (unless signal is 0), waits for it and returns "" on pass, else why not.
  std::string finish(int signal = SIGUSR1) {
    if (signal) ::kill(pid_, signal);
    int status = 0;
    for (int i = 0; i < 1000; ++i) {
      pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == pid_) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      if (i == 999) return "child did not finish in 10 s";
    }
    pid_t p = pid_;
    pid_ = -1;
    std::string msg(4096, '\0');
    ssize_t n = ::read(result_, msg.data(), msg.size());
    msg.resize(n > 0 ? static_cast<size_t>(n) : 0);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return "";
    return fmt::format("child {} status {:#x}: {}", p, status, msg);
  }

 private:
  pid_t pid_ = -1;
  int result_ = -1;
  bool ready_ok_ = false;
};

// Inside a child: checks, each returning "" or a complaint.
inline std::string expect_bytes(int fd, const std::string& want) {
  std::string got;
  char buf[65536];
  int fl = ::fcntl(fd, F_GETFL);
  ::fcntl(fd, F_SETFL, fl | O_NONBLOCK);
  for (;;) {
    ssize_t r = ::read(fd, buf, sizeof buf);
    if (r <= 0) break;
    got.append(buf, static_cast<size_t>(r));
  }
  ::fcntl(fd, F_SETFL, fl);
  if (got == want) return "";
  return fmt::format("fd {}: read {} bytes, want {}", fd, got.size(), want.size());
}

inline bool same_file(int a, int b) {
  pid_t me = ::getpid();
  return ::syscall(SYS_kcmp, me, me, 0 /* KCMP_FILE */, a, b) == 0;
}

inline bool is_dev_null(int fd) {
  struct stat a {}, b {};
  return ::fstat(fd, &a) == 0 && ::stat("/dev/null", &b) == 0 && a.st_rdev == b.st_rdev && S_ISCHR(a.st_mode);
}

// /dev/null at each fd (the "original" state a restore replaces).
inline void dev_null_at(std::initializer_list<int> fds) {
  for (int fd : fds) {
    int n = ::open("/dev/null", O_RDWR);
    ::dup2(n, fd);
    if (n != fd) ::close(n);
  }
}

}  // namespace pipecr::testing
