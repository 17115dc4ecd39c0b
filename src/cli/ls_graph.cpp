// ls_graph.cpp: see ls_graph.hpp.
#include "cli/ls_graph.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <sstream>
#include <thread>

#include <fmt/format.h>

#include "cli/describe.hpp"
#include "sys/proc.hpp"

namespace pipecr::cli {
namespace {

// ANSI sequences, used only when GraphStyle::color.
constexpr const char* kRed = "\x1b[1;31m";
constexpr const char* kYellow = "\x1b[1;33m";
constexpr const char* kCyan = "\x1b[36m";
constexpr const char* kDim = "\x1b[2m";
constexpr const char* kReset = "\x1b[0m";

bool has(const std::vector<std::string>& v, const char* s) { return std::find(v.begin(), v.end(), s) != v.end(); }

std::string paint(const GraphStyle& st, const char* color, const std::string& text) {
  return st.color ? fmt::format("{}{}{}", color, text, kReset) : text;
}

// Field 1 of every /proc/PID/task/TID/schedstat: nanoseconds on a CPU.
uint64_t cpu_ns_of(pid_t pid) {
  auto tids = sys::list_threads(pid);
  if (!tids) return 0;
  uint64_t sum = 0;
  for (pid_t tid : *tids) {
    auto text = sys::read_proc_file(fmt::format("/proc/{}/task/{}/schedstat", pid, tid), 256);
    if (text) sum += std::strtoull(text->c_str(), nullptr, 10);
  }
  return sum;
}

// The box between two groups of processes: "[bytes/capacity full, WRITER BLOCKED]".
std::string box(const GraphPipe& p, const GraphStyle& st) {
  std::vector<std::string> parts;
  std::string fill = fmt::format("{}/{}", p.bytes ? fmt::format("{}", *p.bytes) : "?",
                                 p.capacity ? fmt::format("{}", *p.capacity) : "?");
  if (p.fifo) fill = fmt::format("fifo {}{} {}", printable(p.path), p.unlinked ? " (deleted)" : "", fill);
  if (has(p.states, "full")) fill += " full";
  if (has(p.states, "empty")) fill += " empty";
  parts.push_back(fill);
  if (has(p.states, "writer_blocked")) parts.emplace_back("WRITER BLOCKED");
  if (has(p.states, "reader_blocked")) parts.emplace_back("READER BLOCKED");
  if (has(p.states, "open_waiting")) parts.emplace_back("OPEN WAITING");
  if (p.shared()) parts.emplace_back("shared");
  for (const auto& [pid, sock] : p.in_flight) parts.push_back(fmt::format("in flight {} sock:{}", pid, sock));
  std::string text = fmt::format("[{}]", fmt::join(parts, ", "));
  if (has(p.states, "writer_blocked")) return paint(st, kRed, text);
  if (has(p.states, "reader_blocked") || has(p.states, "open_waiting")) return paint(st, kYellow, text);
  if (has(p.states, "empty")) return paint(st, kDim, text);
  return text;
}

std::string proc_label(const PipeGraph& g, pid_t pid, bool blocked, const GraphStyle& st) {
  auto it = g.procs.find(pid);
  std::string comm = it == g.procs.end() ? "?" : printable(it->second.comm);
  std::vector<std::string> rates;
  if (it != g.procs.end()) {
    if (it->second.read_rate && *it->second.read_rate > 0) rates.push_back("r:" + human_rate(*it->second.read_rate));
    if (it->second.write_rate && *it->second.write_rate > 0) rates.push_back("w:" + human_rate(*it->second.write_rate));
  }
  std::string label = rates.empty() ? fmt::format("{}({})", comm, pid)
                                    : fmt::format("{}({} {})", comm, pid, fmt::join(rates, " "));
  if (blocked) label = paint(st, kRed, label + "!");
  return label;
}

// A set of processes: one label, or {a(1),b(2)} when several share the end.
std::string group(const PipeGraph& g, const std::vector<pid_t>& pids, const std::set<pid_t>& blocked,
                  const GraphStyle& st) {
  if (pids.empty()) return "(none)";
  std::vector<std::string> labels;
  for (pid_t pid : pids) labels.push_back(proc_label(g, pid, blocked.count(pid) > 0, st));
  if (labels.size() == 1) return labels.front();
  return fmt::format("{{{}}}", fmt::join(labels, ","));
}

std::set<pid_t> united(const std::set<pid_t>& a, const std::set<pid_t>& b) {
  std::set<pid_t> u = a;
  u.insert(b.begin(), b.end());
  return u;
}

std::string dot_escape(const std::string& raw) {
  std::string s = printable(raw);  // control characters as \xNN first (untrusted names)
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

}  // namespace

GraphStyle graph_style_for(bool out_is_tty) {
  const char* no_color = std::getenv("NO_COLOR");
  return GraphStyle{out_is_tty && (no_color == nullptr || *no_color == '\0')};
}

std::string human_rate(double b) {
  if (b >= 1024.0 * 1024 * 1024) return fmt::format("{:.1f}G/s", b / (1024.0 * 1024 * 1024));
  if (b >= 1024.0 * 1024) return fmt::format("{:.1f}M/s", b / (1024.0 * 1024));
  if (b >= 1024.0) return fmt::format("{:.1f}k/s", b / 1024.0);
  return fmt::format("{:.0f}B/s", b);
}

Samples sample_procs(const std::set<pid_t>& pids) {
  Samples out;
  for (pid_t pid : pids) {
    ProcSample s;
    auto st = sys::read_state(pid);
    if (!st) continue;  // gone
    s.state = *st;
    s.cpu_ns = cpu_ns_of(pid);
    if (auto io = sys::read_proc_file(fmt::format("/proc/{}/io", pid), 4096)) {
      std::istringstream in(*io);
      std::string key;
      uint64_t v = 0;
      while (in >> key >> v) {
        if (key == "rchar:") s.rchar = v;
        else if (key == "wchar:") s.wchar = v;
      }
      s.io = true;
    }
    out[pid] = s;
  }
  return out;
}

PipeGraph build_graph(const Scan& scan) {
  PipeGraph g;
  auto add_proc = [&](pid_t pid) {
    if (g.procs.count(pid)) return;
    auto c = scan.comms.find(pid);
    g.procs[pid] = GraphProc{pid, c == scan.comms.end() ? "?" : c->second};
  };
  for (const auto& [key, p] : scan.pipes) {
    GraphPipe gp;
    gp.key = key;
    gp.ino = p.ino;
    gp.fifo = p.fifo;
    gp.path = strip_deleted(p.path);
    gp.unlinked = p.fifo && gp.path != p.path;
    gp.capacity = p.capacity;
    gp.bytes = p.bytes;
    gp.states = states(p);
    std::set<pid_t> w, r;
    std::map<pid_t, int> fds_held, fd2_held;
    for (const Holder& h : p.fds) {
      if (h.fd < 0) gp.in_flight.emplace_back(h.pid, h.sock_fd);  // its socket's process takes it later
      ++fds_held[h.pid];
      if (h.fd == 2) ++fd2_held[h.pid];
      int acc = h.flags & O_ACCMODE;
      if (acc != O_RDONLY) w.insert(h.pid);
      if (acc != O_WRONLY) r.insert(h.pid);
      if (h.fd == 0 && acc != O_WRONLY) gp.stdin_of.insert(h.pid);
      if (h.fd == 1 && acc != O_RDONLY) gp.stdout_of.insert(h.pid);
    }
    for (const Stuck& s : p.stuck) {
      bool writing = s.dir == Blocked::writing, reading = s.dir == Blocked::reading;
      if (s.fd < 0 && s.dir == Blocked::none) writing = reading = true;  // open(O_RDWR) does not block; safe
      if (writing) w.insert(s.pid), gp.blocked_writers.insert(s.pid);
      if (reading) r.insert(s.pid), gp.blocked_readers.insert(s.pid);
    }
    for (const auto& [pid, n] : fd2_held)
      if (n == fds_held[pid]) gp.stderr_only.insert(pid);
    gp.writers.assign(w.begin(), w.end());
    gp.readers.assign(r.begin(), r.end());
    for (pid_t pid : w) add_proc(pid);
    for (pid_t pid : r) add_proc(pid);
    g.pipes.push_back(std::move(gp));
  }

  // Chains: pipe A continues into pipe B when A's readers are exactly B's writers, and that set of
  // processes either reads no other pipe and writes no other one (and B not as its stderr), or reads
  // A on fd 0 and writes B on fd 1 (a pipeline stage whose stderr is another pipe). Anything else is
  // a fork or a join: the pipes are drawn as separate chains that name the same processes.
  auto holds = [](const std::vector<pid_t>& v, pid_t pid) { return std::binary_search(v.begin(), v.end(), pid); };
  auto only_these = [&](const std::vector<pid_t>& set, size_t a, size_t b) {
    for (pid_t pid : set)
      for (size_t i = 0; i < g.pipes.size(); ++i)
        if ((holds(g.pipes[i].readers, pid) && i != a) || (holds(g.pipes[i].writers, pid) && i != b) ||
            g.pipes[b].stderr_only.count(pid))
          return false;
    return true;
  };
  auto stage = [&](const std::vector<pid_t>& set, size_t a, size_t b) {
    for (pid_t pid : set)
      if (!g.pipes[a].stdin_of.count(pid) || !g.pipes[b].stdout_of.count(pid) ||
          holds(g.pipes[a].writers, pid) || holds(g.pipes[b].readers, pid))
        return false;
    return true;
  };
  std::vector<std::optional<size_t>> next(g.pipes.size()), prev(g.pipes.size());
  for (size_t a = 0; a < g.pipes.size(); ++a) {
    const auto& rd = g.pipes[a].readers;
    if (rd.empty()) continue;
    for (size_t b = 0; b < g.pipes.size(); ++b) {
      if (b == a || prev[b] || g.pipes[b].writers != rd) continue;
      if (!only_these(rd, a, b) && !stage(rd, a, b)) continue;
      next[a] = b;
      prev[b] = a;
      break;
    }
  }
  std::vector<bool> done(g.pipes.size(), false);
  auto walk = [&](size_t start) {
    std::vector<size_t> chain;
    for (std::optional<size_t> i = start; i && !done[*i]; i = next[*i]) {
      done[*i] = true;
      chain.push_back(*i);
    }
    g.chains.push_back(std::move(chain));
  };
  for (size_t i = 0; i < g.pipes.size(); ++i)
    if (!prev[i]) walk(i);
  for (size_t i = 0; i < g.pipes.size(); ++i)  // what is left is a cycle: start anywhere
    if (!done[i]) walk(i);
  // In flow order of their first process, so that the output is stable.
  auto first_pid = [&](const std::vector<size_t>& c) {
    const GraphPipe& p = g.pipes[c.front()];
    return p.writers.empty() ? (p.readers.empty() ? 0 : p.readers.front()) : p.writers.front();
  };
  std::stable_sort(g.chains.begin(), g.chains.end(),
                   [&](const auto& a, const auto& b) { return first_pid(a) < first_pid(b); });
  return g;
}

std::set<pid_t> hint_candidates(const PipeGraph& g) {
  std::set<pid_t> out;
  for (const GraphPipe& p : g.pipes)
    if (!p.blocked_readers.empty() && p.bytes && *p.bytes == 0)
      for (pid_t w : p.writers)
        if (!p.blocked_writers.count(w) && !p.blocked_readers.count(w)) out.insert(w);
  return out;
}

void apply_samples(PipeGraph& g, const Samples& before, const Samples& after, double seconds) {
  for (auto& [pid, proc] : g.procs) {
    auto a = after.find(pid);
    if (a == after.end()) continue;
    proc.state = a->second.state;
    auto b = before.find(pid);
    if (b == before.end() || seconds <= 0 || !a->second.io || !b->second.io) continue;
    proc.read_rate = static_cast<double>(a->second.rchar - std::min(a->second.rchar, b->second.rchar)) / seconds;
    proc.write_rate = static_cast<double>(a->second.wchar - std::min(a->second.wchar, b->second.wchar)) / seconds;
  }
  g.hints.clear();
  for (const GraphPipe& p : g.pipes) {
    if (p.blocked_readers.empty() || !p.bytes || *p.bytes != 0) continue;
    for (pid_t w : p.writers) {
      if (p.blocked_writers.count(w) || p.blocked_readers.count(w)) continue;
      if (w == ::getpid()) continue;  // `pipecr ls --graph | less`: we are the busy writer, and we do not buffer
      auto a = after.find(w);
      auto b = before.find(w);
      if (a == after.end()) continue;
      bool running = a->second.state == 'R';
      bool cpu_moved = b != before.end() && a->second.cpu_ns > b->second.cpu_ns;
      if (!running && !cpu_moved) continue;  // idle (sleep 100 | cat): nothing to say
      // A writer whose wchar moved did write meanwhile (slowly, or elsewhere): not holding back.
      if (b != before.end() && a->second.io && b->second.io && a->second.wchar != b->second.wchar) continue;
      const GraphProc& wp = g.procs[w];
      pid_t r = *p.blocked_readers.begin();
      const GraphProc& rp = g.procs[r];
      g.hints.push_back(Hint{r, w, p.ino,
                             fmt::format("{}({}) waits on an empty pipe while its writer {}({}) is {}: {} probably "
                                         "buffers its output (stdio block-buffers a pipe). Make it line-buffered: "
                                         "stdbuf -oL {} ... (or its own option, e.g. python3 -u, grep "
                                         "--line-buffered)",
                                         printable(rp.comm), r, printable(wp.comm), w, running ? "running" : "busy", printable(wp.comm),
                                         printable(wp.comm))});
    }
  }
}

void sample_for_hints(PipeGraph& g) {
  std::set<pid_t> c = hint_candidates(g);
  if (c.empty()) return;
  Samples before = sample_procs(c);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  Samples after = sample_procs(c);
  apply_samples(g, before, after, 0);  // states and hints only: rates over 200 ms of a few pids say little
}

std::string render_text(const PipeGraph& g, const GraphStyle& st) {
  std::string out;
  bool marked = false;
  for (const auto& chain : g.chains) {
    const GraphPipe& first = g.pipes[chain.front()];
    std::string line = group(g, first.writers, first.blocked_writers, st);
    marked |= !first.blocked_writers.empty();
    for (size_t k = 0; k < chain.size(); ++k) {
      const GraphPipe& p = g.pipes[chain[k]];
      std::set<pid_t> blocked = p.blocked_readers;
      if (k + 1 < chain.size()) blocked = united(blocked, g.pipes[chain[k + 1]].blocked_writers);
      marked |= !blocked.empty();
      line += fmt::format(" -> {} -> {}", box(p, st), group(g, p.readers, blocked, st));
    }
    out += line + "\n";
  }
  for (const Hint& h : g.hints) out += paint(st, kCyan, "hint: " + h.text) + "\n";
  std::string summary = fmt::format("{} pipe(s) in {} chain(s)", g.pipes.size(), g.chains.size());
  if (marked) summary += "; ! = blocked in read(), write() or open() on the pipe beside it";
  out += summary + "\n";
  return out;
}

std::string render_dot(const PipeGraph& g) {
  std::string out = "digraph pipecr {\n  rankdir=LR;\n  node [fontname=\"monospace\"];\n";
  for (const auto& [pid, p] : g.procs)
    out += fmt::format("  p{} [shape=box, label=\"{}\\n{}\"];\n", pid, dot_escape(p.comm), pid);
  for (const GraphPipe& p : g.pipes) {
    std::string fill = fmt::format("{}/{}", p.bytes ? fmt::format("{}", *p.bytes) : "?",
                                   p.capacity ? fmt::format("{}", *p.capacity) : "?");
    std::string name = p.fifo ? dot_escape(p.path) : fmt::format("pipe:[{}]", p.ino);
    const char* color = has(p.states, "writer_blocked") ? "red"
                        : has(p.states, "reader_blocked") || has(p.states, "open_waiting") ? "orange"
                                                                                            : "black";
    out += fmt::format("  i{} [shape={}, color={}, label=\"{}\\n{}{}\"];\n", p.ino, p.fifo ? "note" : "ellipse",
                       color, name, fill, has(p.states, "full") ? " full" : has(p.states, "empty") ? " empty" : "");
    for (pid_t w : p.writers)
      out += fmt::format("  p{} -> i{}{};\n", w, p.ino,
                         p.blocked_writers.count(w) ? " [color=red, penwidth=2, label=\"blocked\"]" : "");
    for (pid_t r : p.readers)
      out += fmt::format("  i{} -> p{}{};\n", p.ino, r,
                         p.blocked_readers.count(r) ? " [color=orange, penwidth=2, label=\"blocked\"]" : "");
  }
  out += "}\n";
  return out;
}

nlohmann::json graph_json(const PipeGraph& g) {
  auto opt = [](const auto& v) { return v ? nlohmann::json(*v) : nlohmann::json(nullptr); };
  nlohmann::json procs = nlohmann::json::array();
  for (const auto& [pid, p] : g.procs)
    procs.push_back({{"pid", pid},
                     {"comm", p.comm},
                     {"state", p.state == '?' ? nlohmann::json(nullptr) : nlohmann::json(std::string(1, p.state))},
                     {"read_bytes_per_second", opt(p.read_rate)},
                     {"write_bytes_per_second", opt(p.write_rate)}});
  nlohmann::json pipes = nlohmann::json::array();
  for (const GraphPipe& p : g.pipes)
    pipes.push_back({{"inode", p.ino},
                     {"kind", p.fifo ? "fifo" : "pipe"},
                     {"path", p.fifo ? nlohmann::json(p.path) : nlohmann::json(nullptr)},
                     {"capacity", opt(p.capacity)},
                     {"bytes", opt(p.bytes)},
                     {"state", p.states},
                     {"writers", p.writers},
                     {"readers", p.readers},
                     {"blocked_writers", p.blocked_writers},
                     {"blocked_readers", p.blocked_readers},
                     {"shared", p.shared()},
                     {"in_flight", [&] {
                        nlohmann::json a = nlohmann::json::array();
                        for (const auto& [pid, sock] : p.in_flight) a.push_back({{"pid", pid}, {"socket_fd", sock}});
                        return a;
                      }()}});
  nlohmann::json chains = nlohmann::json::array();
  for (const auto& c : g.chains) {
    nlohmann::json inodes = nlohmann::json::array();
    for (size_t i : c) inodes.push_back(g.pipes[i].ino);
    chains.push_back(std::move(inodes));
  }
  nlohmann::json hints = nlohmann::json::array();
  for (const Hint& h : g.hints)
    hints.push_back({{"kind", "stdio_buffering"}, {"inode", h.ino}, {"reader", h.reader}, {"writer", h.writer},
                     {"text", h.text}});
  return {{"processes", std::move(procs)}, {"pipes", std::move(pipes)}, {"chains", std::move(chains)},
          {"hints", std::move(hints)}};
}

}  // namespace pipecr::cli
