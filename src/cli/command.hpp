// command.hpp: how a `pipecr` subcommand plugs into the CLI.
//
// Each subcommand lives in its own file, src/cli/cmd_<name>.cpp, and registers itself with a static
// Registrar. The CLI is an executable (not a library), so every object file is linked and every
// registrar runs before main(). main() creates one CLI11 subcommand per registration, calls its
// setup function (which declares the options and returns the run callback), parses, and runs the
// callback of the subcommand the user chose.
//
// A run callback returns an exit code (see exit_codes.hpp), or a pipecr::Error that main() prints
// as ONE line "pipecr <cmd>: <what>" and maps to an exit code with exit_code_for(). Commands print
// their results to stdout and never call exit().
//
// A new subcommand, complete:
//
//   // cmd_frob.cpp: `pipecr frob FILE`: what it does, in one paragraph.
//   #include "cli/command.hpp"
//   namespace pipecr::cli {
//   namespace {
//   RunFn setup(CLI::App& app, CommandContext& ctx) {
//     auto file = std::make_shared<std::string>();   // options outlive setup(): hold them in the closure
//     app.add_option("file", *file, "the image")->required();
//     return [file, &ctx]() -> Expected<int> {
//       auto r = do_frob(*file);
//       if (!r) return tl::unexpected(r.error());   // main prints "pipecr frob: <what>", exits by kind
//       fmt::print(ctx.out, "ok\n");
//       return kExitOk;
//     };
//   }
//   const Registrar kFrob{"frob", "one line for the command list", 35, setup};
//   }  // namespace
//   }  // namespace pipecr::cli
#pragma once

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli/exit_codes.hpp"
#include "pipecr/error.hpp"

namespace pipecr::cli {

// What main() hands every subcommand.
struct CommandContext {
  std::string name;               // the subcommand's name, for messages
  std::FILE* out = stdout;        // results
  std::FILE* err = stderr;        // warnings (errors go through the returned Error instead)
  bool out_is_tty = false;        // isatty(stdout): choose human or raw output
};

// The run callback: an exit code, or an Error for main() to print and map.
using RunFn = std::function<Expected<int>()>;
// Declares options on app (already named and described) and returns the run callback.
using SetupFn = RunFn (*)(CLI::App& app, CommandContext& ctx);

struct CommandSpec {
  std::string name;
  std::string description;
  int order = 50;  // position in `pipecr --help`: ls 10, peek 20, dump 30, show 40, restore 50, check 90
  SetupFn setup = nullptr;
};

// Every registered subcommand (registration order is link order: main() sorts by `order`).
[[nodiscard]] std::vector<CommandSpec>& registry();

struct Registrar {
  Registrar(const char* name, const char* description, int order, SetupFn setup) {
    registry().push_back(CommandSpec{name, description, order, setup});
  }
};

}  // namespace pipecr::cli
