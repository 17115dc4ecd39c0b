/* agent.c: pipecr's in-target agent. Freestanding (no libc), position independent, built at build
 * time and embedded in libpipecr (CMake: agent_blob). pipecr maps it into a stopped target with one
 * remote mmap and points one thread at its entry (arch file x86_64.S); the agent then:
 *   1. blocks every signal, names its mapping "pipecr-agent", makes two socketpairs (control and
 *      files) and publishes them (phase SOCKET_READY); pipecr takes one end of each with pidfd_getfd
 *      and sends HELLO with the commit memfd; the agent maps the commit page, closes the ends pipecr
 *      took (so that pipecr's death is EOF) and answers ACK;
 *      HELLO may carry a second fd: the receiving end of a files queue pipecr filled before the stop
 *      (its FILES already waiting there); the agent then uses it in place of its own files pair;
 *   2. (dump) answers SURVEY: fcntl(F_GETFD) of every number below the limit given but its own two
 *      sockets, and each open file sent back over SCM_RIGHTS with its number, FD_CLOEXEC and fstat(),
 *      253 a message (survey()); nothing of the target changes, and pipecr then ends it as an abort;
 *   2. (restore) answers PREPARE (can every operation run, and do `count` received files fit now: it
 *      counts the free numbers below its limit with ppoll, taking none; then it grows its fd table
 *      to the highest number to fill) while the prepared files wait on the
 *      files socket (FILES, SCM_RIGHTS). They stay there, in flight: they hold their files without
 *      taking a number in the target, and nothing of the target is changed;
 *   3. on DECIDE, on EOF, on a timeout or on its own failure, decides once: it compare-and-swaps the
 *      shared commit word from OPEN to ABORTED; if it reads COMMITTED it runs the operations in order
 *      (receive the next batch of up to 253 files, each on its own number when it can: what the
 *      batch replaces handed to pipecr and closed first, the free numbers below it held; else dup3
 *      each to its number and close the temporaries; epoll_ctl ADD, F_SETFL |= flags, close), else
 *      it closes the files socket, dropping what is queued there;
 *   4. answers DONE, unmaps the commit page, closes its files socket, and waits: with an rt_sigframe
 *      (the usual case) for EOF on its control socket, which pipecr closes once it has let the thread
 *      go (or by dying), then it unmaps itself through the target's `syscall; ret` with rsp at the
 *      frame and rt_sigreturn returns the thread to its interrupted context, leaving nothing behind.
 *      Without a frame (fallback) it parks (a sleep) so that pipecr can take the thread back and
 *      remove the mapping; when pipecr is gone (EOF, timeout) or nobody comes within park_ms, it
 *      restores the signal mask and returns to the interrupted context through the register block
 *      by itself, leaving its mapping (named pipecr-agent) behind.
 * Every decision is one word in a page shared by all agents of a restore: one store by pipecr commits
 * every target, and an agent that gave up first makes that store fail, so targets never split. */
#include <asm/unistd.h>

#include "agent_abi.h"

typedef unsigned long ulong;

long agent_syscall(long nr, long a1, long a2, long a3, long a4, long a5, long a6);
void agent_return(uint64_t frame, uint64_t gadget, void* base, uint64_t len) __attribute__((noreturn));

#define SYS6(nr, a1, a2, a3, a4, a5, a6) \
  agent_syscall((nr), (long)(a1), (long)(a2), (long)(a3), (long)(a4), (long)(a5), (long)(a6))
#define SYS(nr, a1, a2, a3, a4, a5) SYS6(nr, a1, a2, a3, a4, a5, 0)

/* Kernel ABI constants (generic across 64-bit Linux architectures that have these calls). */
#define K_AF_UNIX 1
#define K_SOCK_SEQPACKET 5
#define K_SOCK_CLOEXEC 02000000
#define K_O_CLOEXEC 02000000
#define K_F_DUPFD_CLOEXEC 1030
#define K_F_GETFD 1
#define K_F_GETFL 3
#define K_F_SETFL 4
#define K_F_SETFD 2
#define K_FD_CLOEXEC 1
#define K_POLLNVAL 0x20
#define K_RLIMIT_NOFILE 7
#define K_MSG_CMSG_CLOEXEC 0x40000000
#define K_MSG_CTRUNC 0x8
#define K_MSG_NOSIGNAL 0x4000
#define K_MSG_DONTWAIT 0x40
#define K_MSG_PEEK 0x2
#define K_SOL_SOCKET 1
#define K_SCM_RIGHTS 1
#define K_POLLIN 0x1
#define K_PROT_RW 3
#define K_MAP_SHARED 1
#define K_SIG_BLOCK 0
#define K_SIG_SETMASK 2
#define K_PR_SET_VMA 0x53564d41
#define K_PR_SET_VMA_ANON_NAME 0
#define K_EPOLL_CTL_ADD 1
#define K_EMFILE 24
#define K_EINVAL 22
#define K_EPROTO 71
#define K_ETIMEDOUT 110
#define K_ETOOMANYREFS 109
#define K_EPIPE 32
#define K_ECONNRESET 104
#define K_FD_CLOEXEC 1
#define K_MAX_FDS 253 /* SCM_MAX_FD */
#define K_SIOCOUTQ 0x5411 /* TIOCOUTQ: bytes sent on a unix socket not yet received */
#define K_FIONREAD 0x541B
#define K_SPLICE_F_NONBLOCK 2
#define K_EAGAIN 11
#define K_S_IFMT 0170000
#define K_S_IFIFO 0010000

struct k_iovec { void* base; ulong len; };
struct k_msghdr {
  void* name;
  int namelen;
  struct k_iovec* iov;
  ulong iovlen;
  void* control;
  ulong controllen;
  unsigned flags;
};
struct k_cmsghdr { ulong len; int level; int type; };
struct k_timespec { long sec; long nsec; };
struct k_pollfd { int fd; short events; short revents; };
struct __attribute__((packed)) k_epoll_event { uint32_t events; uint64_t data; };

/* The receive buffer for one message's control data, in the control page after the block. */
#define CMSG_BUF_OFF 512
#define CMSG_BUF_LEN (16 + K_MAX_FDS * 4 + 8)

struct state {
  struct pipecr_agent_ctl* ctl;
  struct pipecr_agent_op* ops;
  const unsigned char* fdmap;
  volatile uint32_t* word;
  int sock;  /* control messages */
  int files; /* the files, parked in its queue until the commit */
  int failed; /* -errno: the agent aborts whatever pipecr says */
  int orphan; /* pipecr is gone (EOF, a timeout, a send that failed): nobody will take us back */
  int nold;   /* replaced files kept (above floor) to hand to pipecr, in the control page at OLD_OFF */
  uint32_t failed_at;
  long limit; /* the soft RLIMIT_NOFILE read by PREPARE (0: not read) */
  int nfill;  /* numbers held by fill_below() during the commit */
  int fill_max; /* the highest of them */
  int* fills;
};

static void close_fd(int fd) {
  if (fd >= 0) SYS(__NR_close, fd, 0, 0, 0, 0);
}

static int collides(const struct state* s, int fd) {
  return fd < s->ctl->floor && (s->fdmap[fd >> 3] >> (fd & 7)) & 1;
}

/* A received file that sits on a number an operation will fill is moved above every such number. */
static int settle(const struct state* s, int fd) {
  if (!collides(s, fd)) return fd;
  long moved = SYS(__NR_fcntl, fd, K_F_DUPFD_CLOEXEC, s->ctl->floor, 0, 0);
  close_fd(fd);
  return (int)moved;
}

/* Whether this thread still has a tracer (TracerPid in /proc/thread-self/status is not 0): before
 * the handshake, pipecr's death shows only this way. */
#define STATUS_BUF_OFF 2048
#define STATUS_BUF_LEN 1024
#define K_O_RDONLY 0
#define K_AT_FDCWD (-100)
static int traced(struct pipecr_agent_ctl* ctl) {
  char* buf = (char*)ctl + STATUS_BUF_OFF;
  static const char path[] = "/proc/thread-self/status";
  static const char key[] = "TracerPid:";
  long fd = SYS(__NR_openat, K_AT_FDCWD, path, K_O_RDONLY | K_O_CLOEXEC, 0, 0);
  if (fd < 0) return 1; /* cannot tell: assume pipecr is there, the timeout still bounds the wait */
  long n = SYS(__NR_read, fd, buf, STATUS_BUF_LEN - 1, 0, 0);
  close_fd((int)fd);
  if (n <= 0) return 1;
  for (long i = 0; i + (long)sizeof key - 1 < n; ++i) {
    int match = 1;
    for (unsigned k = 0; k + 1 < sizeof key; ++k)
      if (buf[i + k] != key[k]) {
        match = 0;
        break;
      }
    if (!match) continue;
    long j = i + (long)sizeof key - 1;
    while (j < n && (buf[j] == ' ' || buf[j] == '\t')) ++j;
    return !(j + 1 < n && buf[j] == '0' && buf[j + 1] == '\n');
  }
  return 1;
}

/* Waits up to ms for the socket to be readable: > 0 readable (or EOF), 0 timeout, < 0 error. */
static long wait_readable(int sock, int ms) {
  struct k_pollfd p = {sock, K_POLLIN, 0};
  struct k_timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  for (;;) {
    long r = SYS(__NR_ppoll, &p, 1, &ts, 0, 8);
    if (r != -4) return r; /* -EINTR: cannot happen with every signal blocked, but be safe */
  }
}

static long send_msg(int sock, uint32_t type, uint32_t first, uint32_t count, int32_t status) {
  struct pipecr_agent_msg m = {type, first, count, status};
  struct k_iovec iov = {&m, sizeof m};
  struct k_msghdr h = {0, 0, &iov, 1, 0, 0, 0};
  return SYS(__NR_sendmsg, sock, &h, K_MSG_NOSIGNAL, 0, 0);
}

/* recvmsg(), once more after ECONNRESET: pipecr's end closed with messages of ours unread (an
 * OLDFILES the agent had just sent, pipecr dying): the kernel sets the error on this end
 * (unix_release_sock), and the next receive reports it, once, before what is still queued here.
 * Every receive of the agent goes through here. */
static long recvmsg_past_reset(int sock, struct k_msghdr* h, int flags) {
  const ulong controllen = h->controllen;
  long n = SYS(__NR_recvmsg, sock, h, flags, 0, 0);
  if (n == -K_ECONNRESET) {
    h->controllen = controllen;
    h->flags = 0;
    n = SYS(__NR_recvmsg, sock, h, flags, 0, 0);
  }
  return n;
}

/* One message; its files (at most max) go to fds, their number to *nfds. Returns the length, 0 at
 * EOF, or -errno. */
static long recv_msg(struct state* s, int sock, int flags, struct pipecr_agent_msg* m, int* fds, int max, int* nfds) {
  char* cbuf = (char*)s->ctl + CMSG_BUF_OFF;
  struct k_iovec iov = {m, sizeof *m};
  struct k_msghdr h = {0, 0, &iov, 1, cbuf, CMSG_BUF_LEN, 0};
  long n = recvmsg_past_reset(sock, &h, flags);
  *nfds = 0;
  if (n <= 0) return n;
  ulong off = 0;
  while (off + sizeof(struct k_cmsghdr) <= h.controllen) {
    struct k_cmsghdr* c = (struct k_cmsghdr*)(cbuf + off);
    if (c->len < sizeof *c || off + c->len > h.controllen) break;
    if (c->level == K_SOL_SOCKET && c->type == K_SCM_RIGHTS) {
      int k = (int)((c->len - sizeof *c) / 4);
      const int* in = (const int*)(c + 1);
      for (int i = 0; i < k; ++i) {
        if (*nfds < max) fds[(*nfds)++] = in[i];
        else close_fd(in[i]);
      }
    }
    off += (c->len + 7) & ~7ul;
  }
  if ((ulong)n != sizeof *m) return -K_EPROTO;
  if (h.flags & K_MSG_CTRUNC) return -K_EMFILE; /* *m is whole: some callers can do with fewer files */
  return n;
}

static void fail(struct state* s, long err, uint32_t at) {
  if (!s->failed) {
    s->failed = (int)err;
    s->failed_at = at;
    s->ctl->error = (int32_t)err;
  }
}

/* Scratch for ppoll() arrays (K_MAX_FDS entries, 2024 bytes), in the control page: it shares the
 * status buffer (used before the handshake only) and the start of the kept-files array (OLD_OFF:
 * keep_old() writes there only after the scratch is done with, see install_batch()). */
#define SCRATCH_OFF STATUS_BUF_OFF
#define OLD_OFF 3072 /* K_MAX_FDS ints: 1012 bytes, up to 4084 */

static struct k_pollfd* scratch(const struct state* s) { return (struct k_pollfd*)((char*)s->ctl + SCRATCH_OFF); }

/* Sends `n` files (SCM_RIGHTS) with a message of this type on the control socket. OLDFILES goes
 * first to the files socket, without waiting: pipecr never reads that one during the stop, so the
 * files stay in flight there, held at no fd number and costing pipecr nothing, until it closes its
 * end after the resume (or dies); when that socket's buffer is full, on the control socket, where
 * pipecr receives and parks them. */
/* Attaches n files to message h (SCM_RIGHTS), in the control page's message buffer; fds may be that
 * buffer's own array already (files_msg_data()). */
static void attach_files(struct state* s, struct k_msghdr* h, const int* fds, int n) {
  char* cbuf = (char*)s->ctl + CMSG_BUF_OFF;
  struct k_cmsghdr* c = (struct k_cmsghdr*)cbuf;
  c->len = sizeof *c + (ulong)n * 4;
  c->level = K_SOL_SOCKET;
  c->type = K_SCM_RIGHTS;
  int* data = (int*)(c + 1);
  if (data != fds)
    for (int i = 0; i < n; ++i) data[i] = fds[i];
  h->control = cbuf;
  h->controllen = (c->len + 7) & ~7ul;
}

static long send_files_msg(struct state* s, uint32_t type, const int* fds, int n) {
  struct pipecr_agent_msg m = {type, 0, (uint32_t)n, 0};
  struct k_iovec iov = {&m, sizeof m};
  struct k_msghdr h = {0, 0, &iov, 1, 0, 0, 0};
  attach_files(s, &h, fds, n);
  if (type == PIPECR_MSG_OLDFILES && SYS(__NR_sendmsg, s->files, &h, K_MSG_NOSIGNAL | K_MSG_DONTWAIT, 0, 0) >= 0)
    return 0;
  return SYS(__NR_sendmsg, s->sock, &h, K_MSG_NOSIGNAL, 0, 0);
}

/* The array send_files_msg() sends from, where a caller may build it in place. */
static int* files_msg_data(const struct state* s) {
  return (int*)((struct k_cmsghdr*)((char*)s->ctl + CMSG_BUF_OFF) + 1);
}

/* Hands the replaced files to pipecr in one message (it closes them after the resume, so the last
 * close of a big pipe frees its pages outside the stop), then closes them here. */
static void flush_old(struct state* s) {
  int* old = (int*)((char*)s->ctl + OLD_OFF);
  if (s->nold == 0) return;
  if (!s->orphan && send_files_msg(s, PIPECR_MSG_OLDFILES, old, s->nold) < 0) s->orphan = 1;
  for (int i = 0; i < s->nold; ++i) close_fd(old[i]);
  s->nold = 0;
}

/* Keeps the file at fd (about to be replaced) at a number at or above floor, for flush_old(); when
 * there is no room, dup3 closes it in place. */
static void keep_old(struct state* s, int fd) {
  if (s->orphan) return;
  long copy = SYS(__NR_fcntl, fd, K_F_DUPFD_CLOEXEC, s->ctl->floor, 0, 0);
  if (copy < 0) return; /* EBADF: nothing there; EMFILE/EINVAL: no room */
  ((int*)((char*)s->ctl + OLD_OFF))[s->nold++] = (int)copy;
  if (s->nold == K_MAX_FDS) flush_old(s);
}

/* Closes [lo, hi] (all of them temporaries): one close_range() for a run. */
static void close_run(int lo, int hi) {
  if (lo < 0) return;
  if (lo == hi || SYS(__NR_close_range, lo, hi, 0, 0, 0) < 0)
    for (int fd = lo; fd <= hi; ++fd) close_fd(fd);
}

/* Closes numbers given in ascending order, one close_run() per run of consecutive ones: runs_add()
 * each, then runs_end(). */
struct runs {
  int lo, hi;
};
#define RUNS_EMPTY {-1, -2}
static void runs_add(struct runs* r, int fd) {
  if (fd == r->hi + 1) {
    r->hi = fd;
    return;
  }
  close_run(r->lo, r->hi);
  r->lo = r->hi = fd;
}
static void runs_end(struct runs* r) {
  close_run(r->lo, r->hi);
  r->lo = -1;
  r->hi = -2;
}

/* An install op of a batch marked done by install_batch() (its temp field). */
#define PLACED (-2)

/* Whether ops [first, first+n) with temporaries t can go through install_batch(): every one an
 * install, their numbers and the temporaries both strictly ascending (recvmsg() fills the lowest
 * free numbers in order, and pipecr queues each message in ascending fd order). */
static int in_order(const struct state* s, uint32_t first, const int* t, int n) {
  const struct pipecr_agent_op* op = s->ops + first;
  for (int i = 0; i < n; ++i) {
    if (op[i].code != PIPECR_AGENT_OP_INSTALL || op[i].fd < 0 || t[i] < 0) return 0;
    if (i && (op[i].fd <= op[i - 1].fd || t[i] <= t[i - 1])) return 0;
  }
  return 1;
}

static void note(int32_t* err, uint32_t* err_at, long r, uint32_t at) {
  if (r < 0 && (!*err || at < *err_at)) {
    *err = (int32_t)r;
    *err_at = at;
  }
}

/* Installs one received batch at once (ops [first, first+n), temporaries t, received with
 * FD_CLOEXEC when `cloexec`), in a few syscalls besides one dup3 per file:
 *  - the numbers it replaces that hold a file now (one ppoll: POLLNVAL marks a free number; a
 *    temporary sitting on a target is ours, not a file of the target) go to pipecr in one OLDFILES
 *    message, before any dup3: the message holds them alive until pipecr closes them after the
 *    resume. If that fails, each is kept by keep_old() as before (or closed in place by dup3);
 *  - a temporary already at its own number is installed as it is (F_SETFD only when its
 *    close-on-exec differs from the message's);
 *  - the others are dup3'ed so that no temporary is overwritten before it is installed: when op i
 *    targets the temporary of op j (fd_i == t_j), j must go first. Both sequences ascending,
 *    fd_i == t_j > t_i gives j > i and fd_j > t_j, so the ops whose number is above their temporary
 *    go first in descending order, then those below in ascending order (fd_i == t_j < t_i: j < i);
 *  - the temporaries left (not now a target) are closed in runs, one close_range() each.
 * Returns the first -errno by operation order (*at its index), 0 when all went. */
static int32_t install_batch(struct state* s, uint32_t first, const int* t, int n, int cloexec, uint32_t* at) {
  struct pipecr_agent_op* op = s->ops + first;
  int32_t err = 0;
  uint32_t err_at = 0;
  int keep = 0;
  if (!s->orphan) {
    struct k_pollfd* p = scratch(s);
    int np = 0;
    for (int i = 0, j = 0; i < n; ++i) {
      while (j < n && t[j] < op[i].fd) ++j;
      if (j < n && t[j] == op[i].fd) continue;
      p[np].fd = op[i].fd;
      p[np].events = 0;
      p[np].revents = 0;
      ++np;
    }
    struct k_timespec zero = {0, 0};
    long r = np ? SYS(__NR_ppoll, p, np, &zero, 0, 8) : 0;
    if (r < 0) {
      keep = 1;
    } else {
      int* old = files_msg_data(s);
      int nold = 0;
      for (int i = 0; i < np; ++i)
        if (!(p[i].revents & K_POLLNVAL)) old[nold++] = p[i].fd;
      if (nold) {
        r = send_files_msg(s, PIPECR_MSG_OLDFILES, old, nold);
        if (r < 0) keep = 1;
      }
    }
  }
  for (int i = n - 1; i >= 0; --i)
    if (op[i].fd > t[i]) {
      if (keep) keep_old(s, op[i].fd);
      note(&err, &err_at, SYS(__NR_dup3, t[i], op[i].fd, op[i].a ? K_O_CLOEXEC : 0, 0, 0), first + (uint32_t)i);
    }
  for (int i = 0; i < n; ++i) {
    if (op[i].fd < t[i]) {
      if (keep) keep_old(s, op[i].fd);
      note(&err, &err_at, SYS(__NR_dup3, t[i], op[i].fd, op[i].a ? K_O_CLOEXEC : 0, 0, 0), first + (uint32_t)i);
    } else if (op[i].fd == t[i] && !op[i].a != !cloexec) {
      note(&err, &err_at, SYS(__NR_fcntl, t[i], K_F_SETFD, op[i].a ? K_FD_CLOEXEC : 0, 0, 0), first + (uint32_t)i);
    }
    op[i].temp = PLACED;
  }
  struct runs left = RUNS_EMPTY;
  for (int i = 0, j = 0; i < n; ++i) {
    while (j < n && op[j].fd < t[i]) ++j;
    if (j < n && op[j].fd == t[i]) continue; /* installed there now */
    runs_add(&left, t[i]);
  }
  runs_end(&left);
  if (err) *at = err_at;
  return err;
}

/* Gives back the numbers fill_below() held, in runs (they were the lowest free, so mostly one). */
static void unfill(struct state* s) {
  struct runs held = RUNS_EMPTY;
  for (int i = 0; i < s->nfill; ++i) runs_add(&held, s->fills[i]);
  runs_end(&held);
  s->nfill = 0;
  s->fill_max = -1;
}

/* Before the batch that starts at op `at` is received (its size peeked from its message): when its
 * numbers are ascending and below the limit, the files they hold now (what it replaces) go to pipecr
 * in one OLDFILES message and are closed here, so that every number is free; recvmsg() would then put
 * its files at the lowest free numbers, below them, if there are any (fresh numbers above a few
 * holes: the usual case).
 * Holding those holes (copies of the control socket) makes each file land on its own number, where
 * install_batch() leaves it as it is: at most one fcntl() per file of the batch, once, instead of a
 * dup3 and a close per file. It never takes a number the batch needs: the files then land at or
 * below its highest number, which is free and below the limit. The holes are given back before a
 * batch that is not above all of them (so no operation ever fills a held number) and before any
 * other operation (which must see the numbers as they are). */
static void fill_below(struct state* s, uint32_t at) {
  const struct pipecr_agent_op* op = s->ops + at;
  struct k_pollfd* p = scratch(s);
  struct k_timespec zero = {0, 0};
  int n = 0, usable = 1;
  /* The batch's size: its message's header, peeked (no control buffer: no file is installed). */
  struct pipecr_agent_msg m;
  struct k_iovec iov = {&m, sizeof m};
  struct k_msghdr h = {0, 0, &iov, 1, 0, 0, 0};
  long pk = recvmsg_past_reset(s->files, &h, K_MSG_DONTWAIT | K_MSG_PEEK);
  int count = 0;
  if (pk == (long)sizeof m && m.type == PIPECR_MSG_FILES && m.first == at && m.count <= K_MAX_FDS &&
      m.count <= s->ctl->nops - at)
    count = (int)m.count;
  while (n < count && op[n].code == PIPECR_AGENT_OP_INSTALL) {
    if (op[n].fd < 0 || op[n].fd >= s->limit || (n && op[n].fd <= op[n - 1].fd)) usable = 0;
    p[n].fd = op[n].fd;
    p[n].events = 0;
    p[n].revents = 0;
    ++n;
  }
  if (n < count) usable = 0;
  if (s->nfill && (!usable || n == 0 || op[0].fd <= s->fill_max)) unfill(s);
  if (!usable || n == 0 || !s->limit || SYS(__NR_ppoll, p, n, &zero, 0, 8) < 0) return;
  /* Numbers that hold a file now (it replaces them): handed to pipecr in one OLDFILES message (which
   * holds them alive until pipecr closes them after the resume), then closed here in runs, so that
   * the batch lands on them too. If that message cannot go, install_batch() deals with them. */
  int* old = files_msg_data(s);
  int nold = 0;
  for (int i = 0; i < n; ++i)
    if (!(p[i].revents & K_POLLNVAL)) old[nold++] = p[i].fd;
  if (nold) {
    if (s->orphan || send_files_msg(s, PIPECR_MSG_OLDFILES, old, nold) < 0) return;
    struct runs handed = RUNS_EMPTY;
    for (int i = 0; i < nold; ++i) runs_add(&handed, old[i]);
    runs_end(&handed);
  }
  for (int taken = 0; taken < n && s->nfill < K_MAX_FDS; ++taken) {
    long x = SYS(__NR_fcntl, s->sock, K_F_DUPFD_CLOEXEC, 0, 0, 0);
    if (x < 0) return;
    if (x >= op[0].fd) {
      close_fd((int)x);
      return;
    }
    s->fills[s->nfill++] = (int)x;
    if (x > s->fill_max) s->fill_max = (int)x;
  }
}

/* At commit: the next FILES message from the files socket, for the install at op `at`; its files
 * become the temporaries of ops [first, first+count), received with FD_CLOEXEC as op `at` wants
 * it. A batch in order (in_order) is installed at once (install_batch: its ops are marked PLACED,
 * *at set to the failed one); else each temporary that sits on a number to be filled is moved above
 * floor and the ops install them one at a time. Returns 0 or -errno. */
static int32_t take_files(struct state* s, uint32_t* at) {
  struct pipecr_agent_ctl* ctl = s->ctl;
  int fds[K_MAX_FDS];
  int nfds = 0;
  struct pipecr_agent_msg m;
  const int cloexec = s->ops[*at].a != 0;
  fill_below(s, *at);
  long r = recv_msg(s, s->files, K_MSG_DONTWAIT | (cloexec ? K_MSG_CMSG_CLOEXEC : 0), &m, fds, K_MAX_FDS, &nfds);
  int32_t st = 0;
  if (r <= 0) st = r < 0 ? (int32_t)r : -K_EPROTO;
  else if (m.type != PIPECR_MSG_FILES || m.first != *at || m.count != (uint32_t)nfds || ctl->nops - m.first < m.count)
    st = nfds < (int)m.count ? -K_EMFILE : -K_EPROTO;
  if (!st && in_order(s, m.first, fds, nfds)) return install_batch(s, m.first, fds, nfds, cloexec, at);
  for (int i = 0; i < nfds; ++i) {
    uint32_t op = m.first + (uint32_t)i;
    if (st || s->ops[op].code != PIPECR_AGENT_OP_INSTALL) {
      close_fd(fds[i]);
      continue;
    }
    int fd = settle(s, fds[i]);
    if (fd < 0) {
      st = fd;
      continue;
    }
    s->ops[op].temp = fd;
  }
  return st;
}

static int32_t prepare(struct state* s, uint32_t* at) {
  for (uint32_t i = 0; i < s->ctl->nops; ++i) {
    const struct pipecr_agent_op* op = &s->ops[i];
    *at = i;
    if (op->code == PIPECR_AGENT_OP_EPOLL_ADD) {
      long r = SYS(__NR_fcntl, op->a, K_F_GETFD, 0, 0, 0);
      if (r < 0) return (int32_t)r;
    }
    if (op->code < PIPECR_AGENT_OP_INSTALL || op->code > PIPECR_AGENT_OP_SETFD) return -K_EINVAL;
  }
  return 0;
}

/* Counts free numbers in [from, limit), K_MAX_FDS at a time with one ppoll() each (POLLNVAL marks
 * a free number), until `want` are found. *collide: how many of them an operation fills (when not
 * NULL); *last: the last one counted. Returns how many were found, or -errno. */
static long free_numbers(const struct state* s, long from, long limit, uint32_t want, uint32_t* collide, long* last) {
  struct k_pollfd* p = scratch(s);
  struct k_timespec zero = {0, 0};
  uint32_t found = 0;
  for (long lo = from; found < want && lo < limit; lo += K_MAX_FDS) {
    int n = limit - lo < K_MAX_FDS ? (int)(limit - lo) : K_MAX_FDS;
    for (int i = 0; i < n; ++i) {
      p[i].fd = (int)(lo + i);
      p[i].events = 0;
      p[i].revents = 0;
    }
    long r = SYS(__NR_ppoll, p, n, &zero, 0, 8);
    if (r < 0) return r;
    for (int i = 0; i < n && found < want; ++i)
      if (p[i].revents & K_POLLNVAL) {
        ++found;
        *last = lo + i;
        if (collide && collides(s, (int)(lo + i))) ++*collide;
      }
  }
  return found;
}

/* Whether `count` received files fit at the commit, without taking any number: the soft
 * RLIMIT_NOFILE, then the free numbers below it, as recvmsg() would fill them (the `count` lowest),
 * and, for those an operation fills (which take_files() moves above floor when a batch is not in
 * order), as many free numbers above both floor and the last of them (settle() takes the lowest free
 * at or above floor). Every thread of the target is stopped, so what fits now fits at the commit.
 * A few ppoll()s (one per 253 numbers scanned). 0 or -EMFILE. */
static int32_t room_for(struct state* s, uint32_t count) {
  struct { uint64_t cur, max; } lim;
  if (count > K_MAX_FDS) count = K_MAX_FDS;
  if (count == 0) return 0;
  long r = SYS(__NR_prlimit64, 0, K_RLIMIT_NOFILE, 0, &lim, 0);
  if (r < 0) return (int32_t)r;
  const long limit = lim.cur > 0x7fffffffull ? 0x7fffffffl : (long)lim.cur;
  s->limit = limit;
  uint32_t collide = 0;
  long last = -1;
  long got = free_numbers(s, 0, limit, count, &collide, &last);
  if (got < 0) return (int32_t)got;
  if ((uint32_t)got < count) return -K_EMFILE;
  if (collide) {
    long from = s->ctl->floor > last + 1 ? s->ctl->floor : last + 1;
    long ignored = 0;
    got = free_numbers(s, from, limit, collide, 0, &ignored);
    if (got < 0) return (int32_t)got;
    if ((uint32_t)got < collide) return -K_EMFILE;
  }
  return 0;
}

/* Makes the fd table cover every number an operation fills now, in one step: the kernel grows it as
 * numbers are taken (to the next power of two), and growing a table that threads share waits for an
 * RCU grace period (expand_fdtable: synchronize_rcu), milliseconds each; installing 2,000 fds at
 * 100-2099 one batch at a time grew it 3 or 4 times during the commit. One F_DUPFD_CLOEXEC at the
 * highest number (floor - 1, when below the limit), closed at once. */
static void grow_table(struct state* s) {
  const long top = (long)s->ctl->floor - 1;
  if (top <= 0 || !s->limit || top >= s->limit) return;
  long x = SYS(__NR_fcntl, s->sock, K_F_DUPFD_CLOEXEC, top, 0, 0);
  if (x >= 0) close_fd((int)x);
}

/* Runs every operation; returns 0 or the first -errno (and where), going on after an error. */
static int32_t apply(struct state* s, uint32_t* at) {
  int32_t first = 0;
  int fills[K_MAX_FDS];
  s->fills = fills;
  for (uint32_t i = 0; i < s->ctl->nops; ++i) {
    struct pipecr_agent_op* op = &s->ops[i];
    uint32_t where = i;
    long r = 0;
    if (op->code == PIPECR_AGENT_OP_INSTALL) {
      if (op->temp == -1) {
        flush_old(s); /* the kept files and the next batch never hold more numbers than one batch */
        r = take_files(s, &where);
      }
      if (op->temp == PLACED) {
        op->temp = -1; /* installed with its batch (r: the batch's first error, at `where`) */
      } else if (op->temp >= 0) {
        keep_old(s, op->fd);
        r = SYS(__NR_dup3, op->temp, op->fd, op->a ? K_O_CLOEXEC : 0, 0, 0);
        close_fd(op->temp);
        op->temp = -1;
      } else if (r == 0) {
        r = -K_EPROTO;
      }
    } else if (s->nfill) {
      unfill(s); /* the other operations see the numbers as they are */
    }
    if (op->code == PIPECR_AGENT_OP_EPOLL_ADD) {
      struct k_epoll_event ev = {(uint32_t)op->b, op->c};
      r = SYS(__NR_epoll_ctl, op->a, K_EPOLL_CTL_ADD, op->fd, &ev, 0);
    } else if (op->code == PIPECR_AGENT_OP_SETFL_OR) {
      r = SYS(__NR_fcntl, op->fd, K_F_GETFL, 0, 0, 0);
      if (r >= 0) r = SYS(__NR_fcntl, op->fd, K_F_SETFL, (ulong)r | op->b, 0, 0);
    } else if (op->code == PIPECR_AGENT_OP_CLOSE) {
      r = SYS(__NR_close, op->fd, 0, 0, 0, 0);
    } else if (op->code == PIPECR_AGENT_OP_SETFD) {
      r = SYS(__NR_fcntl, op->fd, K_F_SETFD, op->a ? K_FD_CLOEXEC : 0, 0, 0);
    }
    if (r < 0 && !first) {
      first = (int32_t)r;
      *at = where;
    }
  }
  flush_old(s);
  unfill(s);
  return first;
}

static void drop_received(struct state* s) {
  for (uint32_t i = 0; i < s->ctl->nops; ++i)
    if (s->ops[i].code == PIPECR_AGENT_OP_INSTALL && s->ops[i].temp >= 0) {
      close_fd(s->ops[i].temp);
      s->ops[i].temp = -1;
    }
}

/* Steps 1 and 2: returns with the decision still to make (or without a connection: s->word NULL). */
static int make_pair(const struct state* s, int sv[2]) {
  long r = SYS(__NR_socketpair, K_AF_UNIX, K_SOCK_SEQPACKET | K_SOCK_CLOEXEC, 0, sv, 0);
  if (r < 0) return (int)r;
  sv[0] = settle(s, sv[0]);
  sv[1] = settle(s, sv[1]);
  if (sv[0] >= 0 && sv[1] >= 0) return 0;
  r = sv[0] < 0 ? sv[0] : sv[1];
  close_fd(sv[0]);
  close_fd(sv[1]);
  return (int)r;
}

/* The survey (dump, PIPECR_MSG_SURVEY): one message of `k` entries with their files attached (those
 * without PIPECR_SURVEY_UNSENT). When the files in flight exceed the limit the kernel puts on them
 * (ETOOMANYREFS: the target's RLIMIT_NOFILE, per user, unless it has CAP_SYS_RESOURCE or
 * CAP_SYS_ADMIN), it waits for pipecr to receive what is queued and tries again, for up to a second. */
static long survey_send(struct state* s, uint32_t type, uint32_t first, const struct pipecr_survey_ent* ent,
                        uint32_t k, const int* fds, uint32_t nfds, int32_t status) {
  struct pipecr_agent_msg m = {type, first, k, status};
  struct k_iovec iov[2] = {{&m, sizeof m}, {(void*)ent, (ulong)k * sizeof *ent}};
  struct k_msghdr h = {0, 0, iov, k ? 2 : 1, 0, 0, 0};
  if (nfds) attach_files(s, &h, fds, (int)nfds);
  for (int tries = 0;; ++tries) {
    long r = SYS(__NR_sendmsg, s->sock, &h, K_MSG_NOSIGNAL, 0, 0);
    if (r != -K_ETOOMANYREFS || tries >= 10000) return r;
    struct k_timespec ts = {0, 100000};
    SYS(__NR_ppoll, 0, 0, &ts, 0, 8);
  }
}

static int broken(long r) { return r == -K_EPIPE || r == -K_ECONNRESET; }

/* Sends k entries and their files in one message; when the kernel refuses the message (a file that
 * may not travel over SCM_RIGHTS), one entry a message, marking UNSENT those it refuses. Returns 0,
 * or -errno when pipecr's end is gone. */
static long survey_flush(struct state* s, uint32_t first, struct pipecr_survey_ent* ent, const int* fds, uint32_t k) {
  long r = survey_send(s, PIPECR_MSG_SURVEY_FILES, first, ent, k, fds, k, 0);
  if (r >= 0 || broken(r)) return r < 0 ? r : 0;
  for (uint32_t i = 0; i < k; ++i) {
    r = survey_send(s, PIPECR_MSG_SURVEY_FILES, first + i, &ent[i], 1, &fds[i], 1, 0);
    if (r < 0 && !broken(r)) {
      ent[i].fd |= PIPECR_SURVEY_UNSENT;
      r = survey_send(s, PIPECR_MSG_SURVEY_FILES, first + i, &ent[i], 1, fds, 0, 0);
    }
    if (r < 0) return r;
  }
  return 0;
}

/* The kernel's struct stat of fstat() (x86-64 layout: the agent is built for x86-64 only, agent.cmake). */
struct k_stat {
  ulong dev, ino, nlink;
  uint32_t mode, uid, gid, pad0;
  ulong rdev;
  long size, blksize, blocks;
  ulong times[6];
  long unused[3];
};

enum { STAT_CHECK = 32 }; /* survey entries between two looks at the socket's queue */

static struct pipecr_survey_ent* survey_ent(const struct state* s) {
  return (struct pipecr_survey_ent*)((char*)s->ctl - s->ctl->ctl_offset + s->ctl->survey_offset);
}

/* The scratch pipes pipecr sends during a survey (SCRATCH messages, their write ends on the lowest
 * free numbers of the target's table): the survey skips those numbers and tees into them in turn. */
struct scratch_set {
  int fd[PIPECR_SURVEY_SCRATCH];     /* write ends, in the order received: pipecr's names for them */
  int sorted[PIPECR_SURVEY_SCRATCH]; /* the same numbers, ascending */
  int n;
  int cur;  /* the one tee'd into now; n: none left (until more come) */
  int off;  /* no tee any more: pipecr is gone (EPIPE), or a SIGPIPE was pending before the survey */
  int skip; /* the next of sorted[] the survey's walk will meet */
  ulong last_ino; /* the pipe tee'd last: its other end (pipe() gives the next number) is skipped */
  uint32_t empty; /* pipes found empty in a row: past EMPTY_RUN, only every EMPTY_RUN-th is asked */
};

/* A table of empty pipes costs the agent a FIONREAD each for nothing: after this many in a row it
 * asks one in EMPTY_RUN, until one holds bytes. */
enum { EMPTY_RUN = 32 };

static void scratch_add(struct scratch_set* sc, const int* fds, int n) {
  for (int i = 0; i < n; ++i) {
    if (sc->n == PIPECR_SURVEY_SCRATCH) {
      close_fd(fds[i]);
      continue;
    }
    sc->fd[sc->n] = fds[i];
    int j = sc->n++;
    for (; j > 0 && sc->sorted[j - 1] > fds[i]; --j) sc->sorted[j] = sc->sorted[j - 1];
    sc->sorted[j] = fds[i];
  }
  sc->skip = 0; /* scratch_own() walks past those below the walk's place again */
}

static void scratch_drop(struct scratch_set* sc) {
  for (int i = 0; i < sc->n; ++i) close_fd(sc->fd[i]);
  sc->n = 0;
  sc->cur = 0;
}

#define K_SIGPIPE_BIT (1ul << (13 - 1))

/* A tee into a pipe without readers (pipecr died with the scratch pipes' read ends) fails with
 * EPIPE and queues a SIGPIPE for this thread, which the agent's mask holds and the target would get
 * after the agent's return. The survey tees only when none was pending at its start (else the two
 * would be one and could not be told apart), and takes the one a tee raised at once. */
static void scratch_check_sigpipe(struct scratch_set* sc) {
  ulong pending = 0;
  if (SYS(__NR_rt_sigpending, &pending, 8, 0, 0, 0) < 0 || (pending & K_SIGPIPE_BIT)) sc->off = 1;
}

static void scratch_take_sigpipe(struct scratch_set* sc) {
  ulong set = K_SIGPIPE_BIT;
  struct k_timespec zero = {0, 0};
  SYS(__NR_rt_sigtimedwait, &set, 0, &zero, 8, 0);
  sc->off = 1;
}

/* After each message sent: the scratch pipes pipecr has sent meanwhile (it makes them while it would
 * otherwise wait for a message). Returns 0, or -errno when pipecr's end is gone. */
static long scratch_poll(struct state* s, struct scratch_set* sc) {
  for (;;) {
    struct pipecr_agent_msg m;
    int fds[PIPECR_SURVEY_SCRATCH];
    int nfds = 0;
    long r = recv_msg(s, s->sock, K_MSG_DONTWAIT | K_MSG_CMSG_CLOEXEC, &m, fds, PIPECR_SURVEY_SCRATCH, &nfds);
    if (r == -K_EAGAIN) return 0;
    if (r == 0) return -K_EPIPE;
    if ((r > 0 || r == -K_EMFILE) && m.type == PIPECR_MSG_SCRATCH) { /* EMFILE: fewer fit (RLIMIT_NOFILE) */
      scratch_add(sc, fds, nfds);
      continue;
    }
    for (int i = 0; i < nfds; ++i) close_fd(fds[i]);
    return r < 0 && r != -K_EMFILE ? r : -K_EPROTO; /* another message, or a failure */
  }
}

/* Whether fd is one of the scratch pipes (the walk asks in ascending order). */
static int scratch_own(struct scratch_set* sc, uint32_t fd) {
  while (sc->skip < sc->n && (uint32_t)sc->sorted[sc->skip] < fd) ++sc->skip;
  return sc->skip < sc->n && (uint32_t)sc->sorted[sc->skip] == fd;
}

/* Tees every buffer of the pipe behind fd (inode ino) into the current scratch pipe: the bytes
 * linked into scratch pipe *which, or 0 when it did not (an empty pipe, a write end, a notification
 * pipe, the scratch pipes used up, the other end of the pipe tee'd just before): pipecr then tees
 * it itself, or skips the second piece. A piece is whole when the tee linked at least what FIONREAD
 * counted before it (pipecr's own rule: what is queued at the tee is the snapshot). A tee cut short
 * by a full scratch pipe leaves what it linked at that scratch pipe's tail, which is never used
 * again, and goes once into the next one. */
static uint32_t scratch_tee(struct scratch_set* sc, int fd, ulong ino, uint32_t* which) {
  int queued = 0;
  if (sc->off || sc->cur >= sc->n || ino == sc->last_ino) return 0;
  if (sc->empty >= EMPTY_RUN && ++sc->empty % EMPTY_RUN != 0) return 0;
  if (SYS(__NR_ioctl, fd, K_FIONREAD, &queued, 0, 0) < 0 || queued <= 0) {
    if (sc->empty < EMPTY_RUN) ++sc->empty;
    return 0;
  }
  sc->empty = 0;
  for (int tries = 0; tries < 2 && sc->cur < sc->n; ++tries) {
    long r = SYS(__NR_tee, fd, sc->fd[sc->cur], 1ul << 30, K_SPLICE_F_NONBLOCK, 0);
    if (r == -K_EPIPE) scratch_take_sigpipe(sc);
    if (r < 0 && r != -K_EAGAIN) return 0; /* EBADF: a write end; EINVAL: a notification pipe */
    if (r >= queued) {
      *which = (uint32_t)sc->cur;
      sc->last_ino = ino;
      return (uint32_t)r;
    }
    ++sc->cur; /* full: on to the next */
  }
  return 0;
}

/* Reports every open fd below n but the agent's own (fcntl F_GETFD: open or not, FD_CLOEXEC; fstat:
 * its kind and inode) and sends each file, up to 253 a message, then SURVEY_DONE. pipecr takes in
 * one message while the agent prepares the next. While pipecr is behind (the same test as for the
 * fstat()s; `always`: at once, for tests) the agent also tees the pipes it meets into the scratch
 * pipes pipecr sends it (SCRATCH). Nothing of the target changes: the files travel as references,
 * the table is only read, the tees only link buffers, and the scratch pipes are closed before
 * SURVEY_DONE. Returns 0, or -errno when pipecr's end is gone. */
static long survey_walk(struct state* s, uint32_t n, int pipecr_cpu, int always, struct scratch_set* sc);
static long survey(struct state* s, uint32_t n, int pipecr_cpu, int always) {
  struct scratch_set sc; /* field by field: zeroing its arrays could become a memset call (clang) */
  sc.n = sc.cur = sc.off = sc.skip = 0;
  sc.last_ino = 0;
  sc.empty = 0;
  scratch_check_sigpipe(&sc);
  long r = survey_walk(s, n, pipecr_cpu, always, &sc);
  scratch_drop(&sc);
  if (r < 0) return r;
  r = survey_send(s, PIPECR_MSG_SURVEY_DONE, (uint32_t)r, s->ctl->survey_offset ? survey_ent(s) : 0, 0, 0, 0,
                  s->ctl->survey_offset ? 0 : -K_EINVAL);
  return r < 0 ? r : 0;
}

static long survey_walk(struct state* s, uint32_t n, int pipecr_cpu, int always, struct scratch_set* sc) {
  struct pipecr_survey_ent* ent = s->ctl->survey_offset ? survey_ent(s) : 0;
  int fds[PIPECR_SURVEY_BATCH];
  uint32_t k = 0, sent = 0;
  /* pipecr's request may have woken this thread on pipecr's own CPU (a unix socket's wakeup is
   * "sync", and a guest's halted vCPU does not count as idle), where it took the CPU from pipecr.
   * Handing it back once lets pipecr move to another CPU at once (Agent::survey) instead of after
   * this thread's slice (1-2 ms measured). On a CPU of its own it does not yield: on a busy machine
   * a yield could hand the CPU to some other process for a slice while the target stands stopped. */
  unsigned cpu = 0;
  if (pipecr_cpu >= 0 && SYS(__NR_getcpu, &cpu, 0, 0, 0, 0) == 0 && (int)cpu == pipecr_cpu)
    SYS(__NR_sched_yield, 0, 0, 0, 0, 0);
  if (!ent) return 0;
  if (n > PIPECR_SURVEY_FD_MASK + 1u) n = PIPECR_SURVEY_FD_MASK + 1u;
  if (always) { /* pipecr sends the scratch pipes (maybe none) right after the request: waited for */
    long r = wait_readable(s->sock, s->ctl->idle_ms);
    if (r > 0) r = scratch_poll(s, sc);
    if (r < 0) return r;
  }
  /* The fstat()s and tees go to whichever side has time (each has a CPU): the agent makes them
   * while pipecr is a whole message behind (two sent that it has not dealt with, by the progress
   * word pipecr writes in the shared page), and else leaves them to pipecr, which would otherwise
   * wait; taking them whenever pipecr was busy at all made the agent the slower side. Without the page,
   * every STAT_CHECK entries: while the message sent last is still queued (asked right after a
   * send, the queue always holds that message, so the answer carries over the start of each). */
  const volatile uint32_t* taken = s->word ? s->word + PIPECR_SURVEY_TAKEN_OFF / sizeof *s->word : 0;
  uint32_t messages = 0;
  int behind = 0;
  for (uint32_t fd = 0; fd < n; ++fd) {
    if ((int)fd == s->sock || (int)fd == s->files || scratch_own(sc, fd)) continue;
    if (always) {
      behind = 1;
    } else if (taken) {
      behind = __atomic_load_n(taken, __ATOMIC_ACQUIRE) + 1 < messages;
    } else if (k % STAT_CHECK == 0 && k != 0) {
      int queued = 0;
      behind = SYS(__NR_ioctl, s->sock, K_SIOCOUTQ, &queued, 0, 0) == 0 && queued > 0;
    }
    long fl = SYS(__NR_fcntl, fd, K_F_GETFD, 0, 0, 0);
    if (fl < 0) continue; /* EBADF: not open */
    struct k_stat st;
    struct pipecr_survey_ent* e = &ent[k];
    e->fd = fd | ((fl & K_FD_CLOEXEC) ? PIPECR_SURVEY_CLOEXEC : 0);
    e->teed = 0;
    e->scratch = 0;
    if (behind && SYS(__NR_fstat, fd, &st, 0, 0, 0) == 0) {
      e->mode = st.mode;
      e->ino = st.ino;
      e->dev = st.dev;
      e->uid = st.uid;
      e->gid = st.gid;
      if ((st.mode & K_S_IFMT) == K_S_IFIFO) e->teed = scratch_tee(sc, (int)fd, st.ino, &e->scratch);
    } else {
      e->mode = 0;
    }
    fds[k++] = (int)fd;
    if (k == PIPECR_SURVEY_BATCH) {
      long r = survey_flush(s, sent, ent, fds, k);
      if (r == 0) r = scratch_poll(s, sc);
      if (r < 0) return r;
      sent += k;
      k = 0;
      ++messages;
    }
  }
  if (k) {
    long r = survey_flush(s, sent, ent, fds, k);
    if (r < 0) return r;
    sent += k;
  }
  return (long)sent;
}

static void converse(struct state* s) {
  struct pipecr_agent_ctl* ctl = s->ctl;
  int sv[2] = {-1, -1}, fv[2] = {-1, -1};
  int fds[K_MAX_FDS];
  int nfds = 0;
  struct pipecr_agent_msg m;
  long r = make_pair(s, sv);
  if (r == 0) {
    r = make_pair(s, fv);
    if (r) {
      close_fd(sv[0]);
      close_fd(sv[1]);
    }
  }
  if (r) {
    ctl->error = (int32_t)r;
    return;
  }
  ctl->sock_peer = sv[0];
  ctl->sock_mine = sv[1];
  ctl->files_peer = fv[0];
  ctl->files_mine = fv[1];
  s->sock = sv[1];
  s->files = fv[1];
  __atomic_store_n(&ctl->phase, PIPECR_AGENT_SOCKET_READY, __ATOMIC_RELEASE);

  /* Wait for HELLO in slices, checking that pipecr (the tracer) is still there. */
  for (int waited = 0;; waited += 10) {
    r = wait_readable(s->sock, 10);
    if (r != 0 || waited >= ctl->handshake_ms || !traced(ctl)) break;
  }
  if (r > 0) r = recv_msg(s, s->sock, K_MSG_CMSG_CLOEXEC, &m, fds, 2, &nfds);
  close_fd(sv[0]);
  close_fd(fv[0]);
  if (r <= 0 || m.type != PIPECR_MSG_HELLO || nfds < 1) {
    for (int i = 0; i < nfds; ++i) close_fd(fds[i]);
    ctl->error = r < 0 ? (int32_t)r : -K_ETIMEDOUT;
    return;
  }
  if (nfds == 2) {
    /* The files queue pipecr filled before the stop: its receiving end replaces our own pair. */
    int q = settle(s, fds[1]);
    if (q < 0) {
      close_fd(fds[0]);
      ctl->error = q;
      return;
    }
    close_fd(fv[1]);
    s->files = q;
    ctl->files_mine = q;
  }
  long page = SYS6(__NR_mmap, 0, 4096, K_PROT_RW, K_MAP_SHARED, fds[0], 0);
  close_fd(fds[0]);
  if (page < 0 && page > -4096) {
    ctl->error = (int32_t)page;
    send_msg(s->sock, PIPECR_MSG_FAILED, 0, 0, (int32_t)page);
    return;
  }
  s->word = (volatile uint32_t*)page;
  __atomic_store_n(&ctl->phase, PIPECR_AGENT_CONNECTED, __ATOMIC_RELEASE);
  send_msg(s->sock, PIPECR_MSG_ACK, 0, 0, 0);

  for (;;) {
    r = wait_readable(s->sock, ctl->idle_ms);
    if (r <= 0) {
      fail(s, r < 0 ? r : -K_ETIMEDOUT, 0);
      s->orphan = 1;
      return;
    }
    r = recv_msg(s, s->sock, K_MSG_CMSG_CLOEXEC, &m, fds, K_MAX_FDS, &nfds);
    for (int i = 0; i < nfds; ++i) close_fd(fds[i]); /* no files come this way */
    if (r <= 0) { /* EOF: pipecr is gone; an error: give up */
      if (r < 0) fail(s, r, 0);
      s->orphan = 1;
      return;
    }
    if (m.type == PIPECR_MSG_DECIDE) return;
    if (m.type == PIPECR_MSG_SCRATCH) continue; /* came after the survey's last look: closed above */
    if (m.type == PIPECR_MSG_SURVEY) {
      if (survey(s, m.count, (int)m.first - 1, m.status & PIPECR_SURVEY_TEE_ALWAYS) < 0) { /* pipecr is gone: nobody takes the thread back */
        s->orphan = 1;
        return;
      }
      continue;
    }
    if (m.type == PIPECR_MSG_PREPARE) {
      uint32_t at = 0;
      int32_t st = s->failed ? s->failed : prepare(s, &at);
      if (!st) st = room_for(s, m.count);
      if (!st) grow_table(s);
      if (st) fail(s, st, at);
      send_msg(s->sock, PIPECR_MSG_PREPARED, s->failed ? s->failed_at : 0, 0, s->failed);
    } else {
      fail(s, -K_EPROTO, 0);
    }
    if (s->failed) {
      /* Give up at once: nobody can commit any more. pipecr learns it from FAILED or PREPARED. */
      uint32_t open = PIPECR_COMMIT_OPEN;
      __atomic_compare_exchange_n(s->word, &open, PIPECR_COMMIT_ABORTED, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
      send_msg(s->sock, PIPECR_MSG_FAILED, s->failed_at, 0, s->failed);
    }
  }
}

__attribute__((used)) void* agent_main(struct pipecr_agent_ctl* ctl) {
  struct state s = {ctl, 0, 0, 0, -1, -1, 0, 0, 0, 0, 0, 0, -1, 0};
  uint64_t all = ~0ull;
  char* base = (char*)ctl - ctl->ctl_offset;
  SYS(__NR_rt_sigprocmask, K_SIG_BLOCK, &all, 0, 8, 0);
  __atomic_store_n(&ctl->phase, PIPECR_AGENT_STARTED, __ATOMIC_RELEASE);
  SYS(__NR_prctl, K_PR_SET_VMA, K_PR_SET_VMA_ANON_NAME, base, ctl->map_len, ctl->name);
  s.ops = (struct pipecr_agent_op*)(base + ctl->ops_offset);
  s.fdmap = (const unsigned char*)(base + ctl->fdmap_offset);

  converse(&s);

  if (s.word) {
    uint32_t open = PIPECR_COMMIT_OPEN;
    __atomic_compare_exchange_n(s.word, &open, PIPECR_COMMIT_ABORTED, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    int committed = __atomic_load_n(s.word, __ATOMIC_SEQ_CST) == PIPECR_COMMIT_COMMITTED;
    uint32_t at = 0;
    int32_t st = committed ? apply(&s, &at) : 0;
    if (!committed) drop_received(&s);
    SYS(__NR_munmap, s.word, 4096, 0, 0, 0);
    if (send_msg(s.sock, PIPECR_MSG_DONE, at, (uint32_t)committed, st) < 0) s.orphan = 1;
  } else {
    drop_received(&s);
    s.orphan = 1; /* no connection: nobody will come */
  }
  close_fd(s.files); /* files still parked in its queue go with it */
  if (ctl->frame) {
    /* pipecr lets the thread go (it interrupts it here and detaches it, changing nothing) and then
     * closes its socket: EOF. Or pipecr is gone (EOF already), or nobody comes within park_ms. Then
     * the agent unmaps itself and the thread returns through the rt_sigframe: registers, FPU state
     * and signal mask as they were, no mapping left. Waiting in ppoll leaves the restart block alone
     * (not that it matters here: rt_sigreturn resets it, see as_resumed_by_sigreturn). */
    __atomic_store_n(&ctl->phase, PIPECR_AGENT_PARKED, __ATOMIC_RELEASE);
    if (!s.orphan) {
      struct k_timespec ts = {ctl->park_ms / 1000, (long)(ctl->park_ms % 1000) * 1000000L};
      struct k_pollfd p = {s.sock, K_POLLIN, 0};
      while (SYS(__NR_ppoll, &p, 1, &ts, 0, 8) == -4) {
      }
    }
    close_fd(s.sock);
    __atomic_store_n(&ctl->phase, PIPECR_AGENT_RETURNING, __ATOMIC_RELEASE);
    agent_return(ctl->frame, ctl->gadget, base, ctl->map_len);
  }
  close_fd(s.sock);
  __atomic_store_n(&ctl->phase, PIPECR_AGENT_PARKED, __ATOMIC_RELEASE);
  /* Without a frame (the fallback), pipecr normally takes the thread back here (PTRACE_INTERRUPT): it
   * puts the registers and the
   * signal mask back and unmaps this code. Past park_ms the agent returns by itself. The sleep is a
   * ppoll on nothing, not nanosleep: an interrupted nanosleep (like poll, futex, clock_nanosleep)
   * overwrites the thread's restart_block, which the interrupted syscall may still need
   * (ERESTART_RESTARTBLOCK); ppoll restarts with ERESTARTNOHAND and leaves it alone. */
  struct k_timespec ts = {ctl->park_ms / 1000, (long)(ctl->park_ms % 1000) * 1000000L};
  while (!s.orphan && SYS(__NR_ppoll, 0, 0, &ts, 0, 8) == -4) {
  }
  __atomic_store_n(&ctl->phase, PIPECR_AGENT_RETURNING, __ATOMIC_RELEASE);
  SYS(__NR_rt_sigprocmask, K_SIG_SETMASK, &ctl->orig_sigmask, 0, 8, 0);
  return (void*)ctl->return_block;
}
