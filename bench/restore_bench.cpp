// restore_bench.cpp: what a restore into processes costs, and what the targets pay for it.
//
//   BM_BuildPipes/N       build of N empty pipes (both ends) in this process: per-pipe cost
//                         (CRIU: about 15 us per pipe).
//   BM_BuildMiB/M         build of M pipes of 1 MiB each (256 full pages; pipe-max-size is 1 MiB):
//                         per-MiB cost (CRIU: about 0.93 ms/MiB).
//   BM_StoppedTime/N/K    a whole restore of N pipes holding K KiB each into a running child; the
//                         counter "stopped_us" is the time from the first seize to the last resume
//                         (Stage::built to Stage::resumed), which must not grow with K.
//   BM_StoppedTimeInPlace/N/K  the same, but the child holds the very pipes the image records, so
//                         each is refilled in place (restore/inplace.hpp): stopped_us must not grow
//                         with K either; total_us includes the plan's scan of every /proc/PID/fd.
// Read ratios from one run: per_pipe_us, per_MiB_ms, and stopped_us across K.
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <deque>
#include <string>

#include <benchmark/benchmark.h>
#include <fcntl.h>

#include "image/image_io.hpp"
#include "image/info.hpp"
#include "restore/plan.hpp"
#include "restore/process.hpp"

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

void BM_StoppedTimeInPlace(benchmark::State& state) {
  raise_nofile();
  const int n = static_cast<int>(state.range(0));
  const int pages = static_cast<int>(state.range(1)) / 4;
  Built b = make_image(n, pages);
  // The child's pipes, made here so that their inodes go into the image; this process lets go of
  // them once the child has them, so the child is their only holder.
  std::vector<int> ends;
  for (int i = 0; i < n; ++i) {
    int p[2];
    if (::pipe(p) != 0) {
      state.SkipWithError("pipe");
      return;
    }
    struct stat st {};
    ::fstat(p[0], &st);
    b.img.pipes[static_cast<size_t>(i)].inode = st.st_ino;
    ends.push_back(p[0]);
    ends.push_back(p[1]);
  }
  b.img.info.boot_id = image::boot_id();
  pid_t child = ::fork();
  if (child == 0) {
    for (int& fd : ends) fd = ::fcntl(fd, F_DUPFD, 100 + 2 * n);  // out of the way of the numbers below
    for (size_t i = 0; i < ends.size(); ++i) ::dup2(ends[i], 100 + static_cast<int>(i));
    for (;;) ::pause();
  }
  for (int fd : ends) ::close(fd);
  double stopped_total = 0, total = 0;
  size_t in_place = 0;
  std::string why;
  for (auto _ : state) {
    std::chrono::steady_clock::time_point t0, t1;
    restore::ProcessRestoreOptions opts;
    opts.hook = [&](restore::Stage s) {
      if (s == restore::Stage::built) t0 = std::chrono::steady_clock::now();
      if (s == restore::Stage::resumed) t1 = std::chrono::steady_clock::now();
    };
    auto start = std::chrono::steady_clock::now();
    auto r = restore::restore_processes(b.img, {{{child, kRec}}, std::nullopt}, opts);
    total += std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
    if (!r) {
      state.SkipWithError(r.error().what.c_str());
      break;
    }
    in_place = r->in_place;
    for (const restore::PipeOutcome& o : r->outcomes)
      if (!o.in_place) why = o.why;
    stopped_total += std::chrono::duration<double, std::micro>(t1 - t0).count();
  }
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  why = "not every pipe was refilled in place: " + why;
  if (in_place != static_cast<size_t>(n)) state.SkipWithError(why.c_str());
  state.counters["stopped_us"] = stopped_total / static_cast<double>(state.iterations());
  state.counters["total_us"] = total / static_cast<double>(state.iterations());
}
BENCHMARK(BM_StoppedTimeInPlace)->Args({10, 0})->Args({10, 64})->Args({10, 1024})->Args({100, 0})->Args({100, 64})
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
