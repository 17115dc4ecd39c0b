// restore_bench.cpp: what a restore into processes costs, and what the targets pay for it.
//
//   BM_BuildPipes/N       build of N empty pipes (both ends) in this process: per-pipe cost
//                         (CRIU: about 15 us per pipe).
//   BM_BuildMiB/M         build of M pipes of 1 MiB each (256 full pages; pipe-max-size is 1 MiB):
//                         per-MiB cost (CRIU: about 0.93 ms/MiB).
//   BM_StoppedTime/N/K    a whole restore of N pipes holding K KiB each into a running child; the
//                         counter "stopped_us" is the time from the first seize to the last resume
//                         (Stage::built to Stage::resumed), which must not grow with K.
//   BM_VictimStall/N/K    the same, seen from the target: a thread of it spins reading the clock,
//                         "victim_stall_us" is its longest gap during one restore (mean over the
//                         iterations), the time it stood still; must stay under 3 ms for N = 1000
//                         and not grow with K. seize_us, agent_us, prepare_us, commit_us and
//                         takeback_us split pipecr's side of the stop by phase (stage hook).
//                         10000/0 has read ends only, 16 bytes each (the stall's growth in pipes).
//                         victim_stall_first_us is the first restore's stall (the one whose fd table
//                         must grow: grown before the stop, by one thread), victim_stall_later_us the
//                         mean of the others.
//                         The image's fds go to numbers the victim does not hold (fresh numbers:
//                         it closes them again after each iteration).
//   BM_VictimStallNoPregrow/N/K  BM_VictimStall without growing the victim's fd table before the stop:
//                         victim_stall_first_us then holds an RCU grace period (expand_fdtable).
//   BM_VictimStallReplace/N/K  the same where the victim already holds a pipe end at every recorded
//                         number (what `restore --into` over a running process does): each install
//                         replaces a file, which the agent hands back to pipecr.
//   BM_Scale/N            a restore of N pipes (read ends only, 16 bytes each) into running children
//                         (15,000 pipes each at most, each under RLIMIT_NOFILE 20,000), whole (plan,
//                         build, install), 100 to 100,000: "per_pipe_us" states the slope.
// Read ratios from one run: per_pipe_us, per_MiB_ms, stopped_us and victim_stall_us across K.
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <deque>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>
#include <fcntl.h>

#include "image/image_io.hpp"
#include "restore/plan.hpp"
#include "restore/process.hpp"
#include "sys/fdtable_grow.hpp"

namespace {

using namespace pipecr;

constexpr int32_t kRec = 777;

struct Built {
  Image img;
  std::vector<std::byte> bytes;
  std::string data;
};

// n pipes, each with `pages` full 4 KiB stream slots, read end at 100+2i, write end at 101+2i.
Built make_image(int n, int pages) {
  Built b;
  b.data.assign(static_cast<size_t>(pages) * 4096, 'd');
  Image& img = b.img;
  img.processes.push_back(ProcessRecord{kRec, 1, "bench", {}});
  for (int i = 0; i < n; ++i) {
    PipeRecord p;
    p.id = i + 1;
    p.capacity = pages > 16 ? 1 << 20 : 65536;
    p.uid = ::getuid();
    p.gid = ::getgid();
    p.mode = 0600;
    for (int s = 0; s < pages; ++s) p.slots.push_back(Slot{4096, false});
    p.data = std::as_bytes(std::span(b.data.data(), b.data.size()));
    img.pipes.push_back(p);
    img.files.push_back(FileRecord{static_cast<uint64_t>(2 * i + 1), p.id, O_RDONLY});
    img.files.push_back(FileRecord{static_cast<uint64_t>(2 * i + 2), p.id, O_WRONLY});
    img.fds.push_back(FdRecord{kRec, 100 + 2 * i, static_cast<uint64_t>(2 * i + 1)});
    img.fds.push_back(FdRecord{kRec, 101 + 2 * i, static_cast<uint64_t>(2 * i + 2)});
  }
  auto enc = image::encode(img);
  b.bytes = std::move(*enc);
  b.img = std::move(*image::parse(b.bytes));
  return b;
}

void raise_nofile() {
  rlimit rl{};
  ::getrlimit(RLIMIT_NOFILE, &rl);
  rl.rlim_cur = rl.rlim_max;
  ::setrlimit(RLIMIT_NOFILE, &rl);
}

// Stage 2 alone, from a plan made by hand (every fd of one recorded process; no target is touched).
// Returns the mean wall time of one build, in microseconds.
double build_only(benchmark::State& state, int n, int pages) {
  raise_nofile();
  Built b = make_image(n, pages);
  restore::ProcessRestoreOptions opts;
  double total = 0;
  for (auto _ : state) {
    auto t0 = std::chrono::steady_clock::now();
    restore::Plan plan;
    plan.img = &b.img;
    plan.holders.push_back(restore::Holder{kRec, ::getppid(), false, {}});
    for (const FileRecord& f : b.img.files) {
      plan.file_index[f.id] = plan.files.size();
      plan.files.push_back(restore::PlannedFile{f, b.img.find_pipe(f.pipe_id)});
    }
    for (size_t i = 0; i < b.img.pipes.size(); ++i) plan.pipes.push_back(restore::PlannedPipe{&b.img.pipes[i], {2 * i, 2 * i + 1}});
    auto built = restore::build(plan, opts);
    if (!built) state.SkipWithError(built.error().what.c_str());
    benchmark::DoNotOptimize(built);
    built = pipecr::Expected<restore::Built>();  // close the fds inside the timed part too
    total += std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  }
  state.SetItemsProcessed(state.iterations() * n);
  state.SetBytesProcessed(state.iterations() * n * int64_t{pages} * 4096);
  return state.iterations() ? total / static_cast<double>(state.iterations()) : 0;
}

void BM_BuildPipes(benchmark::State& state) {
  double us = build_only(state, static_cast<int>(state.range(0)), 0);
  state.counters["per_pipe_us"] = us / static_cast<double>(state.range(0));
}
BENCHMARK(BM_BuildPipes)->Arg(1)->Arg(100)->Arg(1000)->Unit(benchmark::kMicrosecond);

void BM_BuildMiB(benchmark::State& state) {
  double us = build_only(state, static_cast<int>(state.range(0)), 256);
  state.counters["per_MiB_ms"] = us / 1e3 / static_cast<double>(state.range(0));
}
BENCHMARK(BM_BuildMiB)->Arg(1)->Arg(16)->Unit(benchmark::kMillisecond);

void BM_StoppedTime(benchmark::State& state) {
  raise_nofile();
  const int n = static_cast<int>(state.range(0));
  const int pages = static_cast<int>(state.range(1)) / 4;
  Built b = make_image(n, pages);
  pid_t child = ::fork();
  if (child == 0) {
    for (;;) ::pause();
  }
  double stopped_total = 0;
  for (auto _ : state) {
    std::chrono::steady_clock::time_point t0, t1;
    restore::ProcessRestoreOptions opts;
    opts.hook = [&](restore::Stage s) {
      if (s == restore::Stage::built) t0 = std::chrono::steady_clock::now();
      if (s == restore::Stage::resumed) t1 = std::chrono::steady_clock::now();
    };
    auto r = restore::restore_processes(b.img, {{{child, kRec}}, std::nullopt}, opts);
    if (!r) {
      state.SkipWithError(r.error().what.c_str());
      break;
    }
    stopped_total += std::chrono::duration<double, std::micro>(t1 - t0).count();
  }
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  state.counters["stopped_us"] = stopped_total / static_cast<double>(state.iterations());
}
BENCHMARK(BM_StoppedTime)->Args({10, 0})->Args({10, 64})->Args({10, 1024})->Args({100, 0})->Args({100, 64})
    ->Unit(benchmark::kMillisecond);

// A child with a thread that spins on the clock and records its longest gap (shared memory), and a
// main thread in pause(). hold: pipe ends it opens first at 100 .. 100+hold-1 (what a restore then
// replaces).
struct Spinner {
  struct Shared {
    std::atomic<int64_t> max_gap_ns{0};
    std::atomic<int64_t> beats{0};
    std::atomic<int64_t> cleared{0};
  };
  static inline Shared* child_shared = nullptr;
  // SIGUSR1: the child closes every fd from 100 up (what a restore installed), so that the next
  // restore goes to fresh numbers again.
  static void clear(int) {
    ::close_range(100, ~0u, 0);
    child_shared->cleared.fetch_add(1);
  }
  Shared* shared = nullptr;
  pid_t pid = -1;
  explicit Spinner(int hold = 0) {
    void* m = ::mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    shared = new (m) Shared;
    pid = ::fork();
    if (pid == 0) {
      child_shared = shared;
      ::signal(SIGUSR1, clear);
      for (int i = 0; i < hold; i += 2) {
        int p[2];
        if (::pipe(p) != 0) ::_exit(2);
        ::dup2(p[0], 100 + i);
        if (i + 1 < hold) ::dup2(p[1], 101 + i);
        ::close(p[0]);
        ::close(p[1]);
      }
      std::thread([s = shared] {
        auto last = std::chrono::steady_clock::now();
        for (;;) {
          auto now = std::chrono::steady_clock::now();
          int64_t gap = std::chrono::duration_cast<std::chrono::nanoseconds>(now - last).count();
          if (gap > s->max_gap_ns.load(std::memory_order_relaxed)) s->max_gap_ns.store(gap, std::memory_order_relaxed);
          s->beats.fetch_add(1, std::memory_order_relaxed);
          last = now;
        }
      }).detach();
      for (;;) ::pause();
    }
    while (shared->beats.load() < 1000) std::this_thread::yield();
  }
  // Makes the child close what a restore installed (fresh numbers for the next one).
  void clear_fds() {
    const int64_t before = shared->cleared.load();
    ::kill(pid, SIGUSR1);
    while (shared->cleared.load() == before) std::this_thread::yield();
  }
  ~Spinner() {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    ::munmap(shared, sizeof(Shared));
  }
};

Built make_small_image(int n);

void victim_stall(benchmark::State& state, bool replace) {
  raise_nofile();
  const int n = static_cast<int>(state.range(0));
  const int pages = static_cast<int>(state.range(1)) / 4;
  // Over 5,000 pipes, read ends only (16 bytes each): both ends would pass an fd limit of 20,000.
  Built b = n > 5000 ? make_small_image(n) : make_image(n, pages);
  Spinner victim(replace ? static_cast<int>(b.img.fds.size()) : 0);
  double stall_total = 0, worst = 0, stopped_total = 0, first = -1;
  // Phases, from the stage hook: built -> seized (seize), -> stashed (agent start and hand-over),
  // -> installed (in-place swaps, prepare), -> committed (commit and install), -> resumed (take-back).
  constexpr int kPhases = 5;
  double phase_total[kPhases] = {}, phase_first[kPhases] = {};
  int iteration = 0;
  for (auto _ : state) {
    std::chrono::steady_clock::time_point t0, t1;
    std::chrono::steady_clock::time_point at[kPhases + 1];
    restore::ProcessRestoreOptions opts;
    opts.hook = [&](restore::Stage s) {
      const auto now = std::chrono::steady_clock::now();
      switch (s) {
        case restore::Stage::built: at[0] = now; break;
        case restore::Stage::seized: at[1] = now; break;
        case restore::Stage::stashed: at[2] = now; break;
        case restore::Stage::installed: at[3] = now; break;
        case restore::Stage::committed: at[4] = now; break;
        case restore::Stage::resumed: at[5] = now; break;
        default: break;
      }
      if (s == restore::Stage::built) {
        victim.shared->max_gap_ns = 0;  // the build (which grows with K) happens before this
        t0 = std::chrono::steady_clock::now();
      }
      if (s == restore::Stage::resumed) t1 = std::chrono::steady_clock::now();
      if (std::getenv("PIPECR_BENCH_STAGES"))
        fprintf(stderr, "stage %d at %.0f us\n", static_cast<int>(s),
                std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    };
    auto r = restore::restore_processes(b.img, {{{victim.pid, kRec}}, std::nullopt}, opts);
    if (!r) {
      state.SkipWithError(r.error().what.c_str());
      break;
    }
    auto beats = victim.shared->beats.load();
    while (victim.shared->beats.load() < beats + 1000) std::this_thread::yield();  // it ran again
    // Read before the clear: the child's close of what was restored (64 MiB at 1,000 x 64 KiB) keeps
    // a CPU busy, and with this thread waiting for it the spinner can lose the other one.
    double us = static_cast<double>(victim.shared->max_gap_ns.load()) / 1e3;
    if (!replace) victim.clear_fds();  // every restore to fresh numbers, not only the first
    stall_total += us;
    if (first < 0) first = us;
    worst = std::max(worst, us);
    stopped_total += std::chrono::duration<double, std::micro>(t1 - t0).count();
    for (int i = 0; i < kPhases; ++i) {
      const double phase = std::chrono::duration<double, std::micro>(at[i + 1] - at[i]).count();
      phase_total[i] += phase;
      if (iteration == 0) phase_first[i] = phase;
    }
    ++iteration;
  }
  const double it = static_cast<double>(std::max<int64_t>(1, state.iterations()));
  static const char* const names[kPhases] = {"seize_us", "agent_us", "prepare_us", "commit_us", "takeback_us"};
  for (int i = 0; i < kPhases; ++i) state.counters[names[i]] = phase_total[i] / it;
  // The first restore's seize (which includes growing the fd table before the stop, the target
  // running) and prepare (where the stop grows the table when it was not grown before).
  state.counters["seize_first_us"] = phase_first[0];
  state.counters["prepare_first_us"] = phase_first[2];
  state.counters["victim_stall_us"] = stall_total / it;
  state.counters["victim_stall_max_us"] = worst;
  // The first restore into the victim, apart: only it grows the victim's fd table (fresh numbers),
  // which in a process with threads waits for an RCU grace period (expand_fdtable).
  state.counters["victim_stall_first_us"] = first;
  // The iterations after the first (the table big already): the first one's stall is read against it.
  state.counters["victim_stall_later_us"] = it > 1 ? (stall_total - first) / (it - 1) : 0;
  state.counters["stopped_us"] = stopped_total / it;
}

void BM_VictimStall(benchmark::State& state) { victim_stall(state, false); }
void BM_VictimStallReplace(benchmark::State& state) { victim_stall(state, true); }
// BM_VictimStall without the fd table's growth before the stop (sys/fdtable_grow.hpp): the first
// restore's stop then grows the table itself, waiting for a grace period with every thread stopped.
// victim_stall_first_us here against BM_VictimStall's is what the growth before the stop saves.
void BM_VictimStallNoPregrow(benchmark::State& state) {
  sys::set_fd_table_pregrow(false);
  victim_stall(state, false);
  sys::set_fd_table_pregrow(true);
}
BENCHMARK(BM_VictimStallNoPregrow)->Args({1000, 0})->Args({1000, 64})->Unit(benchmark::kMillisecond)->Iterations(10);
BENCHMARK(BM_VictimStallReplace)->Args({1000, 0})->Args({1000, 64})->Unit(benchmark::kMillisecond)->Iterations(10);
BENCHMARK(BM_VictimStall)->Args({1000, 0})->Args({1000, 64})->Args({10000, 0})->Unit(benchmark::kMillisecond)
    ->Iterations(10);

// Pipes per target process in BM_Scale: what one process holds under an fd limit of 20,000 (the
// hard limit of many hosts), with room for the batch the agent receives at once.
constexpr int kPerProc = 15000;

// n pipes, 16 bytes each, spread over ceil(n / kPerProc) recorded processes kRec, kRec+1, ...; the
// read end of the j-th pipe of a process at fd 100+j.
Built make_small_image(int n) {
  Built b;
  b.data.assign(16, 's');
  Image& img = b.img;
  const int procs = (n + kPerProc - 1) / kPerProc;
  for (int k = 0; k < procs; ++k) img.processes.push_back(ProcessRecord{kRec + k, 1, "bench", {}});
  for (int i = 0; i < n; ++i) {
    PipeRecord p;
    p.id = i + 1;
    p.capacity = 4096;
    p.uid = ::getuid();
    p.gid = ::getgid();
    p.mode = 0600;
    p.slots.push_back(Slot{16, false});
    p.data = std::as_bytes(std::span(b.data.data(), b.data.size()));
    img.pipes.push_back(p);
    img.files.push_back(FileRecord{static_cast<uint64_t>(i + 1), p.id, O_RDONLY});
    img.fds.push_back(FdRecord{kRec + i / kPerProc, 100 + i % kPerProc, static_cast<uint64_t>(i + 1)});
  }
  b.bytes = std::move(*image::encode(img));
  b.img = std::move(*image::parse(b.bytes));
  return b;
}

// The time of a whole restore (plan, build, install) of N pipes into running children, each under
// RLIMIT_NOFILE 20,000 and holding at most 15,000 of them (100,000 pipes: 7 children), with pipecr
// (this process) under its own limit: per_pipe_us is the slope, and it stays flat from 1,000 to
// 100,000 when the restore is linear in pipes. stopped_us is the time the targets stood stopped.
void BM_Scale(benchmark::State& state) {
  raise_nofile();
  const int n = static_cast<int>(state.range(0));
  Built b = make_small_image(n);
  std::vector<pid_t> kids;
  restore::ProcessRestoreRequest req;
  for (size_t k = 0; k < b.img.processes.size(); ++k) {
    pid_t child = ::fork();
    if (child == 0) {
      rlimit rl{};
      ::getrlimit(RLIMIT_NOFILE, &rl);
      rl.rlim_cur = rl.rlim_max = std::min<rlim_t>(rl.rlim_max, 20000);
      ::setrlimit(RLIMIT_NOFILE, &rl);
      for (;;) ::pause();
    }
    kids.push_back(child);
    req.into.push_back(restore::IntoSpec{child, kRec + static_cast<int32_t>(k)});
  }
  double total = 0, stopped = 0;
  for (auto _ : state) {
    std::chrono::steady_clock::time_point t1, t2;
    restore::ProcessRestoreOptions opts;
    opts.hook = [&](restore::Stage s) {
      if (s == restore::Stage::built) t1 = std::chrono::steady_clock::now();
      if (s == restore::Stage::resumed) t2 = std::chrono::steady_clock::now();
    };
    auto t0 = std::chrono::steady_clock::now();
    auto r = restore::restore_processes(b.img, req, opts);
    if (!r) {
      state.SkipWithError(r.error().what.c_str());
      break;
    }
    total += std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    stopped += std::chrono::duration<double, std::micro>(t2 - t1).count();
  }
  for (pid_t child : kids) {
    ::kill(child, SIGKILL);
    ::waitpid(child, nullptr, 0);
  }
  const double it = static_cast<double>(std::max<int64_t>(1, state.iterations()));
  state.counters["per_pipe_us"] = total / it / n;
  state.counters["stopped_us"] = stopped / it;
  state.counters["targets"] = static_cast<double>(kids.size());
}
BENCHMARK(BM_Scale)->Arg(100)->Arg(1000)->Arg(10000)->Arg(30000)->Arg(100000)->Unit(benchmark::kMillisecond)
    ->Iterations(3);

}  // namespace

BENCHMARK_MAIN();
