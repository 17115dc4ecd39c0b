// main.cpp: `pipecr`: parse, run one subcommand, map its failure to one line and an exit code.
//
// Subcommands register themselves (command.hpp); main() knows none of them by name. CLI11 parse
// errors exit 64 (EX_USAGE), not CLI11's own codes, so that scripts can tell a typo from a
// failure, and are one stderr line too, in plain words ("pipecr dump: unknown option '--bogus'
// (see pipecr dump --help)"; usage_problem()). Any pipecr::Error becomes exactly one stderr line,
// "pipecr <cmd>: <what>", and the exit code of its kind (exit_codes.hpp).
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <exception>
#include <memory>
#include <regex>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

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

// `-t,--target` as "-t/--target", a positional `image` as "IMAGE".
std::string option_name(const CLI::Option& opt) {
  if (!opt.nonpositional()) {
    std::string n = opt.get_name();
    std::transform(n.begin(), n.end(), n.begin(), [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
    return n;
  }
  std::string n = opt.get_name(false, true);
  std::replace(n.begin(), n.end(), ',', '/');
  return n;
}

// What is wrong with the command line, in one line of plain words, from CLI11's error and what it
// left unparsed. `where` is the subcommand that was parsed, or the app.
std::string usage_problem(const CLI::App& app, const CLI::App& where, const CLI::ParseError& e,
                          const std::vector<std::string>& commands) {
  std::smatch m;
  const std::string what = e.what();
  const bool extras = dynamic_cast<const CLI::ExtrasError*>(&e) != nullptr;
  if (&where == &app && !extras) {
    // No subcommand: CLI11 says "A subcommand is required" whatever the words were; name the first.
    std::vector<std::string> left = app.remaining();
    const std::string list = fmt::format("{}", fmt::join(commands, ", "));
    if (left.empty()) return fmt::format("give a command: {}", list);
    if (left.front().size() > 1 && left.front().front() == '-')
      return fmt::format("unknown option '{}'; give a command first: {}", left.front(), list);
    return fmt::format("unknown command '{}'; the commands are {}", left.front(), list);
  }
  if (extras) {
    std::vector<std::string> left = where.remaining();
    for (const std::string& a : left)
      if (a.size() > 1 && a.front() == '-') return fmt::format("unknown option '{}'", a);
    if (!left.empty()) return fmt::format("unexpected argument '{}'", left.front());
  }
  if (dynamic_cast<const CLI::RequiredError*>(&e) != nullptr)
    for (const CLI::Option* opt : where.get_options())
      if (opt->get_required() && opt->count() == 0)
        return opt->nonpositional() ? fmt::format("{} is required", option_name(*opt))
                                    : fmt::format("{} is missing", option_name(*opt));
  static const std::regex convert(R"(^Could not convert: (\S+) = (.*)$)");
  if (std::regex_match(what, m, convert)) return fmt::format("{}: '{}' is not a valid number", m[1].str(), m[2].str());
  static const std::regex needs(R"(^(\S+): \d+ required (\S+) missing$)");
  if (std::regex_match(what, m, needs)) return fmt::format("{} needs a value ({})", m[1].str(), m[2].str());
  return what;
}

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
    std::vector<std::string> commands;
    for (const Bound& b : bound) {
      commands.push_back(b.app->get_name());
      if (b.app->parsed()) where = b.app;
    }
    // An unknown option before the command (`pipecr --bogus ls`) is pipecr's, not the command's.
    if (dynamic_cast<const CLI::ExtrasError*>(&e) != nullptr && where->remaining().empty()) where = &app;
    std::string name = where == &app ? "pipecr" : fmt::format("pipecr {}", where->get_name());
    fmt::print(stderr, "{}: {} (see {} --help)\n", name, printable(usage_problem(app, *where, e, commands)), name);
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
