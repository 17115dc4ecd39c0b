// fifo: a FIFO opened O_RDWR (one open file description is both reader and writer), holding
// 64 KiB: a full default-size FIFO.
//
// A FIFO's buffer lives only while some end is open, so a restore must reopen the path and refill
// it while keeping an end open. Checks: the fd is still that FIFO (same inode as the path, not a
// new anonymous pipe), O_RDWR, full (a non-blocking probe through a second open gets EAGAIN), and
// every byte.
#include "zdtmlite.h"

namespace {
constexpr int kFd = 80;
constexpr size_t kBytes = 65536;
}  // namespace

int main() {
  zdtm::init("fifo");
  std::string path = zdtm::make_fifo("fifo");
  int fd = open(path.c_str(), O_RDWR);
  if (fd < 0) ZDTM_SYSFAIL("open(%s)", path.c_str());
  zdtm::move_fd(fd, kFd);
  zdtm::write_pattern(kFd, 100, 0, kBytes, kBytes, "fifo");

  zdtm::Expect e;
  e.process(getpid());
  zdtm::Expect::Pipe& p = e.pipe("F", 65536, kBytes);
  p.kind = "fifo";
  p.path = path;
  e.file("rw", "F", "readwrite");
  e.fd(getpid(), kFd, "rw");
  e.write();
  zdtm::ready();
  zdtm::wait_for_signal();

  struct stat st;
  if (stat(path.c_str(), &st) != 0) ZDTM_SYSFAIL("stat(%s)", path.c_str());
  ZDTM_CHECK(S_ISFIFO(st.st_mode) && st.st_ino == zdtm::inode_of(kFd), "fd %d is not the FIFO %s", kFd, path.c_str());
  zdtm::expect_fd(kFd, O_RDWR, 0, false, "fifo fd");
  ZDTM_CHECK(zdtm::pipe_size(kFd) == 65536, "capacity %d", zdtm::pipe_size(kFd));
  ZDTM_CHECK(zdtm::fionread(kFd) == static_cast<int>(kBytes), "%d bytes queued, expected %zu", zdtm::fionread(kFd),
             kBytes);
  int probe = open(path.c_str(), O_WRONLY | O_NONBLOCK);
  if (probe < 0) ZDTM_SYSFAIL("open(%s, O_WRONLY|O_NONBLOCK)", path.c_str());
  char c = 'x';
  errno = 0;
  ZDTM_CHECK(write(probe, &c, 1) < 0 && errno == EAGAIN, "full FIFO took one more byte (errno %d)", errno);
  close(probe);
  zdtm::expect_pattern(kFd, 100, 0, kBytes, "fifo bytes");
  ZDTM_CHECK(zdtm::fionread(kFd) == 0, "bytes left: %d", zdtm::fionread(kFd));
  zdtm::pass();
}
