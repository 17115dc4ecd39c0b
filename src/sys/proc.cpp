// proc.cpp: /proc readers. See proc.hpp for the technique and the error model.
//
// Small files (stat, comm, fdinfo, syscall, wchan) are read into a stack buffer with one open and
// one read: the kernel generates them whole on the first read (seq_file), and none of them exceeds
// a page. Parsing works on string_view with std::from_chars, so no intermediate strings are made.
#include "sys/proc.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <charconv>
#include <climits>
#include <cstdio>
#include <span>

#include <fmt/format.h>

#include "sys/arch.hpp"
#include "sys/unique_fd.hpp"

namespace pipecr::sys {
namespace {

// Fixed-size path buffer: "/proc/<pid>/task/<tid>/children" and friends fit easily.
using PathBuf = std::array<char, 96>;

template <class... Args>
const char* make_path(PathBuf& buf, fmt::format_string<Args...> f, Args&&... args) {
  auto r = fmt::format_to_n(buf.data(), buf.size() - 1, f, std::forward<Args>(args)...);
  *r.out = '\0';
  return buf.data();
}

bool proc_exists(pid_t pid) {
  PathBuf p;
  return ::access(make_path(p, "/proc/{}", pid), F_OK) == 0;
}

// An errno from a /proc access of pid's files: the process being gone outranks everything (a
// vanished process turns any of its files into ENOENT or ESRCH).
Error proc_error(pid_t pid, int err, const char* path) {
  std::string what = fmt::format("open({})", path);
  if ((err == ENOENT || err == ESRCH) && pid > 0 && !proc_exists(pid)) {
    Error e = errno_error(err, std::move(what));
    e.kind = Errc::gone;
    e.what = fmt::format("process {} is gone ({})", pid, e.what);
    return e;
  }
  return errno_error(err, std::move(what));
}

Expected<UniqueFd> open_proc(pid_t pid, const char* path, int flags) {
  int fd = ::open(path, flags | O_CLOEXEC);
  if (fd < 0) return tl::unexpected(proc_error(pid, errno, path));
  return UniqueFd(fd);
}

// One open, reads until EOF or the buffer is full. Returns the text read.
Expected<std::string_view> read_small(pid_t pid, const char* path, std::span<char> buf) {
  auto fd = open_proc(pid, path, O_RDONLY);
  if (!fd) return tl::unexpected(fd.error());
  size_t n = 0;
  while (n < buf.size()) {
    ssize_t r = ::read(fd->get(), buf.data() + n, buf.size() - n);
    if (r < 0) {
      if (errno == EINTR) continue;
      return tl::unexpected(proc_error(pid, errno, path));
    }
    if (r == 0) break;
    n += static_cast<size_t>(r);
  }
  return std::string_view(buf.data(), n);
}

template <class T>
bool parse_num(std::string_view s, T& out, int base = 10) {
  auto r = std::from_chars(s.data(), s.data() + s.size(), out, base);
  return r.ec == std::errc() && r.ptr == s.data() + s.size();
}

// Splits off the next space-separated token of s.
std::string_view next_token(std::string_view& s) {
  size_t b = s.find_first_not_of(" \n\t");
  if (b == std::string_view::npos) {
    s = {};
    return {};
  }
  s.remove_prefix(b);
  size_t e = s.find_first_of(" \n\t");
  std::string_view tok = s.substr(0, e);
  s.remove_prefix(e == std::string_view::npos ? s.size() : e);
  return tok;
}

// Calls fn(name) for every entry of the open directory dirfd, via getdents64 in 32 KiB blocks.
template <class Fn>
Expected<void> for_each_dirent(pid_t pid, int dirfd, const char* path, Fn&& fn) {
  alignas(dirent64) char buf[32768];
  for (;;) {
    ssize_t n = ::getdents64(dirfd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      return tl::unexpected(proc_error(pid, errno, path));
    }
    if (n == 0) return {};
    for (ssize_t off = 0; off < n;) {
      auto* d = reinterpret_cast<dirent64*>(buf + off);
      fn(std::string_view(d->d_name));
      off += d->d_reclen;
    }
  }
}

// The numeric entries of a directory, ascending.
Expected<std::vector<pid_t>> numeric_entries(pid_t pid, const char* path) {
  auto dir = open_proc(pid, path, O_RDONLY | O_DIRECTORY);
  if (!dir) return tl::unexpected(dir.error());
  std::vector<pid_t> ids;
  auto r = for_each_dirent(pid, dir->get(), path, [&](std::string_view name) {
    pid_t id = 0;
    if (parse_num(name, id)) ids.push_back(id);
  });
  if (!r) return tl::unexpected(r.error());
  std::sort(ids.begin(), ids.end());
  return ids;
}

Expected<ProcStat> stat_at(pid_t pid, const char* path) {
  char buf[1024];
  auto text = read_small(pid, path, buf);
  if (!text) return tl::unexpected(text.error());
  return parse_stat(*text);
}

}  // namespace

Expected<std::string> read_proc_file(const std::string& path, size_t max) {
  pid_t pid = 0;
  if (path.rfind("/proc/", 0) == 0) {
    std::string_view rest = std::string_view(path).substr(6);
    (void)parse_num(rest.substr(0, rest.find('/')), pid);
  }
  auto fd = open_proc(pid, path.c_str(), O_RDONLY);
  if (!fd) return tl::unexpected(fd.error());
  std::string out;
  size_t chunk = 4096;
  while (out.size() < max) {
    size_t old = out.size();
    out.resize(std::min(max, old + chunk));
    ssize_t r = ::read(fd->get(), out.data() + old, out.size() - old);
    if (r < 0) {
      out.resize(old);
      if (errno == EINTR) continue;
      return tl::unexpected(proc_error(pid, errno, path.c_str()));
    }
    out.resize(old + static_cast<size_t>(r));
    if (r == 0) break;
    chunk = std::min<size_t>(chunk * 2, 1 << 20);
  }
  return out;
}

Expected<std::vector<pid_t>> list_pids() { return numeric_entries(0, "/proc"); }

Expected<std::vector<pid_t>> list_threads(pid_t pid) {
  PathBuf p;
  return numeric_entries(pid, make_path(p, "/proc/{}/task", pid));
}

Expected<std::string> read_comm(pid_t pid) {
  PathBuf p;
  char buf[256];
  auto text = read_small(pid, make_path(p, "/proc/{}/comm", pid), buf);
  if (!text) return tl::unexpected(text.error());
  std::string_view s = *text;
  if (!s.empty() && s.back() == '\n') s.remove_suffix(1);
  return std::string(s);
}

Expected<std::vector<std::string>> read_cmdline(pid_t pid) {
  PathBuf p;
  auto text = read_proc_file(make_path(p, "/proc/{}/cmdline", pid));
  if (!text) return tl::unexpected(text.error());
  std::vector<std::string> argv;
  std::string_view s = *text;
  while (!s.empty()) {
    size_t e = s.find('\0');
    argv.emplace_back(s.substr(0, e));
    s.remove_prefix(e == std::string_view::npos ? s.size() : e + 1);
  }
  return argv;
}

Expected<ProcStat> parse_stat(std::string_view text) {
  // "pid (comm) S ppid pgrp session ...": comm may be "a) (b", so take the LAST ')'.
  size_t open = text.find('(');
  size_t close = text.rfind(')');
  auto bad = [&] { return fail(Errc::system, 0, fmt::format("malformed stat line: {:.80}", text)); };
  if (open == std::string_view::npos || close == std::string_view::npos || close < open) return bad();
  ProcStat st;
  if (!parse_num(text.substr(0, open > 0 ? open - 1 : 0), st.pid)) return bad();
  st.comm = std::string(text.substr(open + 1, close - open - 1));
  std::string_view rest = text.substr(close + 1);
  std::string_view state = next_token(rest);
  if (state.size() != 1) return bad();
  st.state = state[0];
  if (!parse_num(next_token(rest), st.ppid) || !parse_num(next_token(rest), st.pgrp) ||
      !parse_num(next_token(rest), st.session))
    return bad();
  // Field 28, the address at the main stack's start (0 to a reader that may not ptrace the process);
  // field 39, the CPU the task last ran on: 32 fields after session (Linux 2.2 and later).
  for (int field = 7; field < 39 && !rest.empty(); ++field) {
    std::string_view tok = next_token(rest);
    if (field == 28 && !parse_num(tok, st.start_stack)) st.start_stack = 0;
  }
  if (!parse_num(next_token(rest), st.processor)) st.processor = -1;
  return st;
}

namespace {
// struct procmap_query of <linux/fs.h> (Linux 6.11), which the build machine's headers may predate;
// the ABI is fixed.
struct ProcmapQuery {
  uint64_t size, query_flags, query_addr;
  uint64_t vma_start, vma_end, vma_flags, vma_page_size, vma_offset, inode;
  uint32_t dev_major, dev_minor, vma_name_size, build_id_size;
  uint64_t vma_name_addr, build_id_addr;
};
static_assert(sizeof(ProcmapQuery) == 104);
constexpr unsigned long kProcmapQuery = 0xc0686611;  // _IOWR('f', 17, struct procmap_query)
constexpr uint64_t kCoveringOrNextVma = 0x10, kExecutableVma = 0x04;
}  // namespace

Expected<std::optional<MapRange>> query_mapping(int maps_fd, uint64_t addr, bool or_next) {
  ProcmapQuery q{};
  q.size = sizeof q;
  q.query_flags = or_next ? kCoveringOrNextVma : 0;
  q.query_addr = addr;
  if (::ioctl(maps_fd, kProcmapQuery, &q) == 0) return MapRange{q.vma_start, q.vma_end};
  if (errno == ENOENT) return std::nullopt;
  return fail_errno(errno, fmt::format("ioctl(PROCMAP_QUERY, {:#x})", addr));
}

std::optional<std::vector<ExecMapping>> executable_mappings_by_query(pid_t pid) {
  UniqueFd maps(::open(fmt::format("/proc/{}/maps", pid).c_str(), O_RDONLY | O_CLOEXEC));
  if (!maps) return std::nullopt;
  std::vector<ExecMapping> out;
  char name[PATH_MAX];
  for (uint64_t addr = 0;;) {
    ProcmapQuery q{};
    q.size = sizeof q;
    q.query_flags = kCoveringOrNextVma | kExecutableVma;
    q.query_addr = addr;
    q.vma_name_addr = reinterpret_cast<uint64_t>(name);
    q.vma_name_size = sizeof name;
    if (::ioctl(maps.get(), kProcmapQuery, &q) < 0) {
      if (errno == ENOENT) return out;
      return std::nullopt;  // ENOTTY before 6.11; a name longer than PATH_MAX (ENAMETOOLONG)
    }
    out.push_back(ExecMapping{q.vma_start, q.vma_end, q.vma_offset, fmt::format("{:02x}:{:02x}", q.dev_major, q.dev_minor),
                              q.inode, q.vma_name_size ? std::string(name) : std::string()});
    addr = q.vma_end;
  }
}

std::vector<ExecMapping> executable_mappings_by_listing(pid_t pid) {
  std::vector<ExecMapping> out;
  std::FILE* maps = std::fopen(fmt::format("/proc/{}/maps", pid).c_str(), "re");
  if (!maps) return out;
  char line[PATH_MAX + 256];
  while (std::fgets(line, sizeof line, maps)) {
    unsigned long lo = 0, hi = 0, offset = 0, inode = 0;
    char perms[8] = {}, dev[16] = {};
    int at = 0;
    if (std::sscanf(line, "%lx-%lx %7s %lx %15s %lu %n", &lo, &hi, perms, &offset, dev, &inode, &at) < 6 || hi <= lo ||
        perms[2] != 'x')
      continue;
    std::string_view rest(line + at);
    while (!rest.empty() && (rest.back() == '\n' || rest.back() == ' ')) rest.remove_suffix(1);
    if (rest == "[vsyscall]") continue;
    out.push_back(ExecMapping{lo, hi, offset, dev, inode, std::string(rest)});
  }
  std::fclose(maps);
  return out;
}

std::vector<ExecMapping> executable_mappings(pid_t pid) {
  if (auto q = executable_mappings_by_query(pid)) return std::move(*q);
  return executable_mappings_by_listing(pid);
}

Expected<ProcStat> read_stat(pid_t pid) {
  PathBuf p;
  return stat_at(pid, make_path(p, "/proc/{}/stat", pid));
}

Expected<ProcStat> read_task_stat(pid_t pid, pid_t tid) {
  PathBuf p;
  return stat_at(pid, make_path(p, "/proc/{}/task/{}/stat", pid, tid));
}

uint32_t open_fd_count(pid_t pid, pid_t tid) {
  PathBuf p;
  const char* path = tid ? make_path(p, "/proc/{}/task/{}/fd", pid, tid) : make_path(p, "/proc/{}/fd", pid);
  struct stat st {};
  if (::stat(path, &st) < 0 || st.st_size <= 0) return 0;
  return static_cast<uint32_t>(std::min<off_t>(st.st_size, UINT32_MAX));
}

Expected<pid_t> read_ppid(pid_t pid) {
  return read_stat(pid).map([](const ProcStat& s) { return s.ppid; });
}

TaskStatus parse_status(std::string_view text) {
  TaskStatus st;
  while (!text.empty()) {
    const size_t eol = text.find('\n');
    std::string_view line = text.substr(0, eol);
    text.remove_prefix(eol == std::string_view::npos ? text.size() : eol + 1);
    const size_t colon = line.find(':');
    if (colon == std::string_view::npos) continue;
    const std::string_view key = line.substr(0, colon);
    std::string_view value = line.substr(colon + 1);
    value = next_token(value);
    uint64_t bits = 0;
    if (key == "FDSize") {
      uint32_t n = 0;
      if (parse_num(value, n)) st.fd_size = n;
    } else if (key == "Seccomp") {
      (void)parse_num(value, st.seccomp);
    } else if (key == "Threads") {
      (void)parse_num(value, st.threads);
    } else if (key == "TracerPid") {
      (void)parse_num(value, st.tracer);
    } else if ((key == "SigPnd" || key == "ShdPnd") && parse_num(value, bits, 16)) {
      st.pending |= bits;
    } else if (key == "SigBlk" && parse_num(value, bits, 16)) {
      st.blocked = bits;
    }
  }
  return st;
}

Expected<TaskStatus> read_status(pid_t pid, pid_t tid) {
  PathBuf p;
  const char* path = tid ? make_path(p, "/proc/{}/task/{}/status", pid, tid) : make_path(p, "/proc/{}/status", pid);
  char buf[4096];  // about 1.5 KiB, but Groups: (before the lines pipecr reads) may list thousands
  auto text = read_small(pid, path, buf);
  if (!text) return tl::unexpected(text.error());
  if (text->size() < sizeof buf) return parse_status(*text);
  auto whole = read_proc_file(path, 1 << 20);
  if (!whole) return tl::unexpected(whole.error());
  return parse_status(*whole);
}

std::optional<char> task_state(pid_t pid, pid_t tid) {
  auto st = read_task_stat(pid, tid);
  if (!st) return std::nullopt;
  return st->state;
}

Expected<char> read_state(pid_t pid) {
  return read_stat(pid).map([](const ProcStat& s) { return s.state; });
}

namespace {

// Children by scanning every process's ppid: the fallback without CONFIG_PROC_CHILDREN.
Expected<std::vector<pid_t>> children_by_scan(pid_t pid) {
  auto pids = list_pids();
  if (!pids) return tl::unexpected(pids.error());
  std::vector<pid_t> kids;
  for (pid_t p : *pids) {
    auto st = read_stat(p);
    if (st && st->ppid == pid) kids.push_back(p);  // processes that vanish or hide are skipped
  }
  return kids;
}

}  // namespace

Expected<std::vector<pid_t>> children(pid_t pid) {
  auto tids = list_threads(pid);
  if (!tids) return tl::unexpected(tids.error());
  std::vector<pid_t> kids;
  for (pid_t tid : *tids) {
    PathBuf p;
    auto text = read_proc_file(make_path(p, "/proc/{}/task/{}/children", pid, tid));
    if (!text) {
      if (text.error().kind == Errc::not_found && tid == pid) return children_by_scan(pid);
      if (text.error().kind == Errc::gone) return tl::unexpected(text.error());
      continue;  // a thread that exited meanwhile
    }
    std::string_view s = *text;
    for (std::string_view tok = next_token(s); !tok.empty(); tok = next_token(s)) {
      pid_t kid = 0;
      if (parse_num(tok, kid)) kids.push_back(kid);
    }
  }
  std::sort(kids.begin(), kids.end());
  kids.erase(std::unique(kids.begin(), kids.end()), kids.end());
  return kids;
}

Expected<std::vector<pid_t>> descendants(pid_t pid) {
  auto first = children(pid);
  if (!first) return tl::unexpected(first.error());
  std::vector<pid_t> out = std::move(*first);
  // Breadth first: out grows while we walk it, so parents stay before their children.
  for (size_t i = 0; i < out.size(); ++i) {
    auto kids = children(out[i]);
    if (!kids) continue;  // exited meanwhile: its children were reparented elsewhere
    out.insert(out.end(), kids->begin(), kids->end());
  }
  return out;
}

Expected<std::vector<FdEntry>> list_fds(pid_t pid, bool with_targets) {
  PathBuf p;
  const char* path = make_path(p, "/proc/{}/fd", pid);
  auto dir = open_proc(pid, path, O_RDONLY | O_DIRECTORY);
  if (!dir) return tl::unexpected(dir.error());
  std::vector<FdEntry> fds;
  char link[PATH_MAX];
  int err = 0;
  auto r = for_each_dirent(pid, dir->get(), path, [&](std::string_view name) {
    int fd = 0;
    if (!parse_num(name, fd)) return;
    if (!with_targets) {
      fds.push_back(FdEntry{fd, {}});
      return;
    }
    // name is NUL-terminated inside the dirent record.
    ssize_t n = ::readlinkat(dir->get(), name.data(), link, sizeof link);
    if (n < 0) {
      if (errno != ENOENT && err == 0) err = errno;  // ENOENT: closed since the listing
      return;
    }
    fds.push_back(FdEntry{fd, std::string(link, static_cast<size_t>(n))});
  });
  if (!r) return tl::unexpected(r.error());
  if (err != 0) return tl::unexpected(proc_error(pid, err, path));
  std::sort(fds.begin(), fds.end(), [](const FdEntry& a, const FdEntry& b) { return a.fd < b.fd; });
  return fds;
}

Expected<std::vector<int>> list_task_fds(pid_t pid, pid_t tid, UniqueFd& dir) {
  PathBuf p;
  const char* path = make_path(p, "/proc/{}/task/{}/fd", pid, tid);
  auto d = open_proc(pid, path, O_RDONLY | O_DIRECTORY);
  if (!d) return tl::unexpected(d.error());
  std::vector<int> fds;
  auto r = for_each_dirent(pid, d->get(), path, [&](std::string_view name) {
    int fd = 0;
    if (parse_num(name, fd)) fds.push_back(fd);
  });
  if (!r) return tl::unexpected(r.error());
  dir = std::move(*d);
  return fds;
}

Expected<std::string> read_fd_target(pid_t pid, int fd) {
  PathBuf p;
  const char* path = make_path(p, "/proc/{}/fd/{}", pid, fd);
  char link[PATH_MAX];
  ssize_t n = ::readlink(path, link, sizeof link);
  if (n < 0) return tl::unexpected(proc_error(pid, errno, path));
  return std::string(link, static_cast<size_t>(n));
}

Expected<FdInfo> parse_fdinfo(std::string_view text) {
  FdInfo info;
  bool have_flags = false;
  while (!text.empty()) {
    size_t eol = text.find('\n');
    std::string_view line = text.substr(0, eol);
    text.remove_prefix(eol == std::string_view::npos ? text.size() : eol + 1);
    size_t colon = line.find(':');
    if (colon == std::string_view::npos) continue;
    std::string_view key = line.substr(0, colon);
    std::string_view val = line.substr(colon + 1);
    val.remove_prefix(std::min(val.find_first_not_of(" \t"), val.size()));
    bool ok = true;
    if (key == "pos") ok = parse_num(val, info.pos);
    else if (key == "flags") ok = have_flags = parse_num(val, info.flags, 8);
    else if (key == "mnt_id") ok = parse_num(val, info.mnt_id);
    else if (key == "ino") ok = parse_num(val, info.ino);
    if (!ok) return fail(Errc::system, 0, fmt::format("malformed fdinfo line: {:.80}", line));
  }
  if (!have_flags) return fail(Errc::system, 0, "fdinfo without a flags line");
  return info;
}

Expected<FdInfo> read_fdinfo(pid_t pid, int fd) {
  PathBuf p;
  char buf[4096];
  auto text = read_small(pid, make_path(p, "/proc/{}/fdinfo/{}", pid, fd), buf);
  if (!text) return tl::unexpected(text.error());
  return parse_fdinfo(*text);
}

std::optional<uint64_t> pipe_inode_from_link(std::string_view link) {
  constexpr std::string_view prefix = "pipe:[";
  if (link.size() < prefix.size() + 2 || link.substr(0, prefix.size()) != prefix || link.back() != ']')
    return std::nullopt;
  uint64_t ino = 0;
  if (!parse_num(link.substr(prefix.size(), link.size() - prefix.size() - 1), ino)) return std::nullopt;
  return ino;
}

Expected<TaskSyscall> parse_task_syscall(std::string_view text) {
  // "running", or "-1 sp pc" (in the kernel, not in a syscall), or "nr a1 .. a6 sp pc" in hex.
  TaskSyscall s;
  std::string_view rest = text;
  std::string_view tok = next_token(rest);
  if (tok == "running") return s;
  if (!parse_num(tok, s.nr)) return fail(Errc::system, 0, fmt::format("malformed syscall line: {:.80}", text));
  if (s.nr < 0) return s;
  for (uint64_t& a : s.args) {
    tok = next_token(rest);
    if (tok.substr(0, 2) == "0x") tok.remove_prefix(2);
    if (!parse_num(tok, a, 16)) return fail(Errc::system, 0, fmt::format("malformed syscall line: {:.80}", text));
  }
  return s;
}

Expected<TaskSyscall> read_task_syscall(pid_t pid, pid_t tid) {
  PathBuf p;
  char buf[512];
  auto text = read_small(pid, make_path(p, "/proc/{}/task/{}/syscall", pid, tid), buf);
  if (!text) return tl::unexpected(text.error());
  auto s = parse_task_syscall(*text);
  if (!s) return s;
  s->tid = tid;
  char wbuf[128];
  auto wchan = read_small(pid, make_path(p, "/proc/{}/task/{}/wchan", pid, tid), wbuf);
  if (wchan && *wchan != "0") s->wchan = std::string(*wchan);  // "0" means running
  return s;
}

std::optional<BlockedIo> blocked_io(const TaskSyscall& s) {
  if (s.nr < 0) return std::nullopt;
  const arch::PipeIoArgs io = arch::pipe_io_args(s.nr);
  int arg = -1;
  Blocked dir = Blocked::none;
  if (io.read_arg >= 0 && io.write_arg >= 0) {
    // Two sides (splice, tee) or one of either (vmsplice): the pipe wait it sleeps in says which.
    if (s.wchan.find("writable") != std::string::npos || s.wchan.find("pipe_write") != std::string::npos) {
      arg = io.write_arg;
      dir = Blocked::writing;
    } else if (s.wchan.find("readable") != std::string::npos || s.wchan.find("pipe_read") != std::string::npos) {
      arg = io.read_arg;
      dir = Blocked::reading;
    } else {
      return std::nullopt;
    }
  } else if (io.read_arg >= 0) {
    arg = io.read_arg;
    dir = Blocked::reading;
  } else if (io.write_arg >= 0) {
    arg = io.write_arg;
    dir = Blocked::writing;
  } else {
    return std::nullopt;
  }
  if (s.args[arg] > static_cast<uint64_t>(INT_MAX)) return std::nullopt;
  return BlockedIo{s.tid, static_cast<int>(s.args[arg]), dir, s.wchan, io.name};
}

Expected<std::vector<BlockedIo>> list_blocked_io(pid_t pid) {
  auto tids = list_threads(pid);
  if (!tids) return tl::unexpected(tids.error());
  std::vector<BlockedIo> out;
  for (pid_t tid : *tids) {
    auto s = read_task_syscall(pid, tid);
    if (!s) {
      if (s.error().kind == Errc::gone || s.error().kind == Errc::permission) return tl::unexpected(s.error());
      continue;  // the thread exited meanwhile
    }
    if (auto b = blocked_io(*s)) out.push_back(std::move(*b));
  }
  return out;
}

}  // namespace pipecr::sys
