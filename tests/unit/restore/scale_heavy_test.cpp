// scale_heavy_test.cpp (label heavy): issue 11's check, both halves. Ten processes hold 9,000 pipes
// each (both ends, 16 bytes queued in each: 90,000 pipes, 180,000 fds), each under RLIMIT_NOFILE
// 20,000. One dump of all ten runs in a child process under the same limit; the processes then
// drain every pipe; one restore --into all ten runs in another such child. Every process then finds
// its 16 bytes again in every pipe, at the same fd numbers, with both ends still one pipe. Both
// children's times and peak RSS are printed. Skipped (with the reason) when this machine cannot hold
// it: a hard RLIMIT_NOFILE below 20,000 or less than 2 GiB of memory available.
#include <sys/mman.h>
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "../dump/dump_child.hpp"
#include "restore/process.hpp"

namespace pipecr {
namespace {

using testing::block_usr1;
using testing::DumpChild;
using testing::expect_running;
using testing::raise_nofile;
using testing::wait_usr1;

constexpr int kProcs = 10;
constexpr int kPipes = 9000;
constexpr rlim_t kLimit = 20000;

std::string content(int proc, int pipe) { return fmt::format("p{:02}-{:06}-xxxxx", proc, pipe).substr(0, 16); }

size_t mem_available_mib() {
  std::ifstream f("/proc/meminfo");
  std::string key, unit;
  size_t kib = 0;
  while (f >> key >> kib >> unit)
    if (key == "MemAvailable:") return kib / 1024;
  return 0;
}

// Runs body in a child under RLIMIT_NOFILE kLimit; returns the line it reports.
std::string in_limited_child(const std::function<std::string()>& body) {
  int out[2];
  if (pipe(out) != 0) return "error: pipe";
  pid_t pid = fork();
  if (pid == 0) {
    close(out[0]);
    raise_nofile(kLimit);
    std::string report = body();
    (void)!write(out[1], report.data(), report.size());
    _exit(0);
  }
  close(out[1]);
  std::string report;
  char buf[512];
  for (ssize_t n; (n = read(out[0], buf, sizeof buf)) > 0;) report.append(buf, static_cast<size_t>(n));
  close(out[0]);
  int st = 0;
  waitpid(pid, &st, 0);
  if (!WIFEXITED(st)) report += fmt::format(" (child died: status {:#x})", st);
  return report;
}

long peak_rss_mib() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss / 1024;
}

TEST(RestoreScale, TenProcessesOf9000PipesUnderFdLimit20000) {
  rlimit rl{};
  getrlimit(RLIMIT_NOFILE, &rl);
  if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < kLimit)
    GTEST_SKIP() << "the hard RLIMIT_NOFILE (" << rl.rlim_max << ") is below " << kLimit << ": cannot hold the check";
  if (mem_available_mib() < 2048)
    GTEST_SKIP() << "less than 2 GiB of memory available (" << mem_available_mib() << " MiB): cannot hold the check";

  // Each process says through this page that it drained its pipes (its other fds are closed).
  auto* drained = static_cast<std::atomic<int>*>(
      mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(drained, MAP_FAILED);
  new (drained) std::atomic<int>(0);

  std::vector<std::unique_ptr<DumpChild>> kids;
  for (int k = 0; k < kProcs; ++k) {
    kids.push_back(std::make_unique<DumpChild>([k, drained](int ready) {
      block_usr1();
      raise_nofile(kLimit);
      std::vector<int> rd, wr;
      for (int i = 0; i < kPipes; ++i) {
        int p[2];
        if (pipe(p) != 0) return 2;
        std::string d = content(k, i);
        if (write(p[1], d.data(), d.size()) != 16) return 3;
        rd.push_back(p[0]);
        wr.push_back(p[1]);
      }
      close(ready);
      wait_usr1();  // dumped: drain
      char buf[32];
      for (int i = 0; i < kPipes; ++i)
        if (read(rd[static_cast<size_t>(i)], buf, sizeof buf) != 16 || std::string(buf, 16) != content(k, i)) return 4;
      drained->fetch_add(1);
      wait_usr1();  // restored: every pipe has its bytes again, at the same numbers, both ends one pipe
      for (int i = 0; i < kPipes; ++i) {
        const int r = rd[static_cast<size_t>(i)], w = wr[static_cast<size_t>(i)];
        if (fcntl(r, F_SETFL, O_NONBLOCK) != 0) return 5;
        if (read(r, buf, sizeof buf) != 16 || std::string(buf, 16) != content(k, i)) return 6;
        if (write(w, "!", 1) != 1 || read(r, buf, sizeof buf) != 1 || buf[0] != '!') return 7;
      }
      return 0;
    }));
    ASSERT_TRUE(kids.back()->ready()) << k;
  }
  std::vector<pid_t> pids;
  for (auto& k : kids) pids.push_back(k->pid());
  const std::string path = fmt::format("{}/pipecr-scale-{}.img", std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp",
                                       getpid());

  std::string dumped = in_limited_child([&] {
    auto t0 = std::chrono::steady_clock::now();
    image::MemorySink sink;
    auto st = dump::dump_processes(dump::DumpOptions{.pids = pids}, sink);
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!st) return "error: " + st.error().what;
    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<const char*>(sink.bytes().data()), static_cast<std::streamsize>(sink.bytes().size()));
    if (!f) return std::string("error: writing the image");
    return fmt::format("ok time={:.2f}s stopped={:.1f}ms peak_rss={}MiB image={}MiB", secs,
                       static_cast<double>(st->stopped_ns) / 1e6, peak_rss_mib(), sink.bytes().size() >> 20);
  });
  std::printf("dump of %d x %d pipes: %s\n", kProcs, kPipes, dumped.c_str());
  RecordProperty("dump", dumped);
  ASSERT_EQ(dumped.rfind("ok ", 0), 0u) << dumped;

  for (auto& k : kids) kill(k->pid(), SIGUSR1);
  for (int waited = 0; drained->load() < kProcs && waited < 60000; waited += 10) usleep(10000);
  ASSERT_EQ(drained->load(), kProcs) << "the processes did not drain their pipes";

  std::string restored = in_limited_child([&] {
    std::ifstream f(path, std::ios::binary);
    std::string raw((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    std::vector<std::byte> bytes(raw.size());
    std::memcpy(bytes.data(), raw.data(), raw.size());
    raw.clear();
    raw.shrink_to_fit();
    auto img = image::parse(bytes);
    if (!img) return "error: " + img.error().what;
    restore::ProcessRestoreRequest req;
    for (pid_t p : pids) req.into.push_back(restore::IntoSpec{p, p});
    std::chrono::steady_clock::time_point built, resumed;
    restore::ProcessRestoreOptions opts;
    opts.hook = [&](restore::Stage s) {
      if (s == restore::Stage::built) built = std::chrono::steady_clock::now();
      if (s == restore::Stage::resumed) resumed = std::chrono::steady_clock::now();
    };
    auto t0 = std::chrono::steady_clock::now();
    auto sum = restore::restore_processes(*img, req, opts);
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!sum) return "error: " + sum.error().what;
    return fmt::format("ok pipes={} in_place={} fds={} time={:.2f}s stopped={:.1f}ms peak_rss={}MiB", sum->pipes,
                       sum->in_place, sum->fds, secs, std::chrono::duration<double, std::milli>(resumed - built).count(),
                       peak_rss_mib());
  });
  ::unlink(path.c_str());
  std::printf("restore of %d x %d pipes: %s\n", kProcs, kPipes, restored.c_str());
  RecordProperty("restore", restored);
  EXPECT_EQ(restored.rfind(fmt::format("ok pipes={} ", kProcs * kPipes), 0), 0u) << restored;
  for (auto& k : kids) {
    expect_running(k->pid());
    EXPECT_EQ(k->finish(), 0) << k->pid();
  }
  munmap(drained, 4096);
}

}  // namespace
}  // namespace pipecr
