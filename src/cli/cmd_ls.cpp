// cmd_ls.cpp: `pipecr ls [-t PID ...] [--json] [--graph | --dot] [--watch [SECONDS]]`: every live
// pipe and FIFO, who holds each end, how full it is, and who is stuck on it.
//
// What a person runs to see which stage of a stuck pipeline is full or starved. The scan (how the
// facts are read without stopping anyone) is pipe_scan.hpp; this file prints it as a table or
// JSON, and hands it to ls_graph.hpp for --graph / --dot and to ls_watch.hpp for --watch.
#include <fcntl.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <optional>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/command.hpp"
#include "cli/describe.hpp"
#include "cli/ls_graph.hpp"
#include "cli/ls_watch.hpp"
#include "cli/pipe_scan.hpp"

namespace pipecr::cli {
namespace {

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
    who.push_back(h.fd < 0 ? fmt::format("{} sock:{} (in flight)", h.pid, h.sock_fd) : fmt::format("{}:{}", h.pid, h.fd));
    auto c = scan.comms.find(h.pid);
    std::string comm = c == scan.comms.end() ? "?" : printable(c->second);
    if (std::find(comms.begin(), comms.end(), comm) == comms.end()) comms.push_back(comm);
    for (const Stuck& s : p.stuck)
      if (s.pid == h.pid && s.fd == h.fd)
        notes.push_back(fmt::format("BLOCKED in {}() tid {}", s.call, s.tid));
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
        holders.push_back({{"pid", h.pid},
                           {"fd", h.fd < 0 ? nlohmann::json(nullptr) : nlohmann::json(h.fd)},
                           {"comm", comm(h.pid)},
                           {"cloexec", (h.flags & O_CLOEXEC) != 0},
                           {"in_flight", h.fd >= 0 ? nlohmann::json(nullptr)
                                                   : nlohmann::json{{"socket_fd", h.sock_fd}, {"message", h.message}}}});
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
                         {"fd", s.fd < 0 ? nlohmann::json(nullptr) : nlohmann::json(s.fd)}, {"call", s.call}, {"wchan", s.wchan}});
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
  bool graph = false;
  bool dot = false;
  std::optional<double> watch;
  int count = 0;
  bool in_flight = false;
};

RunFn setup(CLI::App& app, CommandContext& ctx) {
  auto o = std::make_shared<Options>();
  app.add_option("-t,--target", o->pids, "only these processes (repeatable); default: every process");
  app.add_flag("--json", o->json, "print JSON (see docs/json.md); with --watch, one document per line and frame");
  auto* graph = app.add_flag("--graph", o->graph, "draw pipelines as chains: writer -> [fill] -> reader -> ...");
  auto* dot = app.add_flag("--dot", o->dot, "write the pipelines as a Graphviz digraph (dot -Tpng)");
  dot->excludes(graph);
  auto* watch = app.add_option("--watch", o->watch, "redraw every SECONDS (default 2) with bytes per second; "
                                                     "Ctrl-C stops")
                    ->expected(0, 1)
                    ->default_str("2");
  watch->excludes(dot);
  app.add_option("-n,--count", o->count, "with --watch: stop after this many frames")->needs(watch);
  app.add_flag("--in-flight", o->in_flight,
               "also show pipe ends in flight in unix sockets (sent with SCM_RIGHTS, not received yet): peeks "
               "each socket's queue, moving its SO_PEEK_OFF for the walk and back; sockets whose peek offset is in "
               "use are skipped")
      ->excludes(watch);
  return [o, &ctx]() -> Expected<int> {
    for (pid_t pid : o->pids)
      if (pid <= 0) return fail(Errc::invalid_argument, EINVAL, fmt::format("--target {}: not a process id", pid));
    if (o->dot && o->json) return fail(Errc::invalid_argument, EINVAL, "--dot and --json: choose one output format");
    if (o->count < 0) return fail(Errc::invalid_argument, EINVAL, fmt::format("--count {}: not a number of frames", o->count));
    GraphStyle style = graph_style_for(ctx.out_is_tty);
    if (o->watch) {
      double secs = *o->watch;
      if (!(secs >= 0.1 && secs <= 86400))
        return fail(Errc::invalid_argument, EINVAL, fmt::format("--watch {}: give SECONDS between 0.1 and 86400", secs));
      WatchOptions w{o->pids, secs, o->count, o->json, style};
      return watch_pipes(w, ctx);
    }
    auto scan = scan_system(o->pids, o->in_flight);
    if (!scan) return tl::unexpected(scan.error());
    if (o->dot || o->graph) {
      PipeGraph g = build_graph(*scan);
      sample_for_hints(g);
      if (o->dot) fmt::print(ctx.out, "{}", render_dot(g));
      else if (o->json) fmt::print(ctx.out, "{}\n", graph_json(g).dump(2));
      else fmt::print(ctx.out, "{}", render_text(g, style));
      return kExitOk;
    }
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
