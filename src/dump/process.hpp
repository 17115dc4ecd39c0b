// dump/process.hpp: checkpoint every pipe and FIFO held by a set of running processes.
//
// The targets are stopped (PTRACE_SEIZE + PTRACE_INTERRUPT on every thread, so that if pipecr
// dies the kernel lets them run on) only while what must be one moment is taken: their fd tables
// (every table: a thread's own, and one shared by processes, once), a pidfd_getfd() copy of every
// pipe fd (the very open file description), and the queued buffers of every pipe, linked with
// tee() into scratch pipes shared by many pipes. No byte is copied while they are stopped, so the
// stop does not grow with the bytes queued. After they run again: the grouping into open file
// descriptions, flags, FD_CLOEXEC, owner, signal, capacity (from the copies and fdinfo), the slot
// layouts and the bytes (docs/design.md, section 7, says what may change in between).
// The soft RLIMIT_NOFILE is raised to the hard limit for the dump's duration; when even that cannot
// hold a copy of every pipe fd, the copies are taken in batches.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "image/image_io.hpp"
#include "pipecr/error.hpp"
#include "pipecr/image.hpp"

namespace pipecr::dump {

struct DumpOptions {
  std::vector<pid_t> pids;     // the processes to dump
  bool tree = false;           // and all their descendants
  bool leave_stopped = false;  // leave them in a group stop (SIGCONT ends it) instead of resuming
  // Scan every other process's fd table for the dumped pipes (PipeRecord::outside_holders). Costs
  // time in proportion to every fd on the machine; without it only FIFOs whose reader state
  // depends on it are looked up (docs/design.md, section 7).
  bool outside_holders = false;
  // Read each process's fd table through an agent in it (docs/design.md, section 8) where it can;
  // false: pidfd_getfd of every number and fdinfo after the resume (tests and bench compare them).
  bool survey_agent = true;
  // Let the agent tee the pipes it surveys while pipecr is busy with earlier ones, into scratch
  // pipes made before the stop (docs/design.md, section 8); false: pipecr tees every pipe.
  bool agent_tees = true;
  bool agent_tees_always = false;  // tests: the agent tees whenever it can, pipecr busy or not
};

struct DumpStats {
  uint64_t stopped_ns = 0;     // from the first thread stopped to the last resumed
  uint64_t seize_ns = 0;       // of which seizing (PTRACE_SEIZE + INTERRUPT + wait, every thread)
  uint64_t tables = 0;         // fd tables read (a thread's own table counts; a shared one once)
  uint64_t batches = 0;        // pidfd_getfd() batches: 1 unless pipecr's fd limit was short
  uint64_t listed_tables = 0;  // sparse tables whose fds were listed, not probed slot by slot
  uint64_t scratch_pipes = 0;  // scratch pipes pipecr packed the snapshots into
  uint64_t lent_scratch_pipes = 0;  // scratch pipes lent to the agents to tee into (agent_tees)
  uint64_t changed_after_resume = 0;  // fds closed or reused between the resume and their fdinfo read
  uint64_t pipes = 0;
  uint64_t files = 0;
  uint64_t fds = 0;
  uint64_t bytes = 0;          // queued bytes written
  uint64_t in_flight = 0;      // pipe ends in flight in unix sockets (IN_FLIGHT records)
  uint64_t other_in_flight = 0;  // other files in flight there (not recorded)
  std::vector<std::string> notes;  // what the dump could not examine (one sentence each)
  uint64_t epolls = 0;         // epoll instances the dumped processes hold (dump/epoll.hpp)
  uint64_t epoll_watches = 0;  // their watches on dumped pipe ends, recorded (EPOLL_WATCH)
  uint64_t epoll_unattributed = 0;  // watches not recorded: their fd now holds another pipe end
  uint64_t epoll_other = 0;    // watches on fds that hold no dumped pipe end (other kinds of file)
  uint64_t fifo_writers_from_tee = 0;  // FIFOs whose outside writer was told by their tee, not a /proc scan
  uint64_t outside_scans = 0;  // scans of every other process's fd table (0 or 1)
  uint64_t agents = 0;         // fd tables read through an agent's survey (docs/design.md, section 8)
  uint64_t agent_start_ns = 0; // of stopped_ns: starting them (bootstrap and handshake)
  uint64_t agent_survey_ns = 0;  // the surveys (fcntl per number, files received)
  uint64_t survey_take_ns = 0;  // of agent_survey_ns: pipecr's own part (files taken in, pipes tee'd)
  uint64_t agent_tees = 0;     // pipes the agents tee'd themselves, into scratch pipes pipecr lent them
  uint64_t agent_return_ns = 0;  // ending them before the resume (the decision, the thread interrupted)
  uint64_t resume_ns = 0;      // resuming every target (with the agents' own return and unmap)
  uint64_t before_stop_ns = 0;  // from the call to the stop: the targets listed, gadgets found, checks
  uint64_t after_resume_ns = 0; // after it: grouping, flags, owner, signal, capacity, copies closed
  uint64_t write_ns = 0;        // writing the image: records, and the bytes read out of the scratch pipes
};

// Dump into sink. `records`, when not null, receives the records written (without data).
// Errors: Errc::gone (a pid does not exist or exited during the dump), Errc::permission (may not
// ptrace it), Errc::unsupported (a notification pipe; a kernel feature missing: the message says
// which and how to fix it), Errc::system. Every process is resumed whatever happens.
[[nodiscard]] Expected<DumpStats> dump_processes(const DumpOptions& opts, image::Sink& sink, Image* records = nullptr);

// The calling process as the one target, for the in-process API (pipecr::checkpoint_pipe): the
// pipe behind fd, recorded by the same collection as dump_processes() (grouping, fdinfo, owner,
// signal, capacity, snapshot, records, writer), with the caller's own fds as the source: a copy is a
// dup(), nothing is stopped or traced. It records fd and the first fd of the other end the caller
// holds, and no process: the fds are of pid 0 (docs/image-format.md). Errors: EBADF (fd not open),
// Errc::unsupported (not a pipe or FIFO, or a notification pipe), Errc::system.
[[nodiscard]] Expected<DumpStats> dump_self_pipe(int fd, image::Sink& sink, Image* records = nullptr);

// Dump into the file at path, atomically: a temporary file in the same directory (mode 0600),
// fsync, rename. A failed or killed dump leaves no file at path (Errc::cannot_create when the
// file cannot be made).
[[nodiscard]] Expected<DumpStats> dump_to_file(const DumpOptions& opts, const std::string& path,
                                               Image* records = nullptr);

}  // namespace pipecr::dump
