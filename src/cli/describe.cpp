// describe.cpp: see describe.hpp. Tables, not logic: every name is looked up, never composed from
// the numbers' textual form, so an unexpected value shows as a number instead of a wrong name.
#include "cli/describe.hpp"

#include <fcntl.h>
#include <sys/epoll.h>
#include <signal.h>
#include <time.h>

#include <array>

#include <fmt/format.h>

namespace pipecr::cli {
namespace {

// The kernel's O_LARGEFILE on x86_64 and arm64 user space alike (asm-generic/fcntl.h); open()
// sets it on 64-bit kernels, pipe2() does not (kernel-facts.md), so it is worth showing.
constexpr uint32_t kKernelLargefile = 0100000;

struct FlagName {
  uint32_t bits;
  const char* name;
};

// Order: the flags that change how a pipe end behaves first, then the ones that are only noted.
// O_SYNC includes O_DSYNC's bit, so it is matched first and O_DSYNC only when O_SYNC is not whole.
constexpr std::array<FlagName, 7> kFlags{{
    {O_NONBLOCK, "O_NONBLOCK"},
    {O_DIRECT, "O_DIRECT"},
    {O_ASYNC, "O_ASYNC"},
    {kKernelLargefile, "O_LARGEFILE"},
    {O_APPEND, "O_APPEND"},
    {O_NOATIME, "O_NOATIME"},
    {O_CLOEXEC, "O_CLOEXEC"},
}};

// Standard signals of Linux on x86_64 (signal(7)); SIGPOLL is SIGIO, named as fcntl(2) names it.
constexpr std::array<const char*, 32> kSignals{
    nullptr,   "SIGHUP",  "SIGINT",    "SIGQUIT", "SIGILL",  "SIGTRAP", "SIGABRT",   "SIGBUS",
    "SIGFPE",  "SIGKILL", "SIGUSR1",   "SIGSEGV", "SIGUSR2", "SIGPIPE", "SIGALRM",   "SIGTERM",
    "SIGSTKFLT", "SIGCHLD", "SIGCONT", "SIGSTOP", "SIGTSTP", "SIGTTIN", "SIGTTOU",   "SIGURG",
    "SIGXCPU", "SIGXFSZ", "SIGVTALRM", "SIGPROF", "SIGWINCH", "SIGIO",  "SIGPWR",    "SIGSYS",
};

bool shell_safe(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
         std::string_view("_@%+=:,./-").find(static_cast<char>(c)) != std::string_view::npos;
}

}  // namespace

const char* access_name(uint32_t flags) {
  switch (flags & O_ACCMODE) {
    case O_RDONLY: return "read";
    case O_WRONLY: return "write";
    default: return "readwrite";
  }
}

std::vector<std::string> flag_names(uint32_t flags) {
  std::vector<std::string> out;
  uint32_t rest = flags & ~static_cast<uint32_t>(O_ACCMODE);
  for (const FlagName& f : kFlags) {
    if ((rest & f.bits) == f.bits) {
      out.emplace_back(f.name);
      rest &= ~f.bits;
    }
  }
  if ((rest & O_SYNC) == static_cast<uint32_t>(O_SYNC)) {
    out.emplace_back("O_SYNC");
    rest &= ~static_cast<uint32_t>(O_SYNC);
  } else if (rest & O_DSYNC) {
    out.emplace_back("O_DSYNC");
    rest &= ~static_cast<uint32_t>(O_DSYNC);
  }
  if (rest != 0) out.push_back(fmt::format("0{:o}", rest));
  return out;
}

std::vector<std::string> epoll_event_names(uint32_t events) {
  static constexpr struct {
    uint32_t bit;
    const char* name;
  } kEvents[] = {{EPOLLIN, "EPOLLIN"},         {EPOLLPRI, "EPOLLPRI"},       {EPOLLOUT, "EPOLLOUT"},
                 {EPOLLERR, "EPOLLERR"},       {EPOLLHUP, "EPOLLHUP"},       {EPOLLRDNORM, "EPOLLRDNORM"},
                 {EPOLLRDBAND, "EPOLLRDBAND"}, {EPOLLWRNORM, "EPOLLWRNORM"}, {EPOLLWRBAND, "EPOLLWRBAND"},
                 {EPOLLMSG, "EPOLLMSG"},       {EPOLLRDHUP, "EPOLLRDHUP"},   {EPOLLEXCLUSIVE, "EPOLLEXCLUSIVE"},
                 {EPOLLWAKEUP, "EPOLLWAKEUP"}, {EPOLLONESHOT, "EPOLLONESHOT"}, {EPOLLET, "EPOLLET"}};
  std::vector<std::string> out;
  uint32_t rest = events;
  for (const auto& e : kEvents)
    if (rest & e.bit) {
      out.emplace_back(e.name);
      rest &= ~e.bit;
    }
  if (rest != 0) out.push_back(fmt::format("{:#x}", rest));
  return out;
}

std::string owner_type_name(int32_t type) {
  switch (type) {
    case F_OWNER_TID: return "tid";
    case F_OWNER_PID: return "pid";
    case F_OWNER_PGRP: return "pgrp";
    default: return fmt::format("type {}", type);
  }
}

std::string owner_type_words(int32_t type) {
  switch (type) {
    case F_OWNER_TID: return "thread";
    case F_OWNER_PID: return "process";
    case F_OWNER_PGRP: return "process group";
    default: return fmt::format("owner type {}", type);
  }
}

std::string describe_owner(const Owner& owner) {
  if (owner.pid == 0) return "none";
  std::string s = fmt::format("{} {} ({})", owner_type_name(owner.type), owner.pid, owner_type_words(owner.type));
  if (owner.has_uids) s += fmt::format(", uid {}, euid {}", owner.uid, owner.euid);
  return s;
}

std::string signal_name(int32_t sig) {
  if (sig <= 0) return {};
  if (sig < static_cast<int32_t>(kSignals.size()) && kSignals[sig]) return kSignals[sig];
  // SIGRTMIN is a function call in glibc: it reserves the first real-time signals for itself.
  const int rtmin = SIGRTMIN;
  if (sig == rtmin) return "SIGRTMIN";
  if (sig > rtmin && sig <= SIGRTMAX) return fmt::format("SIGRTMIN+{}", sig - rtmin);
  return fmt::format("SIG{}", sig);
}

const char* blocked_name(Blocked b) {
  switch (b) {
    case Blocked::reading: return "reading";
    case Blocked::writing: return "writing";
    default: return nullptr;
  }
}

const char* kind_name(PipeKind k) { return k == PipeKind::fifo ? "fifo" : "pipe"; }

const char* fifo_reader_name(FifoReaderState s) {
  switch (s) {
    case FifoReaderState::seen_writer: return "seen_writer";
    case FifoReaderState::no_writer_yet: return "no_writer_yet";
    default: return "unknown";
  }
}

std::string utc_time(uint64_t unix_ns) {
  if (unix_ns == 0) return {};
  auto secs = static_cast<time_t>(unix_ns / 1'000'000'000u);
  struct tm tm {};
  if (!::gmtime_r(&secs, &tm)) return fmt::format("@{}", secs);
  return fmt::format("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                     tm.tm_min, tm.tm_sec);
}

std::string printable(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char ch : s) {
    auto c = static_cast<unsigned char>(ch);
    if (c == '\\') out += "\\\\";
    else if (c < 0x20 || c == 0x7f) out += fmt::format("\\x{:02x}", c);
    else out += ch;
  }
  return out;
}

std::string command_line(const std::vector<std::string>& argv) {
  std::string out;
  for (const std::string& a : argv) {
    if (!out.empty()) out += ' ';
    bool safe = !a.empty();
    for (char c : a) safe = safe && shell_safe(static_cast<unsigned char>(c));
    if (safe) {
      out += a;
      continue;
    }
    out += '\'';
    for (char c : a) {
      if (c == '\'') out += "'\\''";
      else if (c == '\\') out += c;  // literal inside single quotes
      else out += printable(std::string_view(&c, 1));
    }
    out += '\'';
  }
  return out;
}

}  // namespace pipecr::cli
