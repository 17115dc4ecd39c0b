// image_json.cpp: see image_json.hpp. One function per record type; each writes the fields in the
// order docs/json.md lists them. Absent values are JSON null, never a sentinel number, so that
// "no owner" and "owner pid 0" cannot be confused by a consumer.
#include "cli/image_json.hpp"

#include <functional>
#include <string_view>
#include <unordered_set>

#include <fmt/format.h>

#include "cli/describe.hpp"

namespace pipecr::cli {
namespace {

using Json = nlohmann::ordered_json;

Json info_json(const ImageInfo& i) {
  std::string created = utc_time(i.created_unix_ns);
  return Json{{"page_size", i.page_size},
              {"kernel", i.kernel},
              {"tool", i.tool},
              {"boot_id", i.boot_id},
              {"created", created.empty() ? Json(nullptr) : Json(created)},
              {"created_unix_ns", i.created_unix_ns}};
}

Json process_json(const ProcessRecord& p) {
  return Json{{"pid", p.pid}, {"ppid", p.ppid}, {"comm", p.comm}, {"argv", p.argv}};
}

// The sizes of the packets a reader would get, in order: one per packet slot. Stream slots in a
// pipe that also holds packets are not packets (their bytes read like any stream), so they are
// left out here and stay visible in "slots".
Json packets_json(const PipeRecord& p) {
  if (!p.packet_mode()) return nullptr;
  Json sizes = Json::array();
  for (const Slot& s : p.slots)
    if (s.packet) sizes.push_back(s.len);
  return sizes;
}

Json pipe_json(const PipeRecord& p, const ImageJsonOptions& opt) {
  Json slots = Json::array();
  for (const Slot& s : p.slots) slots.push_back(Json{{"len", s.len}, {"packet", s.packet}});
  bool fifo = p.kind == PipeKind::fifo;
  Json j{{"id", p.id},
         {"kind", kind_name(p.kind)},
         {"path", fifo ? Json(p.path) : Json(nullptr)},
         {"unlinked", p.unlinked},
         {"inode", p.inode},
         {"dev", fifo ? Json(p.dev) : Json(nullptr)},
         {"capacity", p.capacity},
         {"bytes", p.bytes()},
         {"slots", std::move(slots)},
         {"packets", packets_json(p)},
         {"outside_holders", p.outside_holders},
         {"uid", p.uid},
         {"gid", p.gid},
         {"mode", p.mode}};
  if (opt.data) j["data_base64"] = base64(p.data);
  return j;
}

Json owner_json(const Owner& o) {
  if (o.pid == 0) return nullptr;
  return Json{{"type", owner_type_name(o.type)},
              {"pid", o.pid},
              {"uid", o.has_uids ? Json(o.uid) : Json(nullptr)},
              {"euid", o.has_uids ? Json(o.euid) : Json(nullptr)}};
}

// fifo: the file is an end of a FIFO (fifo_reader means something only there).
Json file_json(const FileRecord& f, bool fifo) {
  std::string sig = signal_name(f.signal);
  return Json{{"id", f.id},
              {"pipe", f.pipe_id},
              {"access", access_name(f.flags)},
              {"flags", flag_names(f.flags)},
              {"flags_octal", fmt::format("{:#o}", f.flags)},
              {"owner", owner_json(f.owner)},
              {"signal", f.signal},
              {"signal_name", sig.empty() ? Json(nullptr) : Json(sig)},
              {"fifo_reader", fifo ? Json(fifo_reader_name(f.fifo_reader)) : Json(nullptr)}};
}

Json fd_json(const FdRecord& f) {
  const char* blocked = blocked_name(f.blocked);
  Json j{{"pid", f.pid},
         {"fd", f.fd},
         {"file", f.file_id},
         {"cloexec", f.cloexec},
         {"blocked", blocked ? Json(blocked) : Json(nullptr)}};
  if (f.tid != 0) j["tid"] = f.tid;  // in that thread's own fd table (THREAD_FD)
  return j;
}

Json shared_json(const SharedFdTable& s) { return Json{{"pid", s.pid}, {"with_pid", s.with_pid}}; }

Json in_flight_json(const InFlightRecord& f) {
  return Json{{"file", f.file_id},  {"pid", f.pid},   {"socket_fd", f.sock_fd}, {"socket_inode", f.sock_ino},
              {"message", f.msg},   {"slot", f.slot}, {"end", f.end}};
}

Json epoll_watch_json(const EpollWatch& w) {
  Json j{{"epoll", w.epoll_id},
         {"pid", w.pid},
         {"epoll_fd", w.epoll_fd},
         {"fd", w.fd},
         {"file", w.file_id},
         {"events", epoll_event_names(w.events)},
         {"events_hex", fmt::format("{:#x}", w.events)},
         {"data", w.data},
         {"data_hex", fmt::format("{:#x}", w.data)}};
  if (w.tid != 0) j["tid"] = w.tid;  // in that thread's own fd table (THREAD_EPOLL_WATCH)
  return j;
}

}  // namespace

std::string base64(std::span<const std::byte> bytes) {
  static constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  size_t i = 0;
  auto at = [&](size_t k) { return static_cast<uint32_t>(static_cast<unsigned char>(bytes[k])); };
  for (; i + 3 <= bytes.size(); i += 3) {
    uint32_t v = at(i) << 16 | at(i + 1) << 8 | at(i + 2);
    for (int shift = 18; shift >= 0; shift -= 6) out += kAlphabet[(v >> shift) & 63];
  }
  size_t rest = bytes.size() - i;
  if (rest > 0) {
    uint32_t v = at(i) << 16 | (rest == 2 ? at(i + 1) << 8 : 0);
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += rest == 2 ? kAlphabet[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

namespace {

// Writes the layout described in image_json.hpp into a string, handing full chunks to `flush`
// (when set) so that a document of any size streams through a buffer of about kChunk bytes.
class Layout {
 public:
  explicit Layout(std::function<void(std::string&)> flush = {}) : flush_(std::move(flush)) {}
  void begin() { text_ += "{"; }
  void field(std::string_view key, const Json& value) {
    open_key(key);
    compact(value);
  }
  void begin_array(std::string_view key) {
    open_key(key);
    text_ += "[";
    first_element_ = true;
  }
  void element(const Json& value) {
    text_ += first_element_ ? "\n    " : ",\n    ";
    first_element_ = false;
    compact(value);
    maybe_flush();
  }
  void end_array() { text_ += first_element_ ? "]" : "\n  ]"; }
  void end() { text_ += first_key_ ? "}" : "\n}"; }
  [[nodiscard]] std::string& text() { return text_; }

 private:
  static constexpr size_t kChunk = 1 << 16;
  void open_key(std::string_view key) {
    text_ += first_key_ ? "\n  " : ",\n  ";
    first_key_ = false;
    compact(Json(key));
    text_ += ": ";
  }
  void compact(const Json& v) { text_ += v.dump(-1, ' ', false, Json::error_handler_t::replace); }
  void maybe_flush() {
    if (flush_ && text_.size() >= kChunk) flush_(text_);
  }
  std::function<void(std::string&)> flush_;
  std::string text_;
  bool first_key_ = true, first_element_ = true;
};

// Image::find_pipe is a linear scan; an image may hold 10,000 pipes and more.
std::unordered_set<uint64_t> fifo_ids(const Image& img) {
  std::unordered_set<uint64_t> ids;
  for (const PipeRecord& p : img.pipes)
    if (p.kind == PipeKind::fifo) ids.insert(p.id);
  return ids;
}

}  // namespace

nlohmann::ordered_json image_to_json(const Image& img, const ImageJsonOptions& opt) {
  Json processes = Json::array(), pipes = Json::array(), files = Json::array(), fds = Json::array();
  for (const ProcessRecord& p : img.processes) processes.push_back(process_json(p));
  for (const PipeRecord& p : img.pipes) pipes.push_back(pipe_json(p, opt));
  auto fifos = fifo_ids(img);
  for (const FileRecord& f : img.files) files.push_back(file_json(f, fifos.count(f.pipe_id) > 0));
  for (const FdRecord& f : img.fds) fds.push_back(fd_json(f));
  Json doc{{"format_version", img.format_version},
           {"info", info_json(img.info)},
           {"processes", std::move(processes)},
           {"pipes", std::move(pipes)},
           {"files", std::move(files)},
           {"fds", std::move(fds)}};
  if (!img.shared_tables.empty()) {
    Json shared = Json::array();
    for (const SharedFdTable& s : img.shared_tables) shared.push_back(shared_json(s));
    doc["shared_fd_tables"] = std::move(shared);
  }
  if (!img.in_flight.empty()) {
    Json in_flight = Json::array();
    for (const InFlightRecord& f : img.in_flight) in_flight.push_back(in_flight_json(f));
    doc["in_flight"] = std::move(in_flight);
  }
  if (!img.epoll_watches.empty()) {
    Json watches = Json::array();
    for (const EpollWatch& w : img.epoll_watches) watches.push_back(epoll_watch_json(w));
    doc["epoll_watches"] = std::move(watches);
  }
  return doc;
}

void write_image_json(std::FILE* out, const Image& img, const ImageJsonOptions& opt) {
  Layout doc([out](std::string& chunk) {
    std::fwrite(chunk.data(), 1, chunk.size(), out);
    chunk.clear();
  });
  doc.begin();
  doc.field("format_version", img.format_version);
  doc.field("info", info_json(img.info));
  doc.begin_array("processes");
  for (const ProcessRecord& p : img.processes) doc.element(process_json(p));
  doc.end_array();
  doc.begin_array("pipes");
  for (const PipeRecord& p : img.pipes) doc.element(pipe_json(p, opt));
  doc.end_array();
  doc.begin_array("files");
  auto fifos = fifo_ids(img);
  for (const FileRecord& f : img.files) doc.element(file_json(f, fifos.count(f.pipe_id) > 0));
  doc.end_array();
  doc.begin_array("fds");
  for (const FdRecord& f : img.fds) doc.element(fd_json(f));
  doc.end_array();
  if (!img.shared_tables.empty()) {
    doc.begin_array("shared_fd_tables");
    for (const SharedFdTable& s : img.shared_tables) doc.element(shared_json(s));
    doc.end_array();
  }
  if (!img.in_flight.empty()) {
    doc.begin_array("in_flight");
    for (const InFlightRecord& f : img.in_flight) doc.element(in_flight_json(f));
    doc.end_array();
  }
  if (!img.epoll_watches.empty()) {
    doc.begin_array("epoll_watches");
    for (const EpollWatch& w : img.epoll_watches) doc.element(epoll_watch_json(w));
    doc.end_array();
  }
  doc.end();
  doc.text() += '\n';
  std::fwrite(doc.text().data(), 1, doc.text().size(), out);
}

std::string render_json(const nlohmann::ordered_json& doc) {
  if (!doc.is_object()) return doc.dump(-1, ' ', false, Json::error_handler_t::replace);
  Layout out;
  out.begin();
  for (const auto& [key, value] : doc.items()) {
    if (value.is_array() && !value.empty()) {
      out.begin_array(key);
      for (const Json& e : value) out.element(e);
      out.end_array();
    } else {
      out.field(key, value);
    }
  }
  out.end();
  return std::move(out.text());
}

}  // namespace pipecr::cli
