// cmd_restore.cpp: `pipecr restore IMAGE --into TARGET[=RECORDED]... [--exec RECORDED -- COMMAND [ARG...]]`:
// put the pipes of an image back into running processes (ptrace) and/or a new command (exec).
//
// The image (a file, or `-` for stdin) is spooled into a private file and mapped
// (image::MappedFile), then parsed and validated against this machine (image::validate(): page size,
// capacities, paths, modes, references) before anything else happens: a bad image is exit 65 with
// nothing touched. The queued bytes stream from the mapping into the new pipes.
// Everything is prepared before any target is stopped and the install is all-or-nothing
// (restore/process.hpp, docs/restore.md). Ends that no restored process holds are dropped: one
// "note:" line each on stderr, not an error, printed only when the restore succeeded (the library
// hands notes over only then), so a failure is its one error line. With --exec nothing is printed
// on stdout (it belongs to the command); without it, one summary line. Exit codes as for every
// command (exit_codes.hpp); an exec that fails after the targets were restored exits 71.
#include <charconv>
#include <memory>
#include <vector>

#include <fmt/format.h>

#include "cli/command.hpp"
#include "cli/describe.hpp"
#include "image/image_io.hpp"
#include "image/validate.hpp"
#include "restore/process.hpp"
#include "sys/ptrace.hpp"

namespace pipecr::cli {
namespace {

struct Options {
  std::string image;
  std::vector<std::string> into;
  std::string exec;  // RECORDED, "" when no --exec
  std::vector<std::string> command;
  bool create_fifos = false;
  bool allow_smaller_capacity = false;
  bool no_vmsplice = false;
  double timeout = 10;  // --timeout SECONDS
  bool replace = false;
  bool outside_fifo_holders = false;
  bool verbose = false;
};

// --timeout SECONDS: the bound on every wait for a target (sys::set_wait_timeout).
Expected<void> apply_timeout(double seconds) {
  if (!(seconds > 0) || seconds > 86400)
    return fail(Errc::invalid_argument, EINVAL, fmt::format("--timeout {}: give seconds, more than 0 and at most 86400", seconds));
  sys::set_wait_timeout(std::chrono::milliseconds(static_cast<long long>(seconds * 1000 + 0.5)));
  return {};
}

Expected<int32_t> parse_pid(std::string_view s, std::string_view what) {
  int32_t v = 0;
  auto r = std::from_chars(s.data(), s.data() + s.size(), v);
  if (r.ec != std::errc() || r.ptr != s.data() + s.size() || v < 0)
    return fail(Errc::invalid_argument, EINVAL, fmt::format("{} '{}' is not a pid", what, s));
  return v;
}

Expected<restore::IntoSpec> parse_into(const std::string& s) {
  restore::IntoSpec spec;
  size_t eq = s.find('=');
  auto target = parse_pid(std::string_view(s).substr(0, eq), "--into TARGET");
  if (!target) return tl::unexpected(target.error());
  if (*target == 0) return fail(Errc::invalid_argument, EINVAL, "--into 0: not a pid");
  spec.target = *target;
  if (eq != std::string::npos) {
    auto rec = parse_pid(std::string_view(s).substr(eq + 1), "--into =RECORDED");
    if (!rec) return tl::unexpected(rec.error());
    spec.recorded = *rec;
  }
  return spec;
}

Expected<restore::ProcessRestoreRequest> make_request(const Options& o) {
  restore::ProcessRestoreRequest req;
  for (const std::string& s : o.into) {
    auto spec = parse_into(s);
    if (!spec) return tl::unexpected(spec.error());
    req.into.push_back(*spec);
  }
  if (!o.exec.empty()) {
    auto rec = parse_pid(o.exec, "--exec RECORDED");
    if (!rec) return tl::unexpected(rec.error());
    if (o.command.empty()) return fail(Errc::invalid_argument, EINVAL, "--exec needs a command: --exec RECORDED -- COMMAND [ARG...]");
    req.exec = restore::ExecSpec{*rec, o.command};
  } else if (!o.command.empty()) {
    return fail(Errc::invalid_argument, EINVAL, fmt::format("'{}': a command needs --exec RECORDED", o.command.front()));
  }
  if (req.into.empty() && !req.exec) return fail(Errc::invalid_argument, EINVAL, "give --into TARGET[=RECORDED] or --exec RECORDED");
  return req;
}

Expected<int> run(const Options& o, CommandContext& ctx) {
  if (auto ok = apply_timeout(o.timeout); !ok) return tl::unexpected(ok.error());
  auto req = make_request(o);
  if (!req) return tl::unexpected(req.error());
  auto file = image::MappedFile::open(o.image);
  if (!file) return tl::unexpected(file.error());
  const std::string name = o.image == "-" ? std::string("stdin") : fmt::format("\"{}\"", o.image);
  auto img = image::parse(file->bytes());
  if (!img) return tl::unexpected(Error{img.error().kind, img.error().err, fmt::format("{}: {}", name, img.error().what)});
  if (auto ok = image::validate(*img); !ok)
    return tl::unexpected(Error{ok.error().kind, ok.error().err,
                                fmt::format("{}: cannot be restored here: {}", name, ok.error().what)});
  restore::ProcessRestoreOptions opts;
  opts.refill.allow_smaller_capacity = o.allow_smaller_capacity;
  opts.refill.no_vmsplice = o.no_vmsplice;
  opts.create_fifos = o.create_fifos;
  opts.replace = o.replace;
  opts.allow_outside_fifo_holders = o.outside_fifo_holders;
  opts.note = [&ctx](const std::string& n) {
    fmt::print(ctx.err, "pipecr {}: note: {}\n", ctx.name, printable(n));
    std::fflush(ctx.err);
  };
  std::fflush(ctx.out);  // nothing buffered may reach the command after exec
  auto sum = restore::restore_processes(*img, *req, opts);
  if (!sum) return tl::unexpected(sum.error());
  if (o.verbose)
    for (const restore::PipeOutcome& p : sum->outcomes) {
      if (p.in_place)
        fmt::print(ctx.err, "pipecr {}: pipe {} ({}): refilled in place ({} fd{} kept)\n", ctx.name, p.pipe_id,
                   printable(p.name), p.kept, p.kept == 1 ? "" : "s");
      else
        fmt::print(ctx.err, "pipecr {}: pipe {} ({}): replaced: {}\n", ctx.name, p.pipe_id, printable(p.name),
                   printable(p.why));
    }
  if (o.verbose)
    for (pid_t pid : sum->register_block_return)
      fmt::print(ctx.err,
                 "pipecr {}: pid {}: no `syscall; ret` or rt_sigreturn restorer in its code: its agent used the "
                 "fallback return (register block, removed by a remote munmap)\n",
                 ctx.name, pid);
  if (o.verbose)
    for (const std::string& line : sum->fd_table_growth) fmt::print(ctx.err, "pipecr {}: {}\n", ctx.name, printable(line));
  const size_t replaced = sum->pipes - sum->in_place;
  fmt::print(ctx.out, "restored {} pipe{} ({} in place, {} replaced; {} open file{}, {} fd{}) into {} process{}\n",
             sum->pipes, sum->pipes == 1 ? "" : "s", sum->in_place, replaced, sum->files, sum->files == 1 ? "" : "s",
             sum->fds, sum->fds == 1 ? "" : "s", req->into.size(), req->into.size() == 1 ? "" : "es");
  return kExitOk;
}

RunFn setup(CLI::App& app, CommandContext& ctx) {
  auto o = std::make_shared<Options>();
  app.add_option("image", o->image, "the image file, or - to read it from stdin")->required();
  app.add_option("--into", o->into, "TARGET[=RECORDED]: give the running process TARGET the fds of recorded process "
                                     "RECORDED (may be left out when the image records one process); repeatable")
      ->type_name("TARGET[=RECORDED]");
  app.add_option("--exec", o->exec, "RECORDED: exec the command after -- with the fds of recorded process RECORDED")
      ->type_name("RECORDED");
  app.add_option("command", o->command, "-- COMMAND [ARG...] for --exec");
  app.add_flag("--create-fifos", o->create_fifos, "create (mkfifo, recorded mode) a recorded FIFO path that is missing");
  app.add_flag("--allow-smaller-capacity", o->allow_smaller_capacity,
               "accept the largest capacity this kernel allows when the recorded one is refused");
  app.add_flag("--no-vmsplice", o->no_vmsplice, "refill without vmsplice() (splice from a memfd, or write())");
  app.add_option("--timeout", o->timeout,
                 "SECONDS: the longest wait for a target to stop or its agent to answer (default 10); then "
                 "every target is rolled back");
  app.add_flag("--replace", o->replace,
               "put a new pipe at the recorded fds even where the targets still hold the recorded pipe "
               "(default: such a pipe is emptied and refilled in place, keeping epoll watches and every other link)");
  app.add_flag("--allow-outside-fifo-holders", o->outside_fifo_holders,
               "restore a FIFO even when processes outside the restore have it open (they share the restored "
               "FIFO: they may read its bytes); refused without it");
  app.add_flag("-v,--verbose", o->verbose, "say for each pipe whether it was refilled in place or replaced, and why");
  return [o, &ctx]() -> Expected<int> { return run(*o, ctx); };
}

const Registrar kRestore{"restore", "put the pipes of an image back into running processes (--into) or a new command (--exec)",
                         50, setup};

}  // namespace
}  // namespace pipecr::cli
