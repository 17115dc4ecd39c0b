// restore/inplace.cpp: refill in place (see inplace.hpp): the choice, the build, the swap, the undo.
#include "restore/inplace.hpp"

#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <unordered_set>

#include <fmt/format.h>

#include "image/info.hpp"
#include "restore/in_flight.hpp"
#include "restore/open_file.hpp"
#include "restore/plan.hpp"
#include "sys/file_kind.hpp"
#include "sys/proc.hpp"
#include "sys/syscalls.hpp"

namespace pipecr::restore {
namespace {

int accmode_of(uint32_t flags) { return static_cast<int>(flags) & O_ACCMODE; }
bool can_read(int acc) { return acc == O_RDONLY || acc == O_RDWR; }
bool can_write(int acc) { return acc == O_WRONLY || acc == O_RDWR; }

struct Candidate {
  const PipeRecord* pipe = nullptr;
  PipeChoice choice;
  std::vector<pid_t> strangers;  // holders that are not targets
  bool undecided = true;
};

std::string pipe_name(const PipeRecord& p) {
  return p.kind == PipeKind::fifo ? fmt::format("FIFO {}", p.path) : fmt::format("pipe:[{}]", p.inode);
}

// The threads of pid whose fd table is not pid's (unshare(CLONE_FILES)), one per table: the first
// in /proc/PID/task order, the thread the dump records that table's fds under (FdRecord::tid).
std::vector<pid_t> own_table_threads(pid_t pid) {
  std::vector<pid_t> out;
  auto tids = sys::list_threads(pid);
  if (!tids) return out;
  for (pid_t t : *tids) {
    if (t == pid) continue;
    auto c = sys::kcmp_files(pid, t);
    if (!c || *c == 0) continue;
    bool known = std::any_of(out.begin(), out.end(), [&](pid_t o) {
      auto same = sys::kcmp_files(o, t);
      return same && *same == 0;
    });
    if (!known) out.push_back(t);
  }
  return out;
}

// Every process's fds, once: which targets hold each candidate where, and who else holds it.
// /proc/PID/fd is the process's own table only: the own tables of a target's threads are read
// through /proc/TID/fd (a thread's table in a process that is not a target is not seen).
void scan_holders(std::vector<Candidate>& cands, const std::unordered_set<pid_t>& targets) {
  std::unordered_map<uint64_t, size_t> anon;
  std::unordered_map<uint64_t, std::vector<size_t>> fifo_by_ino;
  for (size_t i = 0; i < cands.size(); ++i) {
    if (cands[i].pipe->kind == PipeKind::fifo && cands[i].pipe->dev == 0) continue;  // cannot be matched
    if (cands[i].pipe->kind == PipeKind::anonymous)
      anon[cands[i].pipe->inode] = i;
    else
      fifo_by_ino[cands[i].pipe->inode].push_back(i);
  }
  if (anon.empty() && fifo_by_ino.empty()) return;
  auto all = sys::list_pids();
  if (!all) {
    for (Candidate& c : cands)
      if (c.undecided) c.choice.why = fmt::format("cannot list processes: {}", all.error().what), c.undecided = false;
    return;
  }
  const dev_t pipefs = sys::pipefs_dev();
  // One fd table: pid's (tid 0), or the own table of its thread tid (/proc/TID/... is that table).
  auto scan_table = [&](pid_t pid, pid_t tid) {
    const pid_t task = tid ? tid : pid;
    // A process whose fds pipecr may not read (another user's, not dumpable, or one that gone
    // meanwhile) is not seen, as dump does not see it either (dump/process.cpp,
    // mark_outside_holders): pipecr cannot ptrace it, so it could not have dumped it either.
    auto fds = sys::list_fds(task, true);
    if (!fds) return;
    for (const sys::FdEntry& e : *fds) {
      std::vector<size_t> hits;
      if (auto ino = sys::pipe_inode_from_link(e.target)) {
        if (auto it = anon.find(*ino); it != anon.end()) hits.push_back(it->second);
      } else if (!fifo_by_ino.empty() && !e.target.empty() && e.target[0] == '/') {
        struct stat st {};
        if (::stat(fmt::format("/proc/{}/fd/{}", task, e.fd).c_str(), &st) < 0 || !S_ISFIFO(st.st_mode)) continue;
        if (auto it = fifo_by_ino.find(st.st_ino); it != fifo_by_ino.end())
          for (size_t i : it->second)
            if (cands[i].pipe->dev == st.st_dev) hits.push_back(i);
      }
      if (hits.empty()) continue;
      if (!targets.count(pid)) {
        for (size_t i : hits) cands[i].strangers.push_back(pid);
        continue;
      }
      struct stat st {};
      if (::stat(fmt::format("/proc/{}/fd/{}", task, e.fd).c_str(), &st) < 0) continue;
      auto info = sys::read_fdinfo(task, e.fd);
      if (!info) continue;
      for (size_t i : hits) {
        const PipeRecord& p = *cands[i].pipe;
        bool same = st.st_ino == p.inode && (p.kind == PipeKind::fifo ? st.st_dev == p.dev : st.st_dev == pipefs);
        if (same)
          cands[i].choice.held.push_back(LiveEnd{pid, tid, e.fd, info->flags & O_ACCMODE, info->flags & ~O_CLOEXEC,
                                                 (info->flags & O_CLOEXEC) != 0});
      }
    }
  };
  // This process is scanned too: it holds nothing of its own yet, so what it holds is the
  // caller's (a program calling the library holds the pipe: it is a holder like any other).
  for (pid_t pid : *all) {
    scan_table(pid, 0);
    if (targets.count(pid))
      for (pid_t tid : own_table_threads(pid)) scan_table(pid, tid);
  }
}

// A named FIFO: what the recorded path names in the mount namespace of each target holding it.
std::string check_fifo_path(const PipeRecord& p, const std::vector<LiveEnd>& held) {
  std::unordered_set<pid_t> seen;
  for (const LiveEnd& e : held) {
    if (!seen.insert(e.pid).second) continue;
    std::string in_ns = fmt::format("/proc/{}/root{}", e.pid, p.path);
    struct stat st {};
    if (::stat(in_ns.c_str(), &st) < 0)
      return fmt::format("{} does not exist in the mount namespace of process {}", p.path, e.pid);
    if (!S_ISFIFO(st.st_mode) || st.st_dev != p.dev || st.st_ino != p.inode)
      return fmt::format("{} in the mount namespace of process {} is no longer the FIFO it holds", p.path, e.pid);
  }
  return {};
}

}  // namespace

std::unordered_map<uint64_t, PipeChoice> choose_in_place(const Image& img, const std::vector<Holder>& holders,
                                                         bool force_replace) {
  std::unordered_map<int32_t, const Holder*> holder_of;
  std::unordered_set<pid_t> targets;
  std::unordered_set<int32_t> restored;  // recorded pids of the --into targets
  for (const Holder& h : holders) {
    holder_of[h.recorded] = &h;
    if (!h.exec) targets.insert(h.target), restored.insert(h.recorded);
  }
  // Pipes a restored process holds, and whether the exec process holds any of them.
  std::unordered_map<uint64_t, bool> wanted;  // pipe id -> held by the exec process
  for (const FdRecord& d : img.fds) {
    auto h = holder_of.find(d.pid);
    if (h == holder_of.end()) continue;
    const FileRecord* f = img.find_file(d.file_id);
    if (!f) continue;
    wanted[f->pipe_id] = wanted[f->pipe_id] || h->second->exec;
  }
  const std::string boot = image::boot_id();
  std::vector<Candidate> cands;
  for (const PipeRecord& p : img.pipes) {
    auto w = wanted.find(p.id);
    if (w == wanted.end()) continue;
    Candidate c;
    c.pipe = &p;
    if (force_replace) c.choice.why = "--replace";
    else if (w->second) c.choice.why = "the --exec process takes it (a new process gets new pipes)";
    else if (p.kind == PipeKind::anonymous && img.info.boot_id.empty())
      c.choice.why = "the image does not record the boot it was made in (an older pipecr made it)";
    else if (p.kind == PipeKind::anonymous && img.info.boot_id != boot)
      c.choice.why = "the image was made in another boot: its pipe inode numbers mean other pipes now";
    else if (p.kind == PipeKind::fifo && p.dev == 0)
      c.choice.why = "the image does not record the FIFO's device (an older pipecr made it)";
    else if (p.kind == PipeKind::fifo && p.unlinked && img.info.boot_id != boot)
      c.choice.why = "an unlinked FIFO from another boot";
    else if (auto away = in_flight_outside(img, p.id, restored); !away.empty())
      c.choice.why = away;  // an end in flight is a holder too (in_flight.hpp)
    else
      c.undecided = true;
    if (!c.choice.why.empty()) c.undecided = false;
    cands.push_back(std::move(c));
  }
  // The library's caller alone (restore_pipe()) replaces every pipe and allows FIFOs shared by path:
  // who else holds them changes nothing, so the machine's fd tables are not read.
  const bool caller_only =
      force_replace && std::all_of(holders.begin(), holders.end(), [](const Holder& h) { return h.caller; });
  if (!caller_only) scan_holders(cands, targets);

  std::unordered_map<uint64_t, PipeChoice> out;
  for (Candidate& c : cands) {
    const PipeRecord& p = *c.pipe;
    std::sort(c.strangers.begin(), c.strangers.end());
    c.strangers.erase(std::unique(c.strangers.begin(), c.strangers.end()), c.strangers.end());
    c.choice.strangers = c.strangers;
    if (c.undecided) {
      if (!c.strangers.empty()) {
        auto comm = sys::read_comm(c.strangers.front());
        c.choice.why = fmt::format("process {} ({}) holds it too and is not restored{}", c.strangers.front(),
                                   comm ? *comm : "?",
                                   c.strangers.size() > 1 ? fmt::format(", and {} more", c.strangers.size() - 1) : "");
      } else if (c.choice.held.empty()) {
        c.choice.why = "no target holds it any more";
      } else if (p.kind == PipeKind::fifo && !p.unlinked) {
        c.choice.why = check_fifo_path(p, c.choice.held);
      }
      // A FIFO reader that has not seen a writer keeps that state only if no writer is opened:
      // refilling bytes needs one when no target holds a write end.
      if (c.choice.why.empty() && p.kind == PipeKind::fifo && p.bytes() > 0) {
        bool writer = std::any_of(c.choice.held.begin(), c.choice.held.end(),
                                  [](const LiveEnd& e) { return can_write(e.accmode); });
        bool latched = std::any_of(img.files.begin(), img.files.end(), [&](const FileRecord& f) {
          return f.pipe_id == p.id && f.fifo_reader == FifoReaderState::no_writer_yet;
        });
        if (latched && !writer)
          c.choice.why = "refilling it would need a writer, and a reader of it has not seen one yet";
      }
    }
    c.choice.target_holds = !c.choice.held.empty();
    if (!c.choice.why.empty()) c.choice.held.clear();
    c.choice.in_place = c.choice.why.empty();
    out.emplace(p.id, std::move(c.choice));
  }
  return out;
}

namespace {

// A restored fd the target holds already, and the live end there.
struct KeptAt {
  PlannedFd* fd = nullptr;
  const LiveEnd* live = nullptr;
  size_t order = 0;  // image order over every holder
};

// Whether two live ends are the same open file description (kcmp KCMP_FILE). Different status flags
// or access modes cannot be one description, which spares the syscall for the usual read end and
// write end. An end that cannot be compared (gone meanwhile) counts as another description.
bool same_description(const LiveEnd& a, const LiveEnd& b) {
  if (a.pid == b.pid && a.tid == b.tid && a.fd == b.fd) return true;
  if (a.flags != b.flags) return false;
  auto r = sys::kcmp_file(a.tid ? a.tid : a.pid, a.fd, b.tid ? b.tid : b.pid, b.fd);
  return r && *r == 0;
}

// An fd is kept only where the description structure is the image's: the kept fds of one recorded
// file must be one live description, and the kept fds of two recorded files two descriptions. The
// kept fds of one pipe are grouped by live description; each recorded file keeps at most one of
// its groups and each group serves at most one recorded file, the largest pairs first (then image
// order). Every other fd is installed anew: a copy of its file's kept description where there is
// one, else a new open (build_in_place()).
void keep_matching_descriptions(std::vector<KeptAt>& kept) {
  std::vector<const LiveEnd*> groups;  // one live end per description
  std::vector<size_t> group_of(kept.size());
  for (size_t i = 0; i < kept.size(); ++i) {
    size_t g = 0;
    while (g < groups.size() && !same_description(*groups[g], *kept[i].live)) ++g;
    if (g == groups.size()) groups.push_back(kept[i].live);
    group_of[i] = g;
  }
  struct Pair {
    uint64_t file;
    size_t group, count = 0, first = 0;
  };
  std::vector<Pair> pairs;
  for (size_t i = 0; i < kept.size(); ++i) {
    const uint64_t file = kept[i].fd->rec->file_id;
    auto it = std::find_if(pairs.begin(), pairs.end(), [&](const Pair& p) { return p.file == file && p.group == group_of[i]; });
    if (it == pairs.end()) it = pairs.insert(pairs.end(), Pair{file, group_of[i], 0, kept[i].order});
    ++it->count;
  }
  std::sort(pairs.begin(), pairs.end(),
            [](const Pair& a, const Pair& b) { return a.count != b.count ? a.count > b.count : a.first < b.first; });
  std::unordered_map<uint64_t, size_t> file_group;  // recorded file -> the live description it keeps
  std::unordered_set<size_t> taken;
  for (const Pair& p : pairs)
    if (!file_group.count(p.file) && taken.insert(p.group).second) file_group.emplace(p.file, p.group);
  for (size_t i = 0; i < kept.size(); ++i) {
    auto it = file_group.find(kept[i].fd->rec->file_id);
    if (it == file_group.end() || it->second != group_of[i]) kept[i].fd->keep = kept[i].fd->set_cloexec = false;
  }
}

}  // namespace

void mark_kept(Plan& plan) {
  std::unordered_map<uint64_t, const PipeChoice*> choice;
  for (const PlannedPipe& pp : plan.pipes)
    if (pp.choice.in_place) choice[pp.pipe->id] = &pp.choice;
  std::unordered_map<uint64_t, std::vector<KeptAt>> kept_of;  // pipe id -> its kept fds
  size_t order = 0;
  for (Holder& h : plan.holders) {
    if (h.exec) continue;
    for (PlannedFd& f : h.fds) {
      ++order;
      f.keep = f.set_cloexec = false;
      const PlannedFile& pf = plan.files[plan.file_index.at(f.rec->file_id)];
      auto c = choice.find(pf.pipe->id);
      if (c == choice.end()) continue;
      const int acc = accmode_of(pf.rec.flags);
      for (const LiveEnd& e : c->second->held) {
        // The fd table the fd was recorded in: a thread's own (h.thread), else the process's.
        if (e.pid != h.target || e.tid != h.thread || e.fd != f.rec->fd || e.accmode != acc) continue;
        f.keep = true;
        f.set_cloexec = e.cloexec != f.rec->cloexec;  // FD_CLOEXEC is the fd's: set at its number
        kept_of[pf.pipe->id].push_back(KeptAt{&f, &e, order});
        break;
      }
    }
  }
  for (auto& [id, kept] : kept_of)
    if (kept.size() > 1) keep_matching_descriptions(kept);
  for (PlannedPipe& pp : plan.pipes) pp.choice.kept = 0;
  std::unordered_map<uint64_t, PlannedPipe*> by_id;
  for (PlannedPipe& pp : plan.pipes) by_id[pp.pipe->id] = &pp;
  for (const Holder& h : plan.holders)
    for (const PlannedFd& f : h.fds)
      if (f.keep) ++by_id.at(plan.files[plan.file_index.at(f.rec->file_id)].pipe->id)->choice.kept;
}

void fit_fd_limit(Plan& plan, size_t limit, size_t open_now) {
  // A margin for what pipecr opens between the plan and the build (listings, the targets' queues).
  constexpr size_t kMargin = 64;
  size_t need = fds_needed(plan) + open_now + kMargin;
  std::unordered_set<const PipeRecord*> replaced;
  for (auto it = plan.pipes.rbegin(); it != plan.pipes.rend() && need > limit; ++it) {
    PlannedPipe& pp = *it;
    if (!pp.choice.in_place) continue;
    size_t saved = in_place_fds(pp, pp.choice.kept);
    need -= std::min(need, saved);
    pp.choice = PipeChoice{};
    pp.choice.target_holds = true;  // in place: a target held it (a FIFO's content then goes in inside the stop)
    pp.choice.why = fmt::format("pipecr's fd limit ({}) does not allow more pipes refilled in place at once", limit);
    need += replaced_fds(pp);
    replaced.insert(pp.pipe);
  }
  if (replaced.empty()) return;
  for (Holder& h : plan.holders)  // one pass, whatever the number of pipes replaced
    for (PlannedFd& f : h.fds)
      if (f.keep && replaced.count(plan.files[plan.file_index.at(f.rec->file_id)].pipe)) f.keep = f.set_cloexec = false;
}

namespace {

Expected<sys::UniqueFd> dup_cloexec(int fd) {
  sys::UniqueFd out(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
  if (!out) return tl::unexpected(sys::call_error("fcntl", fmt::format("fd={}, F_DUPFD_CLOEXEC", fd)));
  return out;
}

// The recorded content of ip.pipe, in a pipe of pipecr's: moved in while the targets are stopped.
Expected<void> build_scratch(InPlacePipe& ip, const ProcessRestoreOptions& opts) {
  const PipeRecord& p = *ip.pipe;
  auto scratch = sys::make_pipe(O_CLOEXEC);
  if (!scratch) return tl::unexpected(scratch.error());
  auto cap = set_capacity(scratch->write.get(), p, opts.refill);
  if (!cap) return tl::unexpected(cap.error());
  if (auto ok = refill(scratch->write.get(), p, opts.refill); !ok) return ok;
  if (!p.slots.empty()) {  // an empty one only checked the capacity early
    ip.scratch_r = std::move(scratch->read);
    ip.scratch_w = std::move(scratch->write);
  }
  return {};
}

}  // namespace

Expected<void> stage_replaced_fifo(int live, const PipeRecord& p, const ProcessRestoreOptions& opts, Built& built) {
  InPlacePipe ip;
  ip.pipe = &p;
  ip.replacing = true;
  auto copy = dup_cloexec(live);
  if (!copy) return tl::unexpected(copy.error());
  ip.held.push_back(std::move(*copy));
  if (auto ok = build_scratch(ip, opts); !ok) return ok;
  built.in_place.push_back(std::move(ip));
  return {};
}

Expected<void> build_in_place(const Plan& plan, const PlannedPipe& pp, const ProcessRestoreOptions& opts,
                              Built& built, const FdsByPipe* index) {
  const PipeRecord& p = *pp.pipe;
  InPlacePipe ip;
  ip.pipe = &p;
  // Copies of every end the targets hold, checked to be the recorded pipe.
  const dev_t pipefs = sys::pipefs_dev();
  std::unordered_map<pid_t, sys::UniqueFd> pidfds;  // per fd table: a thread's pidfd reads its own
  for (const LiveEnd& e : pp.choice.held) {
    const pid_t task = e.tid ? e.tid : e.pid;
    const std::string where = e.tid ? fmt::format("fd {} of thread {} of process {}", e.fd, e.tid, e.pid)
                                    : fmt::format("fd {} of process {}", e.fd, e.pid);
    auto& pidfd = pidfds[task];
    if (!pidfd) {
      auto fd = sys::pidfd_open(task);
      if (!fd) return tl::unexpected(fd.error());
      pidfd = std::move(*fd);
    }
    auto copy = sys::pidfd_getfd(pidfd.get(), e.fd, task);
    if (!copy) return tl::unexpected(copy.error());
    struct stat st {};
    if (::fstat(copy->get(), &st) < 0)
      return tl::unexpected(sys::call_error("fstat", fmt::format("copy of {}", where)));
    bool same = S_ISFIFO(st.st_mode) && st.st_ino == p.inode &&
                (p.kind == PipeKind::fifo ? st.st_dev == p.dev : st.st_dev == pipefs);
    if (!same)
      return fail(Errc::gone, ESRCH,
                  fmt::format("{} changed while the restore was prepared (it no longer holds {})", where,
                              pipe_name(p)));
    ip.held.push_back(std::move(*copy));
  }
  if (ip.held.empty()) return fail(Errc::gone, ESRCH, fmt::format("no target holds {} any more", pipe_name(p)));

  if (auto ok = build_scratch(ip, opts); !ok) return ok;

  // Kept descriptions: one copy per restored fd the target still holds (the same description may
  // come twice; setting it twice is harmless).
  FdsByPipe own;
  if (!index) own = index_fds_by_pipe(plan);
  static const std::vector<std::pair<const Holder*, const PlannedFd*>> none;
  const auto found = (index ? index : &own)->find(&p);
  const auto& fds_of_pipe = found != (index ? index : &own)->end() ? found->second : none;
  std::unordered_map<uint64_t, int> kept_copy;  // file id -> an fd of pipecr on that description
  for (const auto& [hp, fp] : fds_of_pipe) {
    const Holder& h = *hp;
    if (h.exec) continue;
    {
      const PlannedFd& f = *fp;
      if (!f.keep) continue;
      const PlannedFile& pf = plan.files[plan.file_index.at(f.rec->file_id)];
      for (size_t i = 0; i < pp.choice.held.size(); ++i) {
        const LiveEnd& e = pp.choice.held[i];
        if (e.pid != h.target || e.tid != h.thread || e.fd != f.rec->fd) continue;
        auto copy = dup_cloexec(ip.held[i].get());
        if (!copy) return tl::unexpected(copy.error());
        kept_copy.emplace(pf.rec.id, copy->get());
        ip.kept.push_back(KeptFile{&pf.rec, std::move(*copy)});
      }
    }
  }
  // Recorded files no target holds at a recorded number any more: the kept description of the same
  // recorded file where there is one (sharing stays), else a new open on the live pipe.
  for (size_t i : pp.files) {
    const FileRecord& f = plan.files[i].rec;
    bool needed = false;
    for (const auto& [hp, d] : fds_of_pipe) needed = needed || (!d->keep && d->rec->file_id == f.id);
    if (!needed) continue;
    sys::UniqueFd fd;
    if (auto k = kept_copy.find(f.id); k != kept_copy.end()) {
      auto copy = dup_cloexec(k->second);
      if (!copy) return tl::unexpected(copy.error());
      fd = std::move(*copy);
    } else {
      auto made = reopen(ip.held.front().get(), accmode_of(f.flags));
      if (!made) return tl::unexpected(made.error());
      fd = std::move(*made);
      if (auto ok = apply_file_state(fd.get(), f, built.notes); !ok) return ok;
    }
    built.files[f.id] = std::move(fd);
  }
  // pipecr keeps as few fds per pipe as it can until the commit: the kept copies, else one end.
  if (!ip.kept.empty()) ip.held.clear();
  else ip.held.resize(1);
  built.in_place.push_back(std::move(ip));
  return {};
}

size_t in_place_fds(const PlannedPipe& pp, size_t kept) {
  // kept copies (or one end), scratch, holding pipe, pipecr's own reader and writer
  return std::max<size_t>(kept, 1) + (pp.pipe->slots.empty() ? 0 : 2) + 2 + 2;
}

size_t replaced_fds(const PlannedPipe& pp) {
  if (pp.pipe->kind != PipeKind::fifo) return 0;
  if (!pp.choice.target_holds || pp.pipe->unlinked) return 1;  // the read-write open (or temporary reader), kept
  // that, its copy, scratch, pipecr's own reader and writer (no holding pipe: it must be empty)
  return 1 + 1 + (pp.pipe->slots.empty() ? 0 : 2) + 2;
}

namespace {

// Any fd of pipecr's on the live pipe.
int any_end(const InPlacePipe& p) { return p.kept.empty() ? p.held.front().get() : p.kept.front().copy.get(); }

// An end of the live pipe that can read (or write): a target's, else one pipecr opens now.
Expected<int> live_end(InPlacePipe& p, bool write) {
  auto fits = [&](int fd) {
    auto fl = sys::get_fl(fd);
    return fl && (write ? can_write(*fl & O_ACCMODE) : can_read(*fl & O_ACCMODE));
  };
  for (sys::UniqueFd& fd : p.held)
    if (fits(fd.get())) return fd.get();
  for (KeptFile& k : p.kept)
    if (fits(k.copy.get())) return k.copy.get();
  sys::UniqueFd& own = write ? p.writer : p.reader;
  if (!own) {
    if (write && !p.reader) {  // a FIFO refuses a non-blocking writer while it has no reader
      auto r = live_end(p, false);
      if (!r) return r;
    }
    auto made = reopen(any_end(p), write ? O_WRONLY : O_RDONLY);
    if (!made) return tl::unexpected(made.error());
    own = std::move(*made);
  }
  return own.get();
}

// Moves every buffer of the pipe behind `from` (a read end) into the pipe behind `to`.
Expected<void> move_all(int from, int to, const std::string& what) {
  for (int round = 0;; ++round) {
    auto left = sys::bytes_queued(from);
    if (!left) return tl::unexpected(left.error());
    if (*left == 0) return {};
    auto n = sys::splice_nb(from, to, static_cast<size_t>(*left));
    if (!n) return tl::unexpected(Error{n.error().kind, n.error().err, fmt::format("{}: {}", what, n.error().what)});
    if (*n == 0 || round > 4096)
      return fail(Errc::system, EIO, fmt::format("{}: splice moved nothing with {} bytes queued", what, *left));
  }
}

// Status flags (O_ASYNC as it is: process.cpp sets it at the target's number, clear_async_in_place()
// clears it), owner and signal of a kept description, through pipecr's copy; the old ones saved for
// the undo.
Expected<void> set_kept(KeptFile& k) {
  const int fd = k.copy.get();
  auto fl = sys::get_fl(fd);
  if (!fl) return tl::unexpected(fl.error());
  f_owner_ex own{};
  if (::fcntl(fd, F_GETOWN_EX, &own) < 0) return tl::unexpected(sys::call_error("fcntl", fmt::format("fd={}, F_GETOWN_EX", fd)));
  int sig = ::fcntl(fd, F_GETSIG);
  if (sig < 0) return tl::unexpected(sys::call_error("fcntl", fmt::format("fd={}, F_GETSIG", fd)));
  k.old_fl = *fl;
  k.old_owner_type = own.type;
  k.old_owner_pid = own.pid;
  k.old_sig = sig;
  k.saved = true;
  FileRecord want = *k.rec;
  want.flags = (want.flags & ~static_cast<uint32_t>(O_ASYNC)) | (*fl & O_ASYNC);
  // The owner it has already is left as it is (the kernel's reference to it stays, uids included).
  if (want.owner.pid != 0 && want.owner.type == own.type && want.owner.pid == own.pid) want.owner = Owner{};
  if (auto ok = set_file_state(fd, want, true); !ok) return ok;
  if (k.rec->owner.pid == 0 && own.pid != 0) {
    f_owner_ex none{F_OWNER_PID, 0};
    if (::fcntl(fd, F_SETOWN_EX, &none) < 0)
      return tl::unexpected(sys::call_error("fcntl", fmt::format("fd={}, F_SETOWN_EX, pid=0", fd)));
  }
  if (want.signal == 0 && sig != 0 && ::fcntl(fd, F_SETSIG, 0) < 0)
    return tl::unexpected(sys::call_error("fcntl", fmt::format("fd={}, F_SETSIG, 0", fd)));
  return {};
}

void unset_kept(KeptFile& k) {
  if (!k.saved) return;
  const int fd = k.copy.get();
  auto fl = sys::get_fl(fd);
  // O_ASYNC is left as it is now: process.cpp put it back at the target's number already.
  if (fl) (void)sys::set_fl(fd, (k.old_fl & ~O_ASYNC) | (*fl & O_ASYNC));
  f_owner_ex own{static_cast<__pid_type>(k.old_owner_type), k.old_owner_pid};
  (void)::fcntl(fd, F_SETOWN_EX, &own);
  (void)::fcntl(fd, F_SETSIG, k.old_sig);
  k.saved = false;
}

}  // namespace

Expected<void> swap_in_place(InPlacePipe& p, const ProcessRestoreOptions& opts) {
  const PipeRecord& rec = *p.pipe;
  const std::string name = pipe_name(rec);
  auto wrap = [&](const Error& e) { return tl::unexpected(Error{e.kind, e.err, fmt::format("{}: {}", name, e.what)}); };
  const int any = any_end(p);
  auto cap = sys::get_pipe_size(any);
  if (!cap) return wrap(cap.error());
  p.old_cap = *cap;
  auto queued = sys::bytes_queued(any);
  if (!queued) return wrap(queued.error());
  if (*queued > 0 && p.replacing)
    return fail(Errc::unsupported, EBUSY,
                fmt::format("{}: {} bytes were written into it since it was built, and it is replaced: its new "
                            "descriptions would read them before the recorded ones",
                            name, *queued));
  if (*queued > 0) {
    auto r = live_end(p, false);
    if (!r) return wrap(r.error());
    auto hold = sys::make_pipe(O_CLOEXEC);
    if (!hold) return wrap(hold.error());
    p.hold_r = std::move(hold->read);
    p.hold_w = std::move(hold->write);
    if (auto s = sys::set_pipe_size(p.hold_w.get(), *cap); !s) return wrap(s.error());
    p.emptied = true;
    if (auto ok = move_all(*r, p.hold_w.get(), "moving the queued bytes out"); !ok) return wrap(ok.error());
  }
  p.emptied = true;
  p.capacity_set = true;
  if (auto c = set_capacity(any, rec, opts.refill); !c) return wrap(c.error());
  if (p.scratch_r) {
    // A pipe without readers refuses bytes (EPIPE): pipecr's reader stands in until the commit,
    // leaving the bytes queued for a reader to come, as recorded.
    if (auto r = live_end(p, false); !r) return wrap(r.error());
    auto w = live_end(p, true);
    if (!w) return wrap(w.error());
    p.filled = true;
    if (auto ok = move_all(p.scratch_r.get(), *w, "moving the recorded bytes in"); !ok) return wrap(ok.error());
  }
  p.filled = true;
  auto now = sys::bytes_queued(any);
  if (!now) return wrap(now.error());
  if (static_cast<uint64_t>(*now) != rec.bytes())
    return fail(Errc::system, EIO, fmt::format("{}: {} bytes queued after the refill, expected {}", name, *now, rec.bytes()));
  for (KeptFile& k : p.kept)
    if (auto ok = set_kept(k); !ok) return wrap(ok.error());
  return {};
}

Expected<void> clear_async_in_place(InPlacePipe& p) {
  for (KeptFile& k : p.kept) {
    if (k.rec->flags & O_ASYNC) continue;
    auto fl = sys::get_fl(k.copy.get());
    if (!fl) return tl::unexpected(fl.error());
    if (*fl & O_ASYNC)
      if (auto ok = sys::set_fl(k.copy.get(), *fl & ~O_ASYNC); !ok)
        return tl::unexpected(Error{ok.error().kind, ok.error().err, fmt::format("{}: {}", pipe_name(*p.pipe), ok.error().what)});
  }
  return {};
}

void undo_in_place(InPlacePipe& p) {
  for (auto it = p.kept.rbegin(); it != p.kept.rend(); ++it) unset_kept(*it);
  if (p.held.empty() && p.kept.empty()) return;
  const int any = any_end(p);
  if (p.filled && p.scratch_w) {
    // Drop the recorded bytes: back into the scratch pipe (it had room for them).
    if (auto r = live_end(p, false)) (void)move_all(*r, p.scratch_w.get(), "undo");
    p.filled = false;
  }
  if (p.capacity_set) {
    (void)sys::set_pipe_size(any, p.old_cap);
    p.capacity_set = false;
  }
  if (p.emptied) {
    auto queued = p.hold_r ? sys::bytes_queued(p.hold_r.get()) : Expected<int>(0);
    if (queued && *queued > 0 && live_end(p, false))
      if (auto w = live_end(p, true)) (void)move_all(p.hold_r.get(), *w, "undo");
    p.emptied = false;
  }
}

}  // namespace pipecr::restore
