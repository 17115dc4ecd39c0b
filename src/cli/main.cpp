// main.cpp: `pipecr`: parse, run one subcommand, map its failure to one line and an exit code.
//
// Subcommands register themselves (command.hpp); main() knows none of them by name. CLI11 parse
// errors exit 64 (EX_USAGE), not CLI11's own codes, so that scripts can tell a typo from a
// failure. Any pipecr::Error becomes exactly one stderr line, "pipecr <cmd>: <what>", and the exit
// code of its kind (exit_codes.hpp).
#include <unistd.h>

#include <algorithm>
#include <exception>
#include <memory>

#include <fmt/format.h>

#include "cli/command.hpp"
#include "cli/describe.hpp"
#include "cli/man_text.hpp"
#include "pipecr/image.hpp"

// The project version (CMakeLists.txt project(VERSION)); a compile definition may override it.
#ifndef PIPECR_VERSION_STRING
#define PIPECR_VERSION_STRING "0.1.0"
#endif

namespace pipecr::cli {

std::vector<CommandSpec>& registry() {
  static std::vector<CommandSpec> commands;
  return commands;
}

namespace {

struct Bound {
  CLI::App* app = nullptr;
  std::unique_ptr<CommandContext> ctx;
  RunFn run;
};

int run(int argc, char** argv) {
  CLI::App app{"pipecr: checkpoint, restore and inspect Linux pipes and FIFOs", "pipecr"};
  app.require_subcommand(1, 1);
  app.footer(exit_codes_help());
  app.set_version_flag("--version", fmt::format("pipecr {}\nimage format: reads version {}, writes version {}",
                                                 PIPECR_VERSION_STRING, kFormatVersion, kFormatVersion));

  std::vector<CommandSpec> specs = registry();
  std::stable_sort(specs.begin(), specs.end(), [](auto& a, auto& b) { return a.order < b.order; });
  std::vector<Bound> bound;
  bool tty = ::isatty(STDOUT_FILENO) == 1;
  for (const CommandSpec& spec : specs) {
    Bound b;
    b.app = app.add_subcommand(spec.name, spec.description);
    // What the command does, from pipecr(1) (one source for the page and --help), then the exit codes.
    if (std::string about = man_description(spec.name); !about.empty())
      b.app->footer(about + "\n" + exit_codes_help());
    b.ctx = std::make_unique<CommandContext>(CommandContext{spec.name, stdout, stderr, tty});
    b.run = spec.setup(*b.app, *b.ctx);
    bound.push_back(std::move(b));
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    const CLI::App* where = &app;
    for (const Bound& b : bound)
      if (b.app->parsed()) where = b.app;
    std::string name = where == &app ? "pipecr" : fmt::format("pipecr {}", where->get_name());
    fmt::print(stderr, "{}: {}\nRun '{} --help' for usage.\n", name, printable(e.what()), name);
    return kExitUsage;
  }

  for (Bound& b : bound) {
    if (!b.app->parsed()) continue;
    try {
      Expected<int> r = b.run();
      if (!r) {
        std::fflush(stdout);
        // The one place errors are printed: control characters in what (paths, names from an image
        // or from /proc) are escaped, so the line stays one line and reaches no terminal raw.
        fmt::print(stderr, "pipecr {}: {}\n", b.ctx->name, printable(r.error().what));
        return exit_code_for(r.error());
      }
      return *r;
    } catch (const std::exception& e) {
      fmt::print(stderr, "pipecr {}: internal error: {}\n", b.ctx->name, printable(e.what()));
      return kExitSystem;
    }
  }
  return kExitUsage;  // unreachable: require_subcommand(1)
}

}  // namespace
}  // namespace pipecr::cli

int main(int argc, char** argv) { return pipecr::cli::run(argc, argv); }
