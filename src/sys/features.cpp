// features.cpp: the probes behind `pipecr check`. See features.hpp.
//
// Every probe uses objects it makes itself (pipes, one child) and releases them before returning:
// the child for PTRACE_SEIZE is SIGKILLed and reaped on every path, so a probe never leaves a
// process stopped or traced.
#include "sys/features.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "sys/proc.hpp"
#include "sys/syscalls.hpp"

#ifndef F_GETOWNER_UIDS
#define F_GETOWNER_UIDS 17
#endif
#ifndef F_DUPFD_QUERY
#define F_DUPFD_QUERY (1024 + 3)  // F_LINUX_SPECIFIC_BASE + 3, Linux 6.10
#endif
#ifndef O_NOTIFICATION_PIPE
#define O_NOTIFICATION_PIPE O_EXCL  // include/uapi/linux/watch_queue.h
#endif

namespace pipecr::sys {
namespace {

std::string errno_text(int err) { return fmt::format("{} ({})", strerrorname_np(err) ? strerrorname_np(err) : "?", std::strerror(err)); }

std::string err_text(const Error& e) { return e.err ? errno_text(e.err) : e.what; }

// A pipe holding one byte, for the probes that need data.
Expected<PipePair> pipe_with_byte() {
  auto p = make_pipe(O_CLOEXEC);
  if (!p) return p;
  const std::byte b{'x'};
  auto w = write_all(p->write.get(), std::span<const std::byte>(&b, 1));
  if (!w) return tl::unexpected(w.error());
  return p;
}

Feature probe_tee() {
  Feature f{"tee", false, "", "a kernel with tee(2) (2.6.17+); a seccomp profile may block it", true, false};
  auto a = pipe_with_byte();
  auto b = make_pipe(O_CLOEXEC);
  if (!a || !b) return f.detail = "pipe2 failed", f;
  auto n = tee_nb(a->read.get(), b->write.get(), 1);
  f.ok = n && *n == 1;
  f.detail = n ? (f.ok ? "works" : "copied nothing") : err_text(n.error());
  return f;
}

Feature probe_pidfd(bool& open_ok, bool& getfd_ok, Feature& getfd) {
  Feature f{"pidfd_open", false, "", "Linux 5.3+ for pidfd_open", true, true};
  getfd = Feature{"pidfd_getfd", false, "", "Linux 5.6+ for pidfd_getfd; needs ptrace rights over the target",
                  true, true};
  auto pidfd = pidfd_open(::getpid());
  open_ok = f.ok = pidfd.has_value();
  f.detail = pidfd ? "works" : err_text(pidfd.error());
  if (!pidfd) return getfd.detail = "needs pidfd_open", f;
  auto p = make_pipe(O_CLOEXEC);
  if (!p) return getfd.detail = "pipe2 failed", f;
  auto fd = pidfd_getfd(pidfd->get(), p->read.get(), ::getpid());
  getfd_ok = getfd.ok = fd.has_value();
  getfd.detail = fd ? "works" : err_text(fd.error());
  return f;
}

Feature probe_kcmp() {
  Feature f{"kcmp", false, "", "CONFIG_KCMP=y (or CONFIG_CHECKPOINT_RESTORE on older kernels)", true, false};
  auto p = make_pipe(O_CLOEXEC);
  if (!p) return f.detail = "pipe2 failed", f;
  UniqueFd dup(::fcntl(p->read.get(), F_DUPFD_CLOEXEC, 0));
  auto same = kcmp_file(::getpid(), p->read.get(), ::getpid(), dup.get());
  auto diff = kcmp_file(::getpid(), p->read.get(), ::getpid(), p->write.get());
  f.ok = same && diff && *same == 0 && *diff != 0;
  f.detail = !same ? err_text(same.error()) : (f.ok ? "works" : "gave wrong answers");
  return f;
}

// F_DUPFD_QUERY on a pipe's read end against a dup of it (1) and against its write end (0).
Feature probe_dupfd_query(bool& ok) {
  Feature f{"f_dupfd_query", false, "",
            "Linux 6.10+; optional: the dump groups its copies with kcmp (about 4x slower per pair) without it",
            false, false};
  int err = 0;
  ok = f.ok = dupfd_query_answers(&err);
  f.detail = f.ok ? "works" : err ? errno_text(err) : "gave wrong answers";
  return f;
}

// stat() of /proc/self/fd: its st_size is the number of open fds (Linux 6.2), checked against one
// more fd opened.
Feature probe_proc_fd_count(bool& ok) {
  Feature f{"proc_fd_count", false, "",
            "Linux 6.2+; optional: without it the dump tells a table's fds by its size alone (a table that "
            "once held many fds is then walked slot by slot, and may get the survey agent for few fds)",
            false, false};
  const uint32_t before = open_fd_count(::getpid());
  UniqueFd extra(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  const uint32_t after = open_fd_count(::getpid());
  ok = f.ok = extra && before != 0 && after == before + 1;
  f.detail = f.ok ? "works" : before == 0 ? "not counted (st_size of /proc/self/fd is 0)" : "gave a wrong count";
  return f;
}

// PROCMAP_QUERY on /proc/self/maps: the mapping that holds this very function.
Feature probe_procmap_query(bool& ok) {
  Feature f{"procmap_query", false, "",
            "Linux 6.11+; optional: without it an agent's start reads /proc/PID/maps as text inside the stop "
            "(about 0.5 us a mapping: milliseconds for a process of thousands)",
            false, false};
  UniqueFd maps(::open("/proc/self/maps", O_RDONLY | O_CLOEXEC));
  if (!maps) return f.detail = "/proc/self/maps: " + errno_text(errno), f;
  const auto here = reinterpret_cast<uint64_t>(&probe_procmap_query);
  auto m = query_mapping(maps.get(), here, false);
  ok = f.ok = m && *m && (*m)->start <= here && here < (*m)->end;
  f.detail = !m ? err_text(m.error()) : (f.ok ? "works" : "gave a wrong answer");
  return f;
}

// pipecr's own seccomp mode: the kernel shows a target's seccomp filter only to a tracer under none.
Feature probe_own_seccomp(bool& ok) {
  Feature f{"own_seccomp", false, "",
            "run pipecr outside any seccomp filter (a container's included); optional: under one it cannot read a "
            "target's filter, so a process under a filter gets no agent and no restore",
            false, false};
  auto st = read_status(::getpid());
  ok = f.ok = st && st->seccomp <= 0;
  f.detail = !st ? err_text(st.error()) : f.ok ? "none" : fmt::format("pipecr runs under seccomp (mode {})", st->seccomp);
  return f;
}

Feature probe_ptrace_seize() {
  Feature f{"ptrace_seize", false, "",
            "CAP_SYS_PTRACE, or the same uid with kernel.yama.ptrace_scope <= 1; not blocked by seccomp", true, true};
  pid_t child = ::fork();
  if (child < 0) return f.detail = "fork: " + errno_text(errno), f;
  if (child == 0) {
    ::pause();
    ::_exit(0);
  }
  long r = ::ptrace(PTRACE_SEIZE, child, nullptr, nullptr);
  int err = errno;
  ::kill(child, SIGKILL);  // ends the trace too: nothing stays stopped or traced
  while (::waitpid(child, nullptr, 0) < 0 && errno == EINTR) {
  }
  f.ok = r == 0;
  f.detail = f.ok ? "works (on a child of ours)" : errno_text(err);
  return f;
}

Feature probe_getowner_uids(bool& ok) {
  Feature f{"f_getowner_uids", false, "", "CONFIG_CHECKPOINT_RESTORE=y (owner uid/euid are then dumped too)",
            false, false};
  auto p = make_pipe(O_CLOEXEC);
  if (!p) return f.detail = "pipe2 failed", f;
  uint32_t uids[2] = {};
  ok = f.ok = ::fcntl(p->read.get(), F_GETOWNER_UIDS, uids) == 0;
  f.detail = f.ok ? "works" : errno_text(errno);
  return f;
}

Feature probe_packet_pipes(bool& ok) {
  Feature f{"packet_pipes", false, "", "Linux 3.4+ (pipe2 O_DIRECT); without it packet-mode pipes cannot be restored",
            false, false};
  auto p = make_pipe(O_CLOEXEC | O_DIRECT);
  if (!p) return f.detail = err_text(p.error()), f;
  auto fl = get_fl(p->write.get());
  ok = f.ok = fl && (*fl & O_DIRECT);
  f.detail = f.ok ? "works" : "O_DIRECT not kept";
  return f;
}

// vmsplice of one fresh anonymous page into a pipe, with the given flags.
Expected<bool> try_vmsplice(unsigned flags) {
  long page = ::sysconf(_SC_PAGESIZE);
  void* mem = ::mmap(nullptr, static_cast<size_t>(page), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return tl::unexpected(call_error("mmap", "anonymous page"));
  std::memset(mem, 'v', static_cast<size_t>(page));
  auto p = make_pipe(O_CLOEXEC);
  bool ok = false;
  int err = 0;
  if (p) {
    iovec iov{mem, static_cast<size_t>(page)};
    ok = ::vmsplice(p->write.get(), &iov, 1, flags) == page;
    err = errno;
  }
  ::munmap(mem, static_cast<size_t>(page));
  if (!p) return tl::unexpected(p.error());
  if (!ok) return fail_errno(err, fmt::format("vmsplice(flags={:#x})", flags));
  return true;
}

Feature probe_vmsplice(unsigned flags, bool& ok) {
  bool gift = flags & SPLICE_F_GIFT;
  Feature f{gift ? "vmsplice_gift" : "vmsplice", false, "",
            "optional: restore falls back to write() (seccomp profiles often block vmsplice)", false, false};
  auto r = try_vmsplice(flags);
  ok = f.ok = r.has_value();
  f.detail = r ? "works" : err_text(r.error());
  return f;
}

Expected<uint64_t> read_u64_file(const char* path) {
  auto text = read_proc_file(path, 64);
  if (!text) return tl::unexpected(text.error());
  try {
    return std::stoull(*text);
  } catch (...) {
    return fail(Errc::system, 0, fmt::format("{}: not a number", path));
  }
}

void probe_pipe_limits(KernelFeatures& k) {
  auto max = read_u64_file("/proc/sys/fs/pipe-max-size");
  k.pipe_max_size = max ? static_cast<uint32_t>(*max) : 0;
  k.pipe_user_pages_soft = read_u64_file("/proc/sys/fs/pipe-user-pages-soft").value_or(0);
  k.pipe_user_pages_hard = read_u64_file("/proc/sys/fs/pipe-user-pages-hard").value_or(0);
  k.report.push_back(Feature{"pipe_max_size", max.has_value(),
                             max ? fmt::format("{} bytes (larger pipes need CAP_SYS_RESOURCE)", *max)
                                 : err_text(max.error()),
                             max ? "" : "mount /proc", false, false});
  k.report.push_back(Feature{
      "pipe_user_pages", true,
      fmt::format("soft {} hard {} pages per user{}", k.pipe_user_pages_soft, k.pipe_user_pages_hard,
                  k.pipe_user_pages_soft ? " (past soft, unprivileged users get 2-slot pipes)" : ""),
      "", false, false});
}

void probe_caps(KernelFeatures& k) {
  const uint64_t eff = effective_caps();
  struct Cap { const char* name; const char* cap; int bit; bool* field; const char* why; };
  const Cap caps[] = {
      {"cap_sys_ptrace", "CAP_SYS_PTRACE", 19, &k.cap_sys_ptrace, "needed to dump or restore processes of other users"},
      {"cap_sys_resource", "CAP_SYS_RESOURCE", 24, &k.cap_sys_resource, "needed to restore pipes larger than pipe-max-size"},
      {"cap_checkpoint_restore", "CAP_CHECKPOINT_RESTORE", 40, &k.cap_checkpoint_restore, "lets a non-root tool checkpoint (Linux 5.9+)"},
      {"cap_sys_admin", "CAP_SYS_ADMIN", 21, &k.cap_sys_admin,
       "needed to read a target's seccomp filter, without which a process under one gets no agent and no restore; "
       "covers the others on older kernels"},
  };
  for (const Cap& c : caps) {
    *c.field = (eff >> c.bit) & 1;
    k.report.push_back(Feature{c.name, *c.field, *c.field ? "present" : "absent",
                               *c.field ? "" : fmt::format("grant {} ({})", c.cap, c.why), false, false});
  }
}

void probe_limits(KernelFeatures& k) {
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    k.nofile_soft = rl.rlim_cur;
    k.nofile_hard = rl.rlim_max;
  }
  k.report.push_back(Feature{"rlimit_nofile", true, fmt::format("soft {} hard {}", k.nofile_soft, k.nofile_hard),
                             k.nofile_soft < 4096 ? "raise with `ulimit -n` for dumps of many fds" : "", false,
                             false});
  auto yama = read_u64_file("/proc/sys/kernel/yama/ptrace_scope");
  k.yama_ptrace_scope = yama ? static_cast<int>(*yama) : -1;
  bool ok = k.yama_ptrace_scope <= 1 || (k.yama_ptrace_scope == 2 && k.cap_sys_ptrace);
  static const char* const kScope[] = {"classic", "descendants only", "CAP_SYS_PTRACE only", "no attach"};
  std::string detail = k.yama_ptrace_scope < 0 ? "no Yama"
                       : k.yama_ptrace_scope <= 3
                           ? fmt::format("{} ({})", k.yama_ptrace_scope, kScope[k.yama_ptrace_scope])
                           : fmt::format("{}", k.yama_ptrace_scope);
  k.report.push_back(Feature{"yama_ptrace_scope", ok, detail,
                             ok ? "" : "sysctl kernel.yama.ptrace_scope=1 (or run with CAP_SYS_PTRACE)", false,
                             false});
}

Feature probe_notification_pipes(bool& ok) {
  int fds[2];
  ok = ::pipe2(fds, O_NOTIFICATION_PIPE | O_CLOEXEC) == 0;
  int err = errno;
  if (ok) {
    UniqueFd r(fds[0]), w(fds[1]);
  }
  // Informational: pipecr refuses notification pipes either way (their data cannot be read without
  // consuming it). Without CONFIG_WATCH_QUEUE none can exist.
  return Feature{"notification_pipes", true,
                 ok ? "supported by the kernel (pipecr refuses them)"
                    : fmt::format("not in this kernel: {} (none can exist)", errno_text(err)),
                 "", false, false};
}

}  // namespace

bool dupfd_query_answers(int* err) {
  auto p = make_pipe(O_CLOEXEC);
  if (!p) return false;
  UniqueFd dup(::fcntl(p->read.get(), F_DUPFD_CLOEXEC, 0));
  if (!dup) return false;
  int same = ::fcntl(p->read.get(), F_DUPFD_QUERY, dup.get());
  if (same < 0 && err) *err = errno;
  int diff = ::fcntl(p->read.get(), F_DUPFD_QUERY, p->write.get());
  return same == 1 && diff == 0;
}

bool dupfd_query_works() {
  static const bool works = dupfd_query_answers(nullptr);
  return works;
}

bool KernelFeatures::dump_ready() const {
  for (const Feature& f : report)
    if (f.dump_needs && !f.ok) return false;
  return true;
}

bool KernelFeatures::restore_ready() const {
  for (const Feature& f : report)
    if (f.restore_needs && !f.ok) return false;
  return true;
}

const Feature* KernelFeatures::find(std::string_view name) const {
  for (const Feature& f : report)
    if (f.name == name) return &f;
  return nullptr;
}

KernelFeatures probe_kernel_features() {
  KernelFeatures k;
  Feature tee = probe_tee();
  k.tee = tee.ok;
  k.report.push_back(std::move(tee));
  Feature getfd;
  k.report.push_back(probe_pidfd(k.pidfd_open, k.pidfd_getfd, getfd));
  k.report.push_back(std::move(getfd));
  Feature kcmp = probe_kcmp();
  k.kcmp = kcmp.ok;
  k.report.push_back(std::move(kcmp));
  k.report.push_back(probe_dupfd_query(k.dupfd_query));
  k.report.push_back(probe_proc_fd_count(k.proc_fd_count));
  k.report.push_back(probe_procmap_query(k.procmap_query));
  k.report.push_back(probe_own_seccomp(k.own_seccomp_free));
  Feature seize = probe_ptrace_seize();
  k.ptrace_seize = seize.ok;
  k.report.push_back(std::move(seize));
  k.report.push_back(probe_getowner_uids(k.getowner_uids));
  k.report.push_back(probe_packet_pipes(k.packet_pipes));
  k.report.push_back(probe_vmsplice(0, k.vmsplice));
  k.report.push_back(probe_vmsplice(SPLICE_F_GIFT, k.vmsplice_gift));
  k.report.push_back(probe_notification_pipes(k.notification_pipes));
  probe_pipe_limits(k);
  probe_caps(k);
  probe_limits(k);
  return k;
}

const KernelFeatures& kernel_features() {
  static const KernelFeatures cached = probe_kernel_features();
  return cached;
}

}  // namespace pipecr::sys
