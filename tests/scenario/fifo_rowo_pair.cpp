// fifo_rowo_pair: two FIFOs between a parent and its child, after CRIU's zdtm fifo-rowo-pair.
//
// The master FIFO is open read-only in the parent and write-only in the child; the slave FIFO is
// open O_RDWR once, before the fork, so parent and child share that one open file description,
// which the child moved to fd 64. The child wrote into both: 5,000 bytes into the master, 4,096
// through its fd 64 into the slave. A restore must reopen both paths, give the slave's two fds one
// description across the two processes (kcmp), and refill each FIFO with its own bytes: a FIFO's
// buffer lives only while some end is open, so its refill must keep an end open.
//
// After SIGUSR1 (the parent passes it on to the child) the child checks its fds, and the parent
// its own and every byte of both FIFOs.
#include "zdtmlite.h"

namespace {
constexpr int kSlave = 40, kMasterR = 41, kMasterW = 50, kChildSlave = 64;
constexpr size_t kMasterBytes = 5000, kSlaveBytes = 4096;

void expect_fifo(int fd, const std::string& path, const char* what) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) ZDTM_SYSFAIL("stat(%s)", path.c_str());
  ZDTM_CHECK(S_ISFIFO(st.st_mode) && st.st_ino == zdtm::inode_of(fd), "%s: fd %d is not the FIFO %s", what, fd,
             path.c_str());
}
}  // namespace

int main() {
  zdtm::init("fifo_rowo_pair");
  const std::string master = zdtm::make_fifo("master");
  const std::string slave = zdtm::make_fifo("slave");
  int s = open(slave.c_str(), O_RDWR);
  if (s < 0) ZDTM_SYSFAIL("open(%s, O_RDWR)", slave.c_str());
  zdtm::move_fd(s, kSlave);

  pid_t kid = zdtm::fork_child();
  if (kid == 0) {
    int w = open(master.c_str(), O_WRONLY);  // waits for the parent's reader
    if (w < 0) ZDTM_SYSFAIL("open(%s, O_WRONLY)", master.c_str());
    zdtm::move_fd(w, kMasterW);
    if (dup2(kSlave, kChildSlave) != kChildSlave) ZDTM_SYSFAIL("dup2");
    close(kSlave);
    zdtm::write_pattern(kChildSlave, 31, 0, kSlaveBytes, kSlaveBytes, "child into the slave");
    zdtm::write_pattern(kMasterW, 32, 0, kMasterBytes, 1000, "child into the master");
    zdtm::wait_for_signal();

    zdtm::expect_fd(kMasterW, O_WRONLY, 0, false, "child master writer");
    zdtm::expect_fd(kChildSlave, O_RDWR, 0, false, "child slave");
    expect_fifo(kMasterW, master, "child master writer");
    expect_fifo(kChildSlave, slave, "child slave");
    ZDTM_CHECK(fcntl(kSlave, F_GETFD) < 0, "child fd %d is open again", kSlave);
    const long same = syscall(SYS_kcmp, getpid(), getppid(), 0 /* KCMP_FILE */, kChildSlave, kSlave);
    ZDTM_CHECK(same == 0, "child fd %d and parent fd %d are not one open file description (kcmp %ld)", kChildSlave,
               kSlave, same);
    zdtm::pass();
  }
  int r = open(master.c_str(), O_RDONLY);
  if (r < 0) ZDTM_SYSFAIL("open(%s, O_RDONLY)", master.c_str());
  zdtm::move_fd(r, kMasterR);
  for (int i = 0; zdtm::fionread(kMasterR) != static_cast<int>(kMasterBytes) ||
                  zdtm::fionread(kSlave) != static_cast<int>(kSlaveBytes);
       ++i) {
    ZDTM_CHECK(i < 10000, "the child's bytes did not arrive (master %d, slave %d)", zdtm::fionread(kMasterR),
               zdtm::fionread(kSlave));
    usleep(1000);
  }

  zdtm::Expect e;
  e.process(getpid());
  e.process(kid);
  zdtm::Expect::Pipe& m = e.pipe("M", 65536, kMasterBytes);
  m.kind = "fifo";
  m.path = master;
  zdtm::Expect::Pipe& sl = e.pipe("S", 65536, kSlaveBytes);
  sl.kind = "fifo";
  sl.path = slave;
  e.file("mr", "M", "read");
  e.file("mw", "M", "write");
  e.file("s", "S", "readwrite");
  e.fd(getpid(), kMasterR, "mr");
  e.fd(getpid(), kSlave, "s");
  e.fd(kid, kMasterW, "mw");
  e.fd(kid, kChildSlave, "s");
  e.write();
  zdtm::ready();
  zdtm::wait_for_signal();
  if (kill(kid, SIGUSR1) != 0) ZDTM_SYSFAIL("kill(child, SIGUSR1)");
  int st_kid = zdtm::reap(kid);
  ZDTM_CHECK(st_kid == 0, "child exited with %d", st_kid);

  zdtm::expect_fd(kMasterR, O_RDONLY, 0, false, "parent master reader");
  zdtm::expect_fd(kSlave, O_RDWR, 0, false, "parent slave");
  expect_fifo(kMasterR, master, "parent master reader");
  expect_fifo(kSlave, slave, "parent slave");
  ZDTM_CHECK(zdtm::pipe_size(kMasterR) == 65536 && zdtm::pipe_size(kSlave) == 65536, "capacities %d and %d",
             zdtm::pipe_size(kMasterR), zdtm::pipe_size(kSlave));
  zdtm::expect_pattern(kMasterR, 32, 0, kMasterBytes, "master bytes");
  zdtm::expect_pattern(kSlave, 31, 0, kSlaveBytes, "slave bytes");
  ZDTM_CHECK(zdtm::fionread(kSlave) == 0, "slave: %d bytes left", zdtm::fionread(kSlave));
  // The child has exited: its writer is gone, so the master reads EOF now.
  char c;
  ZDTM_CHECK(read(kMasterR, &c, 1) == 0, "master: no EOF once the child's writer closed: a writer survived");
  zdtm::pass();
}
