// cmd_resize.cpp: `pipecr resize PID:FD SIZE [--json]`: change the capacity of a live pipe that
// another process holds, as pipesz(1) does for one's own fds.
//
// The capacity belongs to the pipe, not to an fd or a process, so no ptrace stop is needed: a
// pidfd_getfd copy of the target's fd is the same open file description, and F_SETPIPE_SZ on it
// resizes the pipe every holder sees. Nothing else changes: the copy is closed right after, the
// file status flags are untouched (F_SETPIPE_SZ does not read or write them), and the kernel moves
// the queued buffers into the new ring as they are (pipe_resize_ring). Kernel rules, worded in the
// errors (kernel-facts.md, "Capacity"):
//   - the size is rounded up to a power-of-two number of pages; the size set is printed;
//   - fewer slots than the buffers in use: EBUSY (a shrink below what is queued);
//   - above /proc/sys/fs/pipe-max-size without CAP_SYS_RESOURCE: EPERM;
//   - notification pipes refuse resizing (EBUSY): refused up front, like peek and dump do.
// SIZE is bytes, or a number with a binary suffix: 64k, 1M (K, KiB, m, MiB ... accepted).
#include <sys/stat.h>
#include <unistd.h>

#include <climits>
#include <fstream>
#include <memory>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/command.hpp"
#include "cli/size_arg.hpp"
#include "dump/pipe.hpp"
#include "sys/proc.hpp"
#include "sys/syscalls.hpp"

namespace pipecr::cli {
namespace {

struct Options {
  std::string target;
  std::string size;
  bool json = false;
};

// /proc/sys/fs/pipe-max-size, for the EPERM message; nullopt if unreadable.
std::optional<uint64_t> pipe_max_size() {
  std::ifstream in("/proc/sys/fs/pipe-max-size");
  uint64_t v = 0;
  if (in >> v) return v;
  return std::nullopt;
}

Expected<int> resize(const Options& o, CommandContext& ctx) {
  auto t = parse_pid_fd(o.target);
  if (!t) return tl::unexpected(t.error());
  auto want = parse_size(o.size);
  if (!want) return tl::unexpected(want.error());
  if (*want > static_cast<uint64_t>(INT_MAX))
    return fail(Errc::invalid_argument, EINVAL, fmt::format("size {}: larger than the kernel accepts ({})", o.size, INT_MAX));

  auto copy = grab_pid_fd(*t);
  if (!copy) return tl::unexpected(copy.error());
  struct stat st {};
  if (::fstat(copy->get(), &st) < 0) return tl::unexpected(sys::call_error("fstat", fmt::format("fd={}", copy->get())));
  if (!S_ISFIFO(st.st_mode)) {
    auto what = sys::read_fd_target(t->pid, t->fd);
    return fail(Errc::unsupported, ENOTSUP,
                fmt::format("{}:{} is not a pipe or FIFO ({})", t->pid, t->fd, what ? *what : std::string("?")));
  }
  if (dump::is_notification_pipe(copy->get()))
    return fail(Errc::unsupported, ENOTSUP, fmt::format("{}:{} is a notification pipe, whose size is fixed", t->pid, t->fd));
  auto old = sys::get_pipe_size(copy->get());
  if (!old) return tl::unexpected(old.error());

  auto set = sys::set_pipe_size(copy->get(), static_cast<int>(*want));
  if (!set) {
    Error e = set.error();
    if (e.err == EBUSY) {
      auto q = sys::bytes_queued(copy->get());
      e.kind = Errc::capacity;
      e.what = fmt::format("{}:{}: cannot shrink the pipe to {} bytes: it holds {} bytes in more page slots than "
                           "that leaves (EBUSY); drain it first or choose a larger size",
                           t->pid, t->fd, *want, q ? fmt::format("{}", *q) : std::string("?"));
    } else if (e.err == EPERM) {
      auto max = pipe_max_size();
      e.kind = Errc::capacity;
      if (max && *want > *max)
        e.what = fmt::format("{}:{}: {} bytes is above /proc/sys/fs/pipe-max-size ({}) and this process lacks "
                             "CAP_SYS_RESOURCE (EPERM)",
                             t->pid, t->fd, *want, *max);
      else
        e.what = fmt::format("{}:{}: the kernel refused {} bytes (EPERM): the pipe owner's user is past "
                             "/proc/sys/fs/pipe-user-pages-hard",
                             t->pid, t->fd, *want);
    }
    return tl::unexpected(e);
  }
  auto queued = sys::bytes_queued(copy->get());

  if (o.json) {
    nlohmann::json j = {{"pid", t->pid},
                        {"fd", t->fd},
                        {"inode", st.st_ino},
                        {"requested", *want},
                        {"old_capacity", *old},
                        {"capacity", *set},
                        {"bytes", queued ? nlohmann::json(*queued) : nlohmann::json(nullptr)}};
    fmt::print(ctx.out, "{}\n", j.dump(2));
  } else {
    fmt::print(ctx.out, "{}:{}: capacity {} -> {} bytes{}\n", t->pid, t->fd, *old, *set,
               queued ? fmt::format(" ({} queued)", *queued) : std::string());
  }
  return kExitOk;
}

RunFn setup(CLI::App& app, CommandContext& ctx) {
  auto o = std::make_shared<Options>();
  app.add_option("target", o->target, "PID:FD of a pipe or FIFO end")->required();
  app.add_option("size", o->size, "new capacity: bytes, or with a suffix (64k, 1M); rounded up to pages")->required();
  app.add_flag("--json", o->json, "print the result as one JSON document (see docs/json.md)");
  return [o, &ctx]() -> Expected<int> { return resize(*o, ctx); };
}

const Registrar kResize{"resize", "change the capacity of a live pipe another process holds", 25, setup};

}  // namespace
}  // namespace pipecr::cli
