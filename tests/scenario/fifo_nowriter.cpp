// fifo_nowriter: a FIFO reader opened O_RDONLY|O_NONBLOCK that has never seen a writer.
//
// Such a reader remembers the FIFO's writer counter at open: poll() reports no POLLHUP until a
// writer has come and gone (fs/pipe.c, pipe_poll). Any writer opened during the dump or the
// restore (to probe or refill the FIFO) and closed again flips this for good; CRIU restored it
// wrong until 2026. Checks: no POLLHUP now; after a writer opens and closes, POLLHUP.
#include "zdtmlite.h"

namespace {
constexpr int kFd = 95;
}  // namespace

int main() {
  zdtm::init("fifo_nowriter");
  std::string path = zdtm::make_fifo("fifo_nowriter");
  int r = open(path.c_str(), O_RDONLY | O_NONBLOCK);
  if (r < 0) ZDTM_SYSFAIL("open(%s, O_RDONLY|O_NONBLOCK)", path.c_str());
  zdtm::move_fd(r, kFd);

  zdtm::Expect e;
  e.process(getpid());
  zdtm::Expect::Pipe& p = e.pipe("F", 65536, 0);
  p.kind = "fifo";
  p.path = path;
  e.file("r", "F", "read", O_NONBLOCK).fifo_reader = "no_writer_yet";
  e.fd(getpid(), kFd, "r");
  e.write();
  zdtm::ready();
  zdtm::wait_for_signal();

  struct stat st;
  if (stat(path.c_str(), &st) != 0) ZDTM_SYSFAIL("stat(%s)", path.c_str());
  ZDTM_CHECK(S_ISFIFO(st.st_mode) && st.st_ino == zdtm::inode_of(kFd), "fd %d is not the FIFO %s", kFd, path.c_str());
  zdtm::expect_fd(kFd, O_RDONLY, O_NONBLOCK, false, "reader");
  ZDTM_CHECK(zdtm::fionread(kFd) == 0, "%d bytes queued in a FIFO nobody wrote", zdtm::fionread(kFd));
  struct pollfd pfd = {kFd, POLLIN, 0};
  int n = poll(&pfd, 1, 0);
  ZDTM_CHECK(n == 0, "poll: revents 0x%x, expected none (no writer has come and gone yet)", pfd.revents);
  int w = open(path.c_str(), O_WRONLY | O_NONBLOCK);
  if (w < 0) ZDTM_SYSFAIL("open(%s, O_WRONLY|O_NONBLOCK)", path.c_str());
  close(w);
  pfd.revents = 0;
  ZDTM_CHECK(poll(&pfd, 1, 0) == 1 && pfd.revents == POLLHUP, "poll after a writer came and went: revents 0x%x",
             pfd.revents);
  zdtm::pass();
}
