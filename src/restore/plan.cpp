// restore/plan.cpp: stage 1 of a restore into processes: decide everything before anything is made.
//
// Reads only the image, the command line and /proc. Checks what would otherwise fail half way: each
// recorded pid exists in the image and is used once, each target exists, is not a zombie and may be
// ptraced, and the --exec command can be found. Whether a target may be ptraced is asked without
// stopping it: pidfd_getfd() makes the same PTRACE_MODE_ATTACH_REALCREDS check as PTRACE_SEIZE
// (Yama included) before it looks up the fd, so asking for an fd no process can have answers EPERM
// when we may not attach and EBADF when we may. The seize itself (stage 3) can still fail (another
// tracer, the target exits); that is rolled back there.
//
// Owners (F_SETOWN_EX) name pids of the dumped world: an owner that is a restored recorded process
// becomes its target (a process group owner: the target's process group); any other owner cannot be
// mapped and is left unset, with a note, except on a description kept in place (settle_owners()).
#include "restore/plan.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <optional>
#include <unordered_set>

#include <fmt/format.h>

#include "restore/in_flight.hpp"
#include "restore/links.hpp"
#include "sys/proc.hpp"
#include "sys/syscalls.hpp"

namespace pipecr::restore {

std::string table_name(const Holder& h) {
  return h.thread ? fmt::format("thread {} of process {}", h.thread, h.target) : fmt::format("process {}", h.target);
}

namespace {

std::string recorded_list(const Image& img) {
  std::string s;
  for (const ProcessRecord& p : img.processes) s += fmt::format("{}{} ({})", s.empty() ? "" : ", ", p.pid, p.comm);
  return s;
}

bool image_has_process(const Image& img, int32_t pid) {
  if (img.processes.empty()) return pid == 0;
  return std::any_of(img.processes.begin(), img.processes.end(), [&](const ProcessRecord& p) { return p.pid == pid; });
}

// The target exists, is alive and may be ptraced by us.
Expected<void> check_target(pid_t target) {
  if (target <= 0) return fail(Errc::invalid_argument, EINVAL, fmt::format("--into {}: not a pid", target));
  if (target == ::getpid())
    return fail(Errc::invalid_argument, EINVAL,
                fmt::format("--into {}: that is pipecr itself (use --exec to restore into a new command)", target));
  auto st = sys::read_stat(target);
  if (!st) return tl::unexpected(Error{st.error().kind, st.error().err, fmt::format("target {}: {}", target, st.error().what)});
  if (st->state == 'Z' || st->state == 'X')
    return fail(Errc::gone, ESRCH, fmt::format("target {} ({}) has exited (zombie)", target, st->comm));
  auto pidfd = sys::pidfd_open(target);
  if (!pidfd) return tl::unexpected(pidfd.error());
  auto probe = sys::pidfd_getfd(pidfd->get(), INT_MAX, target);
  if (probe) return {};  // cannot happen: no fd has that number
  if (probe.error().err == EBADF) return {};
  if (probe.error().kind == Errc::permission)
    return fail(Errc::permission, probe.error().err,
                fmt::format("target {} ({}): not allowed to ptrace it (owned by another user, not dumpable, or "
                            "kernel.yama.ptrace_scope)",
                            target, st->comm));
  return tl::unexpected(probe.error());
}

// PATH search as execvp() does it, so that a missing command is found before any target is touched.
Expected<std::string> resolve_command(const std::string& cmd) {
  if (cmd.empty()) return fail(Errc::invalid_argument, EINVAL, "--exec: no command");
  auto executable = [](const std::string& p) {
    struct stat st {};
    return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(p.c_str(), X_OK) == 0;
  };
  if (cmd.find('/') != std::string::npos) {
    if (executable(cmd)) return cmd;
    return fail(Errc::invalid_argument, ENOENT, fmt::format("--exec: {}: not an executable file", cmd));
  }
  const char* env = std::getenv("PATH");
  std::string path = env ? env : "/usr/local/bin:/bin:/usr/bin";
  size_t at = 0;
  while (at <= path.size()) {
    size_t end = path.find(':', at);
    if (end == std::string::npos) end = path.size();
    std::string dir = path.substr(at, end - at);
    std::string full = (dir.empty() ? std::string(".") : dir) + "/" + cmd;
    if (executable(full)) return full;
    at = end + 1;
  }
  return fail(Errc::invalid_argument, ENOENT, fmt::format("--exec: {}: command not found in PATH", cmd));
}

Expected<void> add_holders(const Image& img, const ProcessRestoreRequest& req, Plan& plan) {
  std::unordered_set<int32_t> recorded;
  std::unordered_set<pid_t> targets;
  for (const IntoSpec& spec : req.into) {
    auto rec = recorded_pid_of(img, spec);
    if (!rec) return tl::unexpected(rec.error());
    if (!recorded.insert(*rec).second)
      return fail(Errc::invalid_argument, EINVAL, fmt::format("recorded process {} is restored twice", *rec));
    if (!targets.insert(spec.target).second)
      return fail(Errc::invalid_argument, EINVAL, fmt::format("target {} is named twice", spec.target));
    if (auto ok = check_target(spec.target); !ok) return tl::unexpected(ok.error());
    plan.holders.push_back(Holder{*rec, spec.target, false, {}});
  }
  if (req.exec) {
    if (!image_has_process(img, req.exec->recorded))
      return fail(Errc::invalid_argument, EINVAL,
                  fmt::format("--exec {}: the image records no such process (it records: {})", req.exec->recorded,
                              recorded_list(img)));
    if (!recorded.insert(req.exec->recorded).second)
      return fail(Errc::invalid_argument, EINVAL, fmt::format("recorded process {} is restored twice", req.exec->recorded));
    auto path = resolve_command(req.exec->argv.empty() ? std::string() : req.exec->argv.front());
    if (!path) return tl::unexpected(path.error());
    plan.exec_path = *path;
    plan.holders.push_back(Holder{req.exec->recorded, ::getpid(), true, {}});
  }
  if (req.caller) {
    if (req.exec) return fail(Errc::invalid_argument, EINVAL, "the caller and --exec are both this process");
    if (!image_has_process(img, req.caller->recorded))
      return fail(Errc::invalid_argument, EINVAL,
                  fmt::format("the image records no process {} (it records: {})", req.caller->recorded,
                              recorded_list(img)));
    if (!recorded.insert(req.caller->recorded).second)
      return fail(Errc::invalid_argument, EINVAL, fmt::format("recorded process {} is restored twice", req.caller->recorded));
    Holder self{req.caller->recorded, ::getpid(), true, {}};
    self.caller = true;
    plan.holders.push_back(std::move(self));
  }
  if (plan.holders.empty()) return fail(Errc::invalid_argument, EINVAL, "nothing to restore into: give --into or --exec");
  return {};
}

// The owner of a restored file, in live pids; nullopt when it cannot be mapped.
std::optional<Owner> map_owner(const Owner& o, const Plan& plan) {
  for (const Holder& h : plan.holders) {
    if (h.recorded != o.pid || o.pid == 0) continue;
    Owner out = o;
    out.pid = h.target;
    if (o.type == F_OWNER_PGRP) {
      auto st = sys::read_stat(h.target);
      if (!st) return std::nullopt;
      out.pid = st->pgrp;
    }
    return out;
  }
  return std::nullopt;
}

void add_file(const Image& img, uint64_t file_id, Plan& plan) {
  if (plan.file_index.count(file_id)) return;
  const FileRecord* f = img.find_file(file_id);
  PlannedFile pf{*f, img.find_pipe(f->pipe_id)};
  // An in-process image (no process records) restored into the caller: its owners are pids of the
  // caller's own world, kept as they are.
  const bool live_owners = img.processes.empty() &&
                           std::any_of(plan.holders.begin(), plan.holders.end(), [](const Holder& h) { return h.caller; });
  if (f->owner.pid != 0 && !live_owners) {
    if (auto o = map_owner(f->owner, plan)) {
      pf.rec.owner = *o;
    } else {
      pf.owner_unmapped = true;  // settle_owners(), once the plan knows which descriptions are kept
      pf.rec.owner = Owner{};
    }
  }
  plan.file_index[file_id] = plan.files.size();
  plan.files.push_back(std::move(pf));
}

const char* owner_kind(int32_t type) {
  return type == F_OWNER_TID ? "thread" : type == F_OWNER_PGRP ? "process group" : "process";
}

// Whether the owner a kept description recorded exists now: a thread or process that is not a
// zombie, or a process group with a member.
bool owner_exists(const Owner& o) {
  if (o.pid <= 0) return false;
  if (o.type == F_OWNER_PGRP) return ::kill(-o.pid, 0) == 0 || errno == EPERM;
  auto st = sys::read_stat(o.pid);  // /proc/N/stat: a thread's own too
  return st && st->state != 'Z' && st->state != 'X';
}

// Owners that are not restored processes. A new description (replaced pipe, --exec, a file no target
// holds any more) gets none, with a note: its ids belong to the dumped world. A description kept in
// place is the one the owner was set on, in this boot: the recorded owner (a thread, a process, a
// process group outside the restore) is set again (or left, when it is the owner now) where it still
// exists; where it is gone the owner is cleared, with a note (a number reused since would name
// another process).
void settle_owners(Plan& plan) {
  std::unordered_set<uint64_t> kept;  // recorded files whose description is kept
  for (const Holder& h : plan.holders)
    for (const PlannedFd& f : h.fds)
      if (f.keep) kept.insert(f.rec->file_id);
  for (PlannedFile& pf : plan.files) {
    if (!pf.owner_unmapped) continue;
    const FileRecord* f = plan.img->find_file(pf.rec.id);
    const Owner& o = f->owner;
    if (!kept.count(pf.rec.id)) {
      plan.notes.push_back(fmt::format("pipe {} file {}: signal owner pid {} is not a restored process: owner not set",
                                       f->pipe_id, f->id, o.pid));
    } else if (owner_exists(o)) {
      pf.rec.owner = o;
    } else {
      plan.notes.push_back(fmt::format("pipe {} file {}: signal owner {} {} no longer exists: owner cleared on the "
                                       "description kept in place",
                                       f->pipe_id, f->id, owner_kind(o.type), o.pid));
    }
  }
}

// A pipe that processes outside the restore hold too (a terminal's log pipe, a supervisor's stdout
// pipe) cannot be restored whole: a new pipe would cut those holders off. Where the target still
// holds that very pipe at the recorded number, the fd is left as it is. Outside holders are those
// the dump recorded (dump --outside-holders) or those the restore's own scan sees now (inplace.hpp).
bool still_connected(const Image& img, const FdRecord& d, pid_t target, bool held_outside_now) {
  const FileRecord* f = img.find_file(d.file_id);
  const PipeRecord* p = f ? img.find_pipe(f->pipe_id) : nullptr;
  if (!p || !(p->outside_holders || held_outside_now) || target <= 0) return false;
  struct stat st {};
  if (::stat(fmt::format("/proc/{}/fd/{}", target, d.fd).c_str(), &st) < 0 || !S_ISFIFO(st.st_mode)) return false;
  if (st.st_ino != p->inode) return false;
  auto acc = sys::read_fdinfo(target, d.fd);
  return acc && (acc->flags & O_ACCMODE) == static_cast<int>(f->flags & O_ACCMODE);
}

// The holder for the fds of thread tid's own fd table in the process of holder h: made on first
// use, after the others (the exec holder has no threads of the recorded process: nullopt).
std::optional<size_t> thread_holder(Plan& plan, size_t h, pid_t tid) {
  if (plan.holders[h].exec) return std::nullopt;
  for (size_t i = 0; i < plan.holders.size(); ++i)
    if (plan.holders[i].thread == tid && plan.holders[i].target == plan.holders[h].target) return i;
  Holder t{plan.holders[h].recorded, plan.holders[h].target, false, {}};
  t.thread = tid;
  plan.holders.push_back(std::move(t));
  return plan.holders.size() - 1;
}

// Why an fd is left as it is (the process still holds its pipe there, which a process outside the
// restore holds too), for its note: who that is, and what to do when it uses the very fd table
// (clone(CLONE_FILES) without CLONE_THREAD: a dump of one of them records the other as outside).
std::string held_outside(const PipeChoice* c, pid_t table) {
  if (!c || c->strangers.empty()) return "it still holds that pipe, which is also held outside the image";
  const pid_t who = c->strangers.front();
  auto comm = sys::read_comm(who);
  const std::string name = fmt::format("process {} ({})", who, comm ? *comm : "?");
  if (auto same = sys::kcmp_files(table, who); same && *same == 0)
    return fmt::format("it still holds that pipe, and {} uses the same fd table (clone(CLONE_FILES)) without being "
                       "restored: dump and restore both (--tree, or -t and --into for each)",
                       name);
  const std::string more = c->strangers.size() > 1 ? fmt::format(" and {} more", c->strangers.size() - 1) : "";
  return fmt::format("it still holds that pipe, which {}{} {} too, outside the restore", name, more,
                     c->strangers.size() > 1 ? "hold" : "holds");
}

// Fds of restored processes, the files and pipes they need; the rest is dropped. A process that
// shared the fd table of a recorded one (SHARED_FILES) receives that table's fds when only it is
// restored; when both are, they are installed once.
void select_fds(const Image& img, Plan& plan, std::unordered_map<uint64_t, PipeChoice>& choices) {
  auto choice_of = [&](const FdRecord& d) -> const PipeChoice* {
    const FileRecord* f = img.find_file(d.file_id);
    auto c = f ? choices.find(f->pipe_id) : choices.end();
    return c == choices.end() ? nullptr : &c->second;
  };
  std::unordered_map<int32_t, size_t> holder_of;
  for (size_t i = 0; i < plan.holders.size(); ++i) holder_of[plan.holders[i].recorded] = i;
  for (const SharedFdTable& s : img.shared_tables)
    if (auto it = holder_of.find(s.pid); it != holder_of.end() && !holder_of.count(s.with_pid))
      holder_of[s.with_pid] = it->second;
  std::unordered_set<uint64_t> async_done;
  for (const FdRecord& d : img.fds) {
    auto h = holder_of.find(d.pid);
    if (h == holder_of.end()) continue;
    std::optional<size_t> hi = h->second;
    if (d.tid != 0) hi = thread_holder(plan, h->second, d.tid);
    if (!hi) {
      plan.notes.push_back(fmt::format("fd {} of thread {}'s own fd table not restored: --exec has no such thread",
                                       d.fd, d.tid));
      continue;
    }
    const PipeChoice* c = choice_of(d);
    const bool in_place = c && c->in_place;
    // (FIFOs held by strangers are refused or allowed by make_plan: not left as they are.)
    const FileRecord* fr = img.find_file(d.file_id);
    const PipeRecord* pr = fr ? img.find_pipe(fr->pipe_id) : nullptr;
    const bool outside_now = c && !c->strangers.empty() && pr && pr->kind == PipeKind::anonymous;
    // A thread's own table is /proc/TID/...: its fds are looked up there, not in the process's table.
    const pid_t table = plan.holders[*hi].thread ? plan.holders[*hi].thread : plan.holders[*hi].target;
    if (!in_place && !plan.holders[*hi].caller && still_connected(img, d, table, outside_now)) {
      plan.notes.push_back(
          fmt::format("fd {} of process {} left as it is: {}", d.fd, plan.holders[*hi].target, held_outside(c, table)));
      continue;
    }
    add_file(img, d.file_id, plan);
    const FileRecord& f = plan.files[plan.file_index[d.file_id]].rec;
    bool async = (f.flags & O_ASYNC) && async_done.insert(f.id).second;
    plan.holders[*hi].fds.push_back(PlannedFd{&d, async});
  }
  std::unordered_set<uint64_t> used;
  for (const PlannedFile& f : plan.files) used.insert(f.pipe->id);
  std::unordered_map<uint64_t, size_t> pipe_at;
  for (const PipeRecord& p : img.pipes) {
    if (!used.count(p.id)) {
      plan.notes.push_back(fmt::format("pipe {} ({}) not restored: no restored process holds it", p.id,
                                       p.kind == PipeKind::fifo ? p.path : fmt::format("pipe:[{}]", p.inode)));
      continue;
    }
    pipe_at[p.id] = plan.pipes.size();
    plan.pipes.push_back(PlannedPipe{&p, {}, std::move(choices[p.id])});
    if (p.outside_holders && !plan.pipes.back().choice.in_place)
      plan.notes.push_back(fmt::format("pipe {}: ends held outside the image are not restored", p.id));
  }
  // Files in image order within each pipe.
  std::vector<size_t> order(plan.files.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return plan.files[a].rec.id < plan.files[b].rec.id; });
  for (size_t i : order) plan.pipes[pipe_at[plan.files[i].pipe->id]].files.push_back(i);
  for (const FdRecord& d : img.fds) {
    if (holder_of.count(d.pid)) continue;
    const FileRecord* f = img.find_file(d.file_id);
    if (!f || !pipe_at.count(f->pipe_id)) continue;
    DroppedEnd e{f->pipe_id, f->id, d.pid, d.fd, (f->flags & O_ACCMODE) != O_RDONLY};
    plan.notes.push_back(describe(e, img));
    plan.dropped.push_back(e);
  }
}

}  // namespace

Expected<int32_t> recorded_pid_of(const Image& img, const IntoSpec& spec) {
  if (spec.recorded) {
    if (!image_has_process(img, *spec.recorded))
      return fail(Errc::invalid_argument, EINVAL,
                  fmt::format("--into {}={}: the image records no process {} (it records: {})", spec.target,
                              *spec.recorded, *spec.recorded, img.processes.empty() ? "none" : recorded_list(img)));
    return *spec.recorded;
  }
  if (img.processes.size() == 1) return img.processes.front().pid;
  if (img.processes.empty()) return 0;
  return fail(Errc::invalid_argument, EINVAL,
              fmt::format("--into {}: the image records {} processes; say which with --into {}=RECORDED (recorded: {})",
                          spec.target, img.processes.size(), spec.target, recorded_list(img)));
}

std::string describe(const DroppedEnd& d, const Image& img) {
  const PipeRecord* p = img.find_pipe(d.pipe_id);
  std::string name = !p ? fmt::format("pipe {}", d.pipe_id)
                     : p->kind == PipeKind::fifo ? fmt::format("FIFO {}", p->path)
                                                 : fmt::format("pipe {} (pipe:[{}])", d.pipe_id, p->inode);
  return fmt::format("dropped: {} {} end, fd {} of recorded process {} (not restored)", name,
                     d.write_side ? "write" : "read", d.fd, d.recorded_pid);
}

// Fds recorded in a thread's own fd table go back into that thread of that process only: the
// thread must exist in the target (so the target is the recorded process) and still have a table
// of its own. The transaction stops each process once and runs an agent in each table it restores
// (the process's own, by its first thread; a thread's own, by that thread); the process's own holder
// goes when it has nothing to install, so that no agent starts for nothing.
Expected<void> check_thread_tables(Plan& plan) {
  for (size_t ti = 0; ti < plan.holders.size(); ++ti) {
    const Holder& t = plan.holders[ti];
    if (t.thread == 0) continue;
    std::string what = fmt::format("fd {} of process {} was in the own fd table of its thread {}",
                                   t.fds.empty() ? -1 : t.fds.front().rec->fd, t.recorded, t.thread);
    struct stat st {};
    if (::stat(fmt::format("/proc/{}/task/{}", t.target, t.thread).c_str(), &st) < 0)
      return fail(Errc::invalid_argument, ESRCH,
                  fmt::format("{}: process {} has no thread {}, so it cannot be restored there{}", what, t.target,
                              t.thread, t.target == t.recorded ? "" : " (restore it into the recorded process)"));
    if (::syscall(SYS_kcmp, t.target, t.thread, 2 /* KCMP_FILES */, 0, 0) == 0)
      return fail(Errc::invalid_argument, EINVAL,
                  fmt::format("{}: thread {} of process {} no longer has an fd table of its own", what, t.thread,
                              t.target));
    for (size_t i = 0; i < plan.holders.size(); ++i) {
      const Holder& h = plan.holders[i];
      if (i == ti || h.target != t.target || h.exec || h.thread != 0 || !h.fds.empty()) continue;
      plan.holders.erase(plan.holders.begin() + static_cast<std::ptrdiff_t>(i));
      return check_thread_tables(plan);  // indices moved: start over
    }
  }
  return {};
}

Expected<Plan> make_plan(const Image& img, const ProcessRestoreRequest& request, const ProcessRestoreOptions& opts) {
  Plan plan;
  plan.img = &img;
  if (auto ok = add_holders(img, request, plan); !ok) return tl::unexpected(ok.error());
  auto choices = choose_in_place(img, plan.holders, opts.replace);
  select_fds(img, plan, choices);
  if (auto ok = check_thread_tables(plan); !ok) return tl::unexpected(ok.error());
  // A FIFO is shared by path: a process outside the restore that has it open would read the
  // restored bytes, or write into the restored FIFO (issue 9). Refused unless the user says so.
  for (const PlannedPipe& pp : plan.pipes) {
    if (pp.pipe->kind != PipeKind::fifo || pp.choice.strangers.empty()) continue;
    const pid_t who = pp.choice.strangers.front();
    auto comm = sys::read_comm(who);
    std::string more = pp.choice.strangers.size() > 1 ? fmt::format(" (and {} more)", pp.choice.strangers.size() - 1) : "";
    if (!opts.allow_outside_fifo_holders)
      return fail(Errc::unsupported, EBUSY,
                  fmt::format("FIFO {}: process {} ({}){} has it open and is not restored: it would share the restored "
                              "FIFO (read its bytes, write into it); refused (give --allow-outside-fifo-holders to "
                              "restore it anyway)",
                              pp.pipe->path, who, comm ? *comm : "?", more));
    plan.notes.push_back(fmt::format("FIFO {}: process {} ({}){} has it open and is not restored: it shares the "
                                     "restored FIFO (--allow-outside-fifo-holders)",
                                     pp.pipe->path, who, comm ? *comm : "?", more));
  }
  mark_kept(plan);
  rlimit rl{};
  auto open_now = sys::list_fds(::getpid(), false);
  if (::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_max != RLIM_INFINITY && open_now)
    fit_fd_limit(plan, static_cast<size_t>(rl.rlim_max), open_now->size());
  settle_owners(plan);
  plan_epoll(img, plan);
  for (std::string& n : cut_links_notes(plan)) plan.notes.push_back(std::move(n));
  for (std::string& n : in_flight_notes(plan)) plan.notes.push_back(std::move(n));
  return plan;
}

}  // namespace pipecr::restore
