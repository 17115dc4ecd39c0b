// scale_heavy_test.cpp (label heavy): issue 11's dump check. Ten processes hold 9,000 pipes each
// (both ends, 16 bytes queued in each: 90,000 pipes, 180,000 fds), each under RLIMIT_NOFILE
// 20,000, and one dump of all ten runs in a process under the same limit. The image must hold
// every pipe with its own bytes, every process must find its pipes as they were, and pipecr's
// peak RSS and time are printed.
#include <sys/ioctl.h>
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <set>
#include <string>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "dump_child.hpp"

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

TEST(DumpScale, TenProcessesOf9000PipesUnderFdLimit20000) {
  std::vector<std::unique_ptr<DumpChild>> kids;
  for (int k = 0; k < kProcs; ++k) {
    kids.push_back(std::make_unique<DumpChild>([k](int ready) {
      block_usr1();
      raise_nofile(kLimit);
      std::vector<int> rd;
      for (int i = 0; i < kPipes; ++i) {
        int p[2];
        if (pipe(p) != 0) return 2;
        std::string d = content(k, i);
        if (write(p[1], d.data(), d.size()) != 16) return 3;
        rd.push_back(p[0]);
      }
      close(ready);
      wait_usr1();
      for (int i = 0; i < kPipes; ++i) {
        char buf[32];
        if (read(rd[static_cast<size_t>(i)], buf, sizeof buf) != 16 || std::string(buf, 16) != content(k, i)) return 4;
      }
      return 0;
    }));
    ASSERT_TRUE(kids.back()->ready()) << k;
  }
  std::vector<pid_t> pids;
  for (auto& k : kids) pids.push_back(k->pid());

  int out[2];
  ASSERT_EQ(pipe(out), 0);
  pid_t dumper = fork();
  if (dumper == 0) {
    close(out[0]);
    raise_nofile(kLimit);
    auto t0 = std::chrono::steady_clock::now();
    image::MemorySink sink;
    auto st = dump::dump_processes(dump::DumpOptions{.pids = pids}, sink);
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    std::string report;
    if (!st) {
      report = "error: " + st.error().what;
    } else {
      auto img = image::parse(sink.bytes());
      std::set<std::string> seen;
      if (img)
        for (const PipeRecord& p : img->pipes)
          seen.insert(std::string(reinterpret_cast<const char*>(p.data.data()), p.data.size()));
      bool ok = img && img->pipes.size() == size_t{kProcs} * kPipes && img->fds.size() == 2u * kProcs * kPipes &&
                seen.size() == size_t{kProcs} * kPipes && seen.count(content(kProcs - 1, kPipes - 1));
      report = fmt::format("{} pipes={} fds={} time={:.2f}s stopped={:.1f}ms seize={:.1f}ms batches={} "
                           "scratch_pipes={} peak_rss={}MiB image={}MiB",
                           ok ? "ok" : "BAD", img ? img->pipes.size() : 0, img ? img->fds.size() : 0, secs,
                           static_cast<double>(st->stopped_ns) / 1e6, static_cast<double>(st->seize_ns) / 1e6,
                           st->batches, st->scratch_pipes, ru.ru_maxrss / 1024, sink.bytes().size() >> 20);
    }
    (void)!write(out[1], report.data(), report.size());
    _exit(0);
  }
  close(out[1]);
  std::string report;
  char buf[512];
  for (ssize_t n; (n = read(out[0], buf, sizeof buf)) > 0;) report.append(buf, static_cast<size_t>(n));
  close(out[0]);
  int st = 0;
  waitpid(dumper, &st, 0);
  std::printf("dump of %d x %d pipes: %s\n", kProcs, kPipes, report.c_str());
  RecordProperty("dump", report);
  EXPECT_TRUE(report.rfind("ok ", 0) == 0) << report;
  for (auto& k : kids) {
    expect_running(k->pid());
    EXPECT_EQ(k->finish(), 0);
  }
}

}  // namespace
}  // namespace pipecr
