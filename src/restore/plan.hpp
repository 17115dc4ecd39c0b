// restore/plan.hpp: the internal stages of restore_processes() (process.hpp): what to build and
// where it goes (Plan, plan.cpp), and the pipes built in this process (Built, build.cpp).
//
// The plan keeps the image's three identities apart: a PlannedPipe per pipe inode to build, a
// PlannedFile per open file description (a FileRecord, its owner already mapped to live pids), and
// per restored process the fd slots (FdRecord) that point at those files. Only what a restored
// process holds is planned; everything else is reported as dropped.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

#include "pipecr/error.hpp"
#include "pipecr/image.hpp"
#include "restore/epoll.hpp"
#include "restore/inplace.hpp"
#include "restore/process.hpp"
#include "sys/unique_fd.hpp"

namespace pipecr::restore {

struct PlannedFd {
  const FdRecord* rec = nullptr;
  bool set_async = false;  // O_ASYNC is set through this fd (the file's first restored fd, image order)
  bool keep = false;       // in place: the target holds the recorded file here already; nothing is installed
  bool set_cloexec = false;  // kept, with another FD_CLOEXEC than recorded: the agent sets it (F_SETFD)
};

// One restored process: a running target (--into), or this process: before exec (--exec), or the
// library's caller (restore_pipe()). `exec` marks this process's own fd table in both cases.
struct Holder {
  int32_t recorded = 0;
  pid_t target = -1;       // the live pid; getpid() for the exec holder
  bool exec = false;
  bool caller = false;     // (with exec) the library's caller: nothing is exec'd; fd -1 is any free number
  std::vector<PlannedFd> fds;  // image order
  // Not 0: the fds go into the own fd table of this thread of target (FdRecord::tid, THREAD_FD);
  // the install runs in that thread.
  pid_t thread = 0;
};

// The holder's fd table in messages: "process 4242", or "thread 4250 of process 4242" for a
// thread's own table.
[[nodiscard]] std::string table_name(const Holder& h);

struct PlannedFile {
  FileRecord rec;          // owner.pid mapped to a live pid (0 when it could not be)
  const PipeRecord* pipe = nullptr;
  bool owner_unmapped = false;  // the recorded owner is not a restored process (settled by make_plan)
};

struct PlannedPipe {
  const PipeRecord* pipe = nullptr;
  std::vector<size_t> files;  // indices into Plan::files, image order
  PipeChoice choice;          // refilled in place, or replaced and why (inplace.hpp)
};

struct Plan {
  const Image* img = nullptr;
  std::vector<Holder> holders;  // the --into targets in command-line order, then the exec holder
  std::vector<PlannedPipe> pipes;
  std::vector<PlannedFile> files;
  std::unordered_map<uint64_t, size_t> file_index;  // FileRecord id -> index into files
  std::vector<DroppedEnd> dropped;
  std::vector<std::string> notes;  // dropped ends, pipes left out, owners not mapped
  EpollPlan epoll;                 // epoll watches re-added on replaced ends (epoll.hpp)
  std::string exec_path;           // the command, resolved through PATH
};

// Stage 1: reads img, request and /proc only. Errors as restore_processes() documents for the
// command line and the targets (invalid_argument, gone, permission), and Errc::unsupported for a
// FIFO held by processes outside the restore (unless opts.allow_outside_fifo_holders).
[[nodiscard]] Expected<Plan> make_plan(const Image& img, const ProcessRestoreRequest& request,
                                       const ProcessRestoreOptions& opts = {});

// The recorded pid a spec means (its own, or the image's only process).
[[nodiscard]] Expected<int32_t> recorded_pid_of(const Image& img, const IntoSpec& spec);

struct Built {
  // FileRecord id -> the prepared open file description. Stage 3 closes each one as soon as every
  // target that takes it has it (so pipecr's fds do not add up with the targets' old ones).
  std::unordered_map<uint64_t, sys::UniqueFd> files;
  // Per FIFO, the open that keeps its buffer alive (the read-write open, or the temporary reader
  // that replaced it for no_writer_yet readers): held until every end is installed, then closed.
  // Ends of anonymous pipes that no restored process holds are closed in build() already.
  std::vector<sys::UniqueFd> keep;
  std::vector<std::string> notes;  // owners that could not be set
  std::vector<std::string> created_fifos;  // paths made by --create-fifos: removed again if the restore fails
  std::vector<InPlacePipe> in_place;       // pipes refilled in place (inplace.hpp), plan order
};

// The restored fds of each pipe (holder, fd), indexed once so that work done per pipe does not loop
// over every fd of every holder (quadratic at 90,000 pipes).
using FdsByPipe = std::unordered_map<const PipeRecord*, std::vector<std::pair<const Holder*, const PlannedFd*>>>;
[[nodiscard]] FdsByPipe index_fds_by_pipe(const Plan& plan);

// Unlinks the FIFOs build() created (a failed restore leaves the file system as it found it).
void remove_created_fifos(Built& built);

// At the commit the agents hand the files their installs replaced to pipecr (freed after the
// resume, so freeing big pipes costs no stop), one OLDFILES message of at most this many at a time;
// pipecr parks each message's files in flight at once (sys/agent.cpp), so it holds one message.
inline constexpr size_t kStashChunk = 253;
// Stage 2 builds the files for the --into targets this many at a time (plus the files of the pipe
// that crosses the mark): each chunk goes into the targets' files queues (sys::FileQueue) and pipecr
// closes its copies, so it never holds more than one chunk of them.
inline constexpr size_t kBuildChunk = 1024;
// Fds pipecr holds besides the planned ones: stdio, the pidfd and socket of a target, a pipe's two
// ends while it is built, /proc listings.
inline constexpr size_t kFdSlack = 32;

// The most fds pipecr holds at once during stages 2 and 3 of this plan (see kStashChunk).
[[nodiscard]] size_t fds_needed(const Plan& plan);

// Errc::system (EMFILE), saying how many are needed and how to get them, when fds_needed() and the
// fds pipecr holds already do not fit under its soft RLIMIT_NOFILE. restore_processes() has raised
// the soft limit to the hard one before it asks.
[[nodiscard]] Expected<void> check_fd_room(const Plan& plan);

// Stage 2: builds every planned pipe in this process, after check_fd_room(). Every fd is O_CLOEXEC.
// flush, when given, is called whenever about kBuildChunk files are in built.files, and once at the
// end: it queues them to the targets and closes what the --exec process does not need.
using Flush = std::function<Expected<void>(Built&)>;
[[nodiscard]] Expected<Built> build(const Plan& plan, const ProcessRestoreOptions& options, const Flush& flush = {});

}  // namespace pipecr::restore
