// pipe_exec: a producer and a consumer connected by a pipe (producer fd 12 -> consumer fd 11),
// for the consumer-restart test: dump both, kill the consumer, restore the producer with --into
// and start a new consumer from the image with --exec.
//
// The stream is one pattern from offset 0 to kTotal. Before "ready" the producer has written
// kBefore bytes and the consumer has read the first kConsumed, so kBefore - kConsumed bytes are
// in flight. After SIGUSR1 the producer writes the rest (more than a pipe holds: it must block and
// be drained by whoever now reads fd 11), closes, and passes if every write succeeded. The
// consumer it forked gets SIGUSR1 too (when it still lives) and reads on from kConsumed to EOF.
// A consumer started as `pipe_exec --consume` (the --exec command) does the same with the fd 11
// it was given: every in-flight byte, then the new ones, then EOF, nothing else.
#include "zdtmlite.h"

namespace {
constexpr int kRead = 11, kWrite = 12;
constexpr uint32_t kSeed = 160;
constexpr size_t kBefore = 41000, kConsumed = 1000, kTotal = 241000;

[[noreturn]] void consume_rest(const char* who) {
  zdtm::expect_fd(kRead, O_RDONLY, 0, false, who);
  zdtm::expect_pattern(kRead, kSeed, kConsumed, kTotal - kConsumed, who);
  char c;
  ssize_t n = read(kRead, &c, 1);
  ZDTM_CHECK(n == 0, "%s: bytes or no EOF after offset %zu (read returned %zd)", who, kTotal, n);
  zdtm::pass();
}

[[noreturn]] void consumer() {
  zdtm::expect_pattern(kRead, kSeed, 0, kConsumed, "consumer, first bytes");
  zdtm::wait_for_signal();
  consume_rest("forked consumer");
}
}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && strcmp(argv[1], "--consume") == 0) {
    zdtm::init("pipe_exec/consumer");
    consume_rest("restarted consumer");
  }
  zdtm::init("pipe_exec");
  signal(SIGPIPE, SIG_IGN);
  int p[2];
  if (pipe(p) != 0) ZDTM_SYSFAIL("pipe");
  zdtm::move_fd(p[1], kWrite);
  zdtm::write_pattern(kWrite, kSeed, 0, kBefore, 4096, "producer, first bytes");
  pid_t kid = zdtm::fork_child();
  if (kid == 0) {
    zdtm::move_fd(p[0], kRead);
    close(kWrite);
    consumer();
  }
  close(p[0]);
  for (int i = 0; i < 10000 && zdtm::fionread(kWrite) > static_cast<int>(kBefore - kConsumed); i++) usleep(1000);
  zdtm::wait_blocked(kid, SYS_rt_sigtimedwait, -1);

  zdtm::Expect e;
  e.process(getpid());
  e.process(kid);
  e.pipe("P", 65536, kBefore - kConsumed);
  e.file("w", "P", "write");
  e.file("r", "P", "read");
  e.fd(getpid(), kWrite, "w");
  e.fd(kid, kRead, "r");
  e.write();
  zdtm::ready();
  zdtm::wait_for_signal();

  kill(kid, SIGUSR1);  // ESRCH when the consumer was killed and replaced: fine
  zdtm::expect_fd(kWrite, O_WRONLY, 0, false, "producer write end");
  zdtm::write_pattern(kWrite, kSeed, kBefore, kTotal - kBefore, 8192, "producer, the rest");
  close(kWrite);
  int st = zdtm::reap(kid);
  ZDTM_CHECK(st == 0 || st == 128 + SIGKILL, "forked consumer exited with %d", st);
  zdtm::pass();
}
