// cmd_ls.cpp: `pipecr ls [-t PID ...] [--json]`: every live pipe and FIFO, who holds each end, how
// full it is, and who is stuck on it.
//
// What a person runs to see which stage of a stuck pipeline is full or starved. Sources, none of
// which stops or disturbs a process:
//   - /proc/PID/fd (readlink "pipe:[ino]", or a path whose stat is S_IFIFO) and fdinfo (flags);
//   - capacity (F_GETPIPE_SZ) and bytes queued (FIONREAD) through a pidfd_getfd copy of one end,
//     closed right after (both work on either end; the copy is the same open file description);
//   - /proc/PID/task/TID/syscall: a thread blocked in read*/write* shows the syscall and its fd
//     argument without ptrace; wchan says pipe_read / pipe_write / wait_for_partner. A thread in
//     wait_for_partner is inside open() of a FIFO with no partner yet: it holds no fd, so its path
//     is read from its memory (process_vm_readv) and matched to the FIFO by device and inode;
//   - kcmp via sys::group_by_open_file, so that fds sharing one open file description (dup, fork)
//     show as one end with several holders.
// Processes we may not inspect are skipped silently unless named with -t.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>

#include <algorithm>
#include <climits>
#include <map>
#include <memory>
#include <optional>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/command.hpp"
#include "cli/describe.hpp"
#include "sys/fdgroup.hpp"
#include "sys/proc.hpp"
#include "sys/syscalls.hpp"

namespace pipecr::cli {
namespace {

constexpr int kKernelLargefile = 0100000;  // glibc's O_LARGEFILE is 0 on 64-bit

struct Holder {
  pid_t pid = 0;
  int fd = -1;
  int flags = 0;  // fdinfo flags (O_CLOEXEC there is this fd's FD_CLOEXEC)
};

struct End {  // one open file description
  std::vector<Holder> holders;
};

struct Stuck {  // a thread blocked on the pipe
  pid_t pid = 0, tid = 0;
  int fd = -1;  // -1: in open() of the FIFO
  Blocked dir = Blocked::none;  // for open(): the access asked for (reading, writing, none = O_RDWR)
  std::string wchan;
};

struct PipeView {
  dev_t dev = 0;
  ino_t ino = 0;
  bool fifo = false;
  std::string path;
  std::optional<int> capacity, bytes;
  std::vector<Holder> fds;
  std::vector<End> ends;
  std::vector<Stuck> stuck;
};

using Key = std::pair<dev_t, ino_t>;

struct Scan {
  std::map<Key, PipeView> pipes;
  std::map<pid_t, std::string> comms;
  std::set<std::pair<pid_t, int>> pipe_fds;
  size_t skipped = 0;
};

std::string strip_deleted(std::string s) {
  constexpr std::string_view kDel = " (deleted)";
  if (s.size() > kDel.size() && s.compare(s.size() - kDel.size(), kDel.size(), kDel) == 0)
    s.resize(s.size() - kDel.size());
  return s;
}

// Adds pid's pipe and FIFO fds to the scan.
Expected<void> scan_fds(pid_t pid, Scan& scan) {
  auto fds = sys::list_fds(pid);
  if (!fds) return tl::unexpected(fds.error());
  for (const sys::FdEntry& e : *fds) {
    bool anon = sys::pipe_inode_from_link(e.target).has_value();
    if (!anon && (e.target.empty() || e.target[0] != '/')) continue;
    struct stat st {};
    if (::stat(fmt::format("/proc/{}/fd/{}", pid, e.fd).c_str(), &st) < 0 || !S_ISFIFO(st.st_mode)) continue;
    auto info = sys::read_fdinfo(pid, e.fd);
    if (!info) continue;  // closed meanwhile
    PipeView& p = scan.pipes[{st.st_dev, st.st_ino}];
    p.dev = st.st_dev;
    p.ino = st.st_ino;
    p.fifo = !anon;
    if (!anon) p.path = e.target;
    p.fds.push_back(Holder{pid, e.fd, info->flags});
    scan.pipe_fds.insert({pid, e.fd});
  }
  return {};
}

// The path a thread passed to open()/openat() while it waits in wait_for_partner, resolved
// against its cwd or dirfd; nullopt when it cannot be read.
std::optional<std::string> open_path(pid_t pid, const sys::TaskSyscall& s) {
  uint64_t addr = 0, dirfd = static_cast<uint64_t>(AT_FDCWD);
  if (s.nr == 2) addr = s.args[0];                               // open(path, flags)
  else if (s.nr == 257 || s.nr == 437) addr = s.args[1], dirfd = s.args[0];  // openat, openat2
  else return std::nullopt;
  char buf[PATH_MAX];
  iovec local{buf, sizeof buf - 1};
  iovec remote{reinterpret_cast<void*>(addr), sizeof buf - 1};
  ssize_t n = ::process_vm_readv(pid, &local, 1, &remote, 1, 0);
  if (n <= 0) return std::nullopt;
  std::string path(buf, strnlen(buf, static_cast<size_t>(n)));
  if (path.empty() || path[0] == '/') return path;
  int dfd = static_cast<int>(dirfd);
  std::string base = dfd == AT_FDCWD ? fmt::format("/proc/{}/cwd", pid) : fmt::format("/proc/{}/fd/{}", pid, dfd);
  return base + "/" + path;
}

// Records every thread of pid blocked in read/write on a pipe fd, or in open() of a FIFO.
void scan_tasks(pid_t pid, Scan& scan, std::map<std::pair<pid_t, int>, std::vector<Stuck>>& by_fd) {
  auto tids = sys::list_threads(pid);
  if (!tids) return;
  for (pid_t tid : *tids) {
    auto s = sys::read_task_syscall(pid, tid);
    if (!s) continue;
    if (auto b = sys::blocked_io(*s)) {
      if (scan.pipe_fds.count({pid, b->fd}))
        by_fd[{pid, b->fd}].push_back(Stuck{pid, tid, b->fd, b->dir, b->wchan});
      continue;
    }
    if (s->wchan != "wait_for_partner") continue;
    auto path = open_path(pid, *s);
    struct stat st {};
    if (!path || ::stat(path->c_str(), &st) < 0 || !S_ISFIFO(st.st_mode)) continue;
    PipeView& p = scan.pipes[{st.st_dev, st.st_ino}];
    p.dev = st.st_dev;
    p.ino = st.st_ino;
    p.fifo = true;
    if (p.path.empty()) {
      auto real = path->rfind("/proc/", 0) == 0 ? std::optional<std::string>() : path;
      p.path = real ? *real : *path;
    }
    scan.comms.emplace(pid, sys::read_comm(pid).value_or("?"));
    uint64_t oflags = s->nr == 2 ? s->args[1] : s->nr == 257 ? s->args[2] : O_RDWR;
    Blocked want = (oflags & O_ACCMODE) == O_RDONLY ? Blocked::reading
                   : (oflags & O_ACCMODE) == O_WRONLY ? Blocked::writing : Blocked::none;
    p.stuck.push_back(Stuck{pid, tid, -1, want, s->wchan});
  }
}

// Capacity and bytes queued through a copy of one end; the copy is closed right away.
void measure(PipeView& p, std::map<pid_t, sys::UniqueFd>& pidfds) {
  for (const Holder& h : p.fds) {
    auto it = pidfds.find(h.pid);
    if (it == pidfds.end()) {
      auto pidfd = sys::pidfd_open(h.pid);
      if (!pidfd) continue;
      it = pidfds.emplace(h.pid, std::move(*pidfd)).first;
    }
    auto copy = sys::pidfd_getfd(it->second.get(), h.fd, h.pid);
    if (!copy) continue;
    auto cap = sys::get_pipe_size(copy->get());
    auto q = sys::bytes_queued(copy->get());
    if (cap) p.capacity = *cap;
    if (q) p.bytes = *q;
    return;
  }
}

void group_ends(PipeView& p) {
  std::vector<sys::FdRef> refs;
  for (const Holder& h : p.fds) refs.push_back(sys::FdRef{h.pid, h.fd, p.ino});
  auto groups = sys::group_by_open_file(refs);
  if (!groups) {  // kcmp refused: one end per fd
    for (const Holder& h : p.fds) p.ends.push_back(End{{h}});
    return;
  }
  for (const sys::FdGroup& g : *groups) {
    End e;
    for (const sys::FdRef& r : g.members)
      for (const Holder& h : p.fds)
        if (h.pid == r.pid && h.fd == r.fd) e.holders.push_back(h);
    p.ends.push_back(std::move(e));
  }
}

Expected<Scan> scan_system(const std::vector<pid_t>& targets) {
  Scan scan;
  bool named = !targets.empty();
  std::vector<pid_t> pids = targets;
  if (!named) {
    auto all = sys::list_pids();
    if (!all) return tl::unexpected(all.error());
    pids = std::move(*all);
  }
  std::vector<pid_t> seen;
  for (pid_t pid : pids) {
    auto r = scan_fds(pid, scan);
    if (!r) {
      if (named) return tl::unexpected(r.error());
      ++scan.skipped;
      continue;
    }
    seen.push_back(pid);
    scan.comms.emplace(pid, sys::read_comm(pid).value_or("?"));
  }
  std::map<std::pair<pid_t, int>, std::vector<Stuck>> by_fd;
  for (pid_t pid : seen) scan_tasks(pid, scan, by_fd);
  std::map<pid_t, sys::UniqueFd> pidfds;
  for (auto& [key, p] : scan.pipes) {
    measure(p, pidfds);
    group_ends(p);
    for (const Holder& h : p.fds) {
      auto it = by_fd.find({h.pid, h.fd});
      if (it != by_fd.end()) p.stuck.insert(p.stuck.end(), it->second.begin(), it->second.end());
    }
  }
  return scan;
}

// ---- presentation ----

const char* access_of(int flags) {
  switch (flags & O_ACCMODE) {
    case O_RDONLY: return "r";
    case O_WRONLY: return "w";
    default: return "rw";
  }
}

std::vector<std::string> flag_names(int flags) {
  std::vector<std::string> out;
  if (flags & O_NONBLOCK) out.emplace_back("O_NONBLOCK");
  if (flags & O_DIRECT) out.emplace_back("O_DIRECT");
  if (flags & O_ASYNC) out.emplace_back("O_ASYNC");
  if (flags & kKernelLargefile) out.emplace_back("O_LARGEFILE");
  if (flags & O_APPEND) out.emplace_back("O_APPEND");
  return out;
}

// Short codes for the state of a pipe, most alarming first.
std::vector<std::string> states(const PipeView& p) {
  bool readers = false, writers = false, wblocked = false, rblocked = false;
  for (const Holder& h : p.fds) {
    int acc = h.flags & O_ACCMODE;
    readers |= acc != O_WRONLY;
    writers |= acc != O_RDONLY;
  }
  for (const Stuck& s : p.stuck) {
    if (s.fd < 0) continue;  // in open(): not yet an end
    wblocked |= s.dir == Blocked::writing;
    rblocked |= s.dir == Blocked::reading;
  }
  std::vector<std::string> st;
  if (wblocked) st.emplace_back("writer_blocked");
  if (rblocked) st.emplace_back("reader_blocked");
  bool opening = std::any_of(p.stuck.begin(), p.stuck.end(), [](const Stuck& s) { return s.fd < 0; });
  if (opening) st.emplace_back("open_waiting");
  if (!readers && !p.fds.empty()) st.emplace_back("no_reader");
  if (!writers && !p.fds.empty()) st.emplace_back("no_writer");
  if (p.bytes && p.capacity && *p.bytes >= *p.capacity) st.emplace_back("full");
  if (p.bytes && *p.bytes == 0) st.emplace_back("empty");
  return st;
}

std::string describe_state(const PipeView& p) {
  std::vector<std::string> out;
  for (const std::string& s : states(p)) {
    if (s == "writer_blocked") out.emplace_back("WRITER BLOCKED (pipe full, reader not reading)");
    else if (s == "reader_blocked") out.emplace_back("READER BLOCKED (waiting for data)");
    else if (s == "open_waiting") out.emplace_back("OPEN WAITING (FIFO has no partner yet)");
    else if (s == "no_reader") out.emplace_back("no reader (writes get EPIPE)");
    else if (s == "no_writer") out.emplace_back(p.bytes.value_or(0) > 0 ? "no writer (EOF after the queued data)"
                                                                        : "no writer (readers get EOF)");
    else if ((s == "full" || s == "empty") && out.empty()) out.emplace_back(s);
  }
  return fmt::format("{}", fmt::join(out, "; "));
}

std::string pipe_name(const PipeView& p) {
  return p.fifo ? fmt::format("fifo:{} [{}]", printable(p.path), p.ino) : fmt::format("pipe:[{}]", p.ino);
}

std::string opt_num(const std::optional<int>& v) { return v ? fmt::format("{}", *v) : "?"; }

// At most `max` items, then "+N".
std::string join_some(const std::vector<std::string>& items, size_t max) {
  if (items.size() <= max) return fmt::format("{}", fmt::join(items, ","));
  std::vector<std::string> head(items.begin(), items.begin() + static_cast<ptrdiff_t>(max));
  return fmt::format("{},+{}", fmt::join(head, ","), items.size() - max);
}

void print_end(std::FILE* out, const PipeView& p, const End& e, const Scan& scan) {
  std::vector<std::string> who, comms, notes;
  for (const Holder& h : e.holders) {
    who.push_back(fmt::format("{}:{}", h.pid, h.fd));
    auto c = scan.comms.find(h.pid);
    std::string comm = c == scan.comms.end() ? "?" : printable(c->second);
    if (std::find(comms.begin(), comms.end(), comm) == comms.end()) comms.push_back(comm);
    for (const Stuck& s : p.stuck)
      if (s.pid == h.pid && s.fd == h.fd)
        notes.push_back(fmt::format("BLOCKED in {}() tid {}", s.dir == Blocked::reading ? "read" : "write", s.tid));
  }
  auto flags = flag_names(e.holders.front().flags);
  std::string line = fmt::format("    {:<3} {:<18} {:<16} {:<12} {}", access_of(e.holders.front().flags),
                                 join_some(who, 2), join_some(comms, 2),
                                 flags.empty() ? "-" : fmt::format("{}", fmt::join(flags, "|")),
                                 fmt::join(notes, "; "));
  line.erase(line.find_last_not_of(' ') + 1);
  fmt::print(out, "{}\n", line);
}

// Writers first, then readers: the order data flows in.
int end_rank(const End& e) {
  int acc = e.holders.front().flags & O_ACCMODE;
  return acc == O_WRONLY ? 0 : acc == O_RDWR ? 1 : 2;
}

void print_table(std::FILE* out, const Scan& scan) {
  size_t wblocked = 0, rblocked = 0;
  for (const auto& [key, p] : scan.pipes) {
    std::string fill = p.bytes && p.capacity && *p.capacity > 0
                           ? fmt::format("{:3.0f}%", 100.0 * *p.bytes / *p.capacity)
                           : "  ?%";
    fmt::print(out, "{}  {}/{} bytes {}  {}\n", pipe_name(p), opt_num(p.bytes), opt_num(p.capacity), fill,
               describe_state(p));
    std::vector<const End*> ends;
    for (const End& e : p.ends) ends.push_back(&e);
    std::stable_sort(ends.begin(), ends.end(), [](auto* a, auto* b) { return end_rank(*a) < end_rank(*b); });
    for (const End* e : ends) print_end(out, p, *e, scan);
    for (const Stuck& s : p.stuck) {
      if (s.fd >= 0) continue;
      auto c = scan.comms.find(s.pid);
      const char* acc = s.dir == Blocked::reading ? "r" : s.dir == Blocked::writing ? "w" : "rw";
      fmt::print(out, "    {:<3} {:<18} {:<16} {:<12} BLOCKED in open() tid {}\n", acc, fmt::format("{}:-", s.pid),
                 c == scan.comms.end() ? "?" : printable(c->second), "-", s.tid);
    }
    auto st = states(p);
    wblocked += std::count(st.begin(), st.end(), "writer_blocked");
    rblocked += std::count(st.begin(), st.end(), "reader_blocked");
  }
  fmt::print(out, "{} pipe(s); {} with a blocked writer, {} with a blocked reader", scan.pipes.size(), wblocked,
             rblocked);
  if (scan.skipped) fmt::print(out, "; {} process(es) not inspectable, skipped", scan.skipped);
  fmt::print(out, "\n");
}

nlohmann::json to_json(const Scan& scan) {
  nlohmann::json pipes = nlohmann::json::array();
  auto comm = [&](pid_t pid) {
    auto c = scan.comms.find(pid);
    return c == scan.comms.end() ? std::string("?") : c->second;
  };
  for (const auto& [key, p] : scan.pipes) {
    nlohmann::json ends = nlohmann::json::array();
    for (const End& e : p.ends) {
      nlohmann::json holders = nlohmann::json::array();
      for (const Holder& h : e.holders)
        holders.push_back({{"pid", h.pid}, {"fd", h.fd}, {"comm", comm(h.pid)}, {"cloexec", (h.flags & O_CLOEXEC) != 0}});
      int fl = e.holders.front().flags;
      static const char* const kAccess[] = {"read", "write", "readwrite", "readwrite"};
      ends.push_back({{"access", kAccess[fl & O_ACCMODE]},
                      {"flags", flag_names(fl)},
                      {"flags_octal", fmt::format("{:#o}", fl & ~O_CLOEXEC)},
                      {"holders", std::move(holders)}});
    }
    nlohmann::json blocked = nlohmann::json::array();
    for (const Stuck& s : p.stuck) {
      const char* op = s.fd < 0 ? "opening" : s.dir == Blocked::reading ? "reading" : "writing";
      blocked.push_back({{"pid", s.pid}, {"tid", s.tid}, {"comm", comm(s.pid)}, {"op", op},
                         {"fd", s.fd < 0 ? nlohmann::json(nullptr) : nlohmann::json(s.fd)}, {"wchan", s.wchan}});
    }
    auto opt = [](const std::optional<int>& v) { return v ? nlohmann::json(*v) : nlohmann::json(nullptr); };
    nlohmann::json fill = nullptr;
    if (p.bytes && p.capacity && *p.capacity > 0) fill = 100.0 * *p.bytes / *p.capacity;
    pipes.push_back({{"inode", p.ino},
                     {"kind", p.fifo ? "fifo" : "pipe"},
                     {"path", p.fifo ? nlohmann::json(strip_deleted(p.path)) : nlohmann::json(nullptr)},
                     {"unlinked", p.fifo && p.path != strip_deleted(p.path)},
                     {"capacity", opt(p.capacity)},
                     {"bytes", opt(p.bytes)},
                     {"fill_percent", fill},
                     {"state", states(p)},
                     {"ends", std::move(ends)},
                     {"blocked", std::move(blocked)}});
  }
  return {{"pipes", std::move(pipes)}, {"skipped_processes", scan.skipped}};
}

struct Options {
  std::vector<pid_t> pids;
  bool json = false;
};

RunFn setup(CLI::App& app, CommandContext& ctx) {
  auto o = std::make_shared<Options>();
  app.add_option("-t,--target", o->pids, "only these processes (repeatable); default: every process");
  app.add_flag("--json", o->json, "print one JSON document (see docs/json.md)");
  return [o, &ctx]() -> Expected<int> {
    for (pid_t pid : o->pids)
      if (pid <= 0) return fail(Errc::invalid_argument, EINVAL, fmt::format("--target {}: not a process id", pid));
    auto scan = scan_system(o->pids);
    if (!scan) return tl::unexpected(scan.error());
    if (o->json)
      fmt::print(ctx.out, "{}\n", to_json(*scan).dump(2));
    else
      print_table(ctx.out, *scan);
    return kExitOk;
  };
}

const Registrar kLs{"ls", "list live pipes and FIFOs: holders, fill level, blocked readers and writers", 10, setup};

}  // namespace
}  // namespace pipecr::cli
