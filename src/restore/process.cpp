// restore/process.cpp: stage 3 of a restore into processes: the transaction that installs the
// prepared pipes into running targets, and the exec of a new command that holds its share.
//
// Targets (all-or-nothing over every target): stop every one first (PTRACE_SEIZE + INTERRUPT on all
// threads, sys/ptrace.hpp), then in phases over all of them: check RLIMIT_NOFILE against the highest
// recorded fd; stash what is open at each recorded number (a copy at a high number inside the
// target); install the prepared files (SCM_RIGHTS + dup3, sys/remote.hpp), the same fd passed to
// every target that shared the open file description; set O_ASYNC at the final number of each file
// that had it (si_fd is the number O_ASYNC was set through). Only when every phase succeeded for
// every target are the stashes dropped, registers restored and the targets let go. Any failure, for
// any target: every stash is put back (the old file at each number, with its FD_CLOEXEC), every
// target resumed, and the error returned. Nothing here depends on the bytes queued: they were
// written in stage 2, before the first target was stopped.
//
// --exec: this process takes the exec holder's fds the same way, in its own fd table (dup3 to the
// recorded numbers, with a stash of what was there), BEFORE the targets are stopped, so a failure in
// either part undoes both; only the exec itself comes after the targets are committed (the command
// was found on PATH in stage 1, so it rarely fails then). Every fd pipecr holds is O_CLOEXEC, so
// the command starts with exactly the recorded fds plus what pipecr inherited (stdin, stdout, stderr).
#include "restore/process.hpp"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <memory>

#include <fmt/format.h>

#include "restore/plan.hpp"
#include "sys/ptrace.hpp"
#include "sys/remote.hpp"
#include "sys/syscalls.hpp"

namespace pipecr::restore {
namespace {

Error in_target(const Holder& h, const Error& e) {
  return Error{e.kind, e.err, fmt::format("target {} (recorded {}): {}", h.target, h.recorded, e.what)};
}

int highest_fd(const Holder& h) {
  int m = -1;
  for (const PlannedFd& f : h.fds) m = std::max(m, f.rec->fd);
  return m;
}

// One stopped target and what was done to it so far.
struct Session {
  Session(sys::StoppedProcess p, const Holder& h) : proc(std::move(p)), holder(&h) {}
  sys::StoppedProcess proc;                  // declared first: destroyed after remote
  std::optional<sys::RemoteSyscalls> remote;
  std::vector<sys::StashedFd> stash;
  bool stashed = false;
  const Holder* holder;
};

class TargetTransaction {
 public:
  TargetTransaction(const Plan& plan, const Built& built, const ProcessRestoreOptions& opts)
      : plan_(plan), built_(built), opts_(opts) {}
  TargetTransaction(const TargetTransaction&) = delete;
  TargetTransaction& operator=(const TargetTransaction&) = delete;
  ~TargetTransaction() { rollback(); }

  // Every phase for every target; on failure everything is rolled back before returning.
  Expected<void> run() {
    for (const Holder& h : plan_.holders) {
      if (h.exec) continue;
      auto sp = sys::StoppedProcess::seize(h.target);
      if (!sp) return abort(in_target(h, sp.error()));
      sessions_.push_back(std::make_unique<Session>(std::move(*sp), h));
    }
    stage(Stage::seized);
    using Phase = Expected<void> (TargetTransaction::*)(Session&);
    for (Phase phase : {&TargetTransaction::attach, &TargetTransaction::stash, &TargetTransaction::install,
                        &TargetTransaction::async}) {
      for (auto& s : sessions_)
        if (auto ok = (this->*phase)(*s); !ok) return abort(in_target(*s->holder, ok.error()));
      if (phase == &TargetTransaction::stash) stage(Stage::stashed);
    }
    stage(Stage::installed);
    return {};
  }

  // Drops the stashes and lets every target go. Past the point of no return: reports the first error.
  Expected<void> commit() {
    std::optional<Error> first;
    for (auto& s : sessions_) {
      auto ok = sys::drop_stash(*s->remote, s->stash);
      s->stashed = false;
      if (ok) ok = s->remote->restore();
      if (ok) ok = s->proc.resume();
      if (!ok && !first) first = in_target(*s->holder, ok.error());
    }
    sessions_.clear();
    if (first) return tl::unexpected(*first);
    return {};
  }

 private:
  void stage(Stage st) {
    if (opts_.hook) opts_.hook(st);
  }

  Expected<void> attach(Session& s) {
    auto r = sys::RemoteSyscalls::attach(s.proc, s.proc.threads().front());
    if (!r) return tl::unexpected(r.error());
    s.remote.emplace(std::move(*r));
    int top = highest_fd(*s.holder);
    if (top < 0) return {};
    auto limit = sys::remote_nofile_limit(*s.remote);
    if (!limit) return tl::unexpected(limit.error());
    // The stash copies and the temporaries of install_fds go above the highest number.
    if (static_cast<uint64_t>(top) + s.holder->fds.size() + 4 > *limit)
      return fail(Errc::system, EMFILE,
                  fmt::format("its RLIMIT_NOFILE ({}) is too low for fd {} (and {} temporary fds above it): raise it, "
                              "e.g. prlimit --pid {} --nofile={}",
                              *limit, top, s.holder->fds.size() + 4, s.holder->target, top + s.holder->fds.size() + 64));
    return {};
  }

  Expected<void> stash(Session& s) {
    std::vector<int> numbers;
    numbers.reserve(s.holder->fds.size());
    for (const PlannedFd& f : s.holder->fds) numbers.push_back(f.rec->fd);
    auto st = sys::stash_fds(*s.remote, numbers);
    if (!st) return tl::unexpected(st.error());
    s.stash = std::move(*st);
    s.stashed = true;
    return {};
  }

  Expected<void> install(Session& s) {
    std::vector<sys::FdInstall> fds;
    fds.reserve(s.holder->fds.size());
    for (const PlannedFd& f : s.holder->fds)
      fds.push_back(sys::FdInstall{built_.files.at(f.rec->file_id).get(), f.rec->fd, f.rec->cloexec});
    return sys::install_fds(*s.remote, fds);
  }

  Expected<void> async(Session& s) {
    for (const PlannedFd& f : s.holder->fds) {
      if (!f.set_async) continue;
      auto fl = sys::remote_fcntl(*s.remote, f.rec->fd, F_GETFL);
      if (fl && *fl >= 0) fl = sys::remote_fcntl(*s.remote, f.rec->fd, F_SETFL, *fl | O_ASYNC);
      if (!fl) return tl::unexpected(fl.error());
      if (*fl < 0) return fail_errno(static_cast<int>(-*fl), fmt::format("fcntl(fd={}, F_SETFL, O_ASYNC)", f.rec->fd));
    }
    return {};
  }

  tl::unexpected<Error> abort(Error e) {
    rollback();
    return tl::unexpected(std::move(e));
  }

  // Undo in every target touched: old fds back, registers back, detached. Errors cannot be reported
  // better than the error that caused the rollback; a target that died meanwhile has nothing to undo.
  void rollback() {
    for (auto& s : sessions_) {
      if (s->stashed && s->remote) (void)sys::unstash_fds(*s->remote, s->stash);
      s->stashed = false;
      if (s->remote) (void)s->remote->restore();
      (void)s->proc.resume();
    }
    sessions_.clear();
  }

  const Plan& plan_;
  const Built& built_;
  const ProcessRestoreOptions& opts_;
  std::vector<std::unique_ptr<Session>> sessions_;  // stable addresses: RemoteSyscalls points at proc
};

// The exec holder's fds put in place in this process, undone unless the exec happens.
class SelfInstall {
 public:
  SelfInstall() = default;
  SelfInstall(const SelfInstall&) = delete;
  SelfInstall& operator=(const SelfInstall&) = delete;
  ~SelfInstall() { rollback(); }

  Expected<void> place(int source, int fd, bool cloexec, int floor) {
    Saved s{fd, sys::UniqueFd(), 0};
    int old = ::fcntl(fd, F_GETFD);
    if (old >= 0) {
      s.flags = old;
      s.copy.reset(::fcntl(fd, F_DUPFD_CLOEXEC, floor));
      if (!s.copy) return tl::unexpected(sys::call_error("fcntl", fmt::format("fd={}, F_DUPFD_CLOEXEC, {}", fd, floor)));
    }
    if (::dup3(source, fd, cloexec ? O_CLOEXEC : 0) < 0)
      return tl::unexpected(sys::call_error("dup3", fmt::format("{}, {}", source, fd)));
    saved_.push_back(std::move(s));
    return {};
  }

  void rollback() {
    for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) {
      if (it->copy)
        (void)::dup3(it->copy.get(), it->fd, (it->flags & FD_CLOEXEC) ? O_CLOEXEC : 0);
      else
        sys::UniqueFd(it->fd).reset();
    }
    saved_.clear();
  }

 private:
  struct Saved {
    int fd;
    sys::UniqueFd copy;  // what was open at fd (O_CLOEXEC), if anything
    int flags;
  };
  std::vector<Saved> saved_;
};

// Moves fd above floor - 1 when it sits below floor (keeps O_CLOEXEC).
Expected<void> move_up(sys::UniqueFd& fd, int floor) {
  if (!fd || fd.get() >= floor) return {};
  sys::UniqueFd moved(::fcntl(fd.get(), F_DUPFD_CLOEXEC, floor));
  if (!moved) return tl::unexpected(sys::call_error("fcntl", fmt::format("fd={}, F_DUPFD_CLOEXEC, {}", fd.get(), floor)));
  fd = std::move(moved);
  return {};
}

// Room for fd number top in this process: raise the soft limit if the hard one allows.
Expected<void> self_fd_room(int top) {
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) < 0) return tl::unexpected(sys::call_error("getrlimit", "RLIMIT_NOFILE"));
  rlim_t want = static_cast<rlim_t>(top) + 64;
  if (rl.rlim_cur >= want) return {};
  if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < want)
    return fail(Errc::system, EMFILE, fmt::format("fd {} is not below pipecr's hard RLIMIT_NOFILE ({})", top, rl.rlim_max));
  rl.rlim_cur = want;
  if (::setrlimit(RLIMIT_NOFILE, &rl) < 0) return tl::unexpected(sys::call_error("setrlimit", "RLIMIT_NOFILE"));
  return {};
}

Expected<void> place_self(const Holder& h, Built& built, SelfInstall& self) {
  const int top = highest_fd(h);
  if (top < 0) return {};
  if (auto ok = self_fd_room(top); !ok) return ok;
  const int floor = top + 1;
  for (auto& [id, fd] : built.files)
    if (auto ok = move_up(fd, floor); !ok) return ok;
  for (sys::UniqueFd& fd : built.keep)
    if (auto ok = move_up(fd, floor); !ok) return ok;
  for (const PlannedFd& f : h.fds)
    if (auto ok = self.place(built.files.at(f.rec->file_id).get(), f.rec->fd, f.rec->cloexec, floor); !ok)
      return tl::unexpected(Error{ok.error().kind, ok.error().err, fmt::format("exec process: {}", ok.error().what)});
  return {};
}

// O_ASYNC at the final numbers, the soft fd limit as it was (or as high as the fds need), exec.
Error exec_now(const Plan& plan, const Holder& h, const ExecSpec& spec, rlim_t soft_before) {
  for (const PlannedFd& f : h.fds)
    if (f.set_async)
      if (auto ok = set_async(f.rec->fd, plan.files[plan.file_index.at(f.rec->file_id)].rec); !ok)
        return ok.error();
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur > soft_before) {
    rl.rlim_cur = std::max<rlim_t>(soft_before, static_cast<rlim_t>(highest_fd(h)) + 1);
    (void)::setrlimit(RLIMIT_NOFILE, &rl);
  }
  std::vector<char*> argv;
  for (const std::string& a : spec.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  ::execv(plan.exec_path.c_str(), argv.data());
  return sys::call_error("execv", plan.exec_path);
}

}  // namespace

Expected<ProcessRestoreSummary> restore_processes(const Image& img, const ProcessRestoreRequest& request,
                                                  const ProcessRestoreOptions& opts) {
  rlimit rl_before{};
  ::getrlimit(RLIMIT_NOFILE, &rl_before);
  auto plan = make_plan(img, request);
  if (!plan) return tl::unexpected(plan.error());
  ProcessRestoreSummary sum;
  auto note = [&](const std::string& n) {
    sum.notes.push_back(n);
    if (opts.note) opts.note(n);
  };
  for (const std::string& n : plan->notes) note(n);
  sum.dropped = plan->dropped;
  if (opts.hook) opts.hook(Stage::planned);

  auto built = build(*plan, opts);
  if (!built) return tl::unexpected(built.error());
  for (const std::string& n : built->notes) note(n);
  if (opts.hook) opts.hook(Stage::built);
  sum.pipes = plan->pipes.size();
  sum.files = plan->files.size();
  for (const Holder& h : plan->holders) sum.fds += h.fds.size();

  const Holder* exec_holder = nullptr;
  for (const Holder& h : plan->holders)
    if (h.exec) exec_holder = &h;
  SelfInstall self;
  if (exec_holder)
    if (auto ok = place_self(*exec_holder, *built, self); !ok) {
      self.rollback();
      remove_created_fifos(*built);
      return tl::unexpected(ok.error());
    }
  if (plan->holders.size() > (exec_holder ? 1u : 0u)) {
    TargetTransaction tx(*plan, *built, opts);
    if (auto ok = tx.run(); !ok) {
      self.rollback();
      remove_created_fifos(*built);
      return tl::unexpected(ok.error());
    }
    if (auto ok = tx.commit(); !ok) return tl::unexpected(ok.error());
    if (opts.hook) opts.hook(Stage::resumed);
  }
  if (!exec_holder) return sum;
  Error e = exec_now(*plan, *exec_holder, *request.exec, rl_before.rlim_cur);
  self.rollback();
  bool targets = plan->holders.size() > 1;
  return fail(Errc::system, e.err,
              fmt::format("{}{}", e.what, targets ? " (the --into targets were already restored)" : ""));
}

}  // namespace pipecr::restore
