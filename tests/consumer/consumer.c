/* consumer.c: a C program that uses an installed libpipecr the way a downstream project would.
 *
 * It is built against the installed headers and library only (never the source tree), twice: by a
 * CMake project with find_package(pipecr) and by a plain `cc $(pkg-config --cflags --libs pipecr)`.
 * It checkpoints a pipe holding "hello", closes that pipe, restores it at fresh fd numbers and reads
 * the bytes back; then it checks that truncated images are refused with -EBADMSG and leave the
 * caller's fds alone. Exit 0 on success; each failure prints one line saying which step failed. */
/* Strict C99 plus POSIX: the public header must not need GNU extensions. */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <pipecr/pipecr.h>

static int failures;

static void fail(const char *step, long rc) {
  fprintf(stderr, "consumer: %s: returned %ld (%s)\n", step, rc, rc < 0 ? pipecr_strerror((int)rc) : "");
  failures++;
}

/* Checkpoint a pipe holding "hello" into a malloc'd image; returns its size, 0 on failure. */
static size_t make_image(void **img) {
  int p[2];
  if (pipe(p) != 0 || write(p[1], "hello", 5) != 5) {
    perror("consumer: pipe/write");
    exit(1);
  }
  size_t needed = 0;
  long rc = pipecr_ckpoint_pipe(p[0], NULL, 0, &needed);
  if (rc != -ENOSPC || needed == 0) {
    fail("pipecr_ckpoint_pipe(NULL, 0) should give -ENOSPC and the size", rc);
    return 0;
  }
  *img = malloc(needed);
  rc = pipecr_ckpoint_pipe(p[0], *img, needed, NULL);
  if (rc <= 0 || (size_t)rc > needed) {
    fail("pipecr_ckpoint_pipe", rc);
    return 0;
  }
  /* The checkpoint must not have consumed the bytes. */
  char buf[8];
  if (read(p[0], buf, sizeof buf) != 5 || memcmp(buf, "hello", 5) != 0) fail("original pipe lost its bytes", 0);
  close(p[0]);
  close(p[1]);
  return (size_t)rc;
}

static void check_restore(const void *img, size_t size) {
  int fd[2] = {-1, -1};
  int rc = pipecr_restore_pipe(fd, img, size);
  if (rc != 0 || fd[0] < 0 || fd[1] < 0) {
    fail("pipecr_restore_pipe", rc);
    return;
  }
  /* Close the write end first so that the second read sees end of file, not an empty live pipe. */
  close(fd[1]);
  char buf[16];
  ssize_t n = read(fd[0], buf, sizeof buf);
  if (n != 5 || memcmp(buf, "hello", 5) != 0) fail("restored pipe should hold exactly \"hello\"", n);
  else if ((n = read(fd[0], buf, sizeof buf)) != 0) fail("restored pipe should hold nothing after \"hello\"", n);
  close(fd[0]);
}

static void check_truncated(const void *img, size_t size) {
  const size_t cuts[] = {size - 1, size / 2, 4};
  for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
    int fd[2] = {-1, -1};
    int rc = pipecr_restore_pipe(fd, img, cuts[i]);
    if (rc != -EBADMSG) fail("restore of a truncated image should give -EBADMSG", rc);
    if (fd[0] != -1 || fd[1] != -1) fail("a failed restore changed fd[]", rc);
  }
}

int main(void) {
  void *img = NULL;
  size_t size = make_image(&img);
  if (size > 0) {
    check_restore(img, size);
    check_truncated(img, size);
  }
  free(img);
  if (failures) return 1;
  printf("consumer: ok (image of %zu bytes)\n", size);
  return 0;
}
