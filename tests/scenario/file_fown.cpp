// file_fown: signal-driven I/O on both ends of a pipe: F_SETOWN_EX, F_SETSIG and O_ASYNC.
//
// The owner, the signal and O_ASYNC belong to the open file description, and the si_fd a handler
// receives is the fd number at the time O_ASYNC was set: a restore that sets O_ASYNC before the
// fd reaches its final number delivers a wrong si_fd. The read end is owned by the process
// (F_OWNER_PID) with SIGRTMIN+1, the write end by the thread (F_OWNER_TID) with SIGRTMIN+2. After
// SIGUSR1, reading makes room (the writer's signal, POLL_OUT, si_fd 71) and writing makes data
// (the reader's signal, POLL_IN, si_fd 70). Signals left pending by the dump or the wreck are
// flushed first, so only a signal caused by this check counts.
#include "zdtmlite.h"

namespace {
constexpr int kR = 70, kW = 71;
constexpr size_t kBytes = 2000;

void own(int fd, int type, pid_t who, int sig) {
  struct f_owner_ex o = {static_cast<__pid_type>(type), who};
  if (fcntl(fd, F_SETOWN_EX, &o) != 0) ZDTM_SYSFAIL("F_SETOWN_EX(fd %d)", fd);
  if (fcntl(fd, F_SETSIG, sig) != 0) ZDTM_SYSFAIL("F_SETSIG(fd %d)", fd);
  zdtm::setfl(fd, O_ASYNC);  // last, at the final number: it fixes si_fd
}

void expect_owner(int fd, int type, pid_t who, int sig) {
  struct f_owner_ex o = {};
  if (fcntl(fd, F_GETOWN_EX, &o) != 0) ZDTM_SYSFAIL("F_GETOWN_EX(fd %d)", fd);
  ZDTM_CHECK(o.type == type && o.pid == who, "fd %d: owner type %d pid %d, expected type %d pid %d", fd, o.type, o.pid,
             type, static_cast<int>(who));
  int s = fcntl(fd, F_GETSIG);
  ZDTM_CHECK(s == sig, "fd %d: F_GETSIG %d, expected %d", fd, s, sig);
}

sigset_t io_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGRTMIN + 1);
  sigaddset(&set, SIGRTMIN + 2);
  sigaddset(&set, SIGIO);
  return set;
}

void flush_signals() {
  sigset_t set = io_signals();
  struct timespec zero = {0, 0};
  while (sigtimedwait(&set, nullptr, &zero) > 0) {
  }
}

void expect_signal(int sig, int fd, int code, const char* what) {
  sigset_t set = io_signals();
  struct timespec two = {2, 0};
  siginfo_t si = {};
  int got = sigtimedwait(&set, &si, &two);
  if (got < 0) ZDTM_SYSFAIL("%s: no signal within 2 s", what);
  ZDTM_CHECK(got == sig && si.si_fd == fd && si.si_code == code,
             "%s: got signal %d si_fd %d si_code %d, expected signal %d si_fd %d si_code %d", what, got, si.si_fd,
             si.si_code, sig, fd, code);
}
}  // namespace

int main() {
  zdtm::init("file_fown", {SIGIO, SIGRTMIN + 1, SIGRTMIN + 2});
  int p[2];
  if (pipe(p) != 0) ZDTM_SYSFAIL("pipe");
  zdtm::move_fd(p[0], kR);
  zdtm::move_fd(p[1], kW);
  zdtm::write_pattern(kW, 90, 0, kBytes, kBytes, "w");
  pid_t me = getpid();
  pid_t tid = static_cast<pid_t>(syscall(SYS_gettid));
  own(kR, F_OWNER_PID, me, SIGRTMIN + 1);
  own(kW, F_OWNER_TID, tid, SIGRTMIN + 2);

  zdtm::Expect e;
  e.process(me);
  e.pipe("P", 65536, kBytes);
  zdtm::Expect::File& r = e.file("r", "P", "read", O_ASYNC);
  r.owner_type = F_OWNER_PID, r.owner_pid = me, r.signal = SIGRTMIN + 1;
  zdtm::Expect::File& w = e.file("w", "P", "write", O_ASYNC);
  w.owner_type = F_OWNER_TID, w.owner_pid = tid, w.signal = SIGRTMIN + 2;
  e.fd(me, kR, "r");
  e.fd(me, kW, "w");
  e.write();
  zdtm::ready();
  zdtm::wait_for_signal();

  zdtm::expect_fd(kR, O_RDONLY, O_ASYNC, false, "read end");
  zdtm::expect_fd(kW, O_WRONLY, O_ASYNC, false, "write end");
  expect_owner(kR, F_OWNER_PID, me, SIGRTMIN + 1);
  expect_owner(kW, F_OWNER_TID, tid, SIGRTMIN + 2);
  ZDTM_CHECK(zdtm::fionread(kR) == static_cast<int>(kBytes), "%d bytes queued, expected %zu", zdtm::fionread(kR),
             kBytes);
  flush_signals();
  zdtm::expect_pattern(kR, 90, 0, kBytes, "queued bytes");
  expect_signal(SIGRTMIN + 2, kW, POLL_OUT, "after reading (writer's signal)");
  flush_signals();
  char c = 'x';
  zdtm::write_all(kW, &c, 1, "w");
  expect_signal(SIGRTMIN + 1, kR, POLL_IN, "after writing (reader's signal)");
  zdtm::pass();
}
