// dump_bench.cpp: what a dump costs its targets and pipecr, against what it cannot avoid.
//
// BM_Dump forks a victim holding N pipes (both ends, `bytes` queued in each) and a thread that
// spins on the clock and records its longest gap, and dumps it with dump::dump_processes() into
// a sink that discards the bytes. Counters, all from one run:
//   victim_stall_ms  the spinning thread's longest gap during the dump: how long the victim stood
//                    still, seen from inside it (the number that matters to the dumped program);
//   noise_ms         the same thread's longest gap over an equally long time without a dump (the
//                    machine's scheduling noise: other processes share its 2 cores);
//   stopped_ms       pipecr's own view of the stop (DumpStats::stopped_ns), seize_ms of it seizing;
//   dump_ms          the whole dump, wall time;
//   floor_ms         the loop no dump can avoid, timed in the same run on the same pipes from
//                    this process: pidfd_getfd of every fd, tee of every pipe into a scratch pipe
//                    and splice of it to /dev/null; no stop, no metadata. ratio = dump_ms / floor_ms;
//   floor_state_ms, ratio_state: the same loop also reading, with one fcntl each, the state the
//                    image records besides the bytes: status flags, owner and signal of every copy,
//                    capacity of every pipe (no interface gives them in bulk: see BM_BtfLoad);
//   floor_copy_ms, ratio_copy (pipes with bytes): the same loop reading the bytes into memory
//                    instead of splicing them to /dev/null, and dump_ms against it;
//   dump_cpu_ms, floor_cpu_ms, cpu_ratio: the same on pipecr's CPU time (user + system), which
//                    load on the machine inflates far less than wall time;
//   rss_growth_kb    peak resident memory added by the dump (VmHWM, reset before it);
//   agents, agent_start_ms, agent_survey_ms, agent_return_ms: fd tables read through the in-target
//                    agent (DumpStats::agents) and what its start, its survey and its end before
//                    the resume cost of stopped_ms; survey_take_ms: pipecr's own part of the survey
//                    (files taken in, pipes tee'd; the rest it waited for the agent); resume_ms: the
//                    resume, with the agent's own return. PIPECR_BENCH_NO_AGENT=1 in the environment dumps without the agent
//                    (pidfd_getfd of every number, FD_CLOEXEC from fdinfo): the comparison;
//   before_stop_ms, after_resume_ms, write_ms: the rest of dump_ms (DumpStats): before the stop,
//                    after the resume (grouping, status flags, owner, signal, capacity), and writing
//                    the image (the bytes read out of the scratch pipes, checksummed, slot-walked).
// BM_DumpUnrelated: 1,000 empty pipes (or 1,000 FIFOs opened for reading without a writer) in a
// victim, next to a hog process holding `hog_fds` unrelated fds (pipes of its own): dump_ms must
// not grow with the hog's fds for pipes (the outside-holder scan is off by default); a FIFO reader
// without POLLHUP and no dumped writer needed that scan (its "no writer yet" latch); the FIFO
// case checks that the FIFOs' tee answers it without the scan (third argument 1: the scan asked
// for, which is what the FIFO case cost before). Counters as BM_Dump (without the victim's clock),
// plus outside_marked (a pipe was found held outside), no_writer_yet (FIFO readers found never to
// have seen a writer) and outside_scans (0 or 1: whether every process's fd table was read).
// BM_DumpScale: 16 bytes in each of N pipes, spread over victims of up to 9,000 pipes each
// (18,000 fds, under the 20,000 fd limit of these machines), pipecr under the same limit: time per
// pipe from 100 to 100,000 pipes (the slope), time stopped, scratch pipes and batches.
// BM_TeeFloor: the tees of 1,000 pipes of 64 KiB alone, with their metadata cold and warm in the
// caches: the per-buffer cost no user-space dump avoids while its targets stand stopped.
// BM_AgentAddress: where an agent goes in a target of thousands of mappings, asked of the kernel
// (PROCMAP_QUERY) and read from /proc/PID/maps: a step of the agent's start, inside the stop.
// BM_BtfLoad: what a BPF task_file iterator (the one bulk interface to every file's flags, owner,
// signal and pipe size) costs before its first read: libbpf parsing the kernel's BTF.
// BM_GadgetScan: the search for the agent's return gadgets in a target's code, before the stop.
// BM_ExecMappings: the executable mappings of such a target (where the return gadgets are looked
// for, before the stop), asked of the kernel and read from /proc/PID/maps.
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <fstream>
#include <memory>
#include <string>
#include <cstdlib>
#include <thread>
#include <vector>

#include <benchmark/benchmark.h>

#include "dump/process.hpp"
#include "image/image_io.hpp"
#include "sys/agent.hpp"
#include "sys/proc.hpp"

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

// CPU time of the calling thread (user + system): under load the wall time mostly measures waiting
// for a core, so ratios are given on CPU time too.
double thread_cpu_ms() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e3 + static_cast<double>(ts.tv_nsec) / 1e6;
}

uint64_t mono_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000u + static_cast<uint64_t>(ts.tv_nsec);
}

// Shared with the victim: the spinning thread's longest gap since the last reset.
struct Spin {
  std::atomic<uint64_t> max_gap_ns{0};
  std::atomic<int> reset{0};
};

// A child holding `n` pipes (both ends) with `bytes` queued in each, optionally with a spinning
// thread; killed by the destructor.
struct Victim {
  pid_t pid = -1;
  Spin* spin = nullptr;
  Victim(int n, size_t bytes, bool spinner) {
    spin = static_cast<Spin*>(mmap(nullptr, sizeof(Spin), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
    new (spin) Spin;
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
      if (spinner) {
        std::thread([s = spin] {
          uint64_t last = mono_ns();
          for (;;) {
            uint64_t now = mono_ns();
            if (s->reset.exchange(0)) {
              s->max_gap_ns = 0;
            } else if (now - last > s->max_gap_ns) {
              s->max_gap_ns = now - last;
            }
            last = now;
          }
        }).detach();
      }
      close(ready[1]);
      for (;;) pause();
    }
    close(ready[1]);
    char c;
    (void)!read(ready[0], &c, 1);
    close(ready[0]);
  }
  ~Victim() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
    munmap(spin, sizeof(Spin));
  }
  // Restarts the spinning thread's record of its longest gap.
  void reset_gap() {
    spin->reset = 1;
    while (spin->reset.load()) std::this_thread::yield();
  }
};

long vm_hwm_kb() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stol(line.substr(6));
  return 0;
}

// The pipe fds of pid and whether each is a read end (fdinfo flags), read before the timing.
// With fifos, FIFO fds (a link to a path that is a FIFO) instead of anonymous pipes.
std::vector<std::pair<int, bool>> pipe_fds(pid_t pid, bool fifos = false) {
  std::vector<std::pair<int, bool>> out;
  std::string base = "/proc/" + std::to_string(pid);
  for (int fd = 3, misses = 0; misses < 64; ++fd) {
    char link[64];
    ssize_t n = readlink((base + "/fd/" + std::to_string(fd)).c_str(), link, sizeof link - 1);
    if (n < 0) {
      ++misses;
      continue;
    }
    misses = 0;
    std::string target(link, static_cast<size_t>(n));
    struct stat st {};
    if (fifos ? (target.empty() || target[0] != '/' || stat(target.c_str(), &st) != 0 || !S_ISFIFO(st.st_mode))
              : target.rfind("pipe:", 0) != 0)
      continue;
    std::ifstream info(base + "/fdinfo/" + std::to_string(fd));
    std::string key, val;
    int flags = 0;
    while (info >> key >> val)
      if (key == "flags:") flags = static_cast<int>(std::stol(val, nullptr, 8));
    out.emplace_back(fd, (flags & O_ACCMODE) == O_RDONLY);
  }
  return out;
}

// What the loop reads besides the bytes (FloorState::with): the state the image records of each
// copy (status flags, owner, signal) and of each pipe (capacity, through its read end), one fcntl
// each, as no interface gives them in bulk.
enum class FloorState { without, with };

// The unavoidable loop: pidfd_getfd of every pipe fd, tee of every read end into one scratch
// pipe and splice of it to /dev/null. Returns milliseconds. With `read_bytes`, the bytes are read out of
// the scratch pipe into memory instead (read_bytes: what an image that holds them must do once).
double floor_ms(pid_t pid, const std::vector<std::pair<int, bool>>& fds, double* cpu_ms = nullptr, bool read_bytes = false,
                FloorState state = FloorState::without) {
  static std::vector<char> buf(1 << 20);
  int null = open("/dev/null", O_WRONLY | O_CLOEXEC);
  int s[2];
  pipe2(s, O_NONBLOCK | O_CLOEXEC);
  fcntl(s[1], F_SETPIPE_SZ, 1 << 20);
  auto t0 = Clock::now();
  double c0 = thread_cpu_ms();
  int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  std::vector<int> copies;
  copies.reserve(fds.size());
  for (auto [fd, rd] : fds) {
    int copy = static_cast<int>(syscall(SYS_pidfd_getfd, pidfd, fd, 0));
    copies.push_back(copy);
    if (state == FloorState::with && copy >= 0) {
      struct f_owner_ex own {};
      benchmark::DoNotOptimize(fcntl(copy, F_GETFL));
      benchmark::DoNotOptimize(fcntl(copy, F_GETOWN_EX, &own));
      benchmark::DoNotOptimize(fcntl(copy, F_GETSIG));
      if (rd) benchmark::DoNotOptimize(fcntl(copy, F_GETPIPE_SZ));
    }
    if (rd && copy >= 0) {
      ssize_t n = tee(copy, s[1], 1 << 20, SPLICE_F_NONBLOCK);
      if (n > 0 && read_bytes)
        for (ssize_t left = n; left > 0;) {
          ssize_t r = read(s[0], buf.data(), std::min<size_t>(buf.size(), static_cast<size_t>(left)));
          if (r <= 0) break;
          left -= r;
        }
      else if (n > 0)
        (void)!splice(s[0], nullptr, null, nullptr, static_cast<size_t>(n), SPLICE_F_NONBLOCK);
    }
  }
  for (int c : copies) close(c);
  close(pidfd);
  double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  if (cpu_ms) *cpu_ms += thread_cpu_ms() - c0;
  close(s[0]);
  close(s[1]);
  close(null);
  return ms;
}

// DumpOptions for the victims: the agent unless PIPECR_BENCH_NO_AGENT is set.
pipecr::dump::DumpOptions dump_options(std::vector<pid_t> pids) {
  pipecr::dump::DumpOptions o{.pids = std::move(pids)};
  const char* off = std::getenv("PIPECR_BENCH_NO_AGENT");
  o.survey_agent = !(off && *off && *off != '0');
  const char* no_tees = std::getenv("PIPECR_BENCH_NO_AGENT_TEES");
  o.agent_tees = !(no_tees && *no_tees && *no_tees != '0');
  return o;
}

void BM_Dump(benchmark::State& state) {
  raise_nofile();
  int n = static_cast<int>(state.range(0));
  size_t bytes = static_cast<size_t>(state.range(1));
  Victim v(n, bytes, true);
  auto fds = pipe_fds(v.pid);
  double stall = 0, noise = 0, stopped = 0, seize = 0, dump = 0, flr = 0, growth = 0, last_ms = 20;
  double dump_cpu = 0, floor_cpu = 0;
  double agents = 0, agent_start = 0, agent_survey = 0, agent_return = 0, survey_take = 0, resume = 0, agent_tees = 0;
  double before_stop = 0, after_resume = 0, writing = 0, flr_copy = 0, flr_state = 0;
  for (auto _ : state) {
    // Noise: the victim's longest gap over as long as the dump takes, without a dump.
    v.reset_gap();
    std::this_thread::sleep_for(std::chrono::microseconds(static_cast<int64_t>(last_ms * 1000)));
    noise += static_cast<double>(v.spin->max_gap_ns.load()) / 1e6;

    std::ofstream("/proc/self/clear_refs") << "5";
    long before = vm_hwm_kb();
    v.reset_gap();
    auto t0 = Clock::now();
    double c0 = thread_cpu_ms();
    NullSink sink;
    auto st = pipecr::dump::dump_processes(dump_options({v.pid}), sink);
    double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    dump_cpu += thread_cpu_ms() - c0;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));  // let the spinner notice the resume
    if (!st) {
      state.SkipWithError(st.error().what.c_str());
      return;
    }
    stall += static_cast<double>(v.spin->max_gap_ns.load()) / 1e6;
    dump += ms;
    last_ms = ms;
    stopped += static_cast<double>(st->stopped_ns) / 1e6;
    seize += static_cast<double>(st->seize_ns) / 1e6;
    agents += static_cast<double>(st->agents);
    agent_start += static_cast<double>(st->agent_start_ns) / 1e6;
    agent_survey += static_cast<double>(st->agent_survey_ns) / 1e6;
    agent_return += static_cast<double>(st->agent_return_ns) / 1e6;
    survey_take += static_cast<double>(st->survey_take_ns) / 1e6;
    agent_tees += static_cast<double>(st->agent_tees);
    resume += static_cast<double>(st->resume_ns) / 1e6;
    before_stop += static_cast<double>(st->before_stop_ns) / 1e6;
    after_resume += static_cast<double>(st->after_resume_ns) / 1e6;
    writing += static_cast<double>(st->write_ns) / 1e6;
    growth += static_cast<double>(vm_hwm_kb() - before);
    flr += floor_ms(v.pid, fds, &floor_cpu);
    flr_state += floor_ms(v.pid, fds, nullptr, false, FloorState::with);
    if (bytes) flr_copy += floor_ms(v.pid, fds, nullptr, true);
    benchmark::DoNotOptimize(sink.bytes);
  }
  double it = static_cast<double>(state.iterations());
  state.counters["victim_stall_ms"] = stall / it;
  state.counters["noise_ms"] = noise / it;
  state.counters["stopped_ms"] = stopped / it;
  state.counters["seize_ms"] = seize / it;
  state.counters["dump_ms"] = dump / it;
  state.counters["floor_ms"] = flr / it;
  state.counters["ratio"] = dump / flr;
  state.counters["floor_state_ms"] = flr_state / it;
  state.counters["ratio_state"] = dump / flr_state;
  state.counters["dump_cpu_ms"] = dump_cpu / it;
  state.counters["floor_cpu_ms"] = floor_cpu / it;
  state.counters["cpu_ratio"] = dump_cpu / floor_cpu;
  state.counters["rss_growth_kb"] = growth / it;
  state.counters["agents"] = agents / it;
  state.counters["agent_start_ms"] = agent_start / it;
  state.counters["agent_survey_ms"] = agent_survey / it;
  state.counters["agent_return_ms"] = agent_return / it;
  state.counters["survey_take_ms"] = survey_take / it;
  state.counters["agent_tees"] = agent_tees / it;
  state.counters["resume_ms"] = resume / it;
  state.counters["before_stop_ms"] = before_stop / it;
  state.counters["after_resume_ms"] = after_resume / it;
  state.counters["write_ms"] = writing / it;
  if (bytes) {
    state.counters["floor_copy_ms"] = flr_copy / it;
    state.counters["ratio_copy"] = dump / flr_copy;
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * n * static_cast<int64_t>(bytes));
}

// Empty pipes: the fixed cost per pipe. 64 KiB pipes: the stop must not grow with the bytes. 20
// pipes: few fds, where the survey agent's start weighs most (the victim inherits this process's
// fd table size, so its table is not the kernel's smallest, which the dump reads without the agent).
BENCHMARK(BM_Dump)->Args({1000, 0})->Args({1000, 65536})->Args({100, 0})->Args({5000, 0})->Args({20, 0})
    ->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(8);

// A child that runs `body` (which must not return) once forked; killed by the destructor.
struct Child {
  pid_t pid = -1;
  template <typename F>
  explicit Child(F body) {
    int ready[2];
    if (pipe(ready) != 0) return;
    pid = fork();
    if (pid == 0) {
      close(ready[0]);
      body(ready[1]);
      _exit(0);
    }
    close(ready[1]);
    char c;
    (void)!read(ready[0], &c, 1);
    close(ready[0]);
  }
  ~Child() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
};

// n FIFOs made in dir, each opened O_RDONLY | O_NONBLOCK and no writer: the readers' latch state
// can only be told by the outside-holder scan.
void hold_fifo_readers(const std::string& dir, int n, int ready) {
  raise_nofile();
  for (int i = 0; i < n; ++i) {
    std::string path = dir + "/f" + std::to_string(i);
    if (mkfifo(path.c_str(), 0600) != 0 || open(path.c_str(), O_RDONLY | O_NONBLOCK) < 0) _exit(2);
  }
  close(ready);
  for (;;) pause();
}

void BM_DumpUnrelated(benchmark::State& state) {
  raise_nofile();
  int hog_fds = static_cast<int>(state.range(0));
  bool fifo = state.range(1) != 0;
  bool scan = state.range(2) != 0;  // DumpOptions::outside_holders: the full /proc scan, as asked for
  constexpr int kPipes = 1000;
  char tmpl[] = "/tmp/dump_bench_fifo.XXXXXX";
  std::string dir = fifo ? mkdtemp(tmpl) : "";
  std::unique_ptr<Victim> pipes;
  std::unique_ptr<Child> fifos;
  pid_t pid = -1;
  if (fifo) {
    fifos = std::make_unique<Child>([&](int ready) { hold_fifo_readers(dir, kPipes, ready); });
    pid = fifos->pid;
  } else {
    pipes = std::make_unique<Victim>(kPipes, 0, false);
    pid = pipes->pid;
  }
  std::unique_ptr<Victim> hog;
  if (hog_fds > 0) hog = std::make_unique<Victim>(hog_fds / 2, 0, false);
  auto fds = pipe_fds(pid, fifo);
  double dump = 0, flr = 0, dump_cpu = 0, floor_cpu = 0, stopped = 0;
  bool outside = false;
  size_t latched = 0;
  uint64_t scans = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    double c0 = thread_cpu_ms();
    NullSink sink;
    pipecr::Image image;
    pipecr::dump::DumpOptions opts{.pids = {pid}};
    opts.outside_holders = scan;
    auto st = pipecr::dump::dump_processes(opts, sink, &image);
    dump += std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    dump_cpu += thread_cpu_ms() - c0;
    if (!st) {
      state.SkipWithError(st.error().what.c_str());
      break;
    }
    stopped += static_cast<double>(st->stopped_ns) / 1e6;
    scans = st->outside_scans;
    for (const auto& p : image.pipes) outside = outside || p.outside_holders;
    latched = 0;
    for (const auto& f : image.files) latched += f.fifo_reader == pipecr::FifoReaderState::no_writer_yet;
    flr += floor_ms(pid, fds, &floor_cpu);
  }
  double it = static_cast<double>(state.iterations());
  state.counters["dump_ms"] = dump / it;
  state.counters["floor_ms"] = flr / it;
  state.counters["ratio"] = dump / flr;
  state.counters["dump_cpu_ms"] = dump_cpu / it;
  state.counters["floor_cpu_ms"] = floor_cpu / it;
  state.counters["cpu_ratio"] = dump_cpu / floor_cpu;
  state.counters["stopped_ms"] = stopped / it;
  state.counters["fds"] = static_cast<double>(fds.size());
  state.counters["outside_marked"] = outside ? 1 : 0;
  state.counters["no_writer_yet"] = static_cast<double>(latched);
  state.counters["outside_scans"] = static_cast<double>(scans);
  fifos.reset();
  if (fifo) {
    for (int i = 0; i < kPipes; ++i) unlink((dir + "/f" + std::to_string(i)).c_str());
    rmdir(dir.c_str());
  }
}

// Args: unrelated fds held by another process, FIFO victim (1) or pipe victim (0), and the full
// outside-holder scan asked for (1: what the FIFO case cost when it was scanned for).
BENCHMARK(BM_DumpUnrelated)->Args({0, 0, 0})->Args({16000, 0, 0})->Args({0, 1, 0})->Args({16000, 1, 0})
    ->Args({0, 1, 1})->Args({16000, 1, 1})
    ->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(6);

void BM_DumpScale(benchmark::State& state) {
  raise_nofile();
  int n = static_cast<int>(state.range(0));
  constexpr int kPerVictim = 9000;
  std::vector<std::unique_ptr<Victim>> vs;
  std::vector<pid_t> pids;
  for (int left = n; left > 0; left -= kPerVictim) {
    vs.push_back(std::make_unique<Victim>(std::min(left, kPerVictim), 16, false));
    pids.push_back(vs.back()->pid);
  }
  double dump = 0, stopped = 0;
  uint64_t scratch = 0, batches = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    NullSink sink;
    auto st = pipecr::dump::dump_processes(dump_options(pids), sink);
    dump += std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    if (!st) {
      state.SkipWithError(st.error().what.c_str());
      return;
    }
    stopped += static_cast<double>(st->stopped_ns) / 1e6;
    scratch = st->scratch_pipes;
    batches = st->batches;
  }
  double it = static_cast<double>(state.iterations());
  state.counters["dump_ms"] = dump / it;
  state.counters["per_pipe_us"] = dump / it * 1000 / n;
  state.counters["stopped_ms"] = stopped / it;
  state.counters["scratch_pipes"] = static_cast<double>(scratch);
  state.counters["batches"] = static_cast<double>(batches);
}

BENCHMARK(BM_DumpScale)->Arg(100)->Arg(1000)->Arg(10000)->Arg(100000)
    ->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(2);

// BM_TeeFloor: the part of the stop that grows with the bytes queued, alone, in this process: a tee
// of each of 1,000 pipes (`bytes` queued in each, written with write(): one 4 KiB page a buffer)
// into scratch pipes of pipe-max-size, each tee taking a reference on every page it links. cold=1
// first streams through 64 MiB to push the pages' and buffers' metadata out of the caches, as it is
// in a target whose pipes were filled long before the dump; cold=0 tees them again at once.
// Counters: tee_ms (the tees, with the switch to a fresh scratch pipe when one is full),
// per_buffer_ns (tee_ms per page linked), scratch_ms (making the scratch pipes, timed apart).
void BM_TeeFloor(benchmark::State& state) {
  raise_nofile();
  const size_t bytes = static_cast<size_t>(state.range(0));
  const bool cold = state.range(1) != 0;
  constexpr int kPipes = 1000;
  std::vector<int> src;
  std::string chunk(bytes, 'x');
  for (int i = 0; i < kPipes; ++i) {
    int p[2];
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) != 0 || fcntl(p[1], F_SETPIPE_SZ, static_cast<int>(std::max<size_t>(bytes, 4096))) < 0 ||
        write(p[1], chunk.data(), bytes) != static_cast<ssize_t>(bytes)) {
      state.SkipWithError("cannot make the source pipes");
      return;
    }
    close(p[1]);
    src.push_back(p[0]);
  }
  std::vector<char> flush(64u << 20, 1);
  const int max_size = std::max(fcntl(src[0], F_GETPIPE_SZ), 1 << 20);
  double tee_ms = 0, scratch_ms = 0, buffers = 0;
  for (auto _ : state) {
    const size_t per_scratch = static_cast<size_t>(max_size) / 4096 / std::max<size_t>(1, (bytes + 4095) / 4096);
    std::vector<int> scratch;
    auto s0 = Clock::now();
    for (size_t i = 0; i < kPipes / std::max<size_t>(per_scratch, 1) + 1; ++i) {
      int p[2];
      if (pipe2(p, O_CLOEXEC) != 0) break;
      fcntl(p[1], F_SETPIPE_SZ, max_size);
      scratch.push_back(p[0]);
      scratch.push_back(p[1]);
    }
    scratch_ms += std::chrono::duration<double, std::milli>(Clock::now() - s0).count();
    if (cold)
      for (size_t i = 0; i < flush.size(); i += 64) flush[i] = static_cast<char>(flush[i] + 1);
    benchmark::DoNotOptimize(flush.data());
    size_t k = 0;
    auto t0 = Clock::now();
    for (int fd : src) {
      ssize_t r = tee(fd, scratch[2 * k + 1], SIZE_MAX >> 1, SPLICE_F_NONBLOCK);
      if (r < 0 && errno == EAGAIN && 2 * (k + 1) < scratch.size()) r = tee(fd, scratch[2 * ++k + 1], SIZE_MAX >> 1, SPLICE_F_NONBLOCK);
      if (r > 0) buffers += static_cast<double>((static_cast<size_t>(r) + 4095) / 4096);
    }
    tee_ms += std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    for (int fd : scratch) close(fd);
  }
  for (int fd : src) close(fd);
  double it = static_cast<double>(state.iterations());
  state.counters["tee_ms"] = tee_ms / it;
  state.counters["scratch_ms"] = scratch_ms / it;
  state.counters["per_buffer_ns"] = buffers > 0 ? tee_ms * 1e6 / buffers : 0;
}

BENCHMARK(BM_TeeFloor)->Args({65536, 1})->Args({65536, 0})->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(20);

// BM_BtfLoad: the fixed cost of the one interface that would give every file's state in bulk (a
// BPF task_file iterator), which a dump would pay on every run before its first read: libbpf
// parsing the kernel's BTF (/sys/kernel/btf/vmlinux) to find the iterator's attach point and
// resolve a portable program's field offsets. The verifier's check and the attach come on top and
// are not counted. libbpf is loaded with dlopen() (the Debian package libbpf1): pipecr does not
// link it. Counters: load_ms (parse, look up the attach point, free), btf_mb (the BTF's size).
void BM_BtfLoad(benchmark::State& state) {
  struct stat st {};
  if (stat("/sys/kernel/btf/vmlinux", &st) != 0) {
    state.SkipWithError("no /sys/kernel/btf/vmlinux: this kernel was built without CONFIG_DEBUG_INFO_BTF");
    return;
  }
  void* lib = dlopen("libbpf.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    state.SkipWithError("libbpf.so.1 not found (Debian: apt-get install libbpf1)");
    return;
  }
  using Load = void* (*)();
  using Find = int (*)(const void*, const char*, uint32_t);
  using Free = void (*)(void*);
  auto load = reinterpret_cast<Load>(dlsym(lib, "btf__load_vmlinux_btf"));
  auto find = reinterpret_cast<Find>(dlsym(lib, "btf__find_by_name_kind"));
  auto free_btf = reinterpret_cast<Free>(dlsym(lib, "btf__free"));
  if (!load || !find || !free_btf) {
    state.SkipWithError("libbpf.so.1 lacks btf__load_vmlinux_btf");
    dlclose(lib);
    return;
  }
  constexpr uint32_t kBtfKindFunc = 12;  // <linux/btf.h> BTF_KIND_FUNC
  double ms = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    void* btf = load();
    int id = btf ? find(btf, "bpf_iter_task_file", kBtfKindFunc) : -1;
    if (btf) free_btf(btf);
    ms += std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    if (id <= 0) {
      state.SkipWithError("the kernel's BTF has no bpf_iter_task_file");
      break;
    }
  }
  dlclose(lib);
  state.counters["load_ms"] = ms / static_cast<double>(state.iterations());
  state.counters["btf_mb"] = static_cast<double>(st.st_size) / (1 << 20);
}

BENCHMARK(BM_BtfLoad)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(10);

// A paused child holding `mappings` extra mappings (one page each, a page apart, so that none
// merge; the libraries and code of a JVM or a browser come to thousands), killed and reaped at the
// end; read-only ones, or executable ones (exec). pid -1: it did not start.
struct MappedChild {
  pid_t pid = -1;
  MappedChild(long mappings, bool exec) {
    int ready[2];
    if (pipe(ready) != 0) return;
    const pid_t child = fork();
    if (child == 0) {
      for (long i = 0; i < mappings; ++i) {
        void* p = mmap(nullptr, 2 * 4096, PROT_READ | (exec ? PROT_EXEC : 0), MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p != MAP_FAILED) munmap(static_cast<char*>(p) + 4096, 4096);  // a hole between neighbours
      }
      (void)!write(ready[1], "r", 1);
      pause();
      _exit(0);
    }
    close(ready[1]);
    char c;
    if (child > 0 && read(ready[0], &c, 1) == 1) pid = child;
    else if (child > 0) kill(child, SIGKILL), waitpid(child, nullptr, 0);
    close(ready[0]);
  }
  ~MappedChild() {
    if (pid <= 0) return;
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
  }
};

// BM_AgentAddress: choosing where an agent goes (sys::choose_agent_address), a step of its start
// inside the stop, in a MappedChild (paused meanwhile). way 0 asks the kernel (PROCMAP_QUERY, Linux
// 6.11: a few ioctls), way 1 reads the text of /proc/PID/maps. Counter: choose_us, one choice.
void BM_AgentAddress(benchmark::State& state) {
  const bool listing = state.range(1) != 0;
  MappedChild child(state.range(0), false);
  auto stat = child.pid > 0 ? pipecr::sys::read_stat(child.pid) : tl::unexpected(pipecr::Error{});
  if (!stat) return state.SkipWithError("the child did not start");
  const uint64_t stack = stat->start_stack;
  if (!listing && !pipecr::sys::agent_address_by_query(child.pid, 16 * 4096, stack, stack))
    return state.SkipWithError("no PROCMAP_QUERY here (Linux 6.11)");
  double us = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    uint64_t at = listing ? pipecr::sys::agent_address_by_listing(child.pid, 16 * 4096, stack)
                          : pipecr::sys::agent_address_by_query(child.pid, 16 * 4096, stack, stack).value_or(0);
    us += std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
    benchmark::DoNotOptimize(at);
  }
  state.counters["choose_us"] = us / static_cast<double>(state.iterations());
}

BENCHMARK(BM_AgentAddress)->ArgsProduct({{0, 1000, 10000}, {0, 1}})->Unit(benchmark::kMicrosecond)->UseRealTime()->Iterations(200);

// BM_ExecMappings: listing a target's executable mappings, where the agent's return gadgets are
// looked for before the stop (sys::executable_mappings), in a MappedChild whose extra mappings are
// read-only (the usual case: few executable ones among many) or executable. way 0: PROCMAP_QUERY
// for the executable ones only; way 1: the text of /proc/PID/maps. Counter: list_us.
void BM_ExecMappings(benchmark::State& state) {
  const bool exec = state.range(1) != 0, listing = state.range(2) != 0;
  MappedChild child(state.range(0), exec);
  if (child.pid <= 0) return state.SkipWithError("the child did not start");
  if (!listing && !pipecr::sys::executable_mappings_by_query(child.pid))
    return state.SkipWithError("no PROCMAP_QUERY here (Linux 6.11)");
  double us = 0, found = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    auto m = listing ? pipecr::sys::executable_mappings_by_listing(child.pid)
                     : pipecr::sys::executable_mappings_by_query(child.pid).value_or(std::vector<pipecr::sys::ExecMapping>{});
    us += std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
    found = static_cast<double>(m.size());
  }
  state.counters["list_us"] = us / static_cast<double>(state.iterations());
  state.counters["executable"] = found;
}

// BM_GadgetScan: the search for the agent's return gadgets in a target's code (sys::
// scan_return_gadgets: its executable mappings, glibc's first, read 64 KiB at a time until a
// `syscall; ret` and a restorer are found), which a dump pays before the stop the first time it
// meets a mapped file, so once per run of the command. The target is a paused MappedChild, a fork of
// this process. Counter: scan_us, one scan.
void BM_GadgetScan(benchmark::State& state) {
  MappedChild child(0, false);
  if (child.pid <= 0) return state.SkipWithError("the child did not start");
  double us = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    const pipecr::sys::AgentGadgets g = pipecr::sys::scan_return_gadgets(child.pid);
    us += std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
    if (!g.syscall_ret || !g.restorer) return state.SkipWithError("no return gadgets in the child's code");
  }
  state.counters["scan_us"] = us / static_cast<double>(state.iterations());
}

BENCHMARK(BM_GadgetScan)->Unit(benchmark::kMicrosecond)->UseRealTime()->Iterations(50);

BENCHMARK(BM_ExecMappings)
    ->ArgsProduct({{0, 10000}, {0, 1}, {0, 1}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime()
    ->Iterations(50);

}  // namespace

BENCHMARK_MAIN();
