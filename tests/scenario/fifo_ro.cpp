// fifo_ro: a FIFO of which only a read-only, non-blocking fd is left, holding data.
//
// Built as: open O_RDONLY|O_NONBLOCK (no writer yet: it does not block), open a writer, write
// 20,000 bytes, close the writer. What survives: the bytes (the buffer lives while the reader is
// open), the reader's flags, and the fact that a writer came and went, which makes poll() report
// POLLHUP beside POLLIN, and read() return 0 once the bytes are gone. A restore refills through a
// temporary writer; when that writer closes, the same state results.
#include "zdtmlite.h"

namespace {
constexpr int kFd = 90;
constexpr size_t kBytes = 20000;
}  // namespace

int main() {
  zdtm::init("fifo_ro");
  std::string path = zdtm::make_fifo("fifo_ro");
  int r = open(path.c_str(), O_RDONLY | O_NONBLOCK);
  if (r < 0) ZDTM_SYSFAIL("open(%s, O_RDONLY|O_NONBLOCK)", path.c_str());
  zdtm::move_fd(r, kFd);
  int w = open(path.c_str(), O_WRONLY);
  if (w < 0) ZDTM_SYSFAIL("open(%s, O_WRONLY)", path.c_str());
  zdtm::write_pattern(w, 110, 0, kBytes, kBytes, "writer");
  close(w);

  zdtm::Expect e;
  e.process(getpid());
  zdtm::Expect::Pipe& p = e.pipe("F", 65536, kBytes);
  p.kind = "fifo";
  p.path = path;
  e.file("r", "F", "read", O_NONBLOCK).fifo_reader = "seen_writer";
  e.fd(getpid(), kFd, "r");
  e.write();
  zdtm::ready();
  zdtm::wait_for_signal();

  struct stat st;
  if (stat(path.c_str(), &st) != 0) ZDTM_SYSFAIL("stat(%s)", path.c_str());
  ZDTM_CHECK(S_ISFIFO(st.st_mode) && st.st_ino == zdtm::inode_of(kFd), "fd %d is not the FIFO %s", kFd, path.c_str());
  zdtm::expect_fd(kFd, O_RDONLY, O_NONBLOCK, false, "reader");
  ZDTM_CHECK(zdtm::fionread(kFd) == static_cast<int>(kBytes), "%d bytes queued, expected %zu", zdtm::fionread(kFd),
             kBytes);
  struct pollfd pfd = {kFd, POLLIN, 0};
  ZDTM_CHECK(poll(&pfd, 1, 0) == 1 && pfd.revents == (POLLIN | POLLHUP),
             "poll: revents 0x%x, expected POLLIN|POLLHUP (data, and the writer has gone)", pfd.revents);
  zdtm::expect_pattern(kFd, 110, 0, kBytes, "fifo bytes");
  char c;
  ssize_t n = read(kFd, &c, 1);
  ZDTM_CHECK(n == 0, "read after the data returned %zd (errno %d), expected EOF: a writer is left", n, errno);
  zdtm::pass();
}
