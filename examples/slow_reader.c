/* slow_reader.c: the consumer of the demo's pipeline. Copies stdin to stdout one chunk at a time and
 * sleeps between chunks, so the pipe in front of it fills up and its producer blocks. It keeps no
 * bytes across a sleep: what it has read it has written, so it can be killed and restarted. */
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
  long delay_us = argc > 1 ? atol(argv[1]) : 2000;
  char buf[512];
  for (;;) {
    ssize_t n = read(0, buf, sizeof buf);
    if (n <= 0) return n < 0;
    for (ssize_t off = 0; off < n;) {
      ssize_t w = write(1, buf + off, (size_t)(n - off));
      if (w < 0) return 1;
      off += w;
    }
    struct timespec ts = {0, delay_us * 1000};
    nanosleep(&ts, NULL);
  }
}
