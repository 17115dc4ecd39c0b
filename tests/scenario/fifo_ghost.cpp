// fifo_ghost: an unlinked FIFO, open O_RDWR, holding 30,000 bytes.
//
// The path is gone, so a restore must recreate a FIFO somewhere, open it and unlink it again
// (CRIU's "ghost" files): the result must be a FIFO with no links, the path must not exist
// afterwards, and every byte must be there.
#include "zdtmlite.h"

namespace {
constexpr int kFd = 110;
constexpr size_t kBytes = 30000;
}  // namespace

int main() {
  zdtm::init("fifo_ghost");
  std::string path = zdtm::make_fifo("fifo_ghost");
  int fd = open(path.c_str(), O_RDWR);
  if (fd < 0) ZDTM_SYSFAIL("open(%s)", path.c_str());
  zdtm::move_fd(fd, kFd);
  zdtm::write_pattern(kFd, 130, 0, kBytes, kBytes, "fifo");
  if (unlink(path.c_str()) != 0) ZDTM_SYSFAIL("unlink(%s)", path.c_str());

  zdtm::Expect e;
  e.process(getpid());
  zdtm::Expect::Pipe& p = e.pipe("F", 65536, kBytes);
  p.kind = "fifo";
  p.path = path;
  p.unlinked = true;
  e.file("rw", "F", "readwrite");
  e.fd(getpid(), kFd, "rw");
  e.write();
  zdtm::ready();
  zdtm::wait_for_signal();

  struct stat st;
  if (fstat(kFd, &st) != 0) ZDTM_SYSFAIL("fstat(%d)", kFd);
  ZDTM_CHECK(S_ISFIFO(st.st_mode), "fd %d is not a FIFO (mode 0%o)", kFd, st.st_mode);
  ZDTM_CHECK(st.st_nlink == 0, "the FIFO has %lu links, expected 0 (unlinked)", static_cast<unsigned long>(st.st_nlink));
  ZDTM_CHECK(access(path.c_str(), F_OK) != 0 && errno == ENOENT, "%s exists again", path.c_str());
  zdtm::expect_fd(kFd, O_RDWR, 0, false, "fifo fd");
  ZDTM_CHECK(zdtm::fionread(kFd) == static_cast<int>(kBytes), "%d bytes queued, expected %zu", zdtm::fionread(kFd),
             kBytes);
  zdtm::expect_pattern(kFd, 130, 0, kBytes, "fifo bytes");
  zdtm::pass();
}
