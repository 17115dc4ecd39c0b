// restore/process.cpp: stage 3 of a restore into processes: the transaction that installs the
// prepared pipes into running targets, and the exec of a new command that holds its share.
//
// Targets (all-or-nothing over every target): stop every one first (PTRACE_SEIZE + INTERRUPT on all
// threads, sys/ptrace.hpp), then in phases over all of them: check RLIMIT_NOFILE against the highest
// recorded fd and the room for install_fds()' temporaries; replace the fds chunk by chunk; set
// O_ASYNC at the final number of each file that had it (si_fd is the number O_ASYNC was set through).
// Only when every phase succeeded for every target are the stashes dropped, registers restored and
// the targets let go. Any failure, for any target: every stashed file is put back at its number (with
// its FD_CLOEXEC), numbers that were not open are closed again, every target resumed, and the error
// returned. Nothing here depends on the bytes queued: they were written in stage 2, before the first
// target was stopped.
//
// The stash (what a target had at each recorded number, kept for a rollback) lives in pipecr, not in
// the target: pidfd_getfd() takes a reference without stopping anything more, and costs the target
// no fd numbers. A target that holds N fds at the numbers being replaced would otherwise need 2N
// numbers at once (measured: 10,000 pipes under a hard limit of 20,000 cannot be stashed inside the
// target). pipecr in turn would hold the N new files plus the N old ones, so the replacement goes in
// chunks of kStashChunk: stash a chunk, install it, close pipecr's copy of every new file that every
// target taking it now holds; pipecr never holds more than the files still to install plus a chunk.
// FD_CLOEXEC of a stashed fd is read from /proc/PID/fdinfo/N ("flags:" carries O_CLOEXEC for it),
// which costs no ptrace round trip.
//
// --exec: this process takes the exec holder's fds the same way, in its own fd table (dup3 to the
// recorded numbers, with a stash of what was there), BEFORE the targets are stopped, so a failure in
// either part undoes both; only the exec itself comes after the targets are committed (the command
// was found on PATH in stage 1, so it rarely fails then). Every fd pipecr holds is O_CLOEXEC, so
// the command starts with exactly the recorded fds plus what pipecr inherited (stdin, stdout, stderr).
//
// RLIMIT_NOFILE: the soft limit is raised to the hard one for the whole restore (stage 2 checks up
// front that the fds needed fit) and set back when restore_processes() returns, or before the exec.
#include "restore/process.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <unordered_set>

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

// What a target had at one recorded number: a copy in pipecr, or nothing (the number was free).
struct LocalStash {
  int target_fd = -1;
  sys::UniqueFd copy;
  bool cloexec = false;
};

// FD_CLOEXEC of fd in pid, from the "flags:" line of /proc/PID/fdinfo/FD (octal, O_CLOEXEC included).
Expected<bool> target_cloexec(pid_t pid, int fd) {
  std::string path = fmt::format("/proc/{}/fdinfo/{}", pid, fd);
  sys::UniqueFd in(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!in) return tl::unexpected(sys::call_error("open", path));
  char buf[512];
  ssize_t n = ::read(in.get(), buf, sizeof buf - 1);
  if (n < 0) return tl::unexpected(sys::call_error("read", path));
  buf[n] = '\0';
  const char* at = std::strstr(buf, "\nflags:");
  if (!at) return fail(Errc::system, EIO, fmt::format("{}: no flags: line", path));
  return (std::strtoul(at + 7, nullptr, 8) & O_CLOEXEC) != 0;
}

// The number of fds open in pid.
Expected<size_t> target_fd_count(pid_t pid) {
  std::string path = fmt::format("/proc/{}/fd", pid);
  DIR* dir = ::opendir(path.c_str());
  if (!dir) return tl::unexpected(sys::call_error("opendir", path));
  size_t n = 0;
  while (dirent* d = ::readdir(dir))
    if (d->d_name[0] != '.') ++n;
  ::closedir(dir);
  return n;
}

// One stopped target and what was done to it so far.
struct Session {
  Session(sys::StoppedProcess p, const Holder& h) : proc(std::move(p)), holder(&h) {}
  sys::StoppedProcess proc;                  // declared first: destroyed after remote
  std::optional<sys::RemoteSyscalls> remote;
  sys::UniqueFd pidfd;
  std::vector<LocalStash> stash;             // every number touched so far, in order
  std::vector<std::pair<int, long>> async_undo;  // kept fds whose O_ASYNC was changed: number, old flags
  size_t chunk = kStashChunk;                // fds per install_fds() call: what the target has room for
  const Holder* holder;
};

class TargetTransaction {
 public:
  TargetTransaction(const Plan& plan, Built& built, const ProcessRestoreOptions& opts)
      : plan_(plan), built_(built), opts_(opts) {
    for (const Holder& h : plan_.holders)
      if (!h.exec)
        for (const PlannedFd& f : h.fds)
          if (!f.keep) ++uses_[f.rec->file_id];
  }
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
    for (Phase phase : {&TargetTransaction::attach, &TargetTransaction::replace, &TargetTransaction::async}) {
      for (auto& s : sessions_)
        if (auto ok = (this->*phase)(*s); !ok) return abort(in_target(*s->holder, ok.error()));
      if (phase == &TargetTransaction::attach) {
        stage(Stage::stashed);
        // Pipes refilled in place: every target holding them is stopped now (inplace.hpp).
        for (InPlacePipe& p : built_.in_place)
          if (auto ok = swap_in_place(p, opts_); !ok) return abort(ok.error());
      }
    }
    stage(Stage::installed);
    return {};
  }

  // Drops the stashes and lets every target go. Past the point of no return: reports the first error.
  Expected<void> commit() {
    std::optional<Error> first;
    built_.in_place.clear();  // the old buffers, the copies of the kept files: nothing to undo now
    for (auto& s : sessions_) {
      s->stash.clear();
      s->async_undo.clear();
      auto ok = s->remote->restore();
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
    auto r = sys::RemoteSyscalls::attach(s.proc, s.holder->thread ? s.holder->thread : s.proc.threads().front());
    if (!r) return tl::unexpected(r.error());
    s.remote.emplace(std::move(*r));
    int top = highest_fd(*s.holder);
    if (top < 0) return {};
    auto pidfd = sys::pidfd_open(s.holder->thread ? s.holder->thread : s.holder->target);
    if (!pidfd) return tl::unexpected(pidfd.error());
    s.pidfd = std::move(*pidfd);
    auto limit = sys::remote_nofile_limit(*s.remote);
    if (!limit) return tl::unexpected(limit.error());
    auto open = target_fd_count(s.holder->thread ? s.holder->thread : s.holder->target);
    if (!open) return tl::unexpected(open.error());
    // install_fds() receives each batch at the lowest free numbers, then dup3()s them in place.
    constexpr uint64_t kSpare = 4;  // its socket, and room to spare
    uint64_t room = *limit > *open + kSpare ? *limit - *open - kSpare : 0;
    if (static_cast<uint64_t>(top) >= *limit || room == 0)
      return fail(Errc::system, EMFILE,
                  fmt::format("its RLIMIT_NOFILE ({}) is too low for fd {} with the {} fds it holds (and a few "
                              "temporaries): raise it, e.g. prlimit --pid {} --nofile={}",
                              *limit, top, *open, s.holder->target,
                              std::max<uint64_t>(uint64_t(top) + 1, *open + kSpare + 1) + 64));
    s.chunk = static_cast<size_t>(std::min<uint64_t>(room, kStashChunk));
    return {};
  }

  // Stash a chunk in pipecr, install it, let go of the new files every target now holds; repeat.
  Expected<void> replace(Session& s) {
    const std::vector<PlannedFd>& fds = s.holder->fds;
    std::vector<sys::FdInstall> batch;
    for (size_t at = 0; at < fds.size(); at += s.chunk) {
      const size_t end = std::min(fds.size(), at + s.chunk);
      batch.clear();
      for (size_t i = at; i < end; ++i) {
        if (fds[i].keep) continue;  // in place: the target holds that file there already
        const FdRecord& r = *fds[i].rec;
        if (auto ok = stash_one(s, r.fd); !ok) return ok;
        batch.push_back(sys::FdInstall{built_.files.at(r.file_id).get(), r.fd, r.cloexec});
      }
      if (batch.empty()) continue;
      if (auto ok = sys::install_fds(*s.remote, batch); !ok) return ok;
      for (size_t i = at; i < end; ++i)
        if (!fds[i].keep && --uses_[fds[i].rec->file_id] == 0) built_.files.erase(fds[i].rec->file_id);
    }
    return {};
  }

  Expected<void> stash_one(Session& s, int fd) {
    auto copy = sys::pidfd_getfd(s.pidfd.get(), fd, s.holder->target);
    if (!copy) {
      if (copy.error().err != EBADF) return tl::unexpected(copy.error());
      s.stash.push_back(LocalStash{fd, sys::UniqueFd(), false});
      return {};
    }
    auto cloexec = target_cloexec(s.holder->thread ? s.holder->thread : s.holder->target, fd);
    if (!cloexec) return tl::unexpected(cloexec.error());
    s.stash.push_back(LocalStash{fd, std::move(*copy), *cloexec});
    return {};
  }

  Expected<void> async(Session& s) {
    for (const PlannedFd& f : s.holder->fds) {
      if (f.keep) {
        if (auto ok = async_kept(s, f); !ok) return ok;
        continue;
      }
      if (!f.set_async) continue;
      auto fl = sys::remote_fcntl(*s.remote, f.rec->fd, F_GETFL);
      if (fl && *fl >= 0) fl = sys::remote_fcntl(*s.remote, f.rec->fd, F_SETFL, *fl | O_ASYNC);
      if (!fl) return tl::unexpected(fl.error());
      if (*fl < 0) return fail_errno(static_cast<int>(-*fl), fmt::format("fcntl(fd={}, F_SETFL, O_ASYNC)", f.rec->fd));
    }
    return {};
  }

  // A kept description (in place) gets O_ASYNC as recorded, set or cleared in the target at its
  // own number (si_fd is the number O_ASYNC is set through), once per recorded file.
  Expected<void> async_kept(Session& s, const PlannedFd& f) {
    const FileRecord& rec = plan_.files[plan_.file_index.at(f.rec->file_id)].rec;
    if (!async_seen_.insert(rec.id).second) return {};
    auto fl = sys::remote_fcntl(*s.remote, f.rec->fd, F_GETFL);
    if (!fl) return tl::unexpected(fl.error());
    if (*fl < 0) return fail_errno(static_cast<int>(-*fl), fmt::format("fcntl(fd={}, F_GETFL)", f.rec->fd));
    const bool want = rec.flags & O_ASYNC;
    if (((*fl & O_ASYNC) != 0) == want) return {};
    long set = want ? (*fl | O_ASYNC) : (*fl & ~static_cast<long>(O_ASYNC));
    auto r = sys::remote_fcntl(*s.remote, f.rec->fd, F_SETFL, set);
    if (!r) return tl::unexpected(r.error());
    if (*r < 0) return fail_errno(static_cast<int>(-*r), fmt::format("fcntl(fd={}, F_SETFL, {:#o})", f.rec->fd, set));
    s.async_undo.emplace_back(f.rec->fd, *fl);
    return {};
  }

  tl::unexpected<Error> abort(Error e) {
    rollback();
    return tl::unexpected(std::move(e));
  }

  // Each stashed file back at its number, numbers that were free closed again. install_fds() goes
  // in batches and close() one by one, so a failure part way through (the target died) leaves the
  // rest as they are: nothing better can be done, and a dead target has nothing to undo.
  static void unstash(Session& s) {
    std::vector<sys::FdInstall> back;
    for (const LocalStash& st : s.stash)
      if (st.copy) back.push_back(sys::FdInstall{st.copy.get(), st.target_fd, st.cloexec});
    if (!back.empty()) (void)sys::install_fds(*s.remote, back);
    for (const LocalStash& st : s.stash)
      if (!st.copy) (void)s.remote->call(SYS_close, static_cast<unsigned long>(st.target_fd));  // -EBADF: untouched
    s.stash.clear();
  }

  // Undo in every target touched: old fds back, registers back, detached. Errors cannot be reported
  // better than the error that caused the rollback.
  void rollback() {
    for (auto& s : sessions_)
      if (s->remote)
        for (auto it = s->async_undo.rbegin(); it != s->async_undo.rend(); ++it)
          (void)sys::remote_fcntl(*s->remote, it->first, F_SETFL, it->second);
    for (auto it = built_.in_place.rbegin(); it != built_.in_place.rend(); ++it) undo_in_place(*it);
    built_.in_place.clear();
    for (auto& s : sessions_) {
      if (!s->stash.empty() && s->remote) unstash(*s);
      if (s->remote) (void)s->remote->restore();
      (void)s->proc.resume();
    }
    sessions_.clear();
  }

  const Plan& plan_;
  Built& built_;
  const ProcessRestoreOptions& opts_;
  std::unordered_map<uint64_t, size_t> uses_;       // file id -> fds of targets not yet installed
  std::unordered_set<uint64_t> async_seen_;          // recorded files whose kept O_ASYNC is done
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

// The files only the exec holder takes: it has them at their numbers now, pipecr's copies can go.
void release_exec_only(const Plan& plan, Built& built) {
  std::unordered_set<uint64_t> wanted;
  for (const Holder& h : plan.holders)
    if (!h.exec)
      for (const PlannedFd& f : h.fds) wanted.insert(f.rec->file_id);
  for (auto it = built.files.begin(); it != built.files.end();)
    it = wanted.count(it->first) ? std::next(it) : built.files.erase(it);
}

// The soft RLIMIT_NOFILE raised to the hard one for the lifetime of the object, then set back (the
// library must not leave the caller's limits changed; the CLI's only caller exits anyway).
class SoftFdLimitRaised {
 public:
  SoftFdLimitRaised() {
    if (::getrlimit(RLIMIT_NOFILE, &before_) < 0 || before_.rlim_cur == before_.rlim_max) return;
    rlimit up = before_;
    up.rlim_cur = before_.rlim_max;
    raised_ = ::setrlimit(RLIMIT_NOFILE, &up) == 0;
  }
  ~SoftFdLimitRaised() {
    if (raised_) (void)::setrlimit(RLIMIT_NOFILE, &before_);
  }
  SoftFdLimitRaised(const SoftFdLimitRaised&) = delete;
  SoftFdLimitRaised& operator=(const SoftFdLimitRaised&) = delete;
  [[nodiscard]] rlim_t before() const { return before_.rlim_cur; }

 private:
  rlimit before_{};
  bool raised_ = false;
};

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

// Holds SIGINT, SIGTERM, SIGHUP, SIGQUIT and SIGTSTP back from this thread while targets run
// injected code: were pipecr to die then, the kernel would detach a thread that still has our
// registers and perhaps our two code bytes. A signal that comes meanwhile is delivered when the
// targets are whole again. (SIGKILL cannot be held back; nothing can make that case safe.)
class InterruptsHeld {
 public:
  InterruptsHeld() {
    sigset_t set;
    sigemptyset(&set);
    for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGTSTP}) sigaddset(&set, sig);
    held_ = ::pthread_sigmask(SIG_BLOCK, &set, &before_) == 0;
  }
  ~InterruptsHeld() {
    if (held_) ::pthread_sigmask(SIG_SETMASK, &before_, nullptr);
  }
  InterruptsHeld(const InterruptsHeld&) = delete;
  InterruptsHeld& operator=(const InterruptsHeld&) = delete;

 private:
  sigset_t before_{};
  bool held_ = false;
};

Expected<ProcessRestoreSummary> restore_processes(const Image& img, const ProcessRestoreRequest& request,
                                                  const ProcessRestoreOptions& opts) {
  SoftFdLimitRaised raised;  // declared first: set back after every fd below is closed
  const rlim_t soft_before = raised.before();
  auto plan = make_plan(img, request, opts);
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
  for (const PlannedPipe& pp : plan->pipes) {
    const PipeRecord& p = *pp.pipe;
    PipeOutcome o{p.id, p.kind == PipeKind::fifo ? fmt::format("FIFO {}", p.path) : fmt::format("pipe:[{}]", p.inode),
                  pp.choice.in_place, pp.choice.why, 0};
    for (const Holder& h : plan->holders)
      for (const PlannedFd& f : h.fds)
        if (f.keep && plan->files[plan->file_index.at(f.rec->file_id)].pipe == &p) ++o.kept;
    sum.in_place += o.in_place;
    sum.outcomes.push_back(std::move(o));
  }
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
  if (exec_holder) release_exec_only(*plan, *built);
  if (plan->holders.size() > (exec_holder ? 1u : 0u)) {
    InterruptsHeld held;  // declared before tx: released only after every target is whole again
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
  Error e = exec_now(*plan, *exec_holder, *request.exec, soft_before);
  self.rollback();
  bool targets = plan->holders.size() > 1;
  return fail(Errc::system, e.err,
              fmt::format("{}{}", e.what, targets ? " (the --into targets were already restored)" : ""));
}

}  // namespace pipecr::restore
