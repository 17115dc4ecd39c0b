// ls_watch.cpp: see ls_watch.hpp.
#include "cli/ls_watch.hpp"

#include <signal.h>
#include <time.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <ctime>

#include <fmt/format.h>

#include "cli/pipe_scan.hpp"

namespace pipecr::cli {
namespace {

// Blocks the stop signals for the life of the loop and restores the old mask after.
class StopSignals {
 public:
  StopSignals() {
    sigemptyset(&set_);
    sigaddset(&set_, SIGINT);
    sigaddset(&set_, SIGTERM);
    sigaddset(&set_, SIGHUP);
    ::sigprocmask(SIG_BLOCK, &set_, &old_);
  }
  ~StopSignals() {
    // A signal that arrived after the last wait stays pending: take it, so that restoring the
    // mask does not kill us after we cleaned up.
    timespec zero{0, 0};
    while (::sigtimedwait(&set_, nullptr, &zero) > 0) {
    }
    ::sigprocmask(SIG_SETMASK, &old_, nullptr);
  }
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;
  // Waits up to `seconds`; true when a stop signal came.
  bool wait(double seconds) {
    timespec ts{static_cast<time_t>(seconds), static_cast<long>(std::fmod(seconds, 1.0) * 1e9)};
    for (;;) {
      int r = ::sigtimedwait(&set_, nullptr, &ts);
      if (r > 0) return true;
      if (r < 0 && errno == EINTR) continue;  // another signal (SIGWINCH ...): keep waiting (a bit longer)
      return false;                            // EAGAIN: the time is up
    }
  }

 private:
  sigset_t set_{}, old_{};
};

std::string clock_now() {
  time_t t = ::time(nullptr);
  tm local{};
  ::localtime_r(&t, &local);
  char buf[32];
  std::strftime(buf, sizeof buf, "%H:%M:%S", &local);
  return buf;
}

}  // namespace

Expected<int> watch_pipes(const WatchOptions& o, CommandContext& ctx) {
  bool screen = ctx.out_is_tty && !o.json;
  StopSignals stop;
  struct Cursor {  // hidden while we draw; shown again however we leave
    bool on;
    std::FILE* out;
    ~Cursor() {
      if (on) std::fputs("\x1b[?25h", out), std::fflush(out);
    }
  } cursor{screen, ctx.out};
  if (screen) std::fputs("\x1b[?25l\x1b[H\x1b[2J", ctx.out);  // the only full clear: the first frame

  Samples prev;
  auto prev_t = std::chrono::steady_clock::now();
  for (int frame = 1;; ++frame) {
    auto scan = scan_system(o.pids);
    if (!scan) return tl::unexpected(scan.error());
    PipeGraph g = build_graph(*scan);
    std::set<pid_t> pids;
    for (const auto& [pid, p] : g.procs) pids.insert(pid);
    Samples now = sample_procs(pids);
    auto now_t = std::chrono::steady_clock::now();
    double dt = std::chrono::duration<double>(now_t - prev_t).count();
    apply_samples(g, prev, now, prev.empty() ? 0 : dt);
    prev = std::move(now);
    prev_t = now_t;

    if (o.json) {
      nlohmann::json j = graph_json(g);
      j["frame"] = frame;
      j["interval_seconds"] = o.seconds;
      fmt::print(ctx.out, "{}\n", j.dump());
    } else {
      std::string body = fmt::format("Every {}s: pipecr ls --watch  {}  frame {}\n", o.seconds, clock_now(), frame) +
                         render_text(g, o.style);
      if (screen) {
        std::string out = "\x1b[H";
        size_t start = 0;
        while (start < body.size()) {
          size_t nl = body.find('\n', start);
          out += body.substr(start, nl - start) + "\x1b[K\n";
          start = nl + 1;
        }
        out += "\x1b[J";
        std::fputs(out.c_str(), ctx.out);
      } else {
        fmt::print(ctx.out, "{}{}", frame > 1 ? "\n" : "", body);
      }
    }
    std::fflush(ctx.out);
    if (o.count > 0 && frame >= o.count) break;
    if (stop.wait(o.seconds)) break;
  }
  return kExitOk;
}

}  // namespace pipecr::cli
