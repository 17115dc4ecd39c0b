// cmd_check.cpp: `pipecr check [--json]`: what this kernel and this caller can do.
//
// Prints every probe of sys::kernel_features() with ok/missing, what was seen, and how to fix it,
// marking the ones dump or restore cannot work without. Exits 0 only when everything dump and
// restore need is present, else 69 (EX_UNAVAILABLE).
#include <memory>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/command.hpp"
#include "sys/features.hpp"

namespace pipecr::cli {
namespace {

const char* needed_by(const sys::Feature& f) {
  if (f.dump_needs && f.restore_needs) return "dump+restore";
  if (f.dump_needs) return "dump";
  if (f.restore_needs) return "restore";
  return "optional";
}

void print_table(std::FILE* out, const sys::KernelFeatures& k) {
  fmt::print(out, "{:<24} {:<8} {:<13} {}\n", "FEATURE", "STATUS", "NEEDED BY", "DETAIL");
  for (const sys::Feature& f : k.report) {
    fmt::print(out, "{:<24} {:<8} {:<13} {}\n", f.name, f.ok ? "ok" : "MISSING", needed_by(f), f.detail);
    if (!f.ok && !f.fix.empty()) fmt::print(out, "{:<24} {:<8} {:<13} fix: {}\n", "", "", "", f.fix);
  }
  fmt::print(out, "\ndump:    {}\nrestore: {}\n", k.dump_ready() ? "ready" : "NOT READY (see MISSING above)",
             k.restore_ready() ? "ready" : "NOT READY (see MISSING above)");
}

nlohmann::json to_json(const sys::KernelFeatures& k) {
  nlohmann::json features = nlohmann::json::array();
  for (const sys::Feature& f : k.report) {
    features.push_back({{"name", f.name},
                        {"ok", f.ok},
                        {"detail", f.detail},
                        {"fix", f.fix},
                        {"dump_needs", f.dump_needs},
                        {"restore_needs", f.restore_needs}});
  }
  return {{"dump_ready", k.dump_ready()},
          {"restore_ready", k.restore_ready()},
          {"pipe_max_size", k.pipe_max_size},
          {"features", std::move(features)}};
}

RunFn setup(CLI::App& app, CommandContext& ctx) {
  auto json = std::make_shared<bool>(false);
  app.add_flag("--json", *json, "print one JSON document instead of a table");
  return [json, &ctx]() -> Expected<int> {
    const sys::KernelFeatures& k = sys::kernel_features();
    if (*json)
      fmt::print(ctx.out, "{}\n", to_json(k).dump(2));
    else
      print_table(ctx.out, k);
    return k.dump_ready() && k.restore_ready() ? kExitOk : kExitUnsupported;
  };
}

const Registrar kCheck{"check", "probe the kernel and the caller's privileges; say how to fix what is missing",
                       90, setup};

}  // namespace
}  // namespace pipecr::cli
