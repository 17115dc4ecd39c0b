// dump_bench.cpp: what a dump costs, per pipe and per byte, against what it cannot avoid.
//
// Each benchmark forks a child holding N pipes and dumps it with dump::dump_processes() into a
// sink that discards the bytes. Reported counters:
//   per_pipe_us   wall time of the whole dump divided by N;
//   stopped_ms    how long the child stood stopped (the number that matters to the dumped program);
//   floor_us      per pipe, the syscalls no dump can avoid, timed in the same run on the same pipes
//                 from this process: pidfd_getfd + fstat + F_GETFL + F_GETPIPE_SZ + tee into a
//                 scratch pipe + close. The ratio per_pipe_us / floor_us is the claim.
//   rss_growth_kb peak resident memory added by the dump (VmHWM, reset before it): it must not grow
//                 with the bytes queued, since data streams from scratch pipes to the sink.
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "dump/process.hpp"
#include "image/image_io.hpp"

namespace {

using Clock = std::chrono::steady_clock;

class NullSink final : public pipecr::image::Sink {
 public:
  pipecr::Expected<void> write(std::span<const std::byte> b) override {
    bytes += b.size();
    return {};
  }
  uint64_t bytes = 0;
};

void raise_nofile() {
  rlimit rl{};
  getrlimit(RLIMIT_NOFILE, &rl);
  rl.rlim_cur = rl.rlim_max;
  setrlimit(RLIMIT_NOFILE, &rl);
}

// A child holding `n` pipes (both ends) with `bytes` queued in each; killed by the destructor.
struct Holder {
  pid_t pid = -1;
  Holder(int n, size_t bytes) {
    int ready[2];
    if (pipe(ready) != 0) return;
    pid = fork();
    if (pid == 0) {
      close(ready[0]);
      raise_nofile();
      std::string chunk(bytes, 'x');
      for (int i = 0; i < n; ++i) {
        int p[2];
        if (pipe2(p, O_NONBLOCK) != 0) _exit(2);
        if (bytes && write(p[1], chunk.data(), chunk.size()) != static_cast<ssize_t>(bytes)) _exit(3);
      }
      close(ready[1]);
      for (;;) pause();
    }
    close(ready[1]);
    char c;
    (void)!read(ready[0], &c, 1);
    close(ready[0]);
  }
  ~Holder() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  }
};

long vm_hwm_kb() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stol(line.substr(6));
  return 0;
}

// The unavoidable syscalls per pipe, on the child's fds, from here.
double floor_us(pid_t pid) {
  int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  std::vector<int> fds;
  for (int fd = 3; fd < 1 << 20; ++fd) {
    std::string link = "/proc/" + std::to_string(pid) + "/fd/" + std::to_string(fd);
    struct stat st {};
    if (lstat(link.c_str(), &st) != 0) {
      if (fds.size() > 0 && fd > fds.back() + 64) break;
      continue;
    }
    fds.push_back(fd);
  }
  auto t0 = Clock::now();
  size_t pipes = 0;
  for (int fd : fds) {
    int copy = static_cast<int>(syscall(SYS_pidfd_getfd, pidfd, fd, 0));
    if (copy < 0) continue;
    struct stat st {};
    fstat(copy, &st);
    int fl = fcntl(copy, F_GETFL);
    int cap = fcntl(copy, F_GETPIPE_SZ);
    if ((fl & O_ACCMODE) == O_RDONLY) {
      int s[2];
      pipe2(s, O_NONBLOCK | O_CLOEXEC);
      tee(copy, s[1], static_cast<size_t>(cap), SPLICE_F_NONBLOCK);
      close(s[0]);
      close(s[1]);
      ++pipes;
    }
    close(copy);
  }
  auto t1 = Clock::now();
  close(pidfd);
  return pipes ? std::chrono::duration<double, std::micro>(t1 - t0).count() / static_cast<double>(pipes) : 0;
}

void BM_Dump(benchmark::State& state) {
  raise_nofile();
  int n = static_cast<int>(state.range(0));
  size_t bytes = static_cast<size_t>(state.range(1));
  Holder h(n, bytes);
  double stopped = 0, growth = 0, wall = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    std::ofstream("/proc/self/clear_refs") << "5";
    long before = vm_hwm_kb();
    NullSink sink;
    auto st = pipecr::dump::dump_processes(pipecr::dump::DumpOptions{.pids = {h.pid}}, sink);
    if (!st) {
      state.SkipWithError(st.error().what.c_str());
      return;
    }
    wall += std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
    stopped += static_cast<double>(st->stopped_ns) / 1e6;
    growth += static_cast<double>(vm_hwm_kb() - before);
    benchmark::DoNotOptimize(sink.bytes);
  }
  double iters = static_cast<double>(state.iterations());
  state.counters["stopped_ms"] = stopped / iters;
  state.counters["rss_growth_kb"] = growth / iters;
  state.counters["per_pipe_us"] = wall / iters / n;
  state.counters["floor_us"] = floor_us(h.pid);
  state.counters["ratio"] = state.counters["per_pipe_us"].value / state.counters["floor_us"].value;
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * n * static_cast<int64_t>(bytes));
}

// Empty pipes: the fixed cost per pipe. 64 KiB pipes: the stop must not grow with the bytes.
BENCHMARK(BM_Dump)->Args({1000, 0})->Args({1000, 65536})->Args({100, 65536})->Args({5000, 0})
    ->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
