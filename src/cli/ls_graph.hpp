// ls_graph.hpp: `pipecr ls --graph` / `--dot`: the pipes of a scan (pipe_scan.hpp) as the
// pipelines they form, e.g.
//
//   seq(1234) -> [65536/65536 full, WRITER BLOCKED] -> gzip(1235)! -> [0/65536 empty] -> cat(1236)
//
// Processes are joined by the pipes between them: the processes holding a pipe's write end (or a
// read-write end) on the left, those holding its read end on the right. Two pipes chain through a
// process (or a set of processes sharing both ends, shown {a(1),b(2)}) that is the only reader of
// the first and the only writer of the second, either outright or as a shell pipeline stage does
// (stdin from the first, stdout to the second: its stderr may go to a third pipe). A process blocked in read()/write() on the pipe
// next to it, or in open() of a FIFO, is marked "!"; the pipe's box says which side is blocked.
//
// The stdio hint: a reader blocked on an empty pipe whose writer is not blocked on it but runs
// (state R, or CPU time moving between two samples) and wrote nothing meanwhile (wchar of
// /proc/PID/io unchanged) is most likely waiting for a writer that block-buffers its output
// (stdio does when stdout is a pipe): say so, and suggest stdbuf -oL.
#pragma once

#include <sys/types.h>

#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/pipe_scan.hpp"

namespace pipecr::cli {

struct GraphStyle {
  bool color = false;  // ANSI colours: only on a terminal, never with NO_COLOR set
};
// Colour iff stdout is a terminal and NO_COLOR is unset or empty (no-color.org).
[[nodiscard]] GraphStyle graph_style_for(bool out_is_tty);

// What /proc says about one process, for rates and the stdio hint.
struct ProcSample {
  uint64_t cpu_ns = 0;             // sum over threads of /proc/PID/task/TID/schedstat, field 1
  uint64_t rchar = 0, wchar = 0;   // /proc/PID/io
  bool io = false;                 // /proc/PID/io was readable
  char state = '?';                // /proc/PID/stat
};
using Samples = std::map<pid_t, ProcSample>;
[[nodiscard]] Samples sample_procs(const std::set<pid_t>& pids);

struct GraphProc {
  pid_t pid = 0;
  std::string comm;
  char state = '?';
  std::optional<double> read_rate, write_rate;  // bytes per second, from two samples of /proc/PID/io
};

struct GraphPipe {
  PipeKey key;
  ino_t ino = 0;
  bool fifo = false;
  std::string path;  // FIFOs: the path without " (deleted)"
  bool unlinked = false;
  std::optional<int> capacity, bytes;
  std::vector<std::string> states;  // as states() in pipe_scan.hpp
  std::vector<pid_t> writers, readers;             // distinct pids, ascending; a rw end counts as both
  std::set<pid_t> blocked_writers, blocked_readers;  // in write()/read() on it, or in open() of the FIFO
  std::set<pid_t> stdin_of, stdout_of;  // processes holding its read end at fd 0, its write end at fd 1
  std::set<pid_t> stderr_only;          // processes holding it at fd 2 and no other fd: not data flow
  std::vector<std::pair<pid_t, int>> in_flight;  // ends in flight: (process, socket fd) (ls --in-flight)
  [[nodiscard]] bool shared() const { return writers.size() > 1 || readers.size() > 1; }
};

struct Hint {
  pid_t reader = 0, writer = 0;
  ino_t ino = 0;
  std::string text;
};

struct PipeGraph {
  std::map<pid_t, GraphProc> procs;
  std::vector<GraphPipe> pipes;
  std::vector<std::vector<size_t>> chains;  // indices into pipes, in the order data flows
  std::vector<Hint> hints;
};

[[nodiscard]] PipeGraph build_graph(const Scan& scan);

// The writers the stdio hint may concern: writers of empty pipes whose reader is blocked.
[[nodiscard]] std::set<pid_t> hint_candidates(const PipeGraph& g);
// Fills in process states, rates (when before is not empty and seconds > 0) and hints from two
// samples taken `seconds` apart.
void apply_samples(PipeGraph& g, const Samples& before, const Samples& after, double seconds);
// One-shot: samples the hint candidates twice, 200 ms apart (no sampling if there are none).
void sample_for_hints(PipeGraph& g);

[[nodiscard]] std::string render_text(const PipeGraph& g, const GraphStyle& style);
[[nodiscard]] std::string render_dot(const PipeGraph& g);
[[nodiscard]] nlohmann::json graph_json(const PipeGraph& g);

// "1.5M/s" style rate, binary units.
[[nodiscard]] std::string human_rate(double bytes_per_second);

}  // namespace pipecr::cli
