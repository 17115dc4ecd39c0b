// dump/process.hpp: checkpoint every pipe and FIFO held by a set of running processes.
//
// The targets are stopped (PTRACE_SEIZE + PTRACE_INTERRUPT on every thread, so that if pipecr
// dies the kernel lets them run on) only while what must be consistent is taken: their fd
// tables, the open file descriptions behind them (grouped with kcmp), each description's state,
// and the queued buffers of every pipe, linked into scratch pipes with tee(). No byte is copied
// while they are stopped, so the stop does not grow with the bytes queued. They run again before
// the slot layouts are learned and the bytes streamed into the image.
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
};

struct DumpStats {
  uint64_t stopped_ns = 0;     // from the first thread stopped to the last resumed
  uint64_t pipes = 0;
  uint64_t files = 0;
  uint64_t fds = 0;
  uint64_t bytes = 0;          // queued bytes written
};

// Dump into sink. `records`, when not null, receives the records written (without data).
// Errors: Errc::gone (a pid does not exist or exited during the dump), Errc::permission (may not
// ptrace it), Errc::unsupported (a notification pipe; a kernel feature missing: the message says
// which and how to fix it), Errc::system. Every process is resumed whatever happens.
[[nodiscard]] Expected<DumpStats> dump_processes(const DumpOptions& opts, image::Sink& sink, Image* records = nullptr);

// Dump into the file at path, atomically: a temporary file in the same directory (mode 0600),
// fsync, rename. A failed or killed dump leaves no file at path (Errc::cannot_create when the
// file cannot be made).
[[nodiscard]] Expected<DumpStats> dump_to_file(const DumpOptions& opts, const std::string& path,
                                               Image* records = nullptr);

}  // namespace pipecr::dump
