// scenario_test.cpp: runs the zdtm-style scenario programs against `pipecr dump`, `show` and
// `restore`.
//
// For each program (see the list below and tests/scenario/CMakeLists.txt), six modes:
//   alone    start, wait for "ready", check its description against the live state (/proc),
//            SIGUSR1, expect exit 0: the program and its description are right.
//   wreck    start, drain its pipes through /proc/PID/fd, SIGUSR1, expect exit 1: its checks bite,
//            so a restore that does nothing cannot pass the restore mode.
//   dump     start, `pipecr dump`, no process left stopped or traced, the image private (0600),
//            `pipecr show --json` matches the description, SIGUSR1, expect exit 0: the processes
//            ran on and found their pipes byte-identical.
//   restore  as dump, then wreck, `pipecr restore IMG --into P=P ...` (one call for all the
//            processes, so the pipes between them connect), SIGUSR1, expect exit 0. The targets
//            still hold their (drained) pipes, so these are refilled in place.
//   intact   as dump, then `pipecr restore -v` over the intact state (no wreck): every pipe is
//            refilled in place (the summary says so), SIGUSR1, expect exit 0.
//   replace  as restore, with --replace: every pipe is a new one (the summary says so); epoll
//            watches the image records are re-added. Skipped for programs whose checks need the
//            links to their pipes kept (ends in flight).
// Then the consumer restart with --exec, and the failures: a pid that does not exist, a target
// that exits during the dump, pipecr SIGKILLed during a dump, pipecr run as nobody.
//
// The driver reads PIPECR (the pipecr binary) and ZDTM_BIN_DIR (the programs) from the
// environment. Each test runs in its own mkdtemp directory and every process it starts is a
// harness Process (killed and reaped on every path).
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <poll.h>
#include <unistd.h>

#include <fstream>
#include <optional>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "compare.hpp"
#include "harness.hpp"

namespace zdtm_harness {
namespace {

using nlohmann::json;
using std::chrono::milliseconds;
using std::chrono::seconds;

// Each well under the CTest TIMEOUT (CMakeLists.txt), so that the driver, not CTest, reports a
// hang and kills what it started.
constexpr milliseconds kReadyTimeout = seconds(30);
constexpr milliseconds kPipecrTimeout = seconds(60);
constexpr milliseconds kFinishTimeout = seconds(30);

std::string env(const char* name) {
  const char* v = getenv(name);
  return v ? v : "";
}

std::string bin_dir() {
  std::string d = env("ZDTM_BIN_DIR");
#ifdef ZDTM_DEFAULT_BIN_DIR
  if (d.empty()) d = ZDTM_DEFAULT_BIN_DIR;
#endif
  return d;
}

std::string pipecr() { return env("PIPECR"); }

std::string tail(const std::string& s) { return s.size() > 4000 ? "..." + s.substr(s.size() - 4000) : s; }

std::string lines(const std::vector<std::string>& v, size_t max = 40) {
  std::string out;
  for (size_t i = 0; i < v.size() && i < max; i++) out += "  " + v[i] + "\n";
  if (v.size() > max) out += "  ... and " + std::to_string(v.size() - max) + " more\n";
  return out;
}

// One running scenario program in its own directory.
class Scenario {
 public:
  explicit Scenario(std::string name) : name_(std::move(name)) {}

  // Start it and wait for "ready" and its description.
  void start(std::vector<std::string> args = {}, std::vector<std::string> extra_env = {}) {
    int sv[2];
    ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    ready_ = sv[0];
    SpawnOptions opt;
    opt.argv = {bin_dir() + "/" + name_};
    for (auto& a : args) opt.argv.push_back(a);
    opt.env = {"ZDTM_DIR=" + dir_.path(), "ZDTM_EXPECT=" + dir_ / "expect.json", "ZDTM_TIMEOUT=600"};
    for (auto& e : extra_env) opt.env.push_back(e);
    opt.stdout_path = dir_ / "prog.out";
    opt.stderr_path = dir_ / "prog.err";
    opt.ready_fd = sv[1];
    proc_ = Process(opt);
    close(sv[1]);
    std::string got;
    auto deadline = std::chrono::steady_clock::now() + kReadyTimeout;
    while (got.find('\n') == std::string::npos) {
      auto left = std::chrono::duration_cast<milliseconds>(deadline - std::chrono::steady_clock::now()).count();
      struct pollfd p = {ready_, POLLIN, 0};
      ASSERT_GT(left, 0) << name_ << ": no \"ready\" in time; stderr: " << err();
      ASSERT_GE(poll(&p, 1, static_cast<int>(left)), 0);
      char buf[64];
      ssize_t n = read(ready_, buf, sizeof buf);
      ASSERT_GT(n, 0) << name_ << " exited before \"ready\" (code " << proc_.wait(seconds(5)) << "); stderr: " << err();
      got.append(buf, static_cast<size_t>(n));
    }
    ASSERT_EQ(got, "ready\n");
    std::string e = read_file(dir_ / "expect.json");
    if (!e.empty()) expect_ = json::parse(e);
  }

  ~Scenario() {
    if (ready_ >= 0) close(ready_);
  }

  // SIGUSR1, then its exit code (-1: it did not finish in time; it is killed on destruction).
  int finish() {
    proc_.signal(SIGUSR1);
    return proc_.wait(kFinishTimeout);
  }

  [[nodiscard]] std::vector<pid_t> pids() const {
    std::vector<pid_t> out;
    for (const json& p : expect_.value("processes", json::array())) out.push_back(p.value("pid", 0));
    return out;
  }
  [[nodiscard]] std::string err() const { return tail(read_file(dir_ / "prog.err")); }
  [[nodiscard]] const json& expect() const { return expect_; }
  [[nodiscard]] const TempDir& dir() const { return dir_; }
  [[nodiscard]] std::string image() const { return dir_ / "image.pcr"; }
  Process& proc() { return proc_; }

  size_t wreck() {
    size_t n = 0;
    for (pid_t p : pids()) n += drain(p);
    return n;
  }

 private:
  std::string name_;
  TempDir dir_;
  Process proc_;
  int ready_ = -1;
  json expect_;
};

RunResult pipecr_run(const Scenario& s, std::vector<std::string> args) {
  args.insert(args.begin(), pipecr());
  return run(args, s.dir().path(), kPipecrTimeout);
}

std::string describe(const RunResult& r) {
  return "exit " + std::to_string(r.code) + "\nstderr: " + tail(r.err) + "\nstdout: " + tail(r.out);
}

void expect_not_stopped(const Scenario& s, const char* after) {
  for (pid_t p : s.pids()) {
    std::string problem = wait_not_stopped(p, milliseconds(1000));
    EXPECT_EQ(problem, "") << "after " << after;
  }
}

// `pipecr dump` of the scenario's processes: --tree from the first when it has several.
void dump(const Scenario& s) {
  ASSERT_FALSE(pipecr().empty()) << "PIPECR is not set (the pipecr_cli target was not built)";
  std::vector<pid_t> pids = s.pids();
  ASSERT_FALSE(pids.empty());
  std::vector<std::string> args = {"dump", "-t", std::to_string(pids[0])};
  if (pids.size() > 1) args.push_back("--tree");
  args.insert(args.end(), {"-o", s.image()});
  RunResult r = pipecr_run(s, args);
  expect_not_stopped(s, "pipecr dump");
  ASSERT_EQ(r.code, 0) << "pipecr dump: " << describe(r);
  struct stat st;
  ASSERT_EQ(stat(s.image().c_str(), &st), 0) << "no image at " << s.image();
  EXPECT_EQ(st.st_mode & 0777, 0600u) << "the image should be private";
}

void show_matches(const Scenario& s) {
  RunResult r = pipecr_run(s, {"show", s.image(), "--json"});
  ASSERT_EQ(r.code, 0) << "pipecr show: " << describe(r);
  json doc;
  ASSERT_NO_THROW(doc = json::parse(r.out)) << "show --json is not JSON: " << tail(r.out);
  EXPECT_TRUE(doc.contains("format_version"));
  std::vector<std::string> diffs = compare(s.expect(), doc, true);
  EXPECT_TRUE(diffs.empty()) << "show --json differs from what the program holds:\n" << lines(diffs);
}

// Returns the summary line (stdout) and the -v lines (stderr).
RunResult restore(const Scenario& s, std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {"restore", s.image()};
  for (pid_t p : s.pids()) args.insert(args.end(), {"--into", std::to_string(p) + "=" + std::to_string(p)});
  args.insert(args.end(), extra.begin(), extra.end());
  RunResult r = pipecr_run(s, args);
  expect_not_stopped(s, "pipecr restore");
  EXPECT_EQ(r.code, 0) << "pipecr restore: " << describe(r);
  return r;
}

// ---- the scenarios and their modes ----

struct Info {
  const char* name;
  bool drains;         // holds bytes, so the wreck must make it fail
  bool links = false;  // its checks need the links to its pipes kept (ends in flight): not for --replace
  bool fits = true;    // few enough pipes that pipecr's fd limit lets every one be refilled in place
};

void PrintTo(const Info& i, std::ostream* os) { *os << i.name; }

// Keep in step with ZDTM_SCENARIOS in CMakeLists.txt.
const Info kScenarios[] = {
    {"pipe00", true},     {"pipe01", true},        {"pipe02", true},      {"pipe03", true},
    {"packet", true},     {"write_only", true},    {"file_fown", true},   {"fifo", true},
    {"fifo_ro", true},    {"fifo_nowriter", false}, {"fifo_wronly", false}, {"fifo_ghost", true},
    {"fifo_rowo_pair", true}, {"fifo_loop", true},
    {"freespace", true},  {"many_pipes", true, false, false},    {"vmsplice", true},    {"pipe_exec", true},
    {"epoll_links", true}, {"scm_inflight", true, true}, {"fdt_shared", true}, {"thread_fdt", true},
};

class Zdtm : public ::testing::TestWithParam<Info> {};

TEST_P(Zdtm, alone) {
  Scenario s(GetParam().name);
  ASSERT_NO_FATAL_FAILURE(s.start());
  std::vector<std::string> diffs = compare(s.expect(), live_view(s.expect()), false);
  EXPECT_TRUE(diffs.empty()) << "the program's description differs from its live state:\n" << lines(diffs);
  EXPECT_EQ(s.finish(), 0) << s.err();
}

TEST_P(Zdtm, wreck) {
  if (!GetParam().drains) GTEST_SKIP() << GetParam().name << " holds no bytes: draining changes nothing";
  Scenario s(GetParam().name);
  ASSERT_NO_FATAL_FAILURE(s.start());
  EXPECT_GT(s.wreck(), 0u) << "nothing drained";
  EXPECT_EQ(s.finish(), 1) << "the program should notice its pipes were drained; stderr: " << s.err();
  EXPECT_NE(s.err().find("FAIL"), std::string::npos) << "no reason given";
}

TEST_P(Zdtm, dump) {
  Scenario s(GetParam().name);
  ASSERT_NO_FATAL_FAILURE(s.start());
  ASSERT_NO_FATAL_FAILURE(dump(s));
  show_matches(s);
  EXPECT_EQ(s.finish(), 0) << "after the dump: " << s.err();
}

TEST_P(Zdtm, restore) {
  Scenario s(GetParam().name);
  ASSERT_NO_FATAL_FAILURE(s.start());
  ASSERT_NO_FATAL_FAILURE(dump(s));
  size_t drained = s.wreck();
  if (GetParam().drains) {
    EXPECT_GT(drained, 0u);
  }
  RunResult r = restore(s);
  ASSERT_EQ(r.code, 0);
  EXPECT_EQ(s.finish(), 0) << "after the restore: " << s.err();
}

TEST_P(Zdtm, intact) {
  Scenario s(GetParam().name);
  ASSERT_NO_FATAL_FAILURE(s.start());
  ASSERT_NO_FATAL_FAILURE(dump(s));
  RunResult r = restore(s, {"-v"});
  ASSERT_EQ(r.code, 0);
  if (GetParam().fits) {
    EXPECT_NE(r.out.find(" in place, 0 replaced;"), std::string::npos)
        << "every pipe should be refilled in place: " << describe(r);
    EXPECT_EQ(r.err.find("replaced:"), std::string::npos) << describe(r);
  } else {
    EXPECT_EQ(r.out.find("(0 in place,"), std::string::npos) << "some pipes should be in place: " << describe(r);
  }
  EXPECT_EQ(s.finish(), 0) << "after the restore over the intact state: " << s.err();
}

TEST_P(Zdtm, replace) {
  if (GetParam().links) GTEST_SKIP() << GetParam().name << " needs the links to its pipes kept";
  Scenario s(GetParam().name);
  ASSERT_NO_FATAL_FAILURE(s.start());
  ASSERT_NO_FATAL_FAILURE(dump(s));
  s.wreck();
  RunResult r = restore(s, {"--replace"});
  ASSERT_EQ(r.code, 0);
  EXPECT_NE(r.out.find("(0 in place,"), std::string::npos) << "--replace should replace every pipe: " << describe(r);
  const std::string name = GetParam().name;
  if (name == "epoll_links" || name == "thread_fdt")  // their epoll watches follow the new pipes
    EXPECT_NE(r.err.find("re-added on the restored pipe ends"), std::string::npos) << describe(r);
  EXPECT_EQ(r.err.find("will not hear"), std::string::npos) << "a watch was cut: " << describe(r);
  EXPECT_EQ(s.finish(), 0) << "after the restore with --replace: " << s.err();
}

INSTANTIATE_TEST_SUITE_P(Scenario, Zdtm, ::testing::ValuesIn(kScenarios),
                         [](const ::testing::TestParamInfo<Info>& i) { return std::string(i.param.name); });

// scm_inflight with --replace: the pipes are new, the ends in flight stay on the old ones; restore
// must say so per end (never silence), and the program then sees it.
TEST(Zdtm, scm_inflight_replace_says_ends_stay) {
  Scenario s("scm_inflight");
  ASSERT_NO_FATAL_FAILURE(s.start());
  ASSERT_NO_FATAL_FAILURE(dump(s));
  s.wreck();
  RunResult r = restore(s, {"--replace", "-v"});
  ASSERT_EQ(r.code, 0);
  EXPECT_NE(r.out.find("(0 in place,"), std::string::npos) << describe(r);
  for (const char* end : {"the read end in flight in socket fd 41", "the write end in flight in socket fd 43"}) {
    size_t at = r.err.find(end);
    ASSERT_NE(at, std::string::npos) << "no note for " << end << ": " << describe(r);
    EXPECT_NE(r.err.find("stays on the old pipe", at), std::string::npos) << describe(r);
  }
  EXPECT_EQ(s.finish(), 1) << "the ends in flight should be on the old pipes: " << s.err();
}

// The consumer restart: producer and consumer dumped together; the consumer is killed and
// started again from the image by `restore --exec`, while the producer gets its pipe back with
// --into. The new consumer must read every in-flight byte, then what the producer writes next.
TEST(Zdtm, exec_restarts_consumer) {
  Scenario s("pipe_exec");
  ASSERT_NO_FATAL_FAILURE(s.start());
  ASSERT_NO_FATAL_FAILURE(dump(s));
  std::vector<pid_t> pids = s.pids();
  ASSERT_EQ(pids.size(), 2u);
  pid_t producer = pids[0], consumer = pids[1];
  ASSERT_EQ(kill(consumer, SIGKILL), 0);
  for (int i = 0; i < 2000 && proc_state(consumer) != 'Z' && proc_state(consumer) != 0; i++) usleep(1000);
  ASSERT_TRUE(proc_state(consumer) == 'Z' || proc_state(consumer) == 0) << "the old consumer did not die";

  SpawnOptions opt;
  opt.argv = {pipecr(), "restore", s.image(), "--into", std::to_string(producer) + "=" + std::to_string(producer),
              "--exec", std::to_string(consumer), "--", bin_dir() + "/pipe_exec", "--consume"};
  opt.stdout_path = s.dir() / "consumer.out";
  opt.stderr_path = s.dir() / "consumer.err";
  Process restarted(opt);
  // Let pipecr put the producer's fd back before it writes on; the restarted consumer reads what
  // was in flight meanwhile. The producer's own write end only changes once restore is done, so
  // wait for the exec (comm changes from pipecr to pipe_exec).
  std::string comm;
  for (int i = 0; i < 30000; i++) {
    comm = read_file("/proc/" + std::to_string(restarted.pid()) + "/comm");
    if (comm.rfind("pipe_exec", 0) == 0 || proc_state(restarted.pid()) == 'Z') break;
    usleep(1000);
  }
  ASSERT_EQ(comm.rfind("pipe_exec", 0), 0u) << "pipecr restore --exec did not exec the consumer; "
                                            << read_file(s.dir() / "consumer.err");
  expect_not_stopped(s, "pipecr restore --exec");
  EXPECT_EQ(s.finish(), 0) << "producer: " << s.err();
  EXPECT_EQ(restarted.wait(kFinishTimeout), 0) << "restarted consumer: " << read_file(s.dir() / "consumer.err");
}

// ---- the comparator itself must bite ----

// A description of one process holding a pipe through a read end and two fds sharing a write end.
json described() {
  return json::parse(R"({"processes": [{"pid": 10, "comm": "x"}],
    "pipes": [{"name": "P", "kind": "pipe", "path": null, "capacity": 65536, "bytes": 5, "packets": null,
               "outside_holders": false}],
    "files": [{"name": "r", "pipe": "P", "access": "read", "flags": [], "owner": null, "signal": 0},
              {"name": "w", "pipe": "P", "access": "write", "flags": ["O_NONBLOCK"], "owner": null, "signal": 0}],
    "fds": [{"pid": 10, "fd": 3, "file": "r", "cloexec": false, "blocked": null},
            {"pid": 10, "fd": 4, "file": "w", "cloexec": false, "blocked": null},
            {"pid": 10, "fd": 5, "file": "w", "cloexec": true, "blocked": null}]})");
}

// The same, as an image would say it (ids, and flags the comparison ignores).
json imaged() {
  return json::parse(R"({"format_version": 1, "processes": [{"pid": 10, "comm": "x"}],
    "pipes": [{"id": 7, "kind": "pipe", "path": null, "capacity": 65536, "bytes": 5, "packets": null,
               "slots": [{"len": 5, "packet": false}], "outside_holders": false}],
    "files": [{"id": 1, "pipe": 7, "access": "read", "flags": ["O_LARGEFILE"], "owner": null, "signal": 0},
              {"id": 2, "pipe": 7, "access": "write", "flags": ["O_NONBLOCK"], "owner": null, "signal": 0}],
    "fds": [{"pid": 10, "fd": 3, "file": 1, "cloexec": false, "blocked": null},
            {"pid": 10, "fd": 4, "file": 2, "cloexec": false, "blocked": null},
            {"pid": 10, "fd": 5, "file": 2, "cloexec": true, "blocked": null}]})");
}

TEST(Harness, compare_catches_differences) {
  EXPECT_EQ(compare(described(), imaged(), true), std::vector<std::string>{});
  json split = imaged();  // fd 5 gets an open file description of its own
  split["files"].push_back(split["files"][1]);
  split["files"][2]["id"] = 3;
  split["fds"][2]["file"] = 3;
  EXPECT_FALSE(compare(described(), split, true).empty()) << "separate opens taken for a dup";
  json merged = imaged();  // read and write ends share one open file description
  merged["fds"][0]["file"] = 2;
  EXPECT_FALSE(compare(described(), merged, true).empty());
  json flags = imaged();
  flags["files"][0]["flags"] = {"O_NONBLOCK"};
  EXPECT_FALSE(compare(described(), flags, true).empty()) << "O_NONBLOCK on the wrong end";
  json bytes = imaged();
  bytes["pipes"][0]["bytes"] = 4;
  EXPECT_FALSE(compare(described(), bytes, true).empty());
  json extra = imaged();
  extra["fds"].push_back(json{{"pid", 10}, {"fd", 9}, {"file", 1}, {"cloexec", false}, {"blocked", nullptr}});
  EXPECT_FALSE(compare(described(), extra, true).empty()) << "an fd the program does not hold";
  json cloexec = imaged();
  cloexec["fds"][1]["cloexec"] = true;
  EXPECT_FALSE(compare(described(), cloexec, true).empty());
  json two_pipes = imaged();  // the write end on a pipe of its own
  two_pipes["pipes"].push_back(two_pipes["pipes"][0]);
  two_pipes["pipes"][1]["id"] = 8;
  two_pipes["files"][1]["pipe"] = 8;
  EXPECT_FALSE(compare(described(), two_pipes, true).empty());
  json missing = imaged();
  missing["pipes"][0].erase("outside_holders");
  EXPECT_FALSE(compare(described(), missing, true).empty()) << "strict: a missing field is a difference";
  EXPECT_TRUE(compare(described(), missing, false).empty()) << "live view: a missing field is not compared";
}

// ---- failures: nothing stopped, no image, the right exit code ----

TEST(Fail, no_such_pid) {
  ASSERT_FALSE(pipecr().empty());
  TempDir dir;
  // A pid that surely does not exist: a child of ours, reaped.
  SpawnOptions opt;
  opt.argv = {"/bin/true"};
  Process gone(opt);
  pid_t pid = gone.pid();
  ASSERT_EQ(gone.wait(seconds(10)), 0);
  gone.kill_group();
  std::string img = dir / "image.pcr";
  RunResult r = run({pipecr(), "dump", "-t", std::to_string(pid), "-o", img}, dir.path(), kPipecrTimeout);
  EXPECT_EQ(r.code, 75) << describe(r);
  EXPECT_FALSE(file_exists(img)) << "a failed dump left a file at IMAGE";
}

TEST(Fail, target_exits_during_dump) {
  ASSERT_FALSE(pipecr().empty());
  int finished = 0, refused = 0;
  for (int delay_us : {0, 1000, 5000, 20000, 50000}) {
    Scenario s("exit_early");
    ASSERT_NO_FATAL_FAILURE(s.start({}, {"ZDTM_EXIT_DELAY_US=" + std::to_string(delay_us)}));
    pid_t pid = s.proc().pid();
    RunResult r = run({pipecr(), "dump", "-t", std::to_string(pid), "-o", s.image()}, s.dir().path(), kPipecrTimeout);
    EXPECT_TRUE(r.code == 0 || r.code == 75) << "delay " << delay_us << " us: " << describe(r);
    if (r.code == 75) {
      refused++;
      EXPECT_FALSE(file_exists(s.image())) << "a failed dump left a file at IMAGE";
    } else if (r.code == 0) {
      finished++;
    }
    EXPECT_EQ(wait_not_stopped(pid, milliseconds(1000)), "");
    EXPECT_EQ(s.proc().wait(kFinishTimeout), 0) << "the target did not run on and exit: " << s.err();
  }
  RecordProperty("dumps_finished", finished);
  RecordProperty("dumps_refused", refused);
}

// pipecr SIGKILLed at several moments after it seized the target (while stopped, while capturing,
// while writing the image): the kernel must let the target run on, with its pipes unchanged, and
// IMAGE is either absent or a whole image (a kill can land after the rename, before the exit).
TEST(Fail, pipecr_killed_during_dump) {
  ASSERT_FALSE(pipecr().empty());
  int killed = 0;
  for (int delay_ms : {0, 5, 20, 80}) {
    SCOPED_TRACE("killed " + std::to_string(delay_ms) + " ms after the seize");
    Scenario s("many_pipes");
    ASSERT_NO_FATAL_FAILURE(s.start());
    pid_t target = s.proc().pid();
    SpawnOptions opt;
    opt.argv = {pipecr(), "dump", "-t", std::to_string(target), "-o", s.image()};
    opt.stderr_path = s.dir() / "pipecr.err";
    Process dumper(opt);
    bool seized = false;
    auto deadline = std::chrono::steady_clock::now() + seconds(60);
    while (!seized && std::chrono::steady_clock::now() < deadline) {
      seized = tracer_pid(target) == dumper.pid();
      if (!seized && dumper.wait(milliseconds(0)) >= 0) break;
    }
    int code = seized ? dumper.wait(milliseconds(delay_ms)) : dumper.wait(milliseconds(0));
    dumper.kill_group();
    if (code < 0 && file_exists(s.image())) {
      // Killed between the image's rename into place and its exit: the image must be whole.
      RunResult shown = run({pipecr(), "show", s.image()}, s.dir().path(), kPipecrTimeout);
      EXPECT_EQ(shown.code, 0) << "a killed dump left a file at IMAGE that does not read back: " << describe(shown);
    } else if (code < 0) {
      killed++;
    } else {
      EXPECT_EQ(code, 0) << read_file(s.dir() / "pipecr.err");
    }
    EXPECT_EQ(wait_not_stopped(target, milliseconds(2000)), "") << "pipecr's death left the target stopped";
    EXPECT_EQ(s.finish(), 0) << "the target's pipes changed: " << s.err();
  }
  RecordProperty("dumps_killed", killed);
  if (killed == 0) GTEST_SKIP() << "pipecr always finished before it could be killed";
}

// SIGTERM to pipecr at any moment of a restore: it either has not touched the target yet, or it
// finishes the install first (interrupting signals are held back while targets run injected code).
// Either way the target is not left stopped or traced and its pipes hold what they held (the dump
// is restored without a wreck, so both outcomes pass the program's own checks).
TEST(Fail, pipecr_interrupted_during_restore) {
  ASSERT_FALSE(pipecr().empty());
  int during = 0;
  for (int delay_ms : {0, 2, 10, 40}) {
    SCOPED_TRACE("SIGTERM " + std::to_string(delay_ms) + " ms after the seize");
    Scenario s("many_pipes");
    ASSERT_NO_FATAL_FAILURE(s.start());
    ASSERT_NO_FATAL_FAILURE(dump(s));
    pid_t target = s.proc().pid();
    SpawnOptions opt;
    opt.argv = {pipecr(), "restore", s.image(), "--into", std::to_string(target) + "=" + std::to_string(target)};
    opt.stderr_path = s.dir() / "pipecr.err";
    Process restorer(opt);
    bool seized = false;
    auto deadline = std::chrono::steady_clock::now() + seconds(60);
    while (!seized && std::chrono::steady_clock::now() < deadline) {
      seized = tracer_pid(target) == restorer.pid();
      if (!seized && restorer.wait(milliseconds(0)) >= 0) break;
    }
    if (seized) {
      std::this_thread::sleep_for(milliseconds(delay_ms));
      restorer.signal(SIGTERM);
      during += tracer_pid(target) == restorer.pid();
    }
    int code = restorer.wait(seconds(60));
    EXPECT_TRUE(code == 0 || code == 128 + SIGTERM) << code << ": " << read_file(s.dir() / "pipecr.err");
    EXPECT_EQ(wait_not_stopped(target, milliseconds(2000)), "") << "the target was left stopped or traced";
    EXPECT_EQ(s.finish(), 0) << "the target's pipes are not whole: " << s.err();
  }
  RecordProperty("signals_during_install", during);
}

TEST(Fail, unprivileged_caller) {
  ASSERT_FALSE(pipecr().empty());
  if (geteuid() != 0) GTEST_SKIP() << "needs root to run pipecr as nobody";
  if (access("/usr/bin/setpriv", X_OK) != 0) GTEST_SKIP() << "setpriv (util-linux) not installed";
  Scenario s("pipe01");
  ASSERT_NO_FATAL_FAILURE(s.start());
  // nobody must be able to write the image's directory and to run pipecr: give it its own
  // directory and a copy of the binary there, so only ptrace can be what is refused.
  std::string out_dir = s.dir() / "nobody";
  ASSERT_EQ(mkdir(out_dir.c_str(), 0777), 0);
  ASSERT_EQ(chmod(out_dir.c_str(), 0777), 0);
  ASSERT_EQ(chmod(s.dir().path().c_str(), 0755), 0);
  std::string bin = s.dir() / "pipecr";
  {
    std::ifstream in(pipecr(), std::ios::binary);
    std::ofstream out(bin, std::ios::binary);
    out << in.rdbuf();
  }
  ASSERT_EQ(chmod(bin.c_str(), 0755), 0);
  std::string img = out_dir + "/image.pcr";
  RunResult r = run({"/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", bin, "dump", "-t",
                     std::to_string(s.proc().pid()), "-o", img},
                    out_dir, kPipecrTimeout);
  EXPECT_EQ(r.code, 77) << describe(r);
  EXPECT_FALSE(file_exists(img)) << "a refused dump left a file at IMAGE";
  EXPECT_EQ(wait_not_stopped(s.proc().pid(), milliseconds(1000)), "");
  EXPECT_EQ(s.finish(), 0) << s.err();
}

}  // namespace
}  // namespace zdtm_harness

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  // Orphans of the scenario programs are reparented to us, so that Process can reap them.
  prctl(PR_SET_CHILD_SUBREAPER, 1);
  signal(SIGPIPE, SIG_IGN);
  int rc = RUN_ALL_TESTS();
  // A --gtest_filter that selects nothing (a name drifted from CMakeLists.txt) must not pass.
  if (::testing::UnitTest::GetInstance()->test_to_run_count() == 0) {
    fprintf(stderr, "scenario_test: the filter selected no test\n");
    return 1;
  }
  return rc;
}
