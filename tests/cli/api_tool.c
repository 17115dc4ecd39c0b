/* api_tool.c: the C API (pipecr.h) driven from the command line, for api.bats: it shows that the
 * in-process API and the `pipecr` command are one engine (an image of either restored by the other).
 *
 *   api_tool make            make the reference pipe at fds 5 (read) and 6 (write) and print it
 *   api_tool hold PIDFILE    make it, write the pid to PIDFILE, and sleep (a target for `pipecr dump`)
 *   api_tool ckpt IMG        make it and pipecr_ckpoint_pipe() fd 5 into IMG
 *   api_tool restore IMG     pipecr_restore_pipe() IMG at any free numbers and print what came back
 *   api_tool show R W        print the pipe at fds R and W (the command of `pipecr restore --exec`)
 *
 * The reference pipe: capacity 16 KiB, two slots ("hello " and "engine"), O_NONBLOCK on the read end,
 * FD_CLOEXEC on neither. `show` prints one line: capacity, bytes queued, the bytes (read: the tool
 * exits right after), the access mode, O_NONBLOCK and FD_CLOEXEC of each end. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "pipecr/pipecr.h"

static void die(const char *what) {
  fprintf(stderr, "api_tool: %s: %s\n", what, strerror(errno));
  exit(2);
}

static void make(void) {
  int p[2];
  if (pipe(p) < 0) die("pipe");
  if (fcntl(p[1], F_SETPIPE_SZ, 16384) < 0) die("F_SETPIPE_SZ");
  if (write(p[1], "hello ", 6) != 6 || write(p[1], "engine", 6) != 6) die("write");
  int r = fcntl(p[0], F_DUPFD, 10), w = fcntl(p[1], F_DUPFD, 10);  /* pipe() may have given 5 or 6 */
  if (r < 0 || w < 0) die("F_DUPFD");
  close(p[0]);
  close(p[1]);
  if (dup2(r, 5) < 0 || dup2(w, 6) < 0) die("dup2");
  close(r);
  close(w);
  if (fcntl(5, F_SETFL, O_NONBLOCK) < 0) die("F_SETFL");
}

static void show(int r, int w) {
  int n = 0;
  if (ioctl(r, FIONREAD, &n) < 0) die("FIONREAD");
  char buf[256] = {0};
  ssize_t got = read(r, buf, sizeof buf - 1);
  int rfl = fcntl(r, F_GETFL), wfl = fcntl(w, F_GETFL);
  printf("cap=%d queued=%d bytes=%s r=%s%s%s w=%s%s%s\n", fcntl(w, F_GETPIPE_SZ), n, got > 0 ? buf : "",
         (rfl & O_ACCMODE) == O_RDONLY ? "rdonly" : "other", rfl & O_NONBLOCK ? ",nonblock" : "",
         fcntl(r, F_GETFD) & FD_CLOEXEC ? ",cloexec" : "", (wfl & O_ACCMODE) == O_WRONLY ? "wronly" : "other",
         wfl & O_NONBLOCK ? ",nonblock" : "", fcntl(w, F_GETFD) & FD_CLOEXEC ? ",cloexec" : "");
}

int main(int argc, char **argv) {
  if (argc >= 2 && strcmp(argv[1], "make") == 0) {
    make();
    show(5, 6);
    return 0;
  }
  if (argc == 3 && strcmp(argv[1], "hold") == 0) {
    make();
    for (int fd = 3; fd < 1024; ++fd)  /* nothing inherited: the dump must hold this one pipe only */
      if (fd != 5 && fd != 6) close(fd);
    FILE *f = fopen(argv[2], "w");
    if (!f) die(argv[2]);
    fprintf(f, "%d\n", (int)getpid());
    fclose(f);
    for (;;) pause();
  }
  if (argc == 3 && strcmp(argv[1], "ckpt") == 0) {
    make();
    size_t need = 0;
    long n = pipecr_ckpoint_pipe(5, NULL, 0, &need);
    if (n != -ENOSPC) return fprintf(stderr, "api_tool: ckpt: %s\n", pipecr_strerror((int)n)), 1;
    void *img = malloc(need);
    n = pipecr_ckpoint_pipe(5, img, need, NULL);
    if (n < 0) return fprintf(stderr, "api_tool: ckpt: %s\n", pipecr_strerror((int)n)), 1;
    FILE *f = fopen(argv[2], "w");
    if (!f || fwrite(img, 1, (size_t)n, f) != (size_t)n || fclose(f) != 0) die(argv[2]);
    return 0;
  }
  if (argc == 3 && strcmp(argv[1], "restore") == 0) {
    FILE *f = fopen(argv[2], "r");
    if (!f) die(argv[2]);
    static char img[1 << 20];
    size_t n = fread(img, 1, sizeof img, f);
    fclose(f);
    int fd[2] = {-1, -1};
    int rc = pipecr_restore_pipe(fd, img, n);
    if (rc < 0) return fprintf(stderr, "api_tool: restore: %s\n", pipecr_strerror(rc)), 1;
    show(fd[0], fd[1]);
    return 0;
  }
  if (argc == 4 && strcmp(argv[1], "show") == 0) {
    show(atoi(argv[2]), atoi(argv[3]));
    return 0;
  }
  fprintf(stderr, "usage: api_tool make | hold PIDFILE | ckpt IMG | restore IMG | show R W\n");
  return 2;
}
