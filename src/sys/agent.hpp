// agent.hpp: install files into stopped processes through an agent that runs inside each of them,
// all-or-nothing over every target, whatever happens to pipecr.
//
// Bootstrap (the only step that runs the target through ptrace). Usually (returns_by_sigreturn()):
// an rt_sigframe holding the thread's context (registers as the kernel would restart its
// interrupted syscall, FPU state, signal mask; arch.hpp) is written on its own stack below the red
// zone, and below it a chain frame that runs munmap of the agent's range and returns into the first.
// The agent's address is chosen (choose_agent_address()) and mapped there (MAP_FIXED_NOREPLACE): one remote
// mmap (RW) and one mprotect (code R+X) run at a `syscall; ret` of the target's code with rsp at the
// chain and every signal blocked: whenever pipecr dies, the thread finishes the syscall, returns into
// the target's restorer, rt_sigreturn runs the chain's munmap and then puts it back: no mapping is
// left. Where another process shares the address space (kcmp KCMP_VM over /proc, before the stop in
// find_agent_gadgets(); AgentGadgets::mm_shared), the kernel chooses the address
// and rsp moves to the chain just after the mmap (an empty mapping may be left if pipecr dies in
// between: the leak window). The agent (src/sys/agent/, built at build time and embedded as
// agent_blob), its control block and operations are written there with process_vm_writev, and the
// thread runs from the agent's entry, still traced but needing nothing from its tracer. Fallback (no
// gadget or restorer in the target): the syscalls go through a `syscall` of the target's [vdso]
// (remote.hpp) and the registers go in a block on the stack, which the agent's epilogue pops.
// From the agent's start on, pipecr's death is harmless: the agent sees EOF on its socket (or a
// timeout), decides, and returns to the interrupted code by itself.
//
// Protocol (agent_abi.h; two SOCK_SEQPACKET socketpairs made by the agent, control and files; pipecr
// takes its ends with pidfd_getfd): HELLO (carries the CommitPoint's memfd, and the receiving end of
// a FileQueue pipecr filled before the stop, which then replaces the agent's own files pair) / ACK;
// FILES (SCM_RIGHTS, up to 253 files for consecutive INSTALL operations), queued before the stop or
// sent on the files socket after HELLO: they stay queued, in flight, holding their files without
// taking fd numbers in the target (nor in pipecr, which closes its copies); PREPARE / PREPARED (every
// epoll fd valid, and room for the largest FILES message); then the CommitPoint decides for
// every target at once, and DECIDE / DONE lets each agent act on it: run every operation in order
// (receive a batch of up to 253 files, each on its own number or dup3ed there; epoll_ctl ADD; F_SETFL; F_SETFD;
// close: agent.c, install_batch) or close the files
// socket, which drops what is queued. Finally pipecr stops the thread where the agent waits
// (PTRACE_INTERRUPT), changes nothing, closes its socket and detaches it with the process: the agent
// sees EOF, unmaps itself through the `syscall; ret` with rsp at the frame, and rt_sigreturn returns
// the thread to its interrupted code. In the fallback pipecr takes the thread back instead (unmaps
// the agent with one more remote syscall, puts the registers and signal mask back).
#pragma once

#include <sys/stat.h>
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <array>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "pipecr/error.hpp"
#include "sys/ptrace.hpp"
#include "sys/unique_fd.hpp"

struct pipecr_agent_msg;  // sys/agent/agent_abi.h
struct pipecr_agent_ctl;

namespace pipecr::sys {

// One decision for every agent of a restore: a word in a memfd page that every agent maps. commit()
// is one compare-and-swap OPEN -> COMMITTED; an agent that gives up (EOF, timeout, failure) swaps
// OPEN -> ABORTED first, and then commit() fails: no target can be committed while another rolls back.
class CommitPoint {
 public:
  [[nodiscard]] static Expected<CommitPoint> create();
  CommitPoint(CommitPoint&& o) noexcept;
  CommitPoint& operator=(CommitPoint&&) = delete;
  CommitPoint(const CommitPoint&) = delete;
  ~CommitPoint();

  [[nodiscard]] int fd() const { return fd_.get(); }
  // True when this call committed (the word was OPEN).
  [[nodiscard]] bool commit();
  // OPEN -> ABORTED (nothing when decided already).
  void abort();
  [[nodiscard]] uint32_t state() const;
  // The survey's progress word in the same page (PIPECR_SURVEY_TAKEN_OFF): messages taken in.
  void set_survey_taken(uint32_t n) const;

 private:
  CommitPoint() = default;
  UniqueFd fd_;
  uint32_t* word_ = nullptr;
};

// One operation of a target's install, run in order at commit (see agent_abi.h).
struct AgentOp {
  enum Code : uint32_t { install = 1, epoll_add = 2, setfl_or = 3, close_fd = 4, setfd = 5 };
  Code code = install;
  int fd = -1;           // the number in the target
  int a = 0;             // install, setfd: cloexec; epoll_add: the epoll fd in the target
  uint64_t b = 0;        // epoll_add: events; setfl_or: the flags
  uint64_t c = 0;        // epoll_add: data
  int source = -1;       // install: the file, an fd of this process (sent over the socket)
};

// Files the agent receives at once (SCM_MAX_FD): what it needs in fd numbers at the commit.
inline constexpr size_t kAgentBatch = 253;

// A target's files, parked in flight before the target is stopped: a SOCK_SEQPACKET socketpair this
// process holds both ends of. queue() sends one FILES message (SCM_RIGHTS) for operations
// [first, first + count); the caller may then close its copies: the queue holds the files (and a
// pipe's bytes with them) with no fd number anywhere. The agent gets the receiving end to the
// agent with HELLO; the agent takes the messages one at a time at the commit. Destroying the queue
// before that (or the agent closing it on an abort) drops every file in it.
// Limits: each message is charged to the sending end's send buffer until received (SO_SNDBUFFORCE,
// else SO_SNDBUF up to net.core.wmem_max); net.unix.max_dgram_qlen does not apply (the receiver's
// peer is the sender); without CAP_SYS_ADMIN or CAP_SYS_RESOURCE every file in flight counts
// against the sender's RLIMIT_NOFILE, per user (ETOOMANYREFS).
class FileQueue {
 public:
  // messages: how many will be queued at most (sizes the send buffer).
  [[nodiscard]] static Expected<FileQueue> create(size_t messages);
  [[nodiscard]] Expected<void> queue(uint32_t first, std::span<const int> fds);
  // The receiving end, for the agent (once).
  [[nodiscard]] UniqueFd take_receiver() { return std::move(receiver_); }
  [[nodiscard]] size_t messages() const { return messages_; }
  [[nodiscard]] size_t files() const { return files_; }
  [[nodiscard]] size_t largest() const { return largest_; }

 private:
  UniqueFd sender_, receiver_;
  size_t messages_ = 0, files_ = 0, largest_ = 0;
};

// The two pieces of a target's own code an agent's rt_sigframe return needs: a `syscall; ret` and a
// restorer (arch.hpp); 0 where missing. Finding them scans the target's executable mappings (most of
// a millisecond with glibc), which may be done before the stop: start_survey() then checks them with
// one read each instead of scanning while the target stands still.
// find_agent_gadgets() also looks (kcmp KCMP_VM and KCMP_FILES over /proc, before the stop, 0.1-0.3
// ms with about 100 processes) for another process sharing the target's fd table (the dump reads
// that table without an agent unless the process is dumped too) or its address space, which makes the agent's
// bootstrap keep its leak window (agent.hpp, top): with none then, the bootstrap only checks, while
// stopped, the processes that could have been made since (children of the target's threads and of
// its parent: clone(CLONE_VM), with or without CLONE_PARENT), instead of all of /proc.
struct AgentGadgets {
  uint64_t syscall_ret = 0;
  uint64_t restorer = 0;
  int mm_shared = -1;  // -1: not looked; 0: no other process shared the address space; 1: one did
  // Other processes that used the same fd table then (clone(CLONE_FILES) without CLONE_THREAD):
  // one not stopped with the target could close or replace the numbers an agent takes in it.
  std::vector<pid_t> files_sharers;
};
[[nodiscard]] AgentGadgets find_agent_gadgets(pid_t pid);
// How many times find_agent_gadgets() (or an agent's start without them) had to scan a process's
// code: offsets found once are remembered per mapped file and only checked in the next process.
[[nodiscard]] size_t agent_gadget_scans();
// The scan itself, without the offsets remembered from earlier scans (syscall_ret and restorer
// only): what find_agent_gadgets() costs the first time it meets a mapped file (BM_GadgetScan).
[[nodiscard]] AgentGadgets scan_return_gadgets(pid_t pid);
// Whether gadgets found earlier are still there in pid (one process_vm_readv each).
[[nodiscard]] bool agent_gadgets_still_there(pid_t pid, const AgentGadgets& g);

// Where an agent of len bytes goes in pid's address space, pid stopped (agent.cpp tells the rule);
// sp: the stack pointer of the thread it runs on; start_stack: ProcStat::start_stack. 0: no room.
// Asked with PROCMAP_QUERY where the kernel has it (6.11), a few ioctls whatever the number of
// mappings; else from the text of /proc/PID/maps. Both ways are public for the tests, which hold
// them to the same answer; agent_address_by_query() gives nullopt where it cannot answer.
[[nodiscard]] uint64_t choose_agent_address(pid_t pid, uint64_t len, uint64_t sp, uint64_t start_stack);
[[nodiscard]] std::optional<uint64_t> agent_address_by_query(pid_t pid, uint64_t len, uint64_t sp, uint64_t start_stack);
[[nodiscard]] uint64_t agent_address_by_listing(pid_t pid, uint64_t len, uint64_t sp);

// One open fd of a target as an agent's survey saw it, the target stopped (Agent::survey).
struct SurveyedFd {
  int fd = -1;
  bool cloexec = false;  // FD_CLOEXEC (fcntl F_GETFD in the target)
  UniqueFd file;         // the same open file description, received over SCM_RIGHTS; empty when the
                         // kernel would not send it (the caller may take it with pidfd_getfd)
  bool stat_known = false;  // fstat() in the target worked: st holds its mode, inode, device, uid, gid
  struct stat st {};        // (only those fields)
  uint32_t teed = 0;        // bytes the agent tee'd from its pipe into scratch pipe `scratch` (of
  uint32_t scratch = 0;     // those given to survey()), after that one's earlier pieces; 0: none
};
// Scratch pipes one survey can be given to tee into (Agent::survey), at most.
inline constexpr size_t kSurveyScratchMax = 32;
// Up to `want` (at most kSurveyScratchMax) empty pipes for a survey's agent to tee the pipes it
// surveys into while pipecr is busy with earlier messages (SurveyedFd::teed, whose index is the
// order they were made in): `make` makes one and returns its write end (the caller keeps both
// ends; -1: no more), called whenever pipecr would otherwise wait for the agent's next message.
// They take free numbers of the target's table during the survey, which the caller must leave room
// for; the agent closes them before its last message.
struct SurveyScratch {
  size_t want = 0;
  std::function<int()> make;
  size_t ready = 0;     // of them, how many `make` has at hand (made before the stop): sent at once
  bool always = false;  // tests: the agent tees whenever it has a scratch pipe, pipecr busy or not
};
// Takes one message's worth of a survey (up to 253 fds, in fd order); an error ends the survey.
using SurveySink = std::function<Expected<void>(std::span<SurveyedFd>)>;

// The steps of an rt_sigframe bootstrap, for tests that kill pipecr at one of them:
// mmap_set: the registers point at the gadget for the mmap (not run yet); mapped: the mmap returned
// (and, without the chosen address, rsp points at the chain); written: the agent's image is in;
// protected_code: the mprotect returned; entry_set: the registers point at the agent's entry (not
// let run yet).
enum class AgentBootStep { mmap_set, mapped, written, protected_code, entry_set };
// Called at each step with the agent's address (mmap_set: the chosen one, 0 without) and whether the
// bootstrap runs on the chain (Agent::boot_chained()). Process-wide; nullptr (the default): none.
using AgentBootHook = void (*)(AgentBootStep step, uint64_t address, bool chained);
void set_agent_boot_hook(AgentBootHook hook);

class Agent : public Injector {
 public:
  // For a dump: an agent with no operation, on its own CommitPoint that nothing commits, so that it
  // only answers survey() and then returns untouched (restore(), as after an abort). Made by
  // process.inject<Agent>(tid, Agent::SurveyOnly{}, vdso_hint, gadgets), which owns it (this is a
  // shorthand). Only where it can return through an rt_sigframe (returns_by_sigreturn()): else it
  // fails (ENOTSUP) before anything of the target changed, since the fallback's remote syscalls are
  // a harm window. gadgets: find_agent_gadgets() of the process, found before the stop (else here).
  // commit: a CommitPoint made before the stop, which any number of survey agents may share (none
  // commits it; an aborted one aborts the next too, which is what a survey does); null: one of its own.
  struct SurveyOnly {
    const CommitPoint* commit = nullptr;
  };
  [[nodiscard]] static Expected<Agent*> start_survey(StoppedProcess& process, pid_t tid, uint64_t vdso_hint = 0,
                                                     const AgentGadgets* gadgets = nullptr,
                                                     const CommitPoint* commit = nullptr);
  // Made by StoppedProcess::inject<Agent>(tid, commit, ops, floor, batch, vdso_hint, queue, gadgets), which
  // owns it: starts an agent on thread tid of the (stopped) process with these operations (install ones carry
  // their source fd, sent later by send_files()). floor: above every number an operation fills (the
  // agent keeps its temporaries there when they would collide). Returns once the agent is connected.
  // On failure the target is as it was (the mapping removed, registers back).
  // queue: the receiving end of a FileQueue already holding the install operations' files (their
  // AgentOp::source is then -1 and send_files() sends nothing); batch is then its largest message.
  // The process's resume() restore()s it if it is still open, then waits (after_detach) until the
  // agent has returned and unmapped itself.
  ~Agent() override;
  Agent(const Agent&) = delete;
  Agent& operator=(const Agent&) = delete;

  // Sends the files of the install operations, in messages of at most `batch` (<= 253) consecutive
  // ones: the agent receives one message at a time at the commit.
  [[nodiscard]] Expected<void> send_files();
  // Dump: every open fd of the thread's fd table below `below` (FDSize), in order, but the agent's
  // own two sockets: its number, FD_CLOEXEC, what fstat() says of its file, and the file itself
  // (SCM_RIGHTS, 253 a message: the agent runs one fcntl(F_GETFD) per number and one fstat() per open
  // fd; nothing of the target changes). Each message goes to `sink` as it comes, while the agent
  // surveys the next fds (pipecr and the agent each have a CPU). Returns the number of fds seen.
  // This process needs room for every file received (RLIMIT_NOFILE). When the sink fails, the rest
  // is received and closed (the agent stays ready for another request) and the sink's error returned.
  // scratch: empty pipes for the agent to tee into (SurveyScratch).
  [[nodiscard]] Expected<size_t> survey(uint32_t below, const SurveySink& sink, const SurveyScratch& scratch = {});
  // The same, collected into one vector.
  [[nodiscard]] Expected<std::vector<SurveyedFd>> survey(uint32_t below);
  // Asks the agent whether everything can run; an error (naming the operation) when not.
  [[nodiscard]] Expected<void> prepare();
  // Tells the agent to act on the CommitPoint without waiting for its answer (so that every agent
  // of a restore acts at once); decide() then collects it. Once.
  void send_decide();
  // Tells the agent to act on the CommitPoint (unless send_decide() did); returns whether it
  // committed, or the error of an operation that failed at commit (the others ran).
  [[nodiscard]] Expected<bool> decide();
  // Ends the agent's use of the thread: decide() first if not done (the agent then aborts unless the
  // CommitPoint says committed), then interrupt it while parked; with a frame, close the socket (the
  // agent returns by itself once the thread is detached, a moment after StoppedProcess::resume());
  // in the fallback, unmap the agent and put registers and signal mask back. Idempotent.
  [[nodiscard]] Expected<void> restore() override;
  // With a frame: waits (bounded) until the detached thread has left the agent and its mapping is
  // gone (StoppedProcess::resume() calls it after the detach).
  void after_detach() override;

  [[nodiscard]] pid_t tid() const { return tid_; }
  [[nodiscard]] uint64_t address() const { return base_; }
  [[nodiscard]] uint64_t length() const { return map_len_; }
  // True when the agent returns through an rt_sigframe (the target has a `syscall; ret` and a
  // restorer); false in the fallback (a register block and pipecr's take-back munmap).
  [[nodiscard]] bool returns_by_sigreturn() const { return frame_mode_; }
  // True when the bootstrap mapped the agent at an address it chose, its syscalls running with rsp at
  // the chain that unmaps it (no leak window); false where another process shares the address space
  // (the mapping is then left only if pipecr dies in the two ptrace calls after the mmap), and in the
  // fallback.
  [[nodiscard]] bool boot_chained() const { return chained_; }

 private:
  friend class StoppedProcess;  // inject()
  [[nodiscard]] static Expected<std::unique_ptr<Agent>> create(StoppedProcess& process, pid_t tid,
                                                               const CommitPoint& commit,
                                                               std::span<const AgentOp> ops, int floor,
                                                               size_t batch = kAgentBatch, uint64_t vdso_hint = 0,
                                                               UniqueFd queue = UniqueFd(),
                                                               const AgentGadgets* gadgets = nullptr);
  [[nodiscard]] static Expected<std::unique_ptr<Agent>> create(StoppedProcess& process, pid_t tid, SurveyOnly,
                                                               uint64_t vdso_hint, const AgentGadgets* gadgets);
  Agent(StoppedProcess& p, pid_t tid) : pid_(p.pid()), tid_(tid) { link(&p); }
  [[nodiscard]] Expected<void> boot(const CommitPoint& commit, std::span<const AgentOp> ops, int floor);
  [[nodiscard]] Expected<void> boot_with_frame(pipecr_agent_ctl& ctl, std::vector<unsigned char>& image,
                                               const arch::SigFrame& frame, uint64_t restorer);
  [[nodiscard]] Expected<void> boot_with_block(pipecr_agent_ctl& ctl, std::vector<unsigned char>& image, bool no_signal);
  [[nodiscard]] Expected<long> frame_syscall(uint64_t gadget, uint64_t frame, long nr, std::array<unsigned long, 6> args,
                                             std::optional<AgentBootStep> step = std::nullopt, bool chained = false);
  [[nodiscard]] Expected<void> put_back();
  [[nodiscard]] Expected<void> connect(const CommitPoint& commit);
  [[nodiscard]] Expected<void> await_ack();
  [[nodiscard]] Expected<uint32_t> phase();
  [[nodiscard]] Expected<void> wait_phase(uint32_t at_least, std::chrono::milliseconds limit);
  [[nodiscard]] Expected<::pipecr_agent_msg> receive(std::chrono::milliseconds limit);
  [[nodiscard]] Expected<void> send(int sock, uint32_t type, uint32_t first, uint32_t count, std::span<const int> fds,
                                    int32_t status = 0);
  [[nodiscard]] Expected<void> take_back();
  [[nodiscard]] Expected<void> died_meanwhile();
  [[nodiscard]] Error error(const std::string& what, int err = 0) const;

  pid_t pid_ = -1;
  pid_t tid_ = -1;
  Regs saved_{};              // the thread's registers when stopped
  uint64_t saved_mask_ = 0;   // and its signal mask
  uint64_t base_ = 0;         // the mapping in the target
  uint64_t map_len_ = 0;
  uint64_t ctl_addr_ = 0;
  std::vector<AgentOp> ops_;
  size_t batch_ = kAgentBatch;
  uint64_t vdso_hint_ = 0;   // vdso_syscall_address(), found before the stop
  std::optional<AgentGadgets> pre_gadgets_;  // find_agent_gadgets(), found before the stop
  bool frame_only_ = false;   // a survey: refuse the fallback (its remote syscalls are a harm window)
  std::optional<CommitPoint> own_commit_;  // a survey's, when not given one
  const CommitPoint* commit_ = nullptr;    // the page the agent mapped (a survey's progress word)
  UniqueFd sock_;             // control messages
  UniqueFd files_;            // the files, queued for the agent; and, the other way, the files the
                              // installs replaced (OLDFILES), in flight until this agent is destroyed
  UniqueFd queue_;            // a FileQueue's receiving end, handed over with HELLO
  // What the installs replaced, freed when the agent is destroyed, after the target runs again
  // (freeing big pipes costs no stop): in flight in the files socket (the agent sends them there;
  // with a FileQueue, in that queue's sending end, freed with it), else, when that socket was full,
  // received on the control socket and parked in flight in grave_ (a FileQueue nobody receives
  // from: pipecr holds one message of them at a time), or at pipecr's fds if that queue failed.
  std::unique_ptr<FileQueue> grave_;
  std::vector<UniqueFd> replaced_;
  bool running_ = false;      // the thread runs the agent
  bool decided_ = false;
  bool ack_pending_ = false;  // HELLO sent, its ACK not taken yet (await_ack())
  bool decide_sent_ = false;
  std::optional<Error> decide_error_;  // send_decide() failed
  bool done_ = false;
  bool frame_mode_ = false;   // returns through an rt_sigframe (boot_with_frame)
  bool chained_ = false;      // mapped at a chosen address with rsp at the unmapping chain (no leak window)
  bool masked_ = false;       // every signal blocked by the bootstrap
  bool awaiting_return_ = false;  // let go in its wait: returns by itself once detached
};

// Whether agents return through an rt_sigframe when the target has what it needs (default true);
// false forces the fallback (register block + take-back munmap). Process-wide; for tests and bench.
void set_agent_sigreturn(bool enabled);

// The agent's code, embedded at build time (src/sys/agent/agent.cmake).
extern const unsigned char agent_blob[];
extern const size_t agent_blob_size;

}  // namespace pipecr::sys
