// cmd_peek.cpp: `pipecr peek PID:FD [-n BYTES] [--hex]`: the bytes queued in a live pipe, left
// where they are.
//
// The fd is copied out of the target with pidfd_getfd (same open file description, no effect on
// the target). tee() only reads from a read end, so when the target's fd is a write-only end we
// open /proc/PID/fd/FD O_RDONLY|O_NONBLOCK instead: a second read end of the same pipe, held for
// the few microseconds of the tee (kernel-facts.md: while held, a write that would get EPIPE
// succeeds). dump::snapshot() tees the queued buffers into a scratch pipe as large as the source,
// and we read the scratch pipe: the source keeps every byte, so peeking twice shows the same.
// Output: raw bytes when stdout is not a terminal, else (or with --hex) a `hexdump -C` dump.
#include <fcntl.h>
#include <sys/stat.h>

#include <charconv>
#include <memory>
#include <vector>

#include <fmt/format.h>

#include "cli/command.hpp"
#include "cli/size_arg.hpp"
#include "cli/hexdump.hpp"
#include "dump/pipe.hpp"
#include "sys/proc.hpp"
#include "sys/syscalls.hpp"

namespace pipecr::cli {
namespace {

// Refuses anything but a pipe or FIFO, naming what it is.
Expected<void> require_pipe(const PidFd& t, int fd) {
  struct stat st {};
  if (::fstat(fd, &st) < 0) return tl::unexpected(sys::call_error("fstat", fmt::format("fd={}", fd)));
  if (S_ISFIFO(st.st_mode)) return {};
  auto what = sys::read_fd_target(t.pid, t.fd);
  return fail(Errc::unsupported, ENOTSUP,
              fmt::format("{}:{} is not a pipe or FIFO ({})", t.pid, t.fd, what ? *what : std::string("?")));
}

// A read end of the same pipe: the copy itself unless it is write-only.
Expected<sys::UniqueFd> read_end_for(const PidFd& t, sys::UniqueFd copy) {
  auto fl = sys::get_fl(copy.get());
  if (!fl) return tl::unexpected(fl.error());
  if ((*fl & O_ACCMODE) != O_WRONLY) return copy;
  std::string path = fmt::format("/proc/{}/fd/{}", t.pid, t.fd);
  int r = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (r < 0) return tl::unexpected(sys::call_error("open", fmt::format("{}, O_RDONLY|O_NONBLOCK", path)));
  return sys::UniqueFd(r);
}

// The snapshot's bytes, up to limit. Read slot-aware (dump::SnapshotReader): a plain read() that
// ended inside a packet would drop the rest of that packet.
Expected<std::vector<std::byte>> read_snapshot(dump::Snapshot& snap, uint64_t limit) {
  std::vector<std::byte> data;
  dump::SnapshotReader reader;
  auto slots = reader.read(snap, data);
  if (!slots) return tl::unexpected(slots.error());
  if (data.size() > limit) data.resize(static_cast<size_t>(limit));
  return data;
}

struct Options {
  std::string target;
  uint64_t limit = UINT64_MAX;
  bool hex = false;
};

Expected<int> peek(const Options& o, CommandContext& ctx) {
  auto t = parse_pid_fd(o.target);
  if (!t) return tl::unexpected(t.error());
  auto copy = grab_pid_fd(*t);
  if (!copy) return tl::unexpected(copy.error());
  if (auto p = require_pipe(*t, copy->get()); !p) return tl::unexpected(p.error());
  if (auto id = dump::identify(copy->get()); !id) return tl::unexpected(id.error());
  auto cap = sys::get_pipe_size(copy->get());
  if (!cap) return tl::unexpected(cap.error());
  auto rd = read_end_for(*t, std::move(*copy));
  if (!rd) return tl::unexpected(rd.error());
  auto snap = dump::snapshot(rd->get(), static_cast<uint32_t>(*cap));
  rd->reset();  // hold the extra end as briefly as possible
  if (!snap) return tl::unexpected(snap.error());
  uint32_t queued = snap->bytes;
  auto data = read_snapshot(*snap, o.limit);
  if (!data) return tl::unexpected(data.error());

  if (o.hex || ctx.out_is_tty) {
    fmt::print(ctx.out, "{}:{}: {} of {} bytes queued, capacity {}{}\n", t->pid, t->fd, data->size(), queued, *cap,
               data->size() < queued ? fmt::format(" (first {} shown)", data->size()) : "");
    fmt::print(ctx.out, "{}", format_hexdump(*data));
  } else {
    auto w = sys::write_all(::fileno(ctx.out), *data, "write(stdout)");
    if (!w) return tl::unexpected(w.error());
  }
  return kExitOk;
}

RunFn setup(CLI::App& app, CommandContext& ctx) {
  auto o = std::make_shared<Options>();
  app.add_option("target", o->target, "PID:FD of a pipe or FIFO end")->required();
  app.add_option("-n,--bytes", o->limit, "show at most this many bytes (from the head)");
  app.add_flag("--hex", o->hex, "hexdump even when stdout is not a terminal");
  return [o, &ctx]() -> Expected<int> { return peek(*o, ctx); };
}

const Registrar kPeek{"peek", "show the bytes queued in a live pipe without consuming them", 20, setup};

}  // namespace
}  // namespace pipecr::cli
