// self_rollback_test.cpp: a failed in-process restore leaves the caller's fd table exactly as it was.
//
// The failure is real: the caller's RLIMIT_NOFILE. Numbers 100 and 101 are asked for (both open, on
// /dev/null, with different FD_CLOEXEC and status flags), and every number above them is taken but
// `free_above` of them. The install (restore/process.cpp, SelfInstall) needs numbers above the highest
// asked for: two to move the built ends out of the way, then one per number asked for, to keep what
// was open there until the end. With 4 free it succeeds; with 3 the copy of fd 101 fails (EMFILE)
// after fd 100 was already replaced, and that must be undone; with fewer it fails earlier. Each case
// runs in a child, which may lower its hard limit for good.
#include <dirent.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>

#include "pipecr/pipecr.h"

namespace {

constexpr int kLimit = 256;
constexpr int kRead = 100, kWrite = 101;

// Everything a caller can see of its fd table: per number, the file (device, inode), FD_CLOEXEC,
// the status flags and the offset.
using Table = std::map<int, std::tuple<dev_t, ino_t, int, int, off_t>>;

Table fd_table() {
  Table t;
  DIR* d = opendir("/proc/self/fd");
  if (!d) return t;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] == '.') continue;
    int fd = atoi(e->d_name);
    if (fd == dirfd(d)) continue;
    struct stat st {};
    fstat(fd, &st);
    t[fd] = {st.st_dev, st.st_ino, fcntl(fd, F_GETFD), fcntl(fd, F_GETFL), lseek(fd, 0, SEEK_CUR)};
  }
  closedir(d);
  return t;
}

// The child's work: 0 when the outcome is the expected one, else a line on stderr and 1.
int run_case(int free_above, bool expect_success) {
  rlimit rl{kLimit, kLimit};
  if (setrlimit(RLIMIT_NOFILE, &rl) < 0) return perror("setrlimit"), 1;
  for (int fd = 3; fd < kLimit; ++fd) close(fd);  // nothing inherited in the way
  int p[2];
  if (pipe(p) < 0) return perror("pipe"), 1;
  if (write(p[1], "rollback", 8) != 8) return perror("write"), 1;
  size_t need = 0;
  pipecr_ckpoint_pipe(p[0], nullptr, 0, &need);
  std::vector<char> img(need);
  if (pipecr_ckpoint_pipe(p[0], img.data(), img.size(), nullptr) != static_cast<long>(need))
    return fprintf(stderr, "checkpoint failed\n"), 1;
  int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (dup3(null, kRead, O_CLOEXEC) < 0 || dup2(null, kWrite) < 0) return perror("dup"), 1;
  close(null);
  int w = open("/dev/null", O_WRONLY | O_APPEND);  // a different open file at 101: other flags
  dup2(w, kWrite);
  close(w);
  for (int fd = kWrite + 1; fd < kLimit - free_above; ++fd)
    if (dup2(kRead, fd) < 0) return perror("dup2 fill"), 1;
  const Table before = fd_table();
  int fds[2] = {kRead, kWrite};
  int rc = pipecr_restore_pipe(fds, img.data(), img.size());
  const Table after = fd_table();
  if (expect_success) {
    if (rc != 0) return fprintf(stderr, "free_above=%d: restore failed: %s\n", free_above, pipecr_strerror(rc)), 1;
    char buf[16] = {};
    if (read(kRead, buf, sizeof buf) != 8 || std::string(buf) != "rollback")
      return fprintf(stderr, "free_above=%d: restored pipe does not read back\n", free_above), 1;
    return 0;
  }
  if (rc != -EMFILE)
    return fprintf(stderr, "free_above=%d: expected -EMFILE, got %d (%s)\n", free_above, rc, pipecr_strerror(rc)), 1;
  if (fds[0] != kRead || fds[1] != kWrite) return fprintf(stderr, "fd[] changed on failure\n"), 1;
  if (before != after) {
    for (const auto& [fd, v] : before)
      if (!after.count(fd) || after.at(fd) != v) fprintf(stderr, "fd %d changed or closed\n", fd);
    for (const auto& [fd, v] : after)
      if (!before.count(fd)) fprintf(stderr, "fd %d left open\n", fd);
    return 1;
  }
  return 0;
}

void expect_case(int free_above, bool success) {
  fflush(nullptr);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) _exit(run_case(free_above, success));
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "child died, status " << status;
  EXPECT_EQ(WEXITSTATUS(status), 0) << "free_above=" << free_above;
}

TEST(SelfRollback, EnoughRoomSucceeds) { expect_case(4, true); }

TEST(SelfRollback, FailureAfterTheFirstNumberIsReplacedUndoesIt) { expect_case(3, false); }

TEST(SelfRollback, FailureBeforeAnyNumberChangesNothing) {
  for (int free_above : {0, 1, 2}) expect_case(free_above, false);
}

}  // namespace
