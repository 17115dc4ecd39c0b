// zdtmlite.h: the few helpers every scenario program shares, after CRIU's zdtm.
//
// A scenario program builds one state of pipes and FIFOs, describes it, says "ready", waits for
// SIGUSR1, then checks everything it can observe itself (every byte, size, flag, owner, sharing
// relation) and exits 0 (pass) or 1 (fail, with ONE line "FAIL <scenario>: <reason>" on stderr).
// Between "ready" and SIGUSR1 the harness may dump it, wreck its pipes and restore them; the
// program cannot tell, and that is the point: only a byte-exact restore passes.
//
// The protocol with the harness (tests/scenario/scenario_test.cpp), all through the environment:
//   ZDTM_READY_FD  an fd (a socket, never a pipe: it must not show up in the dump) to write
//                  "ready\n" to; closed right after. Without it, "ready\n" goes to stdout.
//   ZDTM_EXPECT    a path where the program writes, before "ready", the JSON description of what
//                  it holds (see Expect below); the harness compares it with `pipecr show --json`
//                  and with the live state in /proc.
//   ZDTM_DIR       a private scratch directory (FIFOs are made there), so ctest -j runs never meet.
// SIGUSR1 is blocked from init() on and taken with sigwaitinfo(), so it can never arrive early or
// be lost. Every child a program forks dies with its parent (PR_SET_PDEATHSIG) and every program
// kills itself after ZDTM_TIMEOUT seconds (default 300): nothing outlives a crashed harness.
#pragma once

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <deque>
#include <string>
#include <vector>

namespace zdtm {

inline const char* g_name = "scenario";
inline int g_ready_fd = -1;

// One line on stderr, then exit 1. Used for every failed check, in any process of the scenario.
[[noreturn]] __attribute__((format(printf, 1, 2))) inline void fail(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  fprintf(stderr, "FAIL %s[%d]: %s\n", g_name, static_cast<int>(getpid()), buf);
  fflush(stderr);
  _exit(1);
}

// fail() with strerror(errno) appended: for a system call that should not have failed.
#define ZDTM_SYSFAIL(fmt, ...) ::zdtm::fail(fmt ": %s", ##__VA_ARGS__, strerror(errno))

// A check that must hold; the reason names what was expected and what was found.
#define ZDTM_CHECK(cond, fmt, ...) \
  do {                             \
    if (!(cond)) ::zdtm::fail(fmt, ##__VA_ARGS__); \
  } while (0)

[[noreturn]] inline void pass() {
  fflush(stdout);
  _exit(0);
}

inline std::string env_or(const char* name, const char* dflt) {
  const char* v = getenv(name);
  return v && *v ? v : dflt;
}

inline std::string dir() { return env_or("ZDTM_DIR", "/tmp"); }

// A fresh FIFO (mode 0600) named `name` in dir(); returns its path.
inline std::string make_fifo(const char* name) {
  std::string path = dir() + "/" + name;
  unlink(path.c_str());
  if (mkfifo(path.c_str(), 0600) != 0) ZDTM_SYSFAIL("mkfifo(%s)", path.c_str());
  return path;
}

// Block SIGUSR1 (and the extra signals a scenario takes with sigtimedwait) for the whole life of
// the program; arm the self-destruct alarm. Call first thing in main().
inline void init(const char* name, std::vector<int> extra_blocked = {}) {
  g_name = name;
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR1);
  for (int s : extra_blocked) sigaddset(&set, s);
  if (sigprocmask(SIG_BLOCK, &set, nullptr) != 0) ZDTM_SYSFAIL("sigprocmask");
  alarm(static_cast<unsigned>(atoi(env_or("ZDTM_TIMEOUT", "300").c_str())));
  std::string fd = env_or("ZDTM_READY_FD", "");
  g_ready_fd = fd.empty() ? -1 : atoi(fd.c_str());
}

inline void write_all(int fd, const void* buf, size_t n, const char* what) {
  auto p = static_cast<const char*>(buf);
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) ZDTM_SYSFAIL("write(%s, %zu bytes)", what, n);
    p += w;
    n -= static_cast<size_t>(w);
  }
}

// Tell the harness the state is built. The ready fd is closed so no later child inherits it.
inline void ready() {
  int fd = g_ready_fd >= 0 ? g_ready_fd : STDOUT_FILENO;
  write_all(fd, "ready\n", 6, "ready fd");
  if (g_ready_fd >= 0) close(g_ready_fd);
  g_ready_fd = -1;
}

inline void wait_for_signal() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR1);
  for (;;) {
    int s = sigwaitinfo(&set, nullptr);
    if (s == SIGUSR1) return;
    if (s < 0 && errno != EINTR) ZDTM_SYSFAIL("sigwaitinfo");
  }
}

// fork() for a scenario: the child dies with its parent and does not hold the ready fd.
inline pid_t fork_child() {
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) ZDTM_SYSFAIL("fork");
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(1);
    if (g_ready_fd >= 0) close(g_ready_fd);
    g_ready_fd = -1;
  }
  return pid;
}

// Reap a child; its failure reason is already on the shared stderr. Returns its exit code, or
// 128 + signal.
inline int reap(pid_t pid) {
  int status = 0;
  while (waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) ZDTM_SYSFAIL("waitpid(%d)", static_cast<int>(pid));
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return 128 + WTERMSIG(status);
}

// ---- data: a pattern that differs per stream (seed) and per offset, so a byte from the wrong
// ---- pipe, the wrong place or a stale page is caught.

inline uint8_t pattern(uint32_t seed, uint64_t i) {
  uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ (static_cast<uint64_t>(seed) << 40 | seed);
  x ^= x >> 29;
  return static_cast<uint8_t>(x ^ (x >> 17) ^ seed);
}

inline std::vector<uint8_t> pattern_bytes(uint32_t seed, uint64_t off, size_t n) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; i++) v[i] = pattern(seed, off + i);
  return v;
}

// Write n bytes of stream `seed` from offset `off` (in writes of at most `chunk` bytes: how the
// bytes are written decides the slot layout).
inline void write_pattern(int fd, uint32_t seed, uint64_t off, size_t n, size_t chunk, const char* what) {
  while (n > 0) {
    size_t k = n < chunk ? n : chunk;
    std::vector<uint8_t> v = pattern_bytes(seed, off, k);
    write_all(fd, v.data(), k, what);
    off += k;
    n -= k;
  }
}

// Read exactly n bytes and compare them with stream `seed` from `off`. EAGAIN or EOF before n
// bytes is a failure ("pipe lost bytes").
inline void expect_pattern(int fd, uint32_t seed, uint64_t off, size_t n, const char* what) {
  std::vector<uint8_t> buf(65536);
  size_t got = 0;
  while (got < n) {
    size_t want = n - got < buf.size() ? n - got : buf.size();
    ssize_t r = read(fd, buf.data(), want);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) ZDTM_SYSFAIL("%s: read after %zu of %zu bytes", what, got, n);
    if (r == 0) fail("%s: EOF after %zu of %zu bytes", what, got, n);
    for (ssize_t i = 0; i < r; i++) {
      uint8_t want_b = pattern(seed, off + got + static_cast<size_t>(i));
      if (buf[static_cast<size_t>(i)] != want_b)
        fail("%s: byte %zu is 0x%02x, expected 0x%02x", what, got + static_cast<size_t>(i),
             buf[static_cast<size_t>(i)], want_b);
    }
    got += static_cast<size_t>(r);
  }
}

inline int fionread(int fd) {
  int n = -1;
  if (ioctl(fd, FIONREAD, &n) != 0) ZDTM_SYSFAIL("FIONREAD(fd %d)", fd);
  return n;
}

inline int getfl(int fd) {
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0) ZDTM_SYSFAIL("F_GETFL(fd %d)", fd);
  return fl;
}

inline void setfl(int fd, int add) {
  if (fcntl(fd, F_SETFL, getfl(fd) | add) != 0) ZDTM_SYSFAIL("F_SETFL(fd %d)", fd);
}

// The status flags a scenario pins down, as the harness names them.
inline constexpr int kCheckedFlags = O_NONBLOCK | O_DIRECT | O_ASYNC;

// fd has access mode `acc` and exactly `flags` among kCheckedFlags, and FD_CLOEXEC == cloexec.
inline void expect_fd(int fd, int acc, int flags, bool cloexec, const char* what) {
  int fl = getfl(fd);
  ZDTM_CHECK((fl & O_ACCMODE) == acc, "%s (fd %d): access mode %d, expected %d", what, fd, fl & O_ACCMODE, acc);
  ZDTM_CHECK((fl & kCheckedFlags) == flags, "%s (fd %d): status flags 0%o, expected 0%o", what, fd,
             fl & kCheckedFlags, flags);
  int fdfl = fcntl(fd, F_GETFD);
  if (fdfl < 0) ZDTM_SYSFAIL("F_GETFD(fd %d)", fd);
  ZDTM_CHECK(((fdfl & FD_CLOEXEC) != 0) == cloexec, "%s (fd %d): FD_CLOEXEC %d, expected %d", what, fd,
             fdfl & FD_CLOEXEC, cloexec);
}

inline int pipe_size(int fd) {
  int n = fcntl(fd, F_GETPIPE_SZ);
  if (n < 0) ZDTM_SYSFAIL("F_GETPIPE_SZ(fd %d)", fd);
  return n;
}

inline ino_t inode_of(int fd) {
  struct stat st;
  if (fstat(fd, &st) != 0) ZDTM_SYSFAIL("fstat(fd %d)", fd);
  return st.st_ino;
}

// kcmp(KCMP_FILE) of two of our own fds: 0 when they share one open file description.
inline long kcmp_file(int fd1, int fd2) {
  long r = syscall(SYS_kcmp, getpid(), getpid(), 0 /* KCMP_FILE */, fd1, fd2);
  if (r < 0) ZDTM_SYSFAIL("kcmp(KCMP_FILE, %d, %d)", fd1, fd2);
  return r;
}

inline void expect_shared(int fd1, int fd2, bool shared, const char* what) {
  bool same = kcmp_file(fd1, fd2) == 0;
  ZDTM_CHECK(same == shared, "%s: fds %d and %d %s one open file description, expected %s", what, fd1, fd2,
             same ? "share" : "do not share", shared ? "shared" : "separate");
}

// Move fd to exactly `target` (closing whatever was there) and return target.
inline int move_fd(int fd, int target) {
  if (fd == target) return fd;
  if (dup2(fd, target) != target) ZDTM_SYSFAIL("dup2(%d, %d)", fd, target);
  close(fd);
  return target;
}

// Count one-byte writes until EAGAIN (fd must be O_NONBLOCK): the free space a writer sees,
// which depends on the slot layout, not only on the bytes queued.
inline size_t count_free(int wfd, char filler) {
  size_t n = 0;
  for (;;) {
    ssize_t w = write(wfd, &filler, 1);
    if (w == 1) {
      n++;
      continue;
    }
    if (w < 0 && errno == EAGAIN) return n;
    if (w < 0 && errno == EINTR) continue;
    ZDTM_SYSFAIL("one-byte write after %zu", n);
  }
}

inline void expect_filler(int fd, char filler, size_t n, const char* what) {
  std::vector<char> buf(65536);
  size_t got = 0;
  while (got < n) {
    size_t want = n - got < buf.size() ? n - got : buf.size();
    ssize_t r = read(fd, buf.data(), want);
    if (r <= 0) ZDTM_SYSFAIL("%s: read filler after %zu of %zu", what, got, n);
    for (ssize_t i = 0; i < r; i++)
      ZDTM_CHECK(buf[static_cast<size_t>(i)] == filler, "%s: filler byte %zu wrong", what, got + static_cast<size_t>(i));
    got += static_cast<size_t>(r);
  }
}

// Wait (up to 10 s) until `pid` sleeps in system call `nr` with fd `fd` as first argument
// (/proc/PID/syscall), e.g. a child blocked in read(11, ...). A dump taken before that would not
// see the blocked reader the scenario is about. fd < 0: any argument (a child in
// wait_for_signal(): nr SYS_rt_sigtimedwait, once it has built its part of the state).
inline void wait_blocked(pid_t pid, long nr, int fd) {
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/syscall", static_cast<int>(pid));
  for (int i = 0; i < 10000; i++) {
    FILE* f = fopen(path, "r");
    if (!f) ZDTM_SYSFAIL("fopen(%s)", path);
    long got_nr = -1;
    unsigned long arg0 = 0;
    int n = fscanf(f, "%ld 0x%lx", &got_nr, &arg0);
    fclose(f);
    if (n == 2 && got_nr == nr && (fd < 0 || arg0 == static_cast<unsigned long>(fd))) return;
    usleep(1000);
  }
  fail("pid %d never blocked in syscall %ld on fd %d", static_cast<int>(pid), nr, fd);
}

inline std::string comm_of(pid_t pid) {
  char path[64], buf[64] = {0};
  snprintf(path, sizeof path, "/proc/%d/comm", static_cast<int>(pid));
  FILE* f = fopen(path, "r");
  if (!f) ZDTM_SYSFAIL("fopen(%s)", path);
  if (!fgets(buf, sizeof buf, f)) buf[0] = 0;
  fclose(f);
  std::string s = buf;
  if (!s.empty() && s.back() == '\n') s.pop_back();
  return s;
}

// ---- The expected description, written to ZDTM_EXPECT. Its shape follows `pipecr show --json`
// ---- (docs/json.md) but with names the program chooses instead of image ids; the harness maps
// ---- names to ids one-to-one. A field left at its "unset" value is not compared.
class Expect {
 public:
  struct Pipe {
    std::string name, kind = "pipe", path;
    long capacity = -1, bytes = -1;
    bool unlinked = false;
    bool packets_set = false;            // compare "packets"
    std::vector<long> packets;           // with packets_set: the list (empty = null/none)
    std::vector<long> slots;             // when non-empty: slot lengths, head first
  };
  struct File {
    std::string name, pipe, access;      // access: "read", "write", "readwrite"
    int flags = 0;                       // among kCheckedFlags
    int owner_type = -1, owner_pid = 0;  // owner_pid 0: no owner; type: F_OWNER_TID/PID/PGRP
    int signal = 0;
    std::string fifo_reader;             // "seen_writer", "no_writer_yet"; empty: not compared
  };
  struct Fd {
    pid_t pid;
    int fd;
    std::string file;
    bool cloexec = false;
    std::string blocked;                 // "", "reading", "writing"
    pid_t tid = 0;                       // not 0: the fd is in this thread's own table (unshare(CLONE_FILES))
  };
  struct InFlight {                      // a file sent with SCM_RIGHTS, not received yet
    pid_t pid;
    int socket_fd;                       // the receiving socket
    std::string file;
    long message, slot;                  // docs/json.md in_flight[]
  };

  void process(pid_t pid) { procs_.push_back(pid); }
  Pipe& pipe(std::string name, long capacity, long bytes) {
    pipes_.push_back(Pipe{});
    pipes_.back().name = std::move(name);
    pipes_.back().capacity = capacity;
    pipes_.back().bytes = bytes;
    pipes_.back().packets_set = true;  // stream pipes: "packets" is null
    return pipes_.back();
  }
  File& file(std::string name, std::string pipe, std::string access, int flags = 0) {
    files_.push_back(File{});
    File& f = files_.back();
    f.name = std::move(name);
    f.pipe = std::move(pipe);
    f.access = std::move(access);
    f.flags = flags;
    return f;
  }
  Fd& fd(pid_t pid, int fd, std::string file, bool cloexec = false) {
    fds_.push_back(Fd{pid, fd, std::move(file), cloexec, "", 0});
    return fds_.back();
  }

  void in_flight(pid_t pid, int socket_fd, std::string file, long message, long slot) {
    in_flight_.push_back(InFlight{pid, socket_fd, std::move(file), message, slot});
  }

  // Write the JSON document to ZDTM_EXPECT (no-op without it).
  void write() const {
    std::string path = env_or("ZDTM_EXPECT", "");
    if (path.empty()) return;
    std::string s = "{\n \"scenario\": " + str(g_name) + ",\n \"processes\": [";
    for (size_t i = 0; i < procs_.size(); i++)
      s += (i ? ", " : "") + std::string("{\"pid\": ") + std::to_string(procs_[i]) +
           ", \"comm\": " + str(comm_of(procs_[i])) + "}";
    s += "],\n \"pipes\": [";
    for (size_t i = 0; i < pipes_.size(); i++) s += (i ? ",\n  " : "\n  ") + pipe_json(pipes_[i]);
    s += "],\n \"files\": [";
    for (size_t i = 0; i < files_.size(); i++) s += (i ? ",\n  " : "\n  ") + file_json(files_[i]);
    s += "],\n \"fds\": [";
    for (size_t i = 0; i < fds_.size(); i++) s += (i ? ",\n  " : "\n  ") + fd_json(fds_[i]);
    s += "]";
    if (!in_flight_.empty()) {
      s += ",\n \"in_flight\": [";
      for (size_t i = 0; i < in_flight_.size(); i++) {
        const InFlight& f = in_flight_[i];
        s += (i ? ",\n  " : "\n  ") + std::string("{\"pid\": ") + std::to_string(f.pid) +
             ", \"socket_fd\": " + std::to_string(f.socket_fd) + ", \"file\": " + str(f.file) +
             ", \"message\": " + std::to_string(f.message) + ", \"slot\": " + std::to_string(f.slot) + "}";
      }
      s += "]";
    }
    s += "\n}\n";
    std::string tmp = path + ".tmp";
    int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) ZDTM_SYSFAIL("open(%s)", tmp.c_str());
    write_all(fd, s.data(), s.size(), "expect file");
    close(fd);
    if (rename(tmp.c_str(), path.c_str()) != 0) ZDTM_SYSFAIL("rename(%s)", path.c_str());
  }

 private:
  static std::string str(const std::string& v) {
    std::string s = "\"";
    for (char c : v) {
      if (c == '"' || c == '\\') s += '\\';
      if (static_cast<unsigned char>(c) < 0x20) {
        char b[8];
        snprintf(b, sizeof b, "\\u%04x", c);
        s += b;
        continue;
      }
      s += c;
    }
    return s + "\"";
  }
  static std::string list(const std::vector<long>& v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); i++) s += (i ? ", " : "") + std::to_string(v[i]);
    return s + "]";
  }
  static std::string flags_json(int flags) {
    std::string s = "[";
    const char* sep = "";
    if (flags & O_NONBLOCK) s += sep + std::string("\"O_NONBLOCK\""), sep = ", ";
    if (flags & O_DIRECT) s += sep + std::string("\"O_DIRECT\""), sep = ", ";
    if (flags & O_ASYNC) s += sep + std::string("\"O_ASYNC\""), sep = ", ";
    return s + "]";
  }
  static std::string pipe_json(const Pipe& p) {
    std::string s = "{\"name\": " + str(p.name) + ", \"kind\": " + str(p.kind);
    s += ", \"path\": " + (p.kind == "fifo" ? str(p.path) : std::string("null"));
    if (p.kind == "fifo") s += std::string(", \"unlinked\": ") + (p.unlinked ? "true" : "false");
    s += ", \"capacity\": " + std::to_string(p.capacity) + ", \"bytes\": " + std::to_string(p.bytes);
    if (p.packets_set) s += ", \"packets\": " + (p.packets.empty() ? std::string("null") : list(p.packets));
    if (!p.slots.empty()) s += ", \"slots\": " + list(p.slots);
    return s + ", \"outside_holders\": false}";
  }
  static std::string file_json(const File& f) {
    std::string s = "{\"name\": " + str(f.name) + ", \"pipe\": " + str(f.pipe) + ", \"access\": " + str(f.access) +
                    ", \"flags\": " + flags_json(f.flags);
    if (f.owner_pid == 0) {
      s += ", \"owner\": null";
    } else {
      const char* type = f.owner_type == F_OWNER_TID ? "tid" : f.owner_type == F_OWNER_PGRP ? "pgrp" : "pid";
      s += ", \"owner\": {\"type\": " + str(type) + ", \"pid\": " + std::to_string(f.owner_pid) + "}";
    }
    s += ", \"signal\": " + std::to_string(f.signal);
    if (!f.fifo_reader.empty()) s += ", \"fifo_reader\": " + str(f.fifo_reader);
    return s + "}";
  }
  static std::string fd_json(const Fd& f) {
    return "{\"pid\": " + std::to_string(f.pid) + ", \"fd\": " + std::to_string(f.fd) + ", \"file\": " + str(f.file) +
           ", \"cloexec\": " + (f.cloexec ? "true" : "false") +
           ", \"blocked\": " + (f.blocked.empty() ? std::string("null") : str(f.blocked)) +
           (f.tid ? ", \"tid\": " + std::to_string(f.tid) : std::string()) + "}";
  }

  std::vector<pid_t> procs_;
  // deques: the references pipe(), file() and fd() return stay valid as more are added.
  std::deque<Pipe> pipes_;
  std::deque<File> files_;
  std::deque<Fd> fds_;
  std::vector<InFlight> in_flight_;
};

}  // namespace zdtm
