// cmd_show.cpp: `pipecr show IMAGE [--json] [--data]`: what an image holds, for people or as JSON.
//
// The image (a file, or `-` for stdin) is spooled privately, mapped and parsed once
// (image::MappedFile + image::parse: every checksum and cross-reference verified, data viewed in
// place). The text output also says whether a restore on this machine would accept the image
// (image::validate()); `show` itself describes any image that parses. Every string that comes from
// the image (paths, comm, argv, INFO) is printed through printable(): control characters escaped. The human summary is grouped
// the way a person asks the question: each pipe, then each open file description of it (access,
// flags, signal owner), then the fds that share that description (pid:fd, cloexec, blocked). The
// records refer to each other by id, so two hash indexes (pipe -> files, file -> fds) are built
// first: an image of 10,000 pipes shows in linear time. --json prints image_json.hpp's document
// (docs/json.md); --data adds the queued bytes, as a hexdump with packet boundaries or as base64.
#include <algorithm>
#include <iterator>
#include <memory>
#include <unordered_map>

#include <fmt/format.h>

#include "cli/command.hpp"
#include "cli/describe.hpp"
#include "cli/hexdump.hpp"
#include "cli/image_json.hpp"
#include "image/image_io.hpp"
#include "image/validate.hpp"

namespace pipecr::cli {
namespace {

struct Options {
  std::string image;
  bool json = false;
  bool data = false;
};

// Who refers to whom, by position in the image's vectors.
struct Index {
  std::unordered_map<uint64_t, std::vector<size_t>> files_of_pipe;
  std::unordered_map<uint64_t, std::vector<size_t>> fds_of_file;
  std::unordered_map<uint64_t, std::vector<size_t>> in_flight_of_file;
  std::unordered_map<int32_t, const ProcessRecord*> process;
};

Index build_index(const Image& img) {
  Index ix;
  for (size_t i = 0; i < img.files.size(); ++i) ix.files_of_pipe[img.files[i].pipe_id].push_back(i);
  for (size_t i = 0; i < img.fds.size(); ++i) ix.fds_of_file[img.fds[i].file_id].push_back(i);
  for (size_t i = 0; i < img.in_flight.size(); ++i) ix.in_flight_of_file[img.in_flight[i].file_id].push_back(i);
  for (const ProcessRecord& p : img.processes) ix.process.emplace(p.pid, &p);
  return ix;
}

using Out = std::back_insert_iterator<std::string>;

std::string plural(uint64_t n, const char* one, const char* many) {
  return fmt::format("{} {}", n, n == 1 ? one : many);
}

void print_header(Out out, const Image& img, const std::string& path, size_t size) {
  uint64_t queued = 0;
  size_t blocked = 0;
  for (const PipeRecord& p : img.pipes) queued += p.bytes();
  for (const FdRecord& f : img.fds) blocked += f.blocked != Blocked::none;
  std::string created = utc_time(img.info.created_unix_ns);
  fmt::format_to(out, "image {} ({}): format {}, made by {} on Linux {}, {}, page size {}\n", printable(path),
                 plural(size, "byte", "bytes"), img.format_version,
                 img.info.tool.empty() ? "?" : printable(img.info.tool),
                 img.info.kernel.empty() ? "?" : printable(img.info.kernel), created.empty() ? "date unknown" : created,
                 img.info.page_size);
  if (auto ok = image::validate(img); !ok) fmt::format_to(out, "restore here: REFUSED: {}\n", printable(ok.error().what));
  fmt::format_to(out, "{}, {} ({} queued), {}, {}{}; {} blocked\n",
                 plural(img.processes.size(), "process", "processes"), plural(img.pipes.size(), "pipe", "pipes"),
                 plural(queued, "byte", "bytes"), plural(img.files.size(), "open file", "open files"),
                 plural(img.fds.size(), "fd", "fds"),
                 img.in_flight.empty() ? std::string()
                                       : ", " + plural(img.in_flight.size(), "end in flight", "ends in flight"),
                 plural(blocked, "fd", "fds"));
}

void print_processes(Out out, const Image& img) {
  if (img.processes.empty()) return;
  fmt::format_to(out, "\nProcesses:\n  {:>8} {:>8}  {:<16} {}\n", "PID", "PPID", "COMM", "COMMAND");
  for (const ProcessRecord& p : img.processes)
    fmt::format_to(out, "  {:>8} {:>8}  {:<16} {}\n", p.pid, p.ppid, printable(p.comm), command_line(p.argv));
  for (const SharedFdTable& s : img.shared_tables)
    fmt::format_to(out, "  process {} shares the fd table of process {} (its fds are listed under {})\n", s.pid,
                   s.with_pid, s.with_pid);
}

// "pipe 3: fifo /tmp/f (unlinked), inode 77, capacity 65536, 10 bytes queued (0.0%), 1 slot".
void print_pipe_line(Out out, const PipeRecord& p) {
  std::string what = kind_name(p.kind);
  if (p.kind == PipeKind::fifo)
    what += fmt::format(" {}{}", printable(p.path), p.unlinked ? " (unlinked)" : "");
  double fill = p.capacity ? 100.0 * static_cast<double>(p.bytes()) / p.capacity : 0.0;
  fmt::format_to(out, "pipe {}: {}, inode {}, capacity {}, {} queued ({:.1f}%), {}", p.id, what, p.inode, p.capacity,
                 plural(p.bytes(), "byte", "bytes"), fill, plural(p.slots.size(), "slot", "slots"));
  if (p.packet_mode()) {
    size_t packets = std::count_if(p.slots.begin(), p.slots.end(), [](const Slot& s) { return s.packet; });
    fmt::format_to(out, ", {}", plural(packets, "packet", "packets"));
  }
  fmt::format_to(out, "\n  inode owner {}:{}, mode {:04o}{}\n", p.uid, p.gid, p.mode,
                 p.outside_holders ? "; OUTSIDE HOLDERS: processes not in the image hold it too" : "");
}

// "  file 2  write      O_DIRECT  owner pid 7 (process); signal SIGRTMIN+3 (37)".
void print_file_line(Out out, const FileRecord& f, const PipeRecord& p) {
  auto flags = flag_names(f.flags);
  std::string line = fmt::format("  file {}  {:<9}  {}", f.id, access_name(f.flags),
                                 flags.empty() ? std::string("-") : fmt::format("{}", fmt::join(flags, ",")));
  if (f.owner.pid != 0) line += fmt::format("; owner {}", describe_owner(f.owner));
  if (f.signal != 0) line += fmt::format("; signal {} ({})", signal_name(f.signal), f.signal);
  if (p.kind == PipeKind::fifo && f.fifo_reader == FifoReaderState::no_writer_yet)
    line += "; reader has seen no writer yet";
  fmt::format_to(out, "{}\n", line);
}

// "    fd 4243:12  (reader)  cloexec  BLOCKED reading".
void print_fd_line(Out out, const FdRecord& f, const Index& ix) {
  std::string who = f.pid == 0 ? std::string("self") : fmt::format("{}", f.pid);
  auto proc = ix.process.find(f.pid);
  std::string comm = proc == ix.process.end() ? std::string() : fmt::format("  ({})", printable(proc->second->comm));
  const char* blocked = blocked_name(f.blocked);
  if (f.tid != 0) who += fmt::format("/{}", f.tid);  // in the own fd table of thread tid
  fmt::format_to(out, "    fd {}:{}{}{}{}{}\n", who, f.fd, comm, f.tid != 0 ? "  (thread's own fd table)" : "",
                 f.cloexec ? "  cloexec" : "", blocked ? fmt::format("  BLOCKED {}", blocked) : std::string());
}

// "    in flight: socket fd 5 of 4243 (comm), inode 88, message 0, file 1 of it (after 12 bytes)".
void print_in_flight_line(Out out, const InFlightRecord& f, const Index& ix) {
  auto proc = ix.process.find(f.pid);
  std::string comm = proc == ix.process.end() ? std::string() : fmt::format(" ({})", printable(proc->second->comm));
  fmt::format_to(out, "    in flight: socket fd {} of {}{}, socket inode {}, message {}, file {} of it (received after {})\n",
                 f.sock_fd, f.pid, comm, f.sock_ino, f.msg, f.slot, plural(f.end, "byte", "bytes"));
}

std::string indent(const std::string& text, const char* prefix) {
  std::string out;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    out += prefix;
    out.append(text, start, end - start + 1);
    start = end + 1;
  }
  return out;
}

// The queued bytes, head first. In a pipe with packets each slot is dumped on its own under a
// line that says whether it is a packet (a reader gets it whole or loses its rest) or stream
// bytes; in a stream pipe slot boundaries do not change what a reader gets, so one dump.
void print_data(Out out, const PipeRecord& p) {
  auto data = p.data.first(std::min<size_t>(p.data.size(), p.bytes()));
  if (data.empty()) {
    fmt::format_to(out, "  data: none queued\n");
    return;
  }
  if (!p.packet_mode()) {
    fmt::format_to(out, "  data:\n{}", indent(format_hexdump(data), "    "));
    return;
  }
  fmt::format_to(out, "  data, by slot:\n");
  uint64_t off = 0;
  size_t packet = 0;
  for (size_t i = 0; i < p.slots.size() && off < data.size(); ++i) {
    const Slot& s = p.slots[i];
    auto chunk = data.subspan(off, std::min<size_t>(s.len, data.size() - off));
    std::string label = s.packet ? fmt::format("packet {}", ++packet) : std::string("stream bytes");
    fmt::format_to(out, "    -- slot {}: {}, {} at offset {}\n", i, label, plural(s.len, "byte", "bytes"), off);
    fmt::format_to(out, "{}", indent(format_hexdump(chunk, off), "    "));
    off += s.len;
  }
}

// Writes the text to out and empties it once it holds a chunk: the output of a large image
// streams instead of being built whole.
void flush_chunk(std::FILE* out, std::string& text, bool force = false) {
  if (!force && text.size() < (1u << 16)) return;
  std::fwrite(text.data(), 1, text.size(), out);
  text.clear();
}

void print_pipes(std::FILE* file, std::string& text, const Image& img, const Index& ix, bool data) {
  static const std::vector<size_t> kNone;
  auto get = [](const auto& map, uint64_t id) -> const std::vector<size_t>& {
    auto it = map.find(id);
    return it == map.end() ? kNone : it->second;
  };
  Out out(text);
  for (const PipeRecord& p : img.pipes) {
    fmt::format_to(out, "\n");
    print_pipe_line(out, p);
    const auto& files = get(ix.files_of_pipe, p.id);
    if (files.empty()) fmt::format_to(out, "  no open file of it in the image\n");
    for (size_t fi : files) {
      const FileRecord& f = img.files[fi];
      print_file_line(out, f, p);
      for (size_t di : get(ix.fds_of_file, f.id)) print_fd_line(out, img.fds[di], ix);
      for (size_t ii : get(ix.in_flight_of_file, f.id)) print_in_flight_line(out, img.in_flight[ii], ix);
    }
    if (data) print_data(out, p);
    flush_chunk(file, text);
  }
}

// "  epoll 1 (fd 9 of 4242) watches fd 3 (file 2, pipe 1): EPOLLIN,EPOLLET; data 0x2a"; "of 4242/4250"
// for an epoll in the own fd table of thread 4250, as the fds are shown.
void print_epoll_watches(Out out, const Image& img) {
  if (img.epoll_watches.empty()) return;
  std::unordered_map<uint64_t, uint64_t> pipe_of;
  for (const FileRecord& f : img.files) pipe_of.emplace(f.id, f.pipe_id);
  fmt::format_to(out, "\nEpoll watches on pipe ends (re-added by a restore that replaces the end):\n");
  for (const EpollWatch& w : img.epoll_watches) {
    auto names = epoll_event_names(w.events);
    auto pipe = pipe_of.find(w.file_id);
    const std::string who = w.tid != 0 ? fmt::format("{}/{}", w.pid, w.tid) : fmt::format("{}", w.pid);
    fmt::format_to(out, "  epoll {} (fd {} of {}) watches fd {} (file {}, pipe {}): {}; data {:#x}\n", w.epoll_id,
                   w.epoll_fd, who, w.fd, w.file_id, pipe == pipe_of.end() ? 0 : pipe->second,
                   names.empty() ? std::string("no events") : fmt::format("{}", fmt::join(names, ",")), w.data);
  }
}

void write_text(std::FILE* file, const Image& img, const std::string& path, size_t size, bool data) {
  std::string text;
  Out out(text);
  Index ix = build_index(img);
  print_header(out, img, path, size);
  print_processes(out, img);
  if (!img.pipes.empty()) fmt::format_to(out, "\nPipes (each open file, then the fds that share it):\n");
  print_pipes(file, text, img, ix, data);
  print_epoll_watches(out, img);
  flush_chunk(file, text, true);
}

Expected<int> run(const Options& o, CommandContext& ctx) {
  auto file = image::MappedFile::open(o.image);
  if (!file) return tl::unexpected(file.error());
  auto img = image::parse(file->bytes());
  if (!img) {
    Error e = img.error();
    e.what = fmt::format("{}: {}", o.image == "-" ? std::string("stdin") : fmt::format("\"{}\"", o.image), e.what);
    return tl::unexpected(std::move(e));
  }
  if (o.json)
    write_image_json(ctx.out, *img, ImageJsonOptions{o.data});
  else
    write_text(ctx.out, *img, o.image == "-" ? std::string("(stdin)") : o.image, file->bytes().size(), o.data);
  return kExitOk;
}

RunFn setup(CLI::App& app, CommandContext& ctx) {
  auto o = std::make_shared<Options>();
  app.add_option("image", o->image, "the image file, or - to read it from stdin")->required();
  app.add_flag("--json", o->json, "print one JSON document (see docs/json.md)");
  app.add_flag("--data", o->data, "add the queued bytes: a hexdump per pipe, or data_base64 with --json");
  return [o, &ctx]() -> Expected<int> { return run(*o, ctx); };
}

const Registrar kShow{"show", "describe an image: processes, pipes, open files, fds, queued data", 40, setup};

}  // namespace
}  // namespace pipecr::cli
