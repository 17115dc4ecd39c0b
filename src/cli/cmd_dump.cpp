// cmd_dump.cpp: `pipecr dump -t PID [-t PID ...] [--tree] -o IMAGE|- [--json] [--leave-stopped]`.
//
// Raises the soft RLIMIT_NOFILE to the hard one first: the dump holds one scratch pipe per
// non-empty pipe until the image is written. `-o FILE` writes a regular file atomically
// (dump/image_file.cpp refuses devices, FIFOs and links to them); `-o -` streams the image to stdout
// (refused when stdout is a terminal), for `pipecr dump -t P -o - | pipecr restore - --into Q` or
// through ssh. With `-o -`, --json goes to stderr, since stdout carries the image.
#include <sys/resource.h>
#include <unistd.h>

#include <memory>
#include <vector>

#include <fmt/format.h>

#include "cli/command.hpp"
#include "cli/image_json.hpp"
#include "dump/process.hpp"
#include "image/image_io.hpp"
#include "sys/ptrace.hpp"

namespace pipecr::cli {
namespace {

struct Options {
  std::vector<pid_t> pids;
  bool tree = false;
  bool leave_stopped = false;
  bool outside_holders = false;
  bool json = false;
  bool verbose = false;
  std::string output;
  double timeout = 10;  // --timeout SECONDS
};

// --timeout SECONDS: the bound on every wait for a target (sys::set_wait_timeout).
Expected<void> apply_timeout(double seconds) {
  if (!(seconds > 0) || seconds > 86400)
    return fail(Errc::invalid_argument, EINVAL, fmt::format("--timeout {}: give seconds, more than 0 and at most 86400", seconds));
  sys::set_wait_timeout(std::chrono::milliseconds(static_cast<long long>(seconds * 1000 + 0.5)));
  return {};
}

void raise_nofile() {
  rlimit rl {};
  if (::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &rl);
  }
}

Expected<int> run_dump(const Options& o, CommandContext& ctx) {
  raise_nofile();
  if (auto ok = apply_timeout(o.timeout); !ok) return tl::unexpected(ok.error());
  dump::DumpOptions opts{
      .pids = o.pids, .tree = o.tree, .leave_stopped = o.leave_stopped, .outside_holders = o.outside_holders};
  Image records;
  Expected<dump::DumpStats> stats;
  const bool to_stdout = o.output == "-";
  if (to_stdout) {
    if (::isatty(STDOUT_FILENO))
      return fail(Errc::invalid_argument, EINVAL, "-o -: stdout is a terminal; pipe it or redirect it to a file");
    std::fflush(ctx.out);
    image::FdSink sink(STDOUT_FILENO, "stdout");
    stats = dump::dump_processes(opts, sink, &records);
    if (stats)
      if (auto f = sink.flush(); !f) return tl::unexpected(f.error());
  } else {
    stats = dump::dump_to_file(opts, o.output, &records);
  }
  if (!stats) return tl::unexpected(stats.error());
  if (o.json) write_image_json(to_stdout ? ctx.err : ctx.out, records);
  if (o.verbose)
    fmt::print(ctx.err,
               "pipecr dump: {} processes, {} pipes, {} open files, {} fds, {} ends in flight, {} bytes; stopped for "
               "{:.3f} ms\n",
               records.processes.size(), stats->pipes, stats->files, stats->fds, stats->in_flight, stats->bytes,
               static_cast<double>(stats->stopped_ns) / 1e6);
  if (o.verbose) {
    const auto ms = [](uint64_t ns) { return static_cast<double>(ns) / 1e6; };
    fmt::print(ctx.err,
               "pipecr dump: {} fd tables: {} read by an agent in the target, {} listed (few fds in many slots), "
               "the rest slot by slot; {:.3f} ms before the stop, {:.3f} ms after it, {:.3f} ms writing\n",
               stats->tables, stats->agents, stats->listed_tables, ms(stats->before_stop_ns),
               ms(stats->after_resume_ns), ms(stats->write_ns));
  }
  if (stats->other_in_flight > 0)
    fmt::print(ctx.err, "pipecr dump: note: {} files in flight in unix sockets are not pipes or FIFOs: not recorded\n",
               stats->other_in_flight);
  for (const std::string& n : stats->notes) fmt::print(ctx.err, "pipecr dump: note: {}\n", n);
  if (o.verbose && stats->epolls > 0)
    fmt::print(ctx.err,
               "pipecr dump: {} epoll instances: {} watches on pipe ends recorded, {} not attributable, {} on "
               "other files\n",
               stats->epolls, stats->epoll_watches, stats->epoll_unattributed, stats->epoll_other);
  return kExitOk;
}

RunFn setup(CLI::App& app, CommandContext& ctx) {
  auto o = std::make_shared<Options>();
  app.add_option("-t,--target", o->pids, "a process to dump (repeat for more)")->required();
  app.add_flag("--tree", o->tree, "also dump every descendant of the given processes");
  app.add_flag("--outside-holders", o->outside_holders,
               "mark pipes that processes outside the image hold too (reads every process's fd table: slow "
               "on a busy machine)");
  app.add_option("-o,--output", o->output,
                 "the image file to write (a regular file, atomically, mode 0600), or - for stdout")
      ->required();
  app.add_flag("--json", o->json, "print the records written, as `pipecr show --json` would");
  app.add_flag("--leave-stopped", o->leave_stopped,
               "leave the processes in a group stop (SIGCONT resumes them) instead of resuming them");
  app.add_flag("-v,--verbose", o->verbose,
               "say how much was dumped, how long the processes stood stopped, how each fd table was read, and "
               "how long the dump took before the stop, after it and writing");
  app.add_option("--timeout", o->timeout,
                 "SECONDS: the longest wait for a target to stop (default 10); then the dump fails and every "
                 "target is resumed");
  return [o, &ctx]() -> Expected<int> { return run_dump(*o, ctx); };
}

const Registrar kDump{"dump", "checkpoint every pipe and FIFO held by running processes into an image", 30, setup};

}  // namespace
}  // namespace pipecr::cli
