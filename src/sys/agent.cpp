// agent.cpp: pipecr's side of the in-target agent (see agent.hpp; the agent itself is
// src/sys/agent/agent.c, the protocol src/sys/agent/agent_abi.h).
#include "sys/agent.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <optional>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <thread>

#include <fmt/format.h>

#include "sys/agent/agent_abi.h"
#include "sys/arch.hpp"
#include "sys/proc.hpp"
#include "sys/remote.hpp"
#include "sys/syscalls.hpp"

namespace pipecr::sys {
namespace {

constexpr size_t kPage = 4096;
constexpr size_t kMaxFdsPerMessage = 253;  // SCM_MAX_FD
constexpr uint64_t kAgentStackGap = 64;    // between the register block and the agent's stack

uint64_t round_up(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }


// Looks for the two pieces of the target's own code that the rt_sigframe return needs (arch.hpp):
// a `syscall; ret` and a restorer, in its executable file mappings and [vdso], read in chunks with
// process_vm_readv (nothing is written). 0 where one is missing.
using ReturnGadgets = AgentGadgets;

// Whether the gadgets found before the stop are still there (one read each).
bool gadgets_still_there(pid_t pid, const ReturnGadgets& g) {
  auto holds = [pid](uint64_t at, const auto& pattern) {
    unsigned char got[16];
    return at && read_remote(pid, at, got, pattern.size()) && std::memcmp(got, pattern.data(), pattern.size()) == 0;
  };
  return holds(g.syscall_ret, arch::kSyscallRet) &&
         (holds(g.restorer, arch::kRestorer) || holds(g.restorer, arch::kRestorerShort));
}

// Where the gadgets are in a mapped file (device and inode), as offsets into it: a second process
// mapping the same file (every process of a dump uses one libc, as do the dumps a supervisor repeats)
// needs no scan, only the read that checks the bytes are there. 0: not in that file.
struct FileGadgets {
  uint64_t syscall_ret = 0, restorer = 0;  // file offset + 1
};
std::mutex g_file_gadgets_lock;
std::atomic<size_t> g_gadget_scans{0};
std::map<std::pair<std::string, uint64_t>, FileGadgets> g_file_gadgets;

// Where the syscall instruction sits in a gadget's bytes (each holds it once).
template <size_t N>
constexpr size_t insn_offset(const std::array<unsigned char, N>& pattern) {
  for (size_t k = 0; k + arch::kSyscallInsn.size() <= N; ++k) {
    bool at = true;
    for (size_t j = 0; j < arch::kSyscallInsn.size(); ++j) at = at && pattern[k + j] == arch::kSyscallInsn[j];
    if (at) return k;
  }
  return N;
}

// The first syscall instruction in buf at or after i, or n. Blocks of 64 bytes are passed over with
// a test of the instruction's first two bytes that the compiler turns into vector compares; the
// block that holds one is then walked a byte at a time. (memchr for the first byte stops at every
// 0x0f, common in x86 code; glibc's memmem walks a short needle a byte at a time: BM_GadgetScan.)
size_t next_syscall_insn(const unsigned char* buf, size_t n, size_t i) {
  constexpr auto& insn = arch::kSyscallInsn;
  static_assert(insn.size() >= 2);
  constexpr size_t kBlock = 64;
  for (; i + kBlock + insn.size() <= n; i += kBlock) {
    unsigned char any = 0;
    for (size_t j = 0; j < kBlock; ++j)
      any |= static_cast<unsigned char>((buf[i + j] == insn[0]) & (buf[i + j + 1] == insn[1]));
    if (any) break;
  }
  for (; i + insn.size() <= n; ++i)
    if (std::memcmp(buf + i, insn.data(), insn.size()) == 0) return i;
  return n;
}

// The gadgets not found yet in buf (n bytes read from address at), in one pass over its syscall
// instructions, each compared with the gadgets around it. The first of each gadget in the chunk is
// taken.
void find_in_chunk(const unsigned char* buf, size_t n, uint64_t at, ReturnGadgets& g) {
  auto match = [&](size_t hit, const auto& pattern) -> uint64_t {
    const size_t k = insn_offset(pattern);
    if (hit < k || hit - k + pattern.size() > n) return 0;
    return std::memcmp(buf + hit - k, pattern.data(), pattern.size()) == 0 ? at + (hit - k) : 0;
  };
  for (size_t hit = next_syscall_insn(buf, n, 0); hit < n; hit = next_syscall_insn(buf, n, hit + 1)) {
    if (!g.syscall_ret) g.syscall_ret = match(hit, arch::kSyscallRet);
    if (!g.restorer) g.restorer = match(hit, arch::kRestorer);
    if (!g.restorer) g.restorer = match(hit, arch::kRestorerShort);
    if (g.syscall_ret && g.restorer) return;
  }
}

// The scan itself, over ranges in order, remembering the offsets found per mapped file.
ReturnGadgets scan_ranges(pid_t pid, const std::vector<ExecMapping>& ranges) {
  ReturnGadgets g;
  g_gadget_scans.fetch_add(1, std::memory_order_relaxed);
  // 64 KiB: under malloc's mmap threshold (a 256 KiB buffer was mapped and unmapped by every scan), and
  // little read past the gadgets. A gadget across two chunks is whole in the second.
  constexpr size_t kChunk = 64 * 1024, kOverlap = 16;
  std::vector<unsigned char> buf(kChunk);
  for (const ExecMapping& r : ranges) {
    for (uint64_t at = r.start; at < r.end && !(g.syscall_ret && g.restorer);) {
      const size_t n = std::min<uint64_t>(kChunk, r.end - at);
      iovec local{buf.data(), n};
      iovec remote{reinterpret_cast<void*>(at), n};
      if (::process_vm_readv(pid, &local, 1, &remote, 1, 0) != static_cast<ssize_t>(n)) break;
      find_in_chunk(buf.data(), n, at, g);
      if (at + n >= r.end) break;
      at += n - kOverlap;
    }
    // Remembered for the next process that maps this file, by (device, inode); inode 0 is no
    // file ([vdso]).
    if (r.inode != 0) {
      auto off = [&](uint64_t addr) { return addr >= r.start && addr < r.end ? addr - r.start + r.offset + 1 : 0; };
      std::lock_guard<std::mutex> lock(g_file_gadgets_lock);
      FileGadgets& f = g_file_gadgets[std::pair(r.dev, r.inode)];
      if (uint64_t o = off(g.syscall_ret)) f.syscall_ret = o;
      if (uint64_t o = off(g.restorer)) f.restorer = o;
    }
    if (g.syscall_ret && g.restorer) break;
  }
  return g;
}

// The target's executable mappings, glibc's first: where the gadgets are looked for.
std::vector<ExecMapping> gadget_ranges(pid_t pid) {
  std::vector<ExecMapping> ranges = executable_mappings(pid);
  std::stable_partition(ranges.begin(), ranges.end(),  // glibc first
                        [](const ExecMapping& r) { return r.name.find("/libc") != std::string::npos; });
  return ranges;
}

ReturnGadgets find_return_gadgets(pid_t pid) {
  ReturnGadgets g;
  const std::vector<ExecMapping> ranges = gadget_ranges(pid);
  {
    std::lock_guard<std::mutex> lock(g_file_gadgets_lock);
    for (const ExecMapping& r : ranges) {
      if (r.inode == 0) continue;
      auto it = g_file_gadgets.find(std::pair(r.dev, r.inode));
      if (it == g_file_gadgets.end()) continue;
      auto at = [&](uint64_t off) -> uint64_t {
        return off && off - 1 >= r.offset && off - 1 - r.offset < r.end - r.start ? r.start + (off - 1 - r.offset) : 0;
      };
      if (!g.syscall_ret) g.syscall_ret = at(it->second.syscall_ret);
      if (!g.restorer) g.restorer = at(it->second.restorer);
    }
  }
  if (g.syscall_ret && g.restorer && gadgets_still_there(pid, g)) return g;
  return scan_ranges(pid, ranges);
}

std::atomic<bool> g_sigreturn{true};
std::atomic<AgentBootHook> g_boot_hook{nullptr};

void boot_step(AgentBootStep step, uint64_t base, bool chained) {
  if (AgentBootHook hook = g_boot_hook.load()) hook(step, base, chained);
}

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif
#ifndef KCMP_VM
#define KCMP_VM 1
#endif

// Whether process `other` uses pid's address space (kcmp KCMP_VM); one that kcmp may not inspect
// (EPERM, EACCES: another user's, for a pipecr without CAP_SYS_PTRACE) or that ended meanwhile
// (ESRCH) counts as not; any other failure as sharing, since it cannot be ruled out.
bool shares_mm(pid_t pid, pid_t other) {
  const long r = ::syscall(SYS_kcmp, pid, other, KCMP_VM, 0, 0);
  return r == 0 || (r < 0 && errno != ESRCH && errno != EPERM && errno != EACCES);
}

#ifndef KCMP_FILES
#define KCMP_FILES 2
#endif

// What other processes share of pid: its address space, its fd table; kcmp against every process
// in /proc (about 1.5 us a process each).
// - The address space (KCMP_VM; clone(CLONE_VM) without CLONE_THREAD: a vfork or posix_spawn child
//   before its exec, a process made with clone(CLONE_VM), another target of the same restore): such
//   a task is not stopped with pid, so it could map at the agent's chosen address before the
//   bootstrap's mmap, and the chain's munmap would then remove its mapping. True when that cannot be
//   ruled out (no kcmp, /proc unreadable); see shares_mm() for the processes skipped.
// - The fd table (KCMP_FILES; clone(CLONE_FILES) without CLONE_THREAD): such a process runs on while
//   the agent holds numbers of that table, and could close or replace them (AgentGadgets).
// A process that stands at a thread whose leader has exited is seen through the leader's entry,
// whose mm and table are gone: it is missed.
struct Sharers {
  bool mm = false;
  std::vector<pid_t> files;
};
Sharers sharers_outside(pid_t pid, bool mm_only) {
  Sharers out;
  DIR* d = ::opendir("/proc");
  if (!d) {
    out.mm = true;
    return out;
  }
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] < '1' || e->d_name[0] > '9') continue;
    char* end = nullptr;
    const long other = std::strtol(e->d_name, &end, 10);
    if (*end || other == pid) continue;
    if (!out.mm && shares_mm(pid, static_cast<pid_t>(other))) {
      out.mm = true;
      if (mm_only) break;
    }
    if (!mm_only && ::syscall(SYS_kcmp, pid, other, KCMP_FILES, 0, 0) == 0) out.files.push_back(static_cast<pid_t>(other));
  }
  ::closedir(d);
  return out;
}

bool mm_shared_outside(pid_t pid) { return sharers_outside(pid, true).mm; }

// mm_shared_outside(pid) while pid is stopped, knowing what find_agent_gadgets() saw before the stop.
// No other process shared the address space then: one that does now was made since by a thread of
// pid (clone(CLONE_VM), a child of that thread, or with CLONE_PARENT a child of pid's parent), since
// only a task in that address space can give it to a new one, and every other was seen. Those are
// the only ones checked (a few /proc reads: sys::children() lists the children of every thread).
// Else (not looked, or one did: it may have exec'd since; children not listed), the whole of /proc.
// stat: pid's /proc/PID/stat when the caller has read it (its parent is taken from there).
bool mm_shared_at_stop(pid_t pid, const std::optional<AgentGadgets>& before, const ProcStat* stat) {
  if (!before || before->mm_shared != 0) return mm_shared_outside(pid);
  auto candidates = children(pid);
  if (!candidates) return mm_shared_outside(pid);
  if (auto parent = stat ? Expected<pid_t>(stat->ppid) : read_ppid(pid); parent && *parent > 0) {
    auto siblings = children(*parent);
    if (!siblings) return mm_shared_outside(pid);
    candidates->insert(candidates->end(), siblings->begin(), siblings->end());
  }
  for (pid_t other : *candidates)
    if (other != pid && shares_mm(pid, other)) return true;
  return false;
}

// Room the agent's mapping keeps from every other mapping: no merge with a neighbour, and a distance
// from whatever grows.
constexpr uint64_t kAgentGuard = 1 << 20;
// Below the main thread's stack, what it may still grow into: its RLIMIT_STACK (1 TiB when unlimited)
// and the kernel's stack_guard_gap (256 pages by default), and at least the 128 MiB the kernel itself
// keeps free there for mmap (mmap_base).
constexpr uint64_t kStackReserveMin = uint64_t{128} << 20;
constexpr uint64_t kStackReserveMax = uint64_t{1} << 40;
constexpr uint64_t kStackGuardGap = uint64_t{1} << 20;
constexpr uint64_t kLowestAgent = uint64_t{16} << 20;  // far above mmap_min_addr

// RLIMIT_STACK of pid (its soft limit, /proc/PID/limits: readable whoever the owner), 0 if unknown,
// UINT64_MAX when unlimited.
uint64_t stack_limit(pid_t pid) {
  // prlimit() answers for a process of pipecr's own user (one syscall); another's needs
  // CAP_SYS_RESOURCE, which pipecr may not have, and is read from the text.
  rlimit lim{};
  if (::prlimit(pid, RLIMIT_STACK, nullptr, &lim) == 0) return lim.rlim_cur == RLIM_INFINITY ? UINT64_MAX : lim.rlim_cur;
  std::FILE* f = std::fopen(fmt::format("/proc/{}/limits", pid).c_str(), "re");
  if (!f) return 0;
  char line[256];
  uint64_t out = 0;
  while (std::fgets(line, sizeof line, f)) {
    if (std::strncmp(line, "Max stack size", 14) != 0) continue;
    const char* v = line + 14;
    while (*v == ' ') ++v;
    out = std::strncmp(v, "unlimited", 9) == 0 ? UINT64_MAX : std::strtoull(v, nullptr, 10);
  }
  std::fclose(f);
  return out;
}

// Where the agent's len bytes go in pid's address space, chosen while every thread using it is
// stopped: the highest page-aligned place with kAgentGuard free on both sides, below the reserve of
// the main stack (its mapping, the one holding start_stack, the [stack] of /proc/PID/maps;
// stack_limit()) and of the mapping holding sp, the stack of the thread the agent runs on (the same
// one, or a thread's fixed stack; a main stack that lost its label, too); 0 when there is none.
// Nothing else can map there until the bootstrap's mmap (MAP_FIXED_NOREPLACE) takes it, since
// nothing else runs in that mm. Two ways to the same answer: PROCMAP_QUERY (Linux 6.11), a few
// ioctls however many mappings the process has, and else the text of /proc/PID/maps, which a
// process of thousands of mappings (a JVM, a browser) takes milliseconds to produce, in the stop.

// The stack reserve's top: where an agent may end at the highest; 0 when the stack leaves no room.
uint64_t below_stack(pid_t pid, uint64_t stack_lo) {
  uint64_t top = uint64_t{0x7ffffffff000};  // the 47-bit user space (a 5-level process may use more)
  if (!stack_lo) return top;
  const uint64_t reserve = std::clamp<uint64_t>(stack_limit(pid), kStackReserveMin, kStackReserveMax) + kStackGuardGap;
  return stack_lo <= reserve ? 0 : stack_lo - reserve;
}

// The highest place for len bytes below top in a gap of the address space: free(lo, hi) answers the
// lowest mapping start in [lo, hi), or hi when that range is free (UINT64_MAX: cannot tell).
template <typename Free>
uint64_t highest_place(uint64_t top, uint64_t len, Free free) {
  for (uint64_t hi = top; hi > kLowestAgent + len + 2 * kAgentGuard;) {
    const uint64_t at = (hi - kAgentGuard - len) & ~uint64_t{kPage - 1};
    if (at < kLowestAgent + kAgentGuard) return 0;
    const uint64_t first = free(at - kAgentGuard, hi);
    if (first == UINT64_MAX) return UINT64_MAX;
    if (first >= hi) return at;
    hi = first;  // every gap above the mapping found is too small: below it
  }
  return 0;
}

}  // namespace

std::optional<uint64_t> agent_address_by_query(pid_t pid, uint64_t len, uint64_t sp, uint64_t start_stack) {
  if (!start_stack) return std::nullopt;  // not told where the main stack is
  UniqueFd maps(::open(fmt::format("/proc/{}/maps", pid).c_str(), O_RDONLY | O_CLOEXEC));
  if (!maps) return std::nullopt;
  uint64_t stack_lo = 0;
  for (uint64_t addr : {start_stack, sp}) {
    auto m = query_mapping(maps.get(), addr, false);
    if (!m) return std::nullopt;  // no PROCMAP_QUERY here (ENOTTY): the listing
    if (*m) stack_lo = stack_lo ? std::min(stack_lo, (*m)->start) : (*m)->start;
  }
  const uint64_t top = below_stack(pid, stack_lo);
  if (!top) return 0;
  const uint64_t at = highest_place(top, len, [&](uint64_t lo, uint64_t hi) -> uint64_t {
    auto m = query_mapping(maps.get(), lo, true);
    if (!m) return UINT64_MAX;
    return *m ? std::min((*m)->start, hi) : hi;
  });
  if (at == UINT64_MAX) return std::nullopt;
  return at;
}

uint64_t agent_address_by_listing(pid_t pid, uint64_t len, uint64_t sp) {
  std::FILE* maps = std::fopen(fmt::format("/proc/{}/maps", pid).c_str(), "re");
  if (!maps) return 0;
  std::vector<std::pair<uint64_t, uint64_t>> used;
  uint64_t stack_lo = 0;
  char line[4096];
  while (std::fgets(line, sizeof line, maps)) {
    unsigned long lo = 0, hi = 0;
    if (std::sscanf(line, "%lx-%lx", &lo, &hi) != 2 || hi <= lo) continue;
    used.emplace_back(lo, hi);
    if (std::strstr(line, "[stack]") || (sp >= lo && sp < hi))
      stack_lo = stack_lo ? std::min<uint64_t>(stack_lo, lo) : lo;
  }
  std::fclose(maps);
  std::sort(used.begin(), used.end());
  const uint64_t top = below_stack(pid, stack_lo);
  if (!top) return 0;
  const uint64_t at = highest_place(top, len, [&](uint64_t lo, uint64_t hi) -> uint64_t {
    // The first mapping ending above lo: it starts in [lo, hi) or covers lo, or starts at hi or above.
    auto it = std::upper_bound(used.begin(), used.end(), lo,
                               [](uint64_t a, const std::pair<uint64_t, uint64_t>& m) { return a < m.second; });
    return it == used.end() ? hi : std::min(it->first, hi);
  });
  return at == UINT64_MAX ? 0 : at;
}

uint64_t choose_agent_address(pid_t pid, uint64_t len, uint64_t sp, uint64_t start_stack) {
  if (auto at = agent_address_by_query(pid, len, sp, start_stack)) return *at;
  return agent_address_by_listing(pid, len, sp);
}

namespace {

// The bootstrap's remote syscalls are used for one step: the process discards them (puts the
// thread back if they did not, and destroys them) when the step ends.
class Discard {
 public:
  Discard(StoppedProcess& p, Injector* i) : process_(p), injector_(i) {}
  ~Discard() { (void)process_.discard(injector_); }
  Discard(const Discard&) = delete;
  Discard& operator=(const Discard&) = delete;

 private:
  StoppedProcess& process_;
  Injector* injector_;
};

// Receives one message into buf (without waiting), and the fds attached to it (SCM_RIGHTS, close-on-
// exec) into files. Returns what recvmsg() returned (errno set when < 0); *ctrunc tells that the
// kernel dropped files for want of fd numbers here.
ssize_t recv_message(int sock, void* buf, size_t len, std::vector<UniqueFd>& files, bool* ctrunc = nullptr) {
  iovec iov{buf, len};
  alignas(cmsghdr) char ctl[CMSG_SPACE(kMaxFdsPerMessage * sizeof(int))];
  msghdr h{};
  h.msg_iov = &iov;
  h.msg_iovlen = 1;
  h.msg_control = ctl;
  h.msg_controllen = sizeof ctl;
  const ssize_t n = ::recvmsg(sock, &h, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  if (n > 0)
    for (cmsghdr* c = CMSG_FIRSTHDR(&h); c; c = CMSG_NXTHDR(&h, c))
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
        const size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < k; ++i) {
          int fd;
          std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
          files.emplace_back(fd);
        }
      }
  if (ctrunc) *ctrunc = n > 0 && (h.msg_flags & MSG_CTRUNC);
  return n;
}

const char* op_name(uint32_t code) {
  switch (code) {
    case AgentOp::install: return "install";
    case AgentOp::epoll_add: return "epoll_ctl(ADD)";
    case AgentOp::setfl_or: return "fcntl(F_SETFL)";
    case AgentOp::close_fd: return "close";
    case AgentOp::setfd: return "fcntl(F_SETFD)";
  }
  return "?";
}

// Sends one message, with fds attached (SCM_RIGHTS) when there are any, again after EINTR.
// Returns what sendmsg() returned last (errno set when < 0).
ssize_t send_message(int sock, const pipecr_agent_msg& m, std::span<const int> fds) {
  iovec iov{const_cast<pipecr_agent_msg*>(&m), sizeof m};
  alignas(cmsghdr) char ctl[CMSG_SPACE(kMaxFdsPerMessage * sizeof(int))] = {};
  msghdr h{};
  h.msg_iov = &iov;
  h.msg_iovlen = 1;
  if (!fds.empty()) {
    h.msg_control = ctl;
    h.msg_controllen = CMSG_SPACE(fds.size() * sizeof(int));
    cmsghdr* c = CMSG_FIRSTHDR(&h);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(fds.size() * sizeof(int));
    std::memcpy(CMSG_DATA(c), fds.data(), fds.size() * sizeof(int));
  }
  ssize_t n;
  do n = ::sendmsg(sock, &h, MSG_NOSIGNAL);
  while (n < 0 && errno == EINTR);
  return n;
}

}  // namespace

void set_agent_sigreturn(bool enabled) { g_sigreturn = enabled; }

void set_agent_boot_hook(AgentBootHook hook) { g_boot_hook = hook; }

AgentGadgets find_agent_gadgets(pid_t pid) {
  AgentGadgets g = find_return_gadgets(pid);
  Sharers sharers = sharers_outside(pid, false);
  g.mm_shared = sharers.mm ? 1 : 0;
  g.files_sharers = std::move(sharers.files);
  return g;
}
bool agent_gadgets_still_there(pid_t pid, const AgentGadgets& g) { return gadgets_still_there(pid, g); }

size_t agent_gadget_scans() { return g_gadget_scans.load(std::memory_order_relaxed); }

AgentGadgets scan_return_gadgets(pid_t pid) { return scan_ranges(pid, gadget_ranges(pid)); }

// ---------------------------------------------------------------- CommitPoint

Expected<CommitPoint> CommitPoint::create() {
  CommitPoint cp;
  cp.fd_.reset(static_cast<int>(::syscall(SYS_memfd_create, "pipecr-commit", MFD_CLOEXEC)));
  if (!cp.fd_) return fail_errno(errno, "memfd_create(pipecr-commit, MFD_CLOEXEC)");
  if (::ftruncate(cp.fd_.get(), kPage) < 0) return fail_errno(errno, "ftruncate(pipecr-commit, 4096)");
  void* p = ::mmap(nullptr, kPage, PROT_READ | PROT_WRITE, MAP_SHARED, cp.fd_.get(), 0);
  if (p == MAP_FAILED) return fail_errno(errno, "mmap(pipecr-commit)");
  cp.word_ = static_cast<uint32_t*>(p);
  return cp;
}

CommitPoint::CommitPoint(CommitPoint&& o) noexcept : fd_(std::move(o.fd_)), word_(o.word_) { o.word_ = nullptr; }

CommitPoint::~CommitPoint() {
  if (word_) ::munmap(word_, kPage);
}

bool CommitPoint::commit() {
  uint32_t open = PIPECR_COMMIT_OPEN;
  return __atomic_compare_exchange_n(word_, &open, PIPECR_COMMIT_COMMITTED, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

void CommitPoint::abort() {
  uint32_t open = PIPECR_COMMIT_OPEN;
  (void)__atomic_compare_exchange_n(word_, &open, PIPECR_COMMIT_ABORTED, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

uint32_t CommitPoint::state() const { return __atomic_load_n(word_, __ATOMIC_SEQ_CST); }

void CommitPoint::set_survey_taken(uint32_t n) const {
  __atomic_store_n(word_ + PIPECR_SURVEY_TAKEN_OFF / sizeof *word_, n, __ATOMIC_RELEASE);
}

// ---------------------------------------------------------------- Agent

Error Agent::error(const std::string& what, int err) const {
  return Error{Errc::system, err, fmt::format("agent in pid {} (thread {}): {}", pid_, tid_, what)};
}

Expected<std::unique_ptr<Agent>> Agent::create(StoppedProcess& process, pid_t tid, const CommitPoint& commit,
                                               std::span<const AgentOp> ops, int floor, size_t batch,
                                               uint64_t vdso_hint, UniqueFd queue, const AgentGadgets* gadgets) {
  std::unique_ptr<Agent> a(new Agent(process, tid));
  a->queue_ = std::move(queue);
  a->ops_.assign(ops.begin(), ops.end());
  a->batch_ = std::clamp<size_t>(batch, 1, kAgentBatch);
  a->vdso_hint_ = vdso_hint;
  if (gadgets) a->pre_gadgets_ = *gadgets;
  if (auto ok = a->boot(commit, ops, floor); !ok) return tl::unexpected(ok.error());
  if (auto ok = a->connect(commit); !ok) {
    (void)a->restore();
    return tl::unexpected(ok.error());
  }
  return a;
}

Expected<Agent*> Agent::start_survey(StoppedProcess& process, pid_t tid, uint64_t vdso_hint, const AgentGadgets* gadgets,
                                     const CommitPoint* commit) {
  return process.inject<Agent>(tid, SurveyOnly{commit}, vdso_hint, gadgets);
}

Expected<std::unique_ptr<Agent>> Agent::create(StoppedProcess& process, pid_t tid, SurveyOnly survey,
                                               uint64_t vdso_hint, const AgentGadgets* gadgets) {
  std::unique_ptr<Agent> a(new Agent(process, tid));
  if (!survey.commit) {  // the agent maps it at HELLO; never committed: it aborts
    auto cp = CommitPoint::create();
    if (!cp) return tl::unexpected(cp.error());
    a->own_commit_.emplace(std::move(*cp));
    survey.commit = &*a->own_commit_;
  }
  const CommitPoint& commit = *survey.commit;
  a->commit_ = survey.commit;
  a->batch_ = 1;
  a->frame_only_ = true;
  a->vdso_hint_ = vdso_hint;
  if (gadgets) a->pre_gadgets_ = *gadgets;
  if (auto ok = a->boot(commit, {}, 0); !ok) return tl::unexpected(ok.error());
  if (auto ok = a->connect(commit); !ok) {
    (void)a->restore();
    return tl::unexpected(ok.error());
  }
  return a;
}

Expected<std::vector<SurveyedFd>> Agent::survey(uint32_t below) {
  std::vector<SurveyedFd> out;
  auto ok = survey(below, [&](std::span<SurveyedFd> batch) -> Expected<void> {
    for (SurveyedFd& f : batch) out.push_back(std::move(f));
    return {};
  });
  if (!ok) return tl::unexpected(ok.error());
  return out;
}

static_assert(kSurveyScratchMax == PIPECR_SURVEY_SCRATCH);

Expected<size_t> Agent::survey(uint32_t below, const SurveySink& sink, const SurveyScratch& scratch) {
  if (!running_ || !sock_ || decided_) return fail(Errc::invalid_argument, EINVAL, "agent: no survey after the decision");
  uint32_t taken = 0;
  if (commit_) commit_->set_survey_taken(0);
  // The scratch pipes are made while pipecr would only wait for a message (the agent looks for them
  // after each message it sends; it tees nothing before its third, see agent.c); when it is to tee
  // always (tests), all of them at once, first.
  std::vector<int> lent;  // their write ends
  size_t want = scratch.make ? std::min(scratch.want, kSurveyScratchMax) : 0;
  auto make_one = [&] {
    const int w = scratch.make();
    if (w < 0) want = lent.size();
    else lent.push_back(w);
    return w >= 0;
  };
  auto send_lent = [&](size_t before) {  // those made since `before`
    return send(sock_.get(), PIPECR_MSG_SCRATCH, static_cast<uint32_t>(before), static_cast<uint32_t>(lent.size() - before),
                std::span<const int>(lent).subspan(before));
  };
  auto lend_while_idle = [&]() -> Expected<void> {
    const size_t before = lent.size();
    for (pollfd p{sock_.get(), POLLIN, 0}; lent.size() < want && ::poll(&p, 1, 0) == 0;)
      if (!make_one()) break;
    return lent.size() == before ? Expected<void>{} : send_lent(before);
  };
  if (scratch.always)
    while (lent.size() < want && make_one()) {
    }
  const int here = ::sched_getcpu();  // the agent yields its CPU at once if it was woken on this one
  if (auto ok = send(sock_.get(), PIPECR_MSG_SURVEY, here >= 0 ? static_cast<uint32_t>(here) + 1 : 0, below, {},
                     scratch.always ? PIPECR_SURVEY_TEE_ALWAYS : 0);
      !ok)
    return tl::unexpected(ok.error());
  if (!scratch.always)  // those at hand go with the request; the rest are made while pipecr waits
    while (lent.size() < std::min(want, scratch.ready) && make_one()) {
    }
  if (scratch.always || !lent.empty())  // with always, the agent waits for this one, even empty
    if (auto ok = send_lent(0); !ok) return tl::unexpected(ok.error());
  if (auto ok = await_ack(); !ok) return tl::unexpected(ok.error());
  // The survey wants two CPUs, one for the agent and one for pipecr, and the scheduler puts them on
  // one: a unix socket's wakeup is "sync" (the woken thread goes to the waker's CPU), and in a
  // virtual machine a halted vCPU is not taken for idle. Left alone, the two shared a CPU for 1-2 ms
  // at each survey's start while the other CPU idled. So once the agent has the request (and, woken
  // on pipecr's CPU, has yielded it: agent.c), pipecr keeps off the CPU the agent is on for the
  // survey (CpuApart), which also keeps the agent's own wakeups of pipecr from pulling it back.
  std::optional<CpuApart> apart;
  if (auto st = read_task_stat(pid_, tid_)) apart.emplace(st->processor);
  size_t seen = 0;
  std::optional<Error> refused;  // the sink's error: the rest is received and dropped, up to SURVEY_DONE
  std::vector<SurveyedFd> batch;
  batch.reserve(PIPECR_SURVEY_BATCH);
  using namespace std::chrono;
  for (auto deadline = steady_clock::now() + wait_timeout();;) {
    struct {
      pipecr_agent_msg m;
      pipecr_survey_ent ent[PIPECR_SURVEY_BATCH];
    } buf;
    std::vector<UniqueFd> files;
    bool truncated = false;
    const ssize_t n = recv_message(sock_.get(), &buf, sizeof buf, files, &truncated);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
      if (lent.size() < want) {
        if (auto ok = lend_while_idle(); !ok) return tl::unexpected(ok.error());
        continue;
      }
      pollfd p{sock_.get(), POLLIN, 0};
      if (::poll(&p, 1, 2) > 0) continue;
      if (auto ok = process_->check_running(tid_); !ok) return tl::unexpected(ok.error());
      if (steady_clock::now() > deadline)
        return fail(Errc::gone, ETIMEDOUT,
                    fmt::format("agent in pid {} (thread {}): no survey within {} ms", pid_, tid_, wait_timeout().count()));
      continue;
    }
    if (n <= 0) {
      int e = n < 0 ? errno : EPIPE;
      if (auto dead = died_meanwhile(); !dead) return tl::unexpected(dead.error());
      return tl::unexpected(error(n == 0 ? "the agent closed its socket during the survey" : "recv(agent socket)", e));
    }
    if (truncated)
      return tl::unexpected(error("survey: files received truncated (pipecr's RLIMIT_NOFILE leaves no room)", EMFILE));
    const pipecr_agent_msg& m = buf.m;
    const size_t count = m.count;
    if (static_cast<size_t>(n) != sizeof m + count * sizeof(pipecr_survey_ent) || count > PIPECR_SURVEY_BATCH ||
        m.first != seen || (m.type != PIPECR_MSG_SURVEY_FILES && m.type != PIPECR_MSG_SURVEY_DONE))
      return tl::unexpected(error(fmt::format("survey: unexpected message {} ({} bytes)", m.type, n), EPROTO));
    size_t unsent = 0;
    for (size_t i = 0; i < count; ++i) unsent += (buf.ent[i].fd & PIPECR_SURVEY_UNSENT) != 0;
    if (files.size() != count - unsent)
      return tl::unexpected(error(fmt::format("survey: {} files for {} entries", files.size(), count - unsent), EPROTO));
    batch.clear();
    for (size_t i = 0, f = 0; i < count; ++i) {
      const pipecr_survey_ent& e = buf.ent[i];
      SurveyedFd s;
      s.fd = static_cast<int>(e.fd & PIPECR_SURVEY_FD_MASK);
      s.cloexec = (e.fd & PIPECR_SURVEY_CLOEXEC) != 0;
      if (!(e.fd & PIPECR_SURVEY_UNSENT)) s.file = std::move(files[f++]);
      if (e.mode != 0) {
        s.stat_known = true;
        s.st.st_mode = e.mode;
        s.st.st_ino = e.ino;
        s.st.st_dev = e.dev;
        s.st.st_uid = e.uid;
        s.st.st_gid = e.gid;
      }
      if (e.teed != 0) {
        if (e.scratch >= lent.size() || !S_ISFIFO(e.mode))
          return tl::unexpected(
              error(fmt::format("survey: fd {} tee'd into scratch pipe {} of {}", s.fd, e.scratch, lent.size()), EPROTO));
        s.teed = e.teed;
        s.scratch = e.scratch;
      }
      batch.push_back(std::move(s));
    }
    seen += count;
    if (m.type == PIPECR_MSG_SURVEY_DONE && m.status != 0) return tl::unexpected(error("survey failed in the target", -m.status));
    if (!batch.empty() && !refused)
      if (auto ok = sink(std::span<SurveyedFd>(batch)); !ok) refused = ok.error();
    if (commit_ && m.type == PIPECR_MSG_SURVEY_FILES) commit_->set_survey_taken(++taken);
    if (m.type == PIPECR_MSG_SURVEY_DONE) {
      if (refused) return tl::unexpected(*refused);
      return seen;
    }
  }
}

Agent::~Agent() {
  (void)restore();
  unlink();
}

// Maps the agent, writes it, its control block, operations and return path, and lets it run.
Expected<void> Agent::boot(const CommitPoint&, std::span<const AgentOp> ops, int floor) {
  if (auto ok = process_->may_run_code(tid_); !ok) return tl::unexpected(ok.error());  // its seccomp filters
  auto regs = process_->regs(tid_);
  if (!regs) return tl::unexpected(regs.error());
  saved_ = *regs;
  auto mask = process_->signal_mask(tid_);
  if (!mask) return tl::unexpected(mask.error());
  saved_mask_ = *mask;

  floor = std::max(floor, 0);
  const uint64_t ctl_offset = round_up(agent_blob_size, kPage);
  const uint64_t fdmap_offset = ctl_offset + kPage;
  const uint64_t fdmap_bytes = round_up(static_cast<uint64_t>(floor) / 8 + 1, 64);
  const uint64_t ops_offset = fdmap_offset + fdmap_bytes;
  const uint64_t ops_end = ops_offset + ops.size() * sizeof(pipecr_agent_op);
  // A survey's message is built in the mapping, not on the thread's stack (8 KiB; threads' stacks
  // may be small). It stays zero: nothing of it is written from here.
  const uint64_t survey_offset = frame_only_ ? round_up(ops_end, 64) : 0;
  map_len_ = round_up(frame_only_ ? survey_offset + PIPECR_SURVEY_BATCH * sizeof(pipecr_survey_ent) : ops_end, kPage);

  pipecr_agent_ctl ctl{};
  ctl.magic = PIPECR_AGENT_MAGIC;
  ctl.sock_peer = ctl.sock_mine = -1;
  ctl.floor = floor;
  ctl.nops = static_cast<uint32_t>(ops.size());
  ctl.ctl_offset = ctl_offset;
  ctl.map_len = map_len_;
  ctl.fdmap_offset = fdmap_offset;
  ctl.ops_offset = ops_offset;
  ctl.survey_offset = survey_offset;
  const auto limit = wait_timeout().count();
  ctl.handshake_ms = static_cast<int32_t>(std::min<long long>(limit, 1 << 30));
  ctl.idle_ms = ctl.handshake_ms;
  ctl.park_ms = static_cast<int32_t>(std::min<long long>(limit, 2000));
  ctl.orig_sigmask = saved_mask_;
  std::snprintf(ctl.name, sizeof ctl.name, "pipecr-agent");

  std::vector<unsigned char> fdmap(fdmap_bytes, 0);
  std::vector<pipecr_agent_op> wire(ops.size());
  for (size_t i = 0; i < ops.size(); ++i) {
    const AgentOp& o = ops[i];
    wire[i] = pipecr_agent_op{o.code, o.fd, -1, o.a, o.b, o.c};
    if (o.code == AgentOp::install) {
      if (o.fd < 0 || o.fd >= floor) return tl::unexpected(error(fmt::format("install at fd {}: not below floor {}", o.fd, floor), EINVAL));
      fdmap[static_cast<size_t>(o.fd) / 8] |= static_cast<unsigned char>(1u << (o.fd % 8));
    }
  }
  std::vector<unsigned char> image(round_up(ops_end, kPage), 0);
  std::memcpy(image.data(), agent_blob, agent_blob_size);
  std::memcpy(image.data() + fdmap_offset, fdmap.data(), fdmap.size());
  if (!wire.empty()) std::memcpy(image.data() + ops_offset, wire.data(), wire.size() * sizeof wire[0]);

  const bool no_signal = !process_->signal_pending(tid_);
  ReturnGadgets g{};
  if (g_sigreturn && arch::frame_return_allowed(pid_, tid_))
    g = pre_gadgets_ && gadgets_still_there(pid_, *pre_gadgets_) ? *pre_gadgets_ : find_return_gadgets(pid_);
  if (frame_only_ && !(g.syscall_ret && g.restorer))  // nothing changed yet
    return tl::unexpected(error("no return through an rt_sigframe here (no `syscall; ret` or restorer in the target, a "
                                "shadow stack, or turned off): a survey does not take the fallback's harm window",
                                ENOTSUP));
  // A process that was in a group stop when seized goes back into it as it is detached, before an
  // agent that returns by itself could run: that agent would stay in it (its socket at its number,
  // its mapping) until a SIGCONT, and then close that number, which a later restore may have filled.
  // There pipecr takes the thread back itself, while it still holds it (the register block).
  if (g.syscall_ret && g.restorer && !process_->was_stopped()) {
    auto fpu = arch::fpu_state(tid_);
    if (!fpu) return tl::unexpected(fpu.error());
    const arch::SigFrame frame =
        arch::build_sigframe(arch::as_resumed_by_sigreturn(saved_, no_signal), saved_mask_, *fpu, g.restorer);
    ctl.frame = frame.frame;
    ctl.gadget = g.syscall_ret;
    return boot_with_frame(ctl, image, frame, g.restorer);
  }
  return boot_with_block(ctl, image, no_signal);
}

// Runs one syscall of the bootstrap at the target's `syscall; ret` with rsp at the frame: were
// pipecr to die at any moment of it, the thread finishes the syscall and returns through the frame.
Expected<long> Agent::frame_syscall(uint64_t gadget, uint64_t frame, long nr, std::array<unsigned long, 6> args,
                                    std::optional<AgentBootStep> step, bool chained) {
  Regs r = saved_;
  r.set_syscall(nr, args, gadget);
  r.set_sp(frame);
  if (auto ok = process_->set_regs(tid_, r); !ok) return tl::unexpected(ok.error());
  if (!masked_) {  // now that rt_sigreturn would restore it: no signal is held back from the thread
    if (auto ok = process_->set_signal_mask(tid_, ~uint64_t{0}); !ok) return tl::unexpected(ok.error());
    masked_ = true;
  }
  if (step) boot_step(*step, args[0], chained);
  if (auto ok = process_->run_syscall(tid_, nr); !ok) return tl::unexpected(ok.error());
  auto after = process_->regs(tid_);
  if (!after) return tl::unexpected(after.error());
  return after->ret();
}

// The thread as it was (registers, mask), re-parked so that the kernel restarts its syscall.
Expected<void> Agent::put_back() {
  auto ok = process_->set_regs(tid_, saved_);
  if (ok) ok = process_->set_signal_mask(tid_, saved_mask_);
  if (ok) ok = process_->repark(tid_);
  return ok;
}

Expected<void> Agent::boot_with_frame(pipecr_agent_ctl& ctl, std::vector<unsigned char>& image,
                                      const arch::SigFrame& frame, uint64_t restorer) {
  frame_mode_ = true;
  if (auto ok = write_remote(pid_, frame.frame, frame.bytes.data(), frame.bytes.size()); !ok)
    return tl::unexpected(error(fmt::format("no room for the signal frame on the thread's stack: {}", ok.error().what),
                                ok.error().err));
  // The chain's first frame: rt_sigreturn into `munmap(at, map_len_)` at the gadget, every signal
  // blocked, with rsp at the thread's own frame, whose rt_sigreturn follows the munmap's ret.
  auto chain_frame = [&](uint64_t at) {
    Regs unmap = saved_;
    unmap.set_syscall(SYS_munmap, {at, map_len_, 0, 0, 0, 0}, ctl.gadget);
    unmap.set_sp(frame.frame);
    return arch::build_sigframe(unmap, ~uint64_t{0}, {}, restorer);
  };
  const uint64_t chain_at = chain_frame(0).frame;  // the same place whatever the address
  const uint64_t agent_sp = (chain_at - kAgentStackGap) & ~uint64_t{15};
  auto write_chain = [&](uint64_t at) {
    const arch::SigFrame f = chain_frame(at);
    return bool(write_remote(pid_, f.frame, f.bytes.data(), f.bytes.size()));
  };
  // Where rsp points while a syscall of the bootstrap runs at the gadget: the chain once it unmaps
  // the agent's range, the thread's own frame before.
  uint64_t syscall_sp = frame.frame;
  auto fail_back = [&](Error e) -> Expected<void> {
    if (base_) (void)frame_syscall(ctl.gadget, syscall_sp, SYS_munmap, {base_, map_len_, 0, 0, 0, 0});
    base_ = 0;
    (void)put_back();
    return tl::unexpected(std::move(e));
  };
  // Signals stay pending (not delivered to a thread that runs our code) until rt_sigreturn puts the
  // mask back: frame_syscall() blocks them once the registers point at the gadget, so that the frames
  // restore the mask whenever pipecr dies.
  const uint64_t code_len = round_up(agent_blob_size, kPage);
  const auto mmap_args = [&](uint64_t at) -> std::array<unsigned long, 6> {
    return {at, map_len_, PROT_READ | PROT_WRITE,
            static_cast<unsigned long>(MAP_PRIVATE | MAP_ANONYMOUS | (at ? MAP_FIXED_NOREPLACE : 0)),
            static_cast<unsigned long>(-1L), 0};
  };
  // Usually: the address is chosen first and the chain written before the mmap, which runs with rsp
  // at the chain: whenever pipecr dies from here on, the thread unmaps that range (nothing, before
  // the mmap) and returns. Not where another process shares the address space (it runs: it could map
  // there first, and the munmap would take its mapping), nor if the kernel does not place the
  // mapping there (MAP_FIXED_NOREPLACE unknown: a mere hint).
  // No room for the chain below the thread's frame (a main stack whose mapping ends just there: the
  // agent's own pushes grow it, a remote write does not): the old bootstrap, with its leak window
  // open until the agent runs.
  bool chain_room = true;
  const auto stat = read_stat(pid_);  // the parent, and where the main stack is
  if (!mm_shared_at_stop(pid_, pre_gadgets_, stat ? &*stat : nullptr)) {
    for (int attempt = 0; attempt < 3 && !base_; ++attempt) {
      const uint64_t at = choose_agent_address(pid_, map_len_, saved_.sp(), stat ? stat->start_stack : 0);
      if (!at) break;
      if (!write_chain(at)) {
        chain_room = false;
        break;
      }
      auto got = frame_syscall(ctl.gadget, chain_at, SYS_mmap, mmap_args(at), AgentBootStep::mmap_set, true);
      if (!got) return fail_back(got.error());
      syscall_sp = chain_at;
      if (*got == -EEXIST) continue;  // mapped meanwhile (cannot be, with the mm stopped): choose again
      if (*got < 0 && *got >= -4095)
        return fail_back(error(fmt::format("mmap({:#x}, {} bytes, rw, MAP_FIXED_NOREPLACE) in the target", at, map_len_),
                               static_cast<int>(-*got)));
      base_ = static_cast<uint64_t>(*got);
      if (base_ == at) {
        chained_ = true;
        break;
      }
      // Placed elsewhere: unmap it (the chain's munmap would miss it) and map as below.
      auto un = frame_syscall(ctl.gadget, syscall_sp, SYS_munmap, {base_, map_len_, 0, 0, 0, 0});
      base_ = 0;
      if (!un || *un != 0) return fail_back(un ? error("munmap(misplaced agent) in the target", static_cast<int>(-*un)) : un.error());
      break;
    }
  }
  // The leak window: from the kernel's mmap until rsp points at a chain that unmaps it, two ptrace
  // calls (the chain's write, the registers) after the mmap returns; without room for the chain,
  // until the agent runs.
  std::optional<LeakWindowScope> leak;
  if (!chained_) {
    leak.emplace();
    auto addr = frame_syscall(ctl.gadget, frame.frame, SYS_mmap, mmap_args(0), AgentBootStep::mmap_set, false);
    syscall_sp = frame.frame;
    if (!addr) return fail_back(addr.error());
    if (*addr < 0 && *addr >= -4095)
      return fail_back(error(fmt::format("mmap({} bytes, rw) in the target", map_len_), static_cast<int>(-*addr)));
    base_ = static_cast<uint64_t>(*addr);
    if (chain_room && write_chain(base_)) {
      auto at_ret = process_->regs(tid_);  // at the gadget's ret: the ret now goes through the chain
      if (!at_ret) return fail_back(at_ret.error());
      at_ret->set_sp(chain_at);
      if (auto ok = process_->set_regs(tid_, *at_ret); !ok) return fail_back(ok.error());
      syscall_sp = chain_at;
      leak.reset();
    }
  }
  boot_step(AgentBootStep::mapped, base_, chained_);
  ctl_addr_ = base_ + ctl.ctl_offset;
  std::memcpy(image.data() + ctl.ctl_offset, &ctl, sizeof ctl);
  if (auto ok = write_remote(pid_, base_, image.data(), image.size()); !ok) return fail_back(ok.error());
  boot_step(AgentBootStep::written, base_, chained_);
  auto prot = frame_syscall(ctl.gadget, syscall_sp, SYS_mprotect, {base_, code_len, PROT_READ | PROT_EXEC, 0, 0, 0});
  if (!prot) return fail_back(prot.error());
  if (*prot != 0) return fail_back(error("mprotect(agent code, r-x) in the target", static_cast<int>(-*prot)));
  boot_step(AgentBootStep::protected_code, base_, chained_);
  // One PTRACE_SETREGS from the chain to the agent: before it a death unmaps through the chain, after
  // it the agent runs and unmaps itself on its way out. The agent's stack is below the chain.
  Regs entry = saved_;
  entry.set_call(base_, agent_sp, ctl_addr_);
  if (auto ok = process_->set_regs(tid_, entry); !ok) return fail_back(ok.error());
  leak.reset();
  boot_step(AgentBootStep::entry_set, base_, chained_);
  if (auto ok = process_->let_run(tid_); !ok) return fail_back(ok.error());
  running_ = true;
  return {};
}

// The fallback without a `syscall; ret` or restorer in the target: a remote mmap through [vdso] (or
// the thread's own syscall instruction), and the agent returns through a register block.
Expected<void> Agent::boot_with_block(pipecr_agent_ctl& ctl, std::vector<unsigned char>& image, bool no_signal) {
  // The registers the thread returns with, as the kernel would restart its syscall, in a block on
  // its own stack below the red zone (written before the bootstrap: nothing uses that memory).
  const Regs back = arch::as_restarted(saved_, no_signal);
  const auto block = arch::return_block(back);
  const uint64_t block_addr = arch::return_block_address(back);
  const uint64_t agent_sp = (block_addr - kAgentStackGap) & ~uint64_t{15};
  if (auto ok = write_remote(pid_, block_addr, block.data(), sizeof block); !ok)
    return tl::unexpected(error(fmt::format("no room for the return block on the thread's stack: {}", ok.error().what),
                                ok.error().err));
  ctl.return_block = block_addr;
  const uint64_t code_len = round_up(agent_blob_size, kPage);

  // The remote syscalls of the bootstrap: from here until the registers point at the agent,
  // pipecr's death would leave the thread with the injected registers (the harm window).
  auto made = process_->inject<RemoteSyscalls>(tid_, RemoteSyscalls::Insn::vdso_first, vdso_hint_);
  if (!made) return tl::unexpected(made.error());
  Discard done_with(*process_, *made);
  RemoteSyscalls* rs = *made;
  vdso_hint_ = rs->patched_code() ? 0 : rs->syscall_address();
  HarmWindowScope window;
  auto addr = rs->call(SYS_mmap, 0, map_len_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                       static_cast<unsigned long>(-1L), 0);
  if (!addr) return tl::unexpected(addr.error());
  if (*addr < 0 && *addr >= -4095) {
    (void)rs->restore();
    return tl::unexpected(error(fmt::format("mmap({} bytes, rw) in the target", map_len_), static_cast<int>(-*addr)));
  }
  base_ = static_cast<uint64_t>(*addr);
  ctl_addr_ = base_ + ctl.ctl_offset;
  // From here a failure must unmap the agent.
  auto unmap_and_fail = [&](Error e) -> Expected<void> {
    (void)rs->call(SYS_munmap, base_, map_len_);
    base_ = 0;
    (void)rs->restore();
    return tl::unexpected(std::move(e));
  };
  std::memcpy(image.data() + ctl.ctl_offset, &ctl, sizeof ctl);
  if (auto ok = write_remote(pid_, base_, image.data(), image.size()); !ok) return unmap_and_fail(ok.error());
  auto prot = rs->call(SYS_mprotect, base_, code_len, PROT_READ | PROT_EXEC);
  if (!prot) return unmap_and_fail(prot.error());
  if (*prot != 0) return unmap_and_fail(error("mprotect(agent code, r-x) in the target", static_cast<int>(-*prot)));

  // Point the thread at the agent: registers first (were pipecr to die now, the agent runs and
  // returns), then the mask, then let it run.
  Regs entry = saved_;
  entry.set_call(base_, agent_sp, ctl_addr_);
  if (auto ok = process_->set_regs(tid_, entry); !ok) return unmap_and_fail(ok.error());
  window.close();
  if (auto ok = rs->release(); !ok) return unmap_and_fail(ok.error());
  if (auto ok = process_->set_signal_mask(tid_, ~uint64_t{0}); !ok) {
    (void)process_->set_regs(tid_, saved_);
    return unmap_and_fail(ok.error());
  }
  if (auto ok = process_->let_run(tid_); !ok) {
    (void)process_->set_regs(tid_, saved_);
    (void)process_->set_signal_mask(tid_, saved_mask_);
    return unmap_and_fail(ok.error());
  }
  running_ = true;
  return {};
}

Expected<uint32_t> Agent::phase() {
  uint32_t ph = 0;
  auto ok = read_remote(pid_, ctl_addr_ + offsetof(pipecr_agent_ctl, phase), &ph, sizeof ph);
  if (!ok) return tl::unexpected(ok.error());
  return ph;
}

Expected<void> Agent::wait_phase(uint32_t at_least, std::chrono::milliseconds limit) {
  using namespace std::chrono;
  const auto deadline = steady_clock::now() + limit;
  const auto spin_until = steady_clock::now() + milliseconds(20);
  for (;;) {
    auto ph = phase();
    if (!ph) return tl::unexpected(ph.error());
    if (*ph >= at_least) return {};
    if (auto ok = process_->check_running(tid_); !ok) return ok;
    if (steady_clock::now() > deadline)
      return fail(Errc::gone, ETIMEDOUT,
                  fmt::format("agent in pid {} (thread {}): no progress within {} ms (phase {})", pid_, tid_,
                              limit.count(), *ph));
    if (steady_clock::now() < spin_until)  // the agent needs a CPU (the target's other threads are stopped): ours
      std::this_thread::yield();
    else
      std::this_thread::sleep_for(microseconds(100));
  }
}

// After the agent's socket broke: the thread's death (Errc::gone) when it died, which the kernel
// reports a little after the files of a dying process are closed.
Expected<void> Agent::died_meanwhile() {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
  do {
    if (auto ok = process_->check_running(tid_); !ok) return ok;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  } while (std::chrono::steady_clock::now() < deadline);
  return {};
}

Expected<void> Agent::send(int sock, uint32_t type, uint32_t first, uint32_t count, std::span<const int> fds,
                           int32_t status) {
  const pipecr_agent_msg m{type, first, count, status};
  for (;;) {
    if (send_message(sock, m, fds) == static_cast<ssize_t>(sizeof m)) return {};
    if (errno == EAGAIN) {  // the agent has not drained the queue yet
      if (auto ok = process_->check_running(tid_); !ok) return ok;
      std::this_thread::sleep_for(std::chrono::microseconds(50));
      continue;
    }
    int e = errno;
    if (auto dead = died_meanwhile(); !dead) return dead;
    Error err = error(fmt::format("sendmsg(type {}, {} fds)", type, fds.size()), e);
    if (e == ETOOMANYREFS)
      err.what += " (files in flight over unix sockets count against pipecr's RLIMIT_NOFILE without "
                  "CAP_SYS_RESOURCE or CAP_SYS_ADMIN: raise it, e.g. ulimit -n, or restore fewer pipes at once)";
    return tl::unexpected(err);
  }
}

Expected<::pipecr_agent_msg> Agent::receive(std::chrono::milliseconds limit) {
  using namespace std::chrono;
  const auto deadline = steady_clock::now() + limit;
  for (;;) {
    pollfd p{sock_.get(), POLLIN, 0};
    int r = ::poll(&p, 1, 2);
    if (r < 0 && errno != EINTR) return tl::unexpected(error("poll(agent socket)", errno));
    if (r > 0) {
      pipecr_agent_msg m{};
      std::vector<UniqueFd> files;
      const ssize_t n = recv_message(sock_.get(), &m, sizeof m, files);
      if (!files.empty()) {
        // Only OLDFILES carries files: the replaced ones, kept alive until this agent is destroyed
        // (after the resume), in flight in a socket queue of pipecr's (no fd number held), else
        // at an fd of pipecr's.
        std::vector<int> fds;
        for (const UniqueFd& f : files) fds.push_back(f.get());
        if (!grave_) {
          auto q = FileQueue::create(ops_.size() / kMaxFdsPerMessage + 4);
          if (q) grave_ = std::make_unique<FileQueue>(std::move(*q));
        }
        if (!(grave_ && grave_->queue(0, fds)))  // else parked: our copies close here
          for (UniqueFd& f : files) replaced_.push_back(std::move(f));
      }
      if (n == static_cast<ssize_t>(sizeof m) && m.type == PIPECR_MSG_OLDFILES) continue;
      if (n == static_cast<ssize_t>(sizeof m)) return m;
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      int e = n < 0 ? errno : EPIPE;
      if (auto dead = died_meanwhile(); !dead) return tl::unexpected(dead.error());
      return tl::unexpected(error(n == 0 ? "the agent closed its socket" : "recv(agent socket)", e));
    }
    if (auto ok = process_->check_running(tid_); !ok) return tl::unexpected(ok.error());
    if (steady_clock::now() > deadline)
      return fail(Errc::gone, ETIMEDOUT,
                  fmt::format("agent in pid {} (thread {}): no answer within {} ms", pid_, tid_, limit.count()));
  }
}

// Handshake: take the agent's socket end, send the commit memfd, and take the ACK (a survey agent's after its request).
Expected<void> Agent::connect(const CommitPoint& commit) {
  if (auto ok = wait_phase(PIPECR_AGENT_SOCKET_READY, wait_timeout()); !ok) return ok;
  pipecr_agent_ctl ctl{};
  if (auto ok = read_remote(pid_, ctl_addr_, &ctl, sizeof ctl); !ok) return ok;
  if (ctl.phase != PIPECR_AGENT_SOCKET_READY && ctl.sock_peer < 0)
    return tl::unexpected(error("no socket", -ctl.error));
  auto pidfd = pidfd_open(tid_);  // the fd table of the agent's thread (it may have its own)
  if (!pidfd) return tl::unexpected(pidfd.error());
  auto mine = pidfd_getfd(pidfd->get(), ctl.sock_peer, pid_);
  if (!mine) return tl::unexpected(mine.error());
  sock_ = std::move(*mine);
  auto files = pidfd_getfd(pidfd->get(), ctl.files_peer, pid_);
  if (!files) return tl::unexpected(files.error());
  files_ = std::move(*files);
  for (int fd : {sock_.get(), files_.get()}) {
    int flags = ::fcntl(fd, F_GETFL);
    if (flags >= 0) (void)::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
  }
  // Every file waits in the files socket's queue until the commit: room for all of them (each
  // message is charged to this end's send buffer until the agent receives it).
  const int want = static_cast<int>(std::min<size_t>(1u << 30, 4096 + ops_.size() * 64));
  if (::setsockopt(files_.get(), SOL_SOCKET, SO_SNDBUFFORCE, &want, sizeof want) < 0)
    (void)::setsockopt(files_.get(), SOL_SOCKET, SO_SNDBUF, &want, sizeof want);
  // HELLO carries the commit memfd, and the receiving end of the files queue when pipecr filled one
  // before the stop (the agent then receives from it instead of its own pair).
  const int hello[2] = {commit.fd(), queue_.get()};
  if (auto ok = send(sock_.get(), PIPECR_MSG_HELLO, 0, 0, std::span(hello, queue_ ? 2 : 1)); !ok) return ok;
  queue_.reset();  // the agent holds it now (and drops its files if it aborts)
  // A survey's request follows HELLO at once (survey(), which takes the ACK after it): the agent
  // goes from one to the other without waiting for pipecr's turn.
  ack_pending_ = true;
  if (frame_only_) return {};
  return await_ack();
}

Expected<void> Agent::await_ack() {
  if (!ack_pending_) return {};
  ack_pending_ = false;
  auto m = receive(wait_timeout());
  if (!m) return tl::unexpected(m.error());
  if (m->type != PIPECR_MSG_ACK) return tl::unexpected(error("handshake refused", -m->status));
  return {};
}

// ---------------------------------------------------------------- FileQueue

Expected<FileQueue> FileQueue::create(size_t messages) {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
    return fail_errno(errno, "socketpair(AF_UNIX, SOCK_SEQPACKET) for a files queue");
  FileQueue q;
  q.sender_.reset(sv[0]);
  q.receiver_.reset(sv[1]);
  int flags = ::fcntl(sv[0], F_GETFL);
  if (flags >= 0) (void)::fcntl(sv[0], F_SETFL, flags | O_NONBLOCK);
  // Each queued message is charged to the sender until received: its skb (a few hundred bytes; a
  // 1 KiB upper bound) plus the files' list. 2 KiB a message leaves room.
  const int want = static_cast<int>(std::min<size_t>(1u << 30, 8192 + messages * 2048));
  if (::setsockopt(sv[0], SOL_SOCKET, SO_SNDBUFFORCE, &want, sizeof want) < 0)
    (void)::setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &want, sizeof want);
  return q;
}

Expected<void> FileQueue::queue(uint32_t first, std::span<const int> fds) {
  if (fds.empty() || fds.size() > kMaxFdsPerMessage)
    return fail(Errc::invalid_argument, EINVAL, fmt::format("files queue: {} files in one message", fds.size()));
  const pipecr_agent_msg m{PIPECR_MSG_FILES, first, static_cast<uint32_t>(fds.size()), 0};
  const ssize_t n = send_message(sender_.get(), m, fds);
  if (n == static_cast<ssize_t>(sizeof m)) {
    ++messages_;
    files_ += fds.size();
    largest_ = std::max(largest_, fds.size());
    return {};
  }
  const int e = n < 0 ? errno : EIO;
  int buf = 0;
  socklen_t len = sizeof buf;
  (void)::getsockopt(sender_.get(), SOL_SOCKET, SO_SNDBUF, &buf, &len);
  std::string what = fmt::format("sendmsg(files queue, {} fds, after {} messages holding {} files)", fds.size(),
                                 messages_, files_);
  if (e == ETOOMANYREFS)
    what += fmt::format(": files in flight count against pipecr's RLIMIT_NOFILE without CAP_SYS_ADMIN or "
                        "CAP_SYS_RESOURCE: this restore needs about {} in flight at once; raise it, e.g. "
                        "prlimit --pid {} --nofile={}:{}, or restore fewer processes at once",
                        files_ + fds.size(), ::getpid(), files_ + fds.size() + 1024, files_ + fds.size() + 1024);
  else if (e == EAGAIN)
    what += fmt::format(": its send buffer ({} bytes) is full; without CAP_NET_ADMIN it is capped by "
                        "net.core.wmem_max: raise it, e.g. sysctl -w net.core.wmem_max={}",
                        buf, std::max<size_t>(8192 + (messages_ + 1) * 2048, 1u << 20));
  return fail_errno(e, what);
}

Expected<void> Agent::send_files() {
  std::vector<int> batch;
  for (size_t at = 0; at < ops_.size();) {
    if (ops_[at].code != AgentOp::install) {
      ++at;
      continue;
    }
    batch.clear();
    size_t first = at;
    while (at < ops_.size() && ops_[at].code == AgentOp::install && batch.size() < batch_)
      batch.push_back(ops_[at++].source);
    if (auto ok = send(files_.get(), PIPECR_MSG_FILES, static_cast<uint32_t>(first), static_cast<uint32_t>(batch.size()), batch); !ok)
      return ok;
  }
  return {};
}

Expected<void> Agent::prepare() {
  // count: the most files one FILES message brings; the agent checks there is room for them.
  size_t installs = 0;
  for (const AgentOp& op : ops_) installs += op.code == AgentOp::install;
  const auto count = static_cast<uint32_t>(std::min(batch_, installs));
  if (auto ok = send(sock_.get(), PIPECR_MSG_PREPARE, 0, count, {}); !ok) return ok;
  auto m = receive(wait_timeout());
  if (!m) return tl::unexpected(m.error());
  if (m->status == 0 && m->type == PIPECR_MSG_PREPARED) return {};
  const AgentOp* op = m->first < ops_.size() ? &ops_[m->first] : nullptr;
  int err = -m->status;
  Error e = error(op ? fmt::format("{} at fd {}: {}", op_name(op->code), op->fd, std::strerror(err))
                     : fmt::format("failed: {}", std::strerror(err)),
                  err);
  if (err == EMFILE)
    e.what += " (the target's RLIMIT_NOFILE leaves no room for the files received)";
  return tl::unexpected(e);
}

void Agent::send_decide() {
  if (decide_sent_) return;
  decide_sent_ = true;
  if (auto ok = send(sock_.get(), PIPECR_MSG_DECIDE, 0, 0, {}); !ok) decide_error_ = ok.error();
}

Expected<bool> Agent::decide() {
  if (decided_) return fail(Errc::invalid_argument, EINVAL, "agent: decided already");
  decided_ = true;
  send_decide();
  if (decide_error_) return tl::unexpected(*decide_error_);
  if (auto ok = await_ack(); !ok) return tl::unexpected(ok.error());  // a survey agent never asked
  for (;;) {
    auto m = receive(wait_timeout());
    if (!m) return tl::unexpected(m.error());
    if (m->type == PIPECR_MSG_FAILED || m->type == PIPECR_MSG_PREPARED) continue;  // said before
    if (m->type != PIPECR_MSG_DONE) return tl::unexpected(error(fmt::format("unexpected message {}", m->type), EPROTO));
    if (m->status != 0) {
      const AgentOp* op = m->first < ops_.size() ? &ops_[m->first] : nullptr;
      return tl::unexpected(error(fmt::format("at commit, {} at fd {}: {}", op ? op_name(op->code) : "?", op ? op->fd : -1,
                                              std::strerror(-m->status)),
                                  -m->status));
    }
    return m->count == 1;
  }
}

// Interrupts the parked agent and puts the thread back where it was, removing the mapping.
Expected<void> Agent::take_back() {
  if (frame_mode_) {
    // The agent returns by itself: stop the thread where it waits for EOF (in ppoll, which the
    // kernel restarts when it is detached), change nothing, and close the socket: once detached, the
    // agent sees EOF, unmaps itself and rt_sigreturn puts the thread back. A thread that left the
    // agent already (park_ms passed) is stopped wherever it is: nothing of it is ours any more.
    // Without a connection (start() failed half way) there is nothing to wait for: the agent needs
    // pipecr for nothing and returns by itself once it sees it has no tracer (or EOF).
    Expected<void> parked = decided_ ? wait_phase(PIPECR_AGENT_PARKED, wait_timeout()) : Expected<void>{};
    auto ok = process_->interrupt(tid_);
    running_ = false;
    sock_.reset();  // files_ stays: the files the installs replaced may wait in it (destructor)
    base_ = 0;
    if (!ok) return ok;
    if (!parked && parked.error().err == EFAULT) return {};  // unmapped: it has returned
    awaiting_return_ = true;  // after_detach() waits for it
    return parked;
  }
  if (auto ok = wait_phase(PIPECR_AGENT_PARKED, wait_timeout()); !ok) return ok;
  if (auto ok = process_->interrupt(tid_); !ok) return ok;
  running_ = false;
  auto ph = phase();
  auto now = process_->regs(tid_);
  if (!now) return tl::unexpected(now.error());
  const bool inside = now->ip() >= base_ && now->ip() < base_ + map_len_;
  if (ph && *ph == PIPECR_AGENT_RETURNING && !inside) {
    // It returned by itself (pipecr was slower than park_ms): a signal handler may still return into
    // its code, so the mapping stays (one page named pipecr-agent).
    base_ = 0;
    return {};
  }
  auto made = process_->inject<RemoteSyscalls>(tid_, RemoteSyscalls::Insn::vdso_first, vdso_hint_);
  if (!made) return tl::unexpected(made.error());
  Discard done_with(*process_, *made);
  RemoteSyscalls* rs = *made;
  rs->restore_to(saved_);
  HarmWindowScope window;  // from the munmap's registers until the thread's own, and its mask, are back
  auto un = rs->call(SYS_munmap, base_, map_len_);
  auto ok = rs->restore();
  if (ok) ok = process_->set_signal_mask(tid_, saved_mask_);
  window.close();
  base_ = 0;
  if (!un) return tl::unexpected(un.error());
  return ok;
}

Expected<void> Agent::restore() {
  if (done_ || !process_) return {};
  done_ = true;
  std::optional<Error> first;
  if (running_) {
    if (!decided_ && sock_) {
      auto d = decide();
      if (!d) first = d.error();
    }
    if (!frame_mode_) {  // with a frame, the socket stays open until the thread is stopped (take_back)
      sock_.reset();     // EOF for an agent that did not get DECIDE (files_ stays: see take_back)
    }
    auto ok = take_back();
    if (!ok && !first) first = ok.error();
  } else if (base_) {
    // Booted but never run (start() failed half way): nothing else to undo here.
    base_ = 0;
  }
  if (!awaiting_return_) unlink();  // else linked until after_detach()
  if (first) return tl::unexpected(*first);
  return {};
}

// The thread is detached: the agent sees EOF, closes its last fds and unmaps itself. Waits (bounded)
// until its mapping is gone, so that when StoppedProcess::resume() returns the target holds exactly
// its own fds and mappings again (the rt_sigreturn that follows the munmap is a few instructions).
// It looks every 20 us and sleeps in between rather than yield its CPU: the target's other threads
// run again by now, and in a guest the agent is often woken on pipecr's CPU (the other vCPU, halted,
// does not count as idle), where a yield handed the CPU to those threads as readily as to the agent
// (measured, BM_Dump 1,000 empty pipes with a spinning thread: the return took 2.9 ms yielding
// for the first 20 ms, 0.2 ms sleeping).
void Agent::after_detach() {
  if (!awaiting_return_) return;
  awaiting_return_ = false;
  unlink();
  using namespace std::chrono;
  const auto deadline = steady_clock::now() + milliseconds(std::min<long long>(wait_timeout().count(), 2000)) + seconds(1);
  for (;;) {
    if (!phase()) return;  // its mapping is gone: it has returned
    if (steady_clock::now() > deadline) return;  // it returns by itself all the same (park_ms)
    std::this_thread::sleep_for(microseconds(20));
  }
}

}  // namespace pipecr::sys
