// many_pipes: 10,000 pipes in one process (CRIU stops at 1024 pipes with data).
//
// RLIMIT_NOFILE's hard limit here is 20,000, so the program raises its soft limit to the hard one
// and holds ONE end of each pipe: the read end, with one byte queued (byte i & 0xff for pipe i)
// and the write end closed. After SIGUSR1 each read end must hold exactly its byte, then report
// EOF (no writer may survive the dump or the restore).
#include <sys/resource.h>

#include "zdtmlite.h"

namespace {
constexpr int kPipes = 10000;
}  // namespace

int main() {
  zdtm::init("many_pipes");
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) ZDTM_SYSFAIL("getrlimit");
  rl.rlim_cur = rl.rlim_max;
  if (setrlimit(RLIMIT_NOFILE, &rl) != 0) ZDTM_SYSFAIL("setrlimit");
  ZDTM_CHECK(rl.rlim_max >= kPipes + 64, "RLIMIT_NOFILE hard limit %lu is below %d",
             static_cast<unsigned long>(rl.rlim_max), kPipes + 64);
  std::vector<int> fds(kPipes);
  std::vector<int> caps(kPipes);
  for (int i = 0; i < kPipes; i++) {
    int p[2];
    if (pipe(p) != 0) ZDTM_SYSFAIL("pipe number %d", i);
    char c = static_cast<char>(i & 0xff);
    zdtm::write_all(p[1], &c, 1, "pipe");
    close(p[1]);
    fds[i] = p[0];
    caps[i] = zdtm::pipe_size(p[0]);
  }

  zdtm::Expect e;
  e.process(getpid());
  for (int i = 0; i < kPipes; i++) {
    std::string n = std::to_string(i);
    e.pipe("P" + n, caps[i], 1).slots = {1};
    e.file("r" + n, "P" + n, "read");
    e.fd(getpid(), fds[i], "r" + n);
  }
  e.write();
  zdtm::ready();
  zdtm::wait_for_signal();

  for (int i = 0; i < kPipes; i++) {
    int fd = fds[i];
    int q = zdtm::fionread(fd);
    ZDTM_CHECK(q == 1, "pipe %d (fd %d): %d bytes queued, expected 1", i, fd, q);
    int fl = zdtm::getfl(fd);
    ZDTM_CHECK((fl & O_ACCMODE) == O_RDONLY && (fl & zdtm::kCheckedFlags) == 0, "pipe %d (fd %d): flags 0%o", i, fd,
               fl);
    char c[2];
    ssize_t r = read(fd, c, 2);
    ZDTM_CHECK(r == 1 && c[0] == static_cast<char>(i & 0xff), "pipe %d (fd %d): read %zd bytes, first 0x%02x", i, fd,
               r, static_cast<unsigned char>(c[0]));
    r = read(fd, c, 1);
    ZDTM_CHECK(r == 0, "pipe %d (fd %d): no EOF after its byte (read returned %zd): a writer survived", i, fd, r);
  }
  zdtm::pass();
}
