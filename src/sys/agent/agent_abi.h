/* agent_abi.h: what pipecr and its in-target agent (agent.c) share: the control block, the operations
 * and the messages. Plain C, fixed-width types only: compiled into the freestanding agent and into
 * pipecr (src/sys/agent.cpp). See docs/design.md section 8 for the protocol.
 *
 * The agent's mapping, anonymous, made by one remote mmap (read-write), then [0, code) made
 * read+execute by one remote mprotect before the agent runs (never writable and executable at once):
 *   [0, code)                    the agent's code (the blob; entry at offset 0), R+X
 *   [code, map_len)              the rest, RW:
 *   [ctl_offset, +4096)          struct pipecr_agent_ctl, then the agent's receive buffers
 *   [fdmap_offset, +fdmap_bytes) one bit per fd number below `floor`: set when an operation installs
 *                                at that number (a received temporary there must be moved away)
 *   [ops_offset, +nops * 32)     the operations, in the order they run at commit
 * What the agent returns through sits on the thread's own stack (below the red zone), not in the
 * mapping: an rt_sigframe (`frame` set: the agent unmaps itself through the `syscall; ret` at `gadget`
 * with rsp at the frame, and rt_sigreturn puts the thread back), else the register block its
 * epilogue pops (the fallback when the target has no such gadget or restorer). */
#ifndef PIPECR_AGENT_ABI_H
#define PIPECR_AGENT_ABI_H

#include <stdint.h>

#define PIPECR_AGENT_MAGIC 0x31746e6567617063ull /* "cpagent1" */

/* Operations, run in order once the transaction commits. */
enum {
  PIPECR_AGENT_OP_INSTALL = 1,   /* dup3(received file, fd, a ? O_CLOEXEC : 0) */
  PIPECR_AGENT_OP_EPOLL_ADD = 2, /* epoll_ctl(a, EPOLL_CTL_ADD, fd, {events = b, data = c}) */
  PIPECR_AGENT_OP_SETFL_OR = 3,  /* fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | b) */
  PIPECR_AGENT_OP_CLOSE = 4,     /* close(fd): a number an earlier operation filled for a moment */
  PIPECR_AGENT_OP_SETFD = 5,     /* fcntl(fd, F_SETFD, a ? FD_CLOEXEC : 0): an fd kept as it is */
};

struct pipecr_agent_op {
  uint32_t code;
  int32_t fd;
  int32_t temp; /* INSTALL: the received file's number in the target, -1 until received (at commit) */
  int32_t a;
  uint64_t b;
  uint64_t c;
};

/* Agent phases (pipecr_agent_ctl.phase), written by the agent only. */
enum {
  PIPECR_AGENT_STARTED = 1,
  PIPECR_AGENT_SOCKET_READY = 2, /* sock_peer is there for pidfd_getfd */
  PIPECR_AGENT_CONNECTED = 3,    /* holds the commit page; sock_peer closed: pipecr's death is EOF */
  PIPECR_AGENT_PARKED = 4,       /* decided and done; waits for pipecr to take the thread back (register
                                    block), or to let it go and close its socket (frame) */
  PIPECR_AGENT_RETURNING = 5,    /* returns to the interrupted code by itself */
};

/* The commit word (offset 0 of the memfd page every agent of one restore maps). */
enum { PIPECR_COMMIT_OPEN = 0, PIPECR_COMMIT_COMMITTED = 1, PIPECR_COMMIT_ABORTED = 2 };
/* A survey's progress, in the same page (its own cache line): the SURVEY_FILES messages pipecr has
 * taken in and dealt with, written by pipecr (0 before each SURVEY), read by the agent, which makes
 * the fstat()s and tees itself while pipecr is still busy with one it sent. */
#define PIPECR_SURVEY_TAKEN_OFF 64

/* Messages (SOCK_SEQPACKET, one struct per packet). */
enum {
  PIPECR_MSG_HELLO = 1,    /* pipecr -> agent, carries the commit memfd, and optionally the receiving
                              end of a files queue pipecr filled before the stop: the agent then
                              receives FILES from it instead of its own files pair */
  PIPECR_MSG_FILES = 2,    /* pipecr -> agent on the files socket, `count` files for ops [first, first+count) */
  PIPECR_MSG_PREPARE = 3,  /* pipecr -> agent: check every operation can run, and that `count` files
                              (the largest FILES message) fit in the fd table at the commit */
  PIPECR_MSG_DECIDE = 4,   /* pipecr -> agent: read the commit word now and act on it */
  PIPECR_MSG_SURVEY = 5,   /* pipecr -> agent (dump): report every open fd below `count` (fcntl F_GETFD
                              of each number but the agent's own) and send each open file over
                              SCM_RIGHTS; answered by SURVEY_FILES messages then one SURVEY_DONE.
                              `first`: the CPU pipecr sent it from + 1 (0: not known); `status`
                              PIPECR_SURVEY_TEE_ALWAYS: tee whenever there is a scratch pipe,
                              pipecr busy or not (tests). Changes nothing in the target */
  PIPECR_MSG_SCRATCH = 6,  /* pipecr -> agent during a survey (the agent looks for it after each
                              message it sends): the write ends of `count` empty scratch pipes
                              (SCM_RIGHTS), up to PIPECR_SURVEY_SCRATCH in all, which the agent tees
                              some of the pipes it surveys into (pipecr_survey_ent.teed) and closes
                              before SURVEY_DONE. `first`: how many were sent before */
  PIPECR_MSG_ACK = 0x81,   /* agent -> pipecr, after HELLO */
  PIPECR_MSG_PREPARED = 0x83, /* agent -> pipecr, status 0 or -errno at operation `first` */
  PIPECR_MSG_DONE = 0x84,     /* agent -> pipecr, count = 1 if committed; status 0 or -errno at `first` */
  PIPECR_MSG_FAILED = 0x85,   /* agent -> pipecr, status -errno: the agent aborted (at `first`) */
  PIPECR_MSG_OLDFILES = 0x86, /* agent -> pipecr at commit, `count` files the installs replaced: pipecr
                                 closes them after the resume, so freeing their buffers costs no stop */
  PIPECR_MSG_SURVEY_FILES = 0x87, /* agent -> pipecr, `count` entries (struct pipecr_survey_ent each,
                                     after the message) and the files of the entries without UNSENT,
                                     in order (SCM_RIGHTS); `first`: how many entries came before */
  PIPECR_MSG_SURVEY_DONE = 0x88,  /* agent -> pipecr, the last message of a survey, laid out as
                                     SURVEY_FILES (`count` may be 0); status 0, or -errno: the survey
                                     failed (what came is incomplete) */
};

/* A survey entry: one open fd, and what fstat() in the target said of its file (so that pipecr,
 * which receives the files while the agent already surveys the next ones, need not ask). */
struct pipecr_survey_ent {
  uint32_t fd;    /* the fd number in the low 30 bits, | PIPECR_SURVEY_CLOEXEC | PIPECR_SURVEY_UNSENT */
  uint32_t mode;  /* st_mode; 0 when fstat failed (pipecr then asks itself) */
  uint64_t ino;   /* st_ino */
  uint64_t dev;   /* st_dev, as fstat() gives it to a program */
  uint32_t uid;   /* st_uid */
  uint32_t gid;   /* st_gid */
  uint32_t teed;    /* bytes the agent linked from this fd's pipe into scratch pipe `scratch` (the
                       SCRATCH message's files, in the order sent), right after that scratch pipe's
                       earlier pieces; every buffer the pipe held. 0: not tee'd (pipecr tees it) */
  uint32_t scratch;
};
#define PIPECR_SURVEY_CLOEXEC 0x80000000u /* FD_CLOEXEC is set on it */
#define PIPECR_SURVEY_UNSENT 0x40000000u  /* open, but its file could not be sent (SCM_RIGHTS refused it) */
#define PIPECR_SURVEY_FD_MASK 0x3fffffffu
#define PIPECR_SURVEY_BATCH 253           /* entries per message at most (SCM_MAX_FD) */
#define PIPECR_SURVEY_TEE_ALWAYS 1
#define PIPECR_SURVEY_SCRATCH 32          /* scratch pipes a SCRATCH message carries at most */

struct pipecr_agent_msg {
  uint32_t type;
  uint32_t first;
  uint32_t count;
  int32_t status;
};

/* The register block the agent's epilogue pops (x86-64: see arch/x86_64.S), lowest address first. */
#define PIPECR_AGENT_RETURN_WORDS 17

struct pipecr_agent_ctl {
  uint64_t magic;
  volatile uint32_t phase;
  int32_t error;        /* the agent's first failure, -errno */
  int32_t sock_peer;    /* pipecr takes this end (pidfd_getfd), the agent then closes it */
  int32_t sock_mine;
  int32_t files_peer;   /* the same for the files socket */
  int32_t files_mine;
  int32_t floor;        /* temporaries are kept at or above this number when they would collide */
  uint32_t nops;
  uint64_t ctl_offset;  /* of this block from the mapping's start */
  uint64_t map_len;
  uint64_t fdmap_offset;
  uint64_t ops_offset;
  int32_t handshake_ms; /* how long the agent waits for pipecr to connect */
  int32_t idle_ms;      /* ... for each next message before it decides on its own (abort) */
  int32_t park_ms;      /* ... for pipecr to take the thread back before it returns by itself */
  int32_t pad;
  uint64_t orig_sigmask;  /* the thread's signal mask when pipecr stopped it */
  uint64_t return_block;  /* address of the register block (on the thread's stack) */
  char name[32];          /* the mapping's name (PR_SET_VMA_ANON_NAME) */
  uint64_t frame;         /* the rt_sigframe on the thread's stack; 0: return through return_block */
  uint64_t gadget;        /* a `syscall; ret` of the target (frame mode) */
  uint64_t survey_offset; /* of PIPECR_SURVEY_BATCH entries (a survey's message), from the mapping's
                             start; 0: no room, the agent answers SURVEY with -EINVAL */
};

#endif
