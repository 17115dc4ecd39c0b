// restore/process.cpp: stage 3 of a restore into processes: the transaction that installs the
// prepared pipes into running targets, and the exec of a new command that holds its share.
//
// Targets (all-or-nothing over every target, whatever happens to pipecr): before anything is built,
// read each one's RLIMIT_NOFILE and fd table (the room check) and make its files queue (Parcels);
// stage 2 parks every built file in the queues a chunk at a time and closes pipecr's copies. Then stop
// every target (PTRACE_SEIZE + INTERRUPT on all threads, sys/ptrace.hpp), start an agent in each
// (sys/agent.hpp: one remote mmap, then the agent runs inside the target), hand it the receiving end
// of its queue with HELLO, and ask it to prepare (it checks, exactly, that one batch fits). Nothing of any target has changed so far. Then one store in the
// shared CommitPoint commits every target at once; each agent installs its files (dup3 to the
// recorded numbers), sets O_ASYNC at the final number of each file that had it (si_fd is the number
// O_ASYNC was set through), and pipecr takes the thread back, removes the agent and lets every
// target go. Any failure before that store, or pipecr's death, or a SIGTERM: every agent closes what
// it was sent and returns; the targets never saw a change. Nothing here depends on the bytes queued:
// they were written in stage 2, before the first target was stopped.
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

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <unordered_set>

#include <fmt/format.h>

#include "restore/plan.hpp"
#include "sys/agent.hpp"
#include "sys/fdtable_grow.hpp"
#include "sys/proc.hpp"
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

// The soft RLIMIT_NOFILE of pid, from /proc/PID/limits (readable whatever the owner).
Expected<uint64_t> target_nofile_limit(pid_t pid) {
  const std::string path = fmt::format("/proc/{}/limits", pid);
  auto read = sys::read_proc_file(path);  // a process gone meanwhile: Errc::gone
  if (!read) return tl::unexpected(read.error());
  const std::string& text = *read;
  auto at = text.find("Max open files");
  if (at == std::string::npos) return fail(Errc::system, EIO, fmt::format("{}: no \"Max open files\" line", path));
  const char* p = text.c_str() + at + std::strlen("Max open files");
  while (*p == ' ') ++p;
  if (std::strncmp(p, "unlimited", 9) == 0) return UINT64_MAX;
  return std::strtoull(p, nullptr, 10);
}

// The fd numbers open in pid (a thread id: that thread's table), sorted.
Expected<std::vector<int>> target_fds(pid_t pid) {
  auto listed = sys::list_fds(pid, false);  // a process gone meanwhile: Errc::gone
  if (!listed) return tl::unexpected(listed.error());
  std::vector<int> fds;
  fds.reserve(listed->size());
  for (const sys::FdEntry& e : *listed) fds.push_back(e.fd);
  return fds;
}

// What a target gets, known and prepared before it is stopped: its limits, and its files parked in
// flight in a queue its agent will receive from (sys::FileQueue), in the order of `order`.
struct Parcel {
  const Holder* holder = nullptr;
  uint64_t nofile = 0;                // its soft RLIMIT_NOFILE
  uint64_t vdso = 0;                  // a syscall instruction in its [vdso]
  sys::AgentGadgets gadgets;          // its agent's return gadgets (found before the stop)
  size_t batch = sys::kAgentBatch;    // files per message: what the target has room for at the commit
  sys::FileQueue queue;
  std::vector<const PlannedFd*> order;    // the install operations, in the order their files are queued
  std::vector<const PlannedFd*> pending;  // of the chunk being queued
};

// Room in a target for what arrives at the commit (read before the stop; the agent checks again,
// exactly, while stopped: PREPARE). Sets p.batch; EMFILE naming the limit when it cannot fit.
Expected<void> size_batch(Parcel& p) {
  const Holder& h = *p.holder;
  const int top = highest_fd(h);
  p.batch = sys::kAgentBatch;
  if (top < 0) return {};
  auto open = target_fds(h.thread ? h.thread : h.target);  // that thread's own fd table, if any
  if (!open) return tl::unexpected(open.error());
  // The files wait in a socket queue (no fd numbers); at the commit the agent takes them one
  // message (a batch of up to 253) at a time. It holds then: what the target holds, one batch, its
  // 4 socket ends; so the batch is what fits. A received file or a socket that lands on a number
  // still to be filled moves above the highest one.
  constexpr uint64_t kSockets = 4, kSpare = 2;
  const uint64_t limit = p.nofile;
  const uint64_t room = limit > open->size() + kSockets + kSpare ? limit - open->size() - kSockets - kSpare : 0;
  p.batch = static_cast<size_t>(std::min<uint64_t>({room, sys::kAgentBatch, h.fds.size()}));
  // A received file lands on the lowest free number, never above what is open plus what arrives:
  // only free recorded numbers below that can be hit (and then it moves above the highest).
  const uint64_t reach = open->size() + p.batch + kSockets;
  uint64_t free_targets = 0;
  for (const PlannedFd& f : h.fds)
    free_targets += static_cast<uint64_t>(f.rec->fd) < reach && !std::binary_search(open->begin(), open->end(), f.rec->fd);
  const uint64_t need = std::max<uint64_t>(open->size() + kSockets + kSpare + 1,
                                           uint64_t(top) + 1 + std::min<uint64_t>(p.batch + kSockets, free_targets));
  if (p.batch == 0 || need > limit)
    return fail(Errc::system, EMFILE,
                fmt::format("its RLIMIT_NOFILE ({}) is too low: the restore needs {} fds in it at once (the {} it "
                            "holds, the files arriving, fd {} the highest): raise it, e.g. prlimit --pid {} "
                            "--nofile={}",
                            limit, need, open->size(), top, h.target, need + 64));
  return {};
}

// Every target's parcel: made before anything is built, filled while building (flush() after each
// chunk of files, which pipecr then closes), handed to the agents once the targets are stopped.
// Destroying it before that drops every file queued: no target saw anything.
class Parcels {
 public:
  explicit Parcels(const Plan& plan) : plan_(plan) {}

  // Limits and queues, before anything is built or stopped.
  Expected<void> make() {
    size_t chunks = plan_.files.size() / kBuildChunk + 2;
    for (const Holder& h : plan_.holders) {
      if (h.exec) {
        for (const PlannedFd& f : h.fds) exec_files_.insert(f.rec->file_id);
        continue;
      }
      Parcel p;
      p.holder = &h;
      auto limit = target_nofile_limit(h.target);
      if (!limit) return tl::unexpected(in_target(h, limit.error()));
      p.nofile = *limit;
      p.vdso = sys::vdso_syscall_address(h.target);
      p.gadgets = sys::find_agent_gadgets(h.target);  // the agent only checks them while stopped
      if (auto ok = size_batch(p); !ok) return tl::unexpected(in_target(h, ok.error()));
      size_t installs = 0;
      for (const PlannedFd& f : h.fds) installs += !f.keep;
      // An epoll re-add through a reused number queues its two files a message each (start()).
      const auto index = static_cast<size_t>(&h - plan_.holders.data());
      size_t epoll_messages = 0;
      for (const EpollReAdd& a : plan_.epoll.adds)  // one message per file an epoll re-add installs
        if (a.holder == index) epoll_messages += a.final_file ? 2 : a.close_after ? 1 : 0;
      auto q = sys::FileQueue::create(installs / std::max<size_t>(p.batch, 1) + chunks + epoll_messages);
      if (!q) return tl::unexpected(q.error());
      p.queue = std::move(*q);
      list_.push_back(std::move(p));
    }
    // Files an epoll re-add checks (and may install once more) stay open until the agents start.
    for (const EpollReAdd& a : plan_.epoll.adds) {
      epoll_files_.insert(a.file_id);
      if (a.final_file) epoll_files_.insert(a.final_file);
    }
    for (size_t i = 0; i < list_.size(); ++i)
      for (const PlannedFd& f : list_[i].holder->fds)
        if (!f.keep) takers_[f.rec->file_id].emplace_back(i, &f);
    return {};
  }

  // Queues every built file not queued yet to every target taking it, then closes pipecr's copy
  // (unless the --exec process takes it too: that one needs it at its number).
  Expected<void> flush(Built& built) {
    for (auto it = built.files.begin(); it != built.files.end();) {
      const uint64_t id = it->first;
      if (!queued_.insert(id).second) {
        ++it;
        continue;
      }
      if (auto t = takers_.find(id); t != takers_.end())
        for (auto& [i, f] : t->second) list_[i].pending.push_back(f);
      ++it;
    }
    for (Parcel& p : list_) {
      // Each message in ascending fd order: the agent then installs a batch with one dup3 per file
      // (none for a file received at its own number) and no move of its temporaries (agent.c,
      // install_batch).
      std::sort(p.pending.begin(), p.pending.end(),
                [](const PlannedFd* x, const PlannedFd* y) { return x->rec->fd < y->rec->fd; });
      std::vector<int> fds;
      for (size_t at = 0; at < p.pending.size();) {
        fds.clear();
        const auto first = static_cast<uint32_t>(p.order.size());
        while (at < p.pending.size() && fds.size() < p.batch) {
          fds.push_back(built.files.at(p.pending[at]->rec->file_id).get());
          p.order.push_back(p.pending[at++]);
        }
        if (auto ok = p.queue.queue(first, fds); !ok) return tl::unexpected(in_target(*p.holder, ok.error()));
      }
      p.pending.clear();
    }
    for (auto it = built.files.begin(); it != built.files.end();)
      it = exec_files_.count(it->first) || epoll_files_.count(it->first) ? std::next(it) : built.files.erase(it);
    return {};
  }

  Parcel& of(const Holder& h) {
    for (Parcel& p : list_)
      if (p.holder == &h) return p;
    throw std::logic_error("no parcel for a target");  // cannot happen: make() made one per target
  }
  [[nodiscard]] size_t queued_files() const {
    size_t n = 0;
    for (const Parcel& p : list_) n += p.queue.files();
    return n;
  }

 private:
  const Plan& plan_;
  std::vector<Parcel> list_;
  std::unordered_map<uint64_t, std::vector<std::pair<size_t, const PlannedFd*>>> takers_;
  std::unordered_set<uint64_t> exec_files_;
  std::unordered_set<uint64_t> epoll_files_;
  std::unordered_set<uint64_t> queued_;
};

// One fd table of a stopped target and the agent that installs into it: a process's own table, or
// the table of one of its threads (unshare(CLONE_FILES)); a process with both has one session
// each, on one StoppedProcess, with an agent in each of the two threads.
struct Session {
  Session(sys::StoppedProcess* p, const Holder& h, Parcel& pc) : proc(p), holder(&h), parcel(&pc) {}
  sys::StoppedProcess* proc;    // owned by the transaction (procs_), which outlives its sessions
  sys::Agent* agent = nullptr;  // owned by proc
  std::vector<sys::AgentOp> ops;
  const Holder* holder;
  Parcel* parcel;
};

// A signal that asks pipecr to stop (SIGINT, SIGTERM, SIGHUP, SIGQUIT) is pending: the transaction
// rolls back instead of going on (InterruptsHeld keeps them blocked meanwhile).
std::optional<int> interrupt_pending() {
  sigset_t set;
  if (::sigpending(&set) < 0) return std::nullopt;
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT})
    if (sigismember(&set, sig)) return sig;
  return std::nullopt;
}

class TargetTransaction {
 public:
  TargetTransaction(const Plan& plan, Built& built, Parcels& parcels, const ProcessRestoreOptions& opts)
      : plan_(plan), built_(built), parcels_(parcels), opts_(opts) {}
  TargetTransaction(const TargetTransaction&) = delete;
  TargetTransaction& operator=(const TargetTransaction&) = delete;
  ~TargetTransaction() { rollback(); }

  // Stops every target, starts an agent in each and hands it its files; nothing of any target is
  // changed yet. On failure everything is rolled back before returning.
  Expected<void> run() {
    // Everything that can be done before the stop is done: the limits were read and the files
    // queued (Parcels), the commit page is made here.
    auto cp = sys::CommitPoint::create();
    if (!cp) return abort(cp.error());
    commit_.emplace(std::move(*cp));
    // A table too small for the restore grows now, in one thread, the others running: not in PREPARE,
    // where its grace period would stop every thread (sys/fdtable_grow.hpp).
    for (const Holder& h : plan_.holders)
      if (!h.exec)
        if (auto ok = pregrow_table(h); !ok) return abort(in_target(h, ok.error()));
    for (const Holder& h : plan_.holders) {
      if (h.exec) continue;
      if (auto ok = check_interrupt(); !ok) return abort(ok.error());
      sys::StoppedProcess* proc = nullptr;
      for (const auto& p : procs_)
        if (p->pid() == h.target) proc = p.get();
      if (!proc) {  // each process is stopped once, whatever number of its tables is restored
        auto sp = sys::StoppedProcess::seize(h.target);
        if (!sp) return abort(in_target(h, sp.error()));
        procs_.push_back(std::move(*sp));
        proc = procs_.back().get();
      }
      sessions_.push_back(std::make_unique<Session>(proc, h, parcels_.of(h)));
    }
    stage(Stage::seized);
    using Phase = Expected<void> (TargetTransaction::*)(Session&);
    for (Phase phase : {&TargetTransaction::start, &TargetTransaction::prepare}) {
      for (auto& s : sessions_) {
        if (auto ok = check_interrupt(); !ok) return abort(ok.error());
        if (auto ok = (this->*phase)(*s); !ok) return abort(in_target(*s->holder, ok.error()));
      }
      if (phase == &TargetTransaction::start) {
        stage(Stage::stashed);
        // Pipes refilled in place: every target holding them is stopped now (inplace.hpp).
        for (InPlacePipe& p : built_.in_place)
          if (auto ok = swap_in_place(p, opts_); !ok) return abort(ok.error());
      }
    }
    if (auto ok = check_interrupt(); !ok) return abort(ok.error());
    stage(Stage::installed);
    return {};
  }

  // The one store that commits every target, then each agent runs its operations and every target
  // is let go. Past that store nothing is undone: reports the first error.
  Expected<void> commit() {
    if (auto ok = check_interrupt(); !ok) return abort(ok.error());
    // A target that died since its agent answered PREPARED cannot abort the shared word any more:
    // look once more, right before the store, so the others are not committed without it (a death
    // between this look and the store remains possible).
    for (auto& s : sessions_)
      if (auto ok = s->proc->check_running(s->agent->tid()); !ok) return abort(in_target(*s->holder, ok.error()));
    if (!commit_->commit())
      return abort(Error{Errc::system, ECANCELED, "an agent gave up before the commit (timeout or failure); every target rolled back"});
    std::optional<Error> first;
    committed_ = true;  // in-place swaps are not undone from here (their old buffers go after the resume)
    for (InPlacePipe& p : built_.in_place)  // O_ASYNC off where the image has none (the targets still stopped)
      if (auto ok = clear_async_in_place(p); !ok && !first) first = ok.error();
    for (auto& s : sessions_) s->agent->send_decide();  // every agent installs at once
    for (auto& s : sessions_) {
      auto done = s->agent->decide();
      Expected<void> ok = done ? Expected<void>{} : tl::unexpected(done.error());
      if (ok && !*done) ok = fail(Errc::system, ECANCELED, "the agent did not commit");
      if (!ok && !first) first = in_target(*s->holder, ok.error());
    }
    stage(Stage::committed);
    for (auto& p : procs_) {  // each process let go as soon as every agent of its own is back
      for (auto& s : sessions_)
        if (s->proc == p.get())
          if (auto ok = s->agent->restore(); !ok && !first) first = in_target(*s->holder, ok.error());
      if (auto ok = p->resume(); !ok && !first) first = in_target(holder_of(*p), ok.error());
    }
    // The agents hold the files their installs replaced: closing them may free big pipes, which is
    // done when the transaction goes away, after the targets run again.
    finished_ = std::move(sessions_);
    sessions_.clear();
    finished_procs_ = std::move(procs_);
    procs_.clear();
    built_.in_place.clear();  // the old buffers, the copies of the kept files: freed with the targets running
    if (first) return tl::unexpected(*first);
    return {};
  }

 private:
  void stage(Stage st) {
    if (opts_.hook) opts_.hook(st);
  }

  static Expected<void> check_interrupt() {
    if (auto sig = interrupt_pending())
      return fail(Errc::system, EINTR, fmt::format("interrupted by {}: every target rolled back", ::sigabbrev_np(*sig)));
    return {};
  }

  // The operations and the agent; the agent gets the queue its files wait in.
  Expected<void> start(Session& s) {
    const Holder& h = *s.holder;
    Parcel& p = *s.parcel;
    for (const PlannedFd* f : p.order)
      s.ops.push_back(sys::AgentOp{sys::AgentOp::install, f->rec->fd, f->rec->cloexec ? 1 : 0, 0, 0, -1});
    for (const PlannedFd& f : h.fds) {
      // A kept fd keeps its slot: FD_CLOEXEC, the slot's own flag, is set there where it differs.
      if (f.keep && f.set_cloexec)
        s.ops.push_back(sys::AgentOp{sys::AgentOp::setfd, f.rec->fd, f.rec->cloexec ? 1 : 0, 0, 0, -1});
      if (f.keep ? wants_async_kept(f) : f.set_async)
        s.ops.push_back(sys::AgentOp{sys::AgentOp::setfl_or, f.rec->fd, 0, O_ASYNC, 0, -1});
    }
    // Epoll watches on the files installed (epoll.hpp), checked now that the target is stopped. An
    // install they need (the watched file at a number that ends up with another) takes its file
    // from the queue too, after every other: queued here, before the agent gets the queue.
    auto watches = epoll_ops(plan_, built_, static_cast<size_t>(&h - plan_.holders.data()));
    if (!watches) return tl::unexpected(watches.error());
    for (sys::AgentOp op : *watches) {
      if (op.code == sys::AgentOp::install) {
        const int src[1] = {op.source};
        if (auto ok = p.queue.queue(static_cast<uint32_t>(s.ops.size()), src); !ok) return tl::unexpected(ok.error());
        op.source = -1;
      }
      s.ops.push_back(op);
    }
    // Temporaries stay above every number an operation fills: the recorded ones, and those an epoll
    // re-add fills for a moment (a watch keyed by an fd closed since).
    int top = highest_fd(h);
    for (const sys::AgentOp& op : s.ops) top = std::max(top, op.fd);
    // The agent runs in the thread whose fd table the holder is (a thread that unshared its table).
    auto agent = s.proc->inject<sys::Agent>(h.thread ? h.thread : s.proc->threads().front(), *commit_, s.ops,
                                   top + 1, std::max<size_t>(p.queue.largest(), 1), p.vdso,
                                   p.queue.messages() ? p.queue.take_receiver() : sys::UniqueFd(), &p.gadgets);
    if (!agent) return tl::unexpected(agent.error());
    s.agent = *agent;
    if (!s.agent->returns_by_sigreturn() &&  // once per process, whatever number of its tables
        std::find(register_block_.begin(), register_block_.end(), h.target) == register_block_.end())
      register_block_.push_back(h.target);
    return {};
  }

 public:
  // Targets whose agent returns through the fallback register block (sys::Agent::returns_by_sigreturn).
  [[nodiscard]] const std::vector<pid_t>& register_block_targets() const { return register_block_; }
  // What the fd tables' growth before the stop did (ProcessRestoreSummary::fd_table_growth).
  [[nodiscard]] const std::vector<std::string>& table_growth() const { return table_growth_; }

 private:

  Expected<void> prepare(Session& s) { return s.agent->prepare(); }

  // The target's fd table grown to hold every number the agent will use (the highest it fills, and
  // above it what a batch may move up, its sockets and spares: size_batch()), when that table is
  // shared by threads. An optimisation: only the target's end fails the restore.
  Expected<void> pregrow_table(const Holder& h) {
    const Parcel& p = parcels_.of(h);
    int top = highest_fd(h);
    for (const EpollReAdd& a : plan_.epoll.adds)
      if (&plan_.holders[a.holder] == &h) top = std::max(top, a.fd);
    if (top < 0) return {};
    const int want = top + static_cast<int>(p.batch) + 6;
    auto g = sys::pregrow_fd_table(h.target, h.thread, want, p.nofile, p.gadgets);
    if (!g) return tl::unexpected(g.error());
    using O = sys::FdTableGrowth::Outcome;
    if (g->outcome == O::grown)
      table_growth_.push_back(fmt::format("pid {}: fd table grown before the stop, {} -> {} slots (by thread {}, the "
                                          "others running)", h.target, g->before, g->after, g->tid));
    else if (g->outcome == O::no_gadget || g->outcome == O::failed)
      table_growth_.push_back(fmt::format("pid {}: fd table ({} slots, fd {} needed) not grown before the stop, "
                                          "the stop grows it: {}", h.target, g->before, want, g->why));
    return {};
  }

  // A kept description (in place) that records O_ASYNC gets it set in the target at its own number
  // (si_fd is the number O_ASYNC is set through), once per recorded file. Setting it where it is set
  // already changes nothing (the kernel rebinds SIGIO only when the bit flips).
  bool wants_async_kept(const PlannedFd& f) {
    const FileRecord& rec = plan_.files[plan_.file_index.at(f.rec->file_id)].rec;
    return (rec.flags & O_ASYNC) && async_seen_.insert(rec.id).second;
  }

  tl::unexpected<Error> abort(Error e) {
    rollback();
    return tl::unexpected(std::move(e));
  }

  // Nothing of any target was changed: each agent closes what it received and returns.
  void rollback() {
    if (commit_) commit_->abort();
    if (!committed_)
      for (auto it = built_.in_place.rbegin(); it != built_.in_place.rend(); ++it) undo_in_place(*it);
    built_.in_place.clear();
    for (auto& s : sessions_)
      if (s->agent) (void)s->agent->restore();
    for (auto& p : procs_) (void)p->resume();
    sessions_.clear();
    procs_.clear();
  }

  // A holder restored into p, to name the process in an error.
  const Holder& holder_of(const sys::StoppedProcess& p) const {
    for (const auto& s : sessions_)
      if (s->proc == &p) return *s->holder;
    return plan_.holders.front();  // not reached: every stopped process has a session
  }

  const Plan& plan_;
  Built& built_;
  Parcels& parcels_;
  const ProcessRestoreOptions& opts_;
  std::optional<sys::CommitPoint> commit_;
  bool committed_ = false;
  // Declared before the sessions, so destroyed after them: a session points at its process.
  std::vector<std::unique_ptr<sys::StoppedProcess>> procs_;
  std::vector<std::unique_ptr<sys::StoppedProcess>> finished_procs_;  // committed and let go; destroyed last
  std::vector<std::unique_ptr<Session>> sessions_;
  std::vector<std::unique_ptr<Session>> finished_;
  std::unordered_set<uint64_t> async_seen_;          // recorded files whose kept O_ASYNC is asked for
  std::vector<pid_t> register_block_;
  std::vector<std::string> table_growth_;
};

// The fds of this process's holder (--exec, or the library's caller) put in place in its own fd
// table: all or nothing. What was open at each number is kept (a copy above `floor`) until
// commit(); rollback(), or the destructor without commit(), puts it back with its FD_CLOEXEC, and
// closes the numbers that were free, last placed first.
class SelfInstall {
 public:
  SelfInstall() = default;
  SelfInstall(const SelfInstall&) = delete;
  SelfInstall& operator=(const SelfInstall&) = delete;
  ~SelfInstall() { rollback(); }

  // source at number fd (replacing what is there), or at the lowest free number when fd is -1.
  // Returns the number it is at.
  Expected<int> place(int source, int fd, bool cloexec, int floor) {
    if (fd < 0) {
      int got = ::fcntl(source, cloexec ? F_DUPFD_CLOEXEC : F_DUPFD, 0);
      if (got < 0) return tl::unexpected(sys::call_error("fcntl", fmt::format("fd={}, F_DUPFD, 0", source)));
      saved_.push_back(Saved{got, sys::UniqueFd(), 0});
      return got;
    }
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
    return fd;
  }

  // The fds stay; what they replaced is closed.
  void commit() { saved_.clear(); }

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

// Every fd of h (this process's holder) at its number; `placed` gets each one's number (h.fds order).
Expected<void> place_self(const Holder& h, Built& built, SelfInstall& self, std::vector<int>& placed) {
  const int top = highest_fd(h);
  if (h.fds.empty()) return {};
  if (top >= 0)
    if (auto ok = self_fd_room(top); !ok) return ok;
  const int floor = top + 1;
  for (auto& [id, fd] : built.files)
    if (auto ok = move_up(fd, floor); !ok) return ok;
  for (sys::UniqueFd& fd : built.keep)
    if (auto ok = move_up(fd, floor); !ok) return ok;
  // The copies and scratch pipes of pipes swapped inside the stop (in place, or a replaced FIFO a
  // target holds, which the exec process may hold too) stay until the commit.
  for (InPlacePipe& ip : built.in_place) {
    for (sys::UniqueFd& fd : ip.held)
      if (auto ok = move_up(fd, floor); !ok) return ok;
    for (KeptFile& k : ip.kept)
      if (auto ok = move_up(k.copy, floor); !ok) return ok;
    for (sys::UniqueFd* fd : {&ip.reader, &ip.writer, &ip.scratch_r, &ip.scratch_w, &ip.hold_r, &ip.hold_w})
      if (auto ok = move_up(*fd, floor); !ok) return ok;
  }
  // Numbers asked for first, then any free number (fd -1, the caller only): so a free pick never
  // takes a number asked for.
  placed.assign(h.fds.size(), -1);
  for (bool any : {false, true})
    for (size_t i = 0; i < h.fds.size(); ++i) {
      const FdRecord& d = *h.fds[i].rec;
      if ((d.fd < 0) != any) continue;
      auto at = self.place(built.files.at(d.file_id).get(), d.fd, d.cloexec, floor);
      if (!at)
        return tl::unexpected(Error{at.error().kind, at.error().err,
                                    fmt::format("{}: {}", h.caller ? "this process" : "exec process", at.error().what)});
      placed[i] = *at;
    }
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

// Holds SIGINT, SIGTERM, SIGHUP, SIGQUIT and SIGTSTP back from this thread while the transaction
// runs, so that one cannot land inside a bootstrap (the one remote mmap per target: the only step a
// death of pipecr could harm). The transaction looks for them between steps: one that came makes it
// roll back every target at once; it is then delivered when the targets are whole again (SIGTERM
// ends pipecr promptly, with everything undone). SIGKILL cannot be held back: see docs/design.md
// section 9 for what it can still harm (the bootstrap window, measured).
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
  // Notes describe what the restore did: they reach opts.note only once it has succeeded (before the
  // exec with --exec), never ahead of an error about a restore that did not happen.
  auto note = [&](const std::string& n) { sum.notes.push_back(n); };
  auto hand_notes = [&] {
    if (opts.note)
      for (const std::string& n : sum.notes) opts.note(n);
  };
  for (const std::string& n : plan->notes) note(n);
  sum.dropped = plan->dropped;
  if (opts.hook) opts.hook(Stage::planned);

  // The targets' limits are read and their queues made before anything is built; each chunk of
  // built files goes into the queues at once and pipecr closes its copies (so pipecr holds about
  // one chunk of files at a time, not one fd per open file description).
  Parcels parcels(*plan);
  if (auto ok = parcels.make(); !ok) return tl::unexpected(ok.error());
  auto built = build(*plan, opts, [&](Built& b) { return parcels.flush(b); });
  if (!built) return tl::unexpected(built.error());
  for (const std::string& n : built->notes) note(n);
  if (opts.hook) opts.hook(Stage::built);
  sum.pipes = plan->pipes.size();
  for (const PlannedPipe& pp : plan->pipes) {
    const PipeRecord& p = *pp.pipe;
    PipeOutcome o{p.id, p.kind == PipeKind::fifo ? fmt::format("FIFO {}", p.path) : fmt::format("pipe:[{}]", p.inode),
                  pp.choice.in_place, pp.choice.why, pp.choice.kept};  // kept: counted by mark_kept()
    sum.in_place += o.in_place;
    sum.outcomes.push_back(std::move(o));
  }
  sum.files = plan->files.size();
  sum.epoll_readded = plan->epoll.adds.size();
  for (const Holder& h : plan->holders) sum.fds += h.fds.size();

  const Holder* exec_holder = nullptr;
  for (const Holder& h : plan->holders)
    if (h.exec) exec_holder = &h;
  SelfInstall self;
  std::vector<int> placed;
  if (exec_holder)
    if (auto ok = place_self(*exec_holder, *built, self, placed); !ok) {
      self.rollback();
      remove_created_fifos(*built);
      return tl::unexpected(ok.error());
    }
  if (exec_holder) release_exec_only(*plan, *built);
  if (plan->holders.size() > (exec_holder ? 1u : 0u)) {
    InterruptsHeld held;  // declared before tx: released only after every target is whole again
    TargetTransaction tx(*plan, *built, parcels, opts);
    if (auto ok = tx.run(); !ok) {
      self.rollback();
      remove_created_fifos(*built);
      return tl::unexpected(ok.error());
    }
    if (auto ok = tx.commit(); !ok) return tl::unexpected(ok.error());
    sum.register_block_return = tx.register_block_targets();
    sum.fd_table_growth = tx.table_growth();
    if (opts.hook) opts.hook(Stage::resumed);
  }
  if (!exec_holder) {
    hand_notes();
    return sum;
  }
  if (exec_holder->caller) {
    // O_ASYNC at the final numbers (si_fd names the number it was set through), then keep them.
    for (size_t i = 0; i < exec_holder->fds.size(); ++i) {
      const PlannedFd& f = exec_holder->fds[i];
      if (f.set_async)
        if (auto ok = set_async(placed[i], plan->files[plan->file_index.at(f.rec->file_id)].rec); !ok) {
          self.rollback();
          remove_created_fifos(*built);
          return tl::unexpected(ok.error());
        }
      sum.caller_fds.push_back(ProcessRestoreSummary::CallerFd{f.rec->file_id, placed[i]});
    }
    self.commit();
    hand_notes();
    return sum;
  }
  hand_notes();
  Error e = exec_now(*plan, *exec_holder, *request.exec, soft_before);
  self.rollback();
  bool targets = plan->holders.size() > 1;
  return fail(Errc::system, e.err,
              fmt::format("{}{}", e.what, targets ? " (the --into targets were already restored)" : ""));
}

}  // namespace pipecr::restore
