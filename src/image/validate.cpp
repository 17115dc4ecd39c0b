// validate.cpp: see validate.hpp. Every rule is checked on the records alone (no system call but
// sysconf), so validate() is cheap, deterministic, and safe to run on any parsed image.
#include "image/validate.hpp"

#include <unistd.h>

#include <bit>
#include <map>
#include <set>
#include <tuple>
#include <string_view>
#include <unordered_map>
#include <unordered_set>

#include <fmt/format.h>

#include "image/encoding.hpp"

namespace pipecr::image {
namespace {

[[nodiscard]] tl::unexpected<Error> refuse(std::string what) {
  return fail(Errc::bad_image, EBADMSG, std::move(what));
}

// "" or why path cannot be opened as recorded: relative paths would resolve against the restorer's
// working directory, a NUL would cut the path short at open(), "." and ".." are not what a dump
// records (readlink of /proc/PID/fd gives a canonical path).
std::string path_problem(const std::string& path) {
  if (path.empty()) return "is empty";
  if (path.front() != '/') return "is not absolute";
  if (path.find('\0') != std::string::npos) return "holds a NUL byte";
  if (path.size() >= kMaxPath) return fmt::format("is {} bytes long, not below PATH_MAX {}", path.size(), kMaxPath);
  std::string_view rest(path);
  while (!rest.empty()) {
    size_t slash = rest.find('/');
    std::string_view part = rest.substr(0, slash);
    if (part == "." || part == "..") return fmt::format("has a \"{}\" component", part);
    if (slash == std::string_view::npos) break;
    rest.remove_prefix(slash + 1);
  }
  return {};
}

Expected<void> validate_pipe(const PipeRecord& p, uint32_t page) {
  const std::string name = fmt::format("pipe {}", p.id);
  if (auto e = check_pipe_kind(p); !e.empty()) return refuse(e);  // id, kind, a path only on a FIFO
  // Capacity: what F_SETPIPE_SZ(capacity) sets is round_pipe_size(capacity); only a value it keeps
  // as it is can be restored exactly, and a kernel only ever reports such values.
  if (p.capacity < page || p.capacity > kMaxPipeCapacity || !std::has_single_bit(p.capacity))
    return refuse(fmt::format("{} capacity {} is not a power of two between the page size {} and {} "
                              "(what F_SETPIPE_SZ can set)",
                              name, p.capacity, page, kMaxPipeCapacity));
  const uint64_t slots_here = p.capacity / page;
  if (p.slots.size() > slots_here)
    return refuse(fmt::format("{} has {} slots but capacity {} holds {} pages of {} bytes here", name,
                              p.slots.size(), p.capacity, slots_here, page));
  uint64_t total = 0;
  for (size_t i = 0; i < p.slots.size(); ++i) {
    const Slot& s = p.slots[i];
    if (s.len == 0 || s.len > page)
      return refuse(fmt::format("{} slot {} holds {} bytes; a pipe buffer holds 1..{} bytes on this machine "
                                "(page size {})",
                                name, i, s.len, page, page));
    total += s.len;
  }
  if (p.data.size() != total)
    return refuse(fmt::format("{} has {} bytes of data but its slots hold {}: they must match", name, p.data.size(),
                              total));
  if (p.mode & ~uint32_t{0777})
    return refuse(fmt::format("{} mode {:#o} has bits beyond 0777 (setuid, setgid or sticky): refused", name, p.mode));
  if (p.kind == PipeKind::fifo)
    if (auto why = path_problem(p.path); !why.empty())
      return refuse(fmt::format("FIFO {} path {}: a FIFO path is absolute, below PATH_MAX, without NUL, . or ..",
                                p.id, why));
  return {};
}

Expected<void> validate_file(const FileRecord& f, const std::unordered_set<uint64_t>& pipes) {
  // id, pipe id, access mode, owner type, signal, FIFO reader state: the reader's rules
  if (auto e = check_file(f); !e.empty()) return refuse(e);
  if (!pipes.count(f.pipe_id)) return refuse(fmt::format("file {} names pipe {}, which the image does not hold", f.id, f.pipe_id));
  if (f.owner.pid < 0)
    return refuse(fmt::format("file {} has owner pid {}: an owner is a positive id, or 0 for none", f.id, f.owner.pid));
  return {};
}

// Each watch names a recorded process and a file that its fd table holds (at the fd the watch was
// added with, or at another: a table shared with with_pid is recorded under with_pid; a thread's own
// table under (pid, tid)); the epoll fd is no recorded pipe end of that table; one (pid, tid, epoll
// fd) is one epoll instance.
Expected<void> validate_epoll_watches(const Image& img, const std::unordered_set<int32_t>& pids,
                                      const std::unordered_set<uint64_t>& files) {
  if (img.epoll_watches.empty()) return {};
  using Table = std::pair<int32_t, int32_t>;  // (pid, tid): tid 0 for the process's table
  std::set<std::pair<Table, int32_t>> fd_slots;   // (table, fd)
  std::set<std::pair<Table, uint64_t>> held;      // (table, file)
  for (const FdRecord& d : img.fds) {
    fd_slots.emplace(Table(d.pid, d.tid), d.fd);
    held.emplace(Table(d.pid, d.tid), d.file_id);
  }
  std::unordered_map<int32_t, int32_t> table_of;  // sharer -> the pid its fds are recorded under
  for (const SharedFdTable& t : img.shared_tables) table_of[t.pid] = t.with_pid;
  std::map<std::tuple<int32_t, int32_t, int32_t>, uint64_t> epolls;
  std::set<std::tuple<int32_t, int32_t, int32_t, uint64_t, int32_t>> seen;
  for (const EpollWatch& w : img.epoll_watches) {
    const std::string name = w.tid != 0 ? fmt::format("epoll {} (fd {} of thread {} of pid {})", w.epoll_id,
                                                      w.epoll_fd, w.tid, w.pid)
                                        : fmt::format("epoll {} (fd {} of pid {})", w.epoll_id, w.epoll_fd, w.pid);
    if (w.tid < 0) return refuse(fmt::format("{}: a thread id is positive", name));
    if (w.epoll_id == 0) return refuse("epoll watch with epoll id 0: ids start at 1");
    if (w.pid <= 0 || !pids.count(w.pid))
      return refuse(fmt::format("{} belongs to a process the image does not record", name));
    if (w.epoll_fd < 0 || w.fd < 0)
      return refuse(fmt::format("{} watches fd {}: fd numbers start at 0", name, w.fd));
    if (!files.count(w.file_id))
      return refuse(fmt::format("{} watches file {}, which the image does not hold", name, w.file_id));
    const Table table(w.tid == 0 && table_of.count(w.pid) ? table_of.at(w.pid) : w.pid, w.tid);
    if (!held.count({table, w.file_id}))
      return refuse(w.tid != 0 ? fmt::format("{} watches file {}, but that thread's table holds no fd of it", name,
                                             w.file_id)
                               : fmt::format("{} watches file {}, but pid {} holds no fd of it", name, w.file_id,
                                             table.first));
    if (fd_slots.count({table, w.epoll_fd}))
      return refuse(fmt::format("{}: that fd is a recorded pipe end, so it is no epoll", name));
    auto [it, fresh] = epolls.emplace(std::tuple(w.pid, w.tid, w.epoll_fd), w.epoll_id);
    if (!fresh && it->second != w.epoll_id)
      return refuse(fmt::format("fd {} of {}pid {} is epoll {} and epoll {}: an fd is one epoll instance", w.epoll_fd,
                                w.tid ? fmt::format("thread {} of ", w.tid) : std::string(), w.pid, it->second,
                                w.epoll_id));
    if (!seen.insert({w.pid, w.tid, w.epoll_fd, w.file_id, w.fd}).second)
      return refuse(fmt::format("{}: the watch of fd {} appears twice: an epoll watches an fd once", name, w.fd));
  }
  return {};
}

}  // namespace

uint32_t host_page_size() {
  static const uint32_t page = [] {
    long v = ::sysconf(_SC_PAGESIZE);
    return v > 0 ? static_cast<uint32_t>(v) : 4096u;
  }();
  return page;
}

Expected<void> validate(const Image& img, uint32_t page_size) {
  const uint32_t page = page_size ? page_size : host_page_size();
  if (img.format_version != kFormatVersion)
    return fail(Errc::image_version, EPROTONOSUPPORT,
                fmt::format("format version {} is not supported (this build reads version {})", img.format_version,
                            kFormatVersion));
  std::unordered_set<int32_t> pids;
  for (const ProcessRecord& p : img.processes) {
    if (p.pid <= 0) return refuse(fmt::format("process pid {} is not positive", p.pid));
    if (!pids.insert(p.pid).second) return refuse(fmt::format("process {} appears twice: pids are unique", p.pid));
  }
  std::unordered_set<uint64_t> pipes;
  for (const PipeRecord& p : img.pipes) {
    if (auto ok = validate_pipe(p, page); !ok) return ok;
    if (!pipes.insert(p.id).second) return refuse(fmt::format("pipe id {} appears twice: ids are unique", p.id));
  }
  std::unordered_set<uint64_t> files;
  for (const FileRecord& f : img.files) {
    if (auto ok = validate_file(f, pipes); !ok) return ok;
    if (!files.insert(f.id).second) return refuse(fmt::format("file id {} appears twice: ids are unique", f.id));
  }
  for (const SharedFdTable& t : img.shared_tables)
    if (t.pid <= 0 || t.with_pid <= 0 || t.pid == t.with_pid || !pids.count(t.pid) || !pids.count(t.with_pid))
      return refuse(fmt::format("shared fd table of pids {} and {}: two different processes the image records", t.pid,
                                t.with_pid));
  std::set<std::tuple<int32_t, int32_t, int32_t>> slots;  // (pid, tid, fd): a thread's own table is another table
  for (const FdRecord& d : img.fds) {
    // pid, fd number, file id, blocked state and thread id on their own: the reader's rules
    if (auto e = check_fd(d); !e.empty()) return refuse(e);
    if (d.pid != 0 && !pids.count(d.pid))
      return refuse(fmt::format("fd {} belongs to pid {}, which the image does not record", d.fd, d.pid));
    if (!files.count(d.file_id))
      return refuse(fmt::format("fd {} of pid {} names file {}, which the image does not hold", d.fd, d.pid, d.file_id));
    if (!slots.insert({d.pid, d.tid, d.fd}).second)
      return refuse(fmt::format("fd {} of pid {} appears twice: a table holds one file at each number", d.fd, d.pid));
  }
  std::set<std::tuple<int32_t, int32_t, uint32_t, uint32_t>> places;  // (pid, sock_fd, msg, slot)
  for (const InFlightRecord& f : img.in_flight) {
    if (f.pid <= 0 || !pids.count(f.pid))
      return refuse(fmt::format("end in flight of file {} is in pid {}, which the image does not record", f.file_id,
                                f.pid));
    if (f.sock_fd < 0)
      return refuse(fmt::format("end in flight of file {} is in socket fd {}: fd numbers start at 0", f.file_id,
                                f.sock_fd));
    if (!files.count(f.file_id)) return refuse(fmt::format("end in flight names file {}, which the image does not hold", f.file_id));
    if (!places.insert({f.pid, f.sock_fd, f.msg, f.slot}).second)
      return refuse(fmt::format("place {}/{} of socket fd {} of pid {} holds two ends in flight: a place holds one",
                                f.msg, f.slot, f.sock_fd, f.pid));
  }
  return validate_epoll_watches(img, pids, files);
}

}  // namespace pipecr::image
