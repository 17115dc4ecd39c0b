// compare.cpp: see compare.hpp.
#include "compare.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <set>
#include <tuple>

#include "harness.hpp"

namespace zdtm_harness {
namespace {

using nlohmann::json;

const std::set<std::string> kComparedFlags = {"O_NONBLOCK", "O_DIRECT", "O_ASYNC"};

std::string key_of(const json& id) { return id.dump(); }

// A one-to-one map between expected names and actual ids.
class Bijection {
 public:
  // False (with a reason) when either side is already paired with someone else.
  bool pair(const std::string& name, const std::string& id, std::string* why) {
    auto a = by_name_.find(name);
    auto b = by_id_.find(id);
    if (a != by_name_.end() && a->second != id) {
      *why = "expected " + name + " is " + a->second + " elsewhere but " + id + " here";
      return false;
    }
    if (b != by_id_.end() && b->second != name) {
      *why = "id " + id + " is expected " + b->second + " elsewhere but " + name + " here";
      return false;
    }
    by_name_[name] = id;
    by_id_[id] = name;
    return true;
  }
  [[nodiscard]] const std::map<std::string, std::string>& by_name() const { return by_name_; }
  [[nodiscard]] size_t size() const { return by_name_.size(); }

 private:
  std::map<std::string, std::string> by_name_, by_id_;
};

std::set<std::string> compared_flags(const json& flags) {
  std::set<std::string> out;
  if (!flags.is_array()) return out;
  for (const json& f : flags)
    if (f.is_string() && kComparedFlags.count(f.get<std::string>())) out.insert(f.get<std::string>());
  return out;
}

std::string join(const std::set<std::string>& s) {
  std::string out;
  for (const std::string& x : s) out += (out.empty() ? "" : ",") + x;
  return "[" + out + "]";
}

std::string strip_deleted(std::string p) {
  const std::string suffix = " (deleted)";
  if (p.size() > suffix.size() && p.compare(p.size() - suffix.size(), suffix.size(), suffix) == 0)
    p.resize(p.size() - suffix.size());
  return p;
}

// Packets: expected null means a stream pipe; actual null or [] both say so.
json norm_packets(const json& p) { return p.is_array() && p.empty() ? json(nullptr) : p; }

json slot_lengths(const json& slots) {
  json out = json::array();
  if (!slots.is_array()) return out;
  for (const json& s : slots) out.push_back(s.is_object() ? s.value("len", json(-1)) : s);
  return out;
}

// The owner, reduced to what the program can state: null, or {type, pid}.
json norm_owner(const json& o) {
  if (!o.is_object() || o.value("pid", 0) == 0) return nullptr;
  return json{{"type", o.value("type", "")}, {"pid", o.value("pid", 0)}};
}

struct Ctx {
  bool strict;
  std::vector<std::string>* out;
  void diff(const std::string& what, const json& want, const json& got) const {
    out->push_back(what + ": expected " + want.dump() + ", got " + got.dump());
  }
  // Compare field `key` of two objects after `norm`; honours strictness for a missing field.
  template <class Norm>
  void field(const std::string& what, const json& want, const json& got, const char* key, Norm norm) const {
    if (!want.contains(key)) return;
    if (!got.contains(key)) {
      if (strict) out->push_back(what + ": field \"" + key + "\" missing");
      return;
    }
    json w = norm(want[key]), g = norm(got[key]);
    if (w != g) diff(what + " " + key, w, g);
  }
  void field(const std::string& what, const json& want, const json& got, const char* key) const {
    field(what, want, got, key, [](const json& j) { return j; });
  }
};

std::map<std::string, json> index_by(const json& arr, const char* key) {
  std::map<std::string, json> m;
  if (!arr.is_array()) return m;
  for (const json& x : arr) m[key_of(x.value(key, json(nullptr)))] = x;
  return m;
}

void compare_processes(const json& want, const json& got, const Ctx& c) {
  std::map<int, json> w, g;
  for (const json& p : want.value("processes", json::array())) w[p.value("pid", 0)] = p;
  for (const json& p : got.value("processes", json::array())) g[p.value("pid", 0)] = p;
  for (auto& [pid, p] : w) {
    if (!g.count(pid)) {
      c.out->push_back("process " + std::to_string(pid) + " missing");
      continue;
    }
    c.field("process " + std::to_string(pid), p, g[pid], "comm");
  }
  for (auto& [pid, p] : g)
    if (!w.count(pid)) c.out->push_back("unexpected process " + std::to_string(pid));
}

}  // namespace

std::vector<std::string> compare(const json& want, const json& got, bool strict) {
  std::vector<std::string> out;
  Ctx c{strict, &out};
  compare_processes(want, got, c);

  // fd slots by (pid, tid, fd): tid 0 for the process's table, else the thread whose own table it is.
  using Slot = std::tuple<int, int, int>;
  auto slot_of = [](const json& f) { return Slot{f.value("pid", 0), f.value("tid", 0), f.value("fd", -1)}; };
  auto name = [](const Slot& k) {
    auto [pid, tid, fd] = k;
    return std::to_string(pid) + (tid ? "/" + std::to_string(tid) : "") + ":" + std::to_string(fd);
  };
  std::map<Slot, json> got_fds;
  for (const json& f : got.value("fds", json::array())) got_fds[slot_of(f)] = f;
  // A process that used another's fd table (clone(CLONE_FILES)) holds every fd listed under it.
  for (const json& t : got.value("shared_fd_tables", json::array())) {
    const int pid = t.value("pid", 0), with = t.value("with_pid", 0);
    std::vector<json> theirs;
    for (auto& [k, f] : got_fds)
      if (std::get<0>(k) == with && std::get<1>(k) == 0) theirs.push_back(f);
    for (json f : theirs) {
      f["pid"] = pid;
      const Slot k = slot_of(f);  // before the move: json's operator= takes its argument by value
      got_fds[k] = std::move(f);
    }
  }
  Bijection files, pipes;
  std::set<Slot> seen;
  for (const json& f : want.value("fds", json::array())) {
    const Slot k = slot_of(f);
    std::string what = "fd " + name(k);
    seen.insert(k);
    auto it = got_fds.find(k);
    if (it == got_fds.end()) {
      out.push_back(what + " missing");
      continue;
    }
    c.field(what, f, it->second, "cloexec");
    c.field(what, f, it->second, "blocked");
    std::string why;
    if (!files.pair(f.value("file", ""), key_of(it->second.value("file", json(nullptr))), &why))
      out.push_back(what + ": open file description sharing differs: " + why);
  }
  for (auto& [k, f] : got_fds)
    if (!seen.count(k)) out.push_back("unexpected fd " + name(k));

  // Ends in flight, by (pid, socket fd, message, slot): they pair files too. The live view (/proc)
  // cannot see them: compared only when the document has them or in strict mode.
  if (strict || got.contains("in_flight")) {
    using Place = std::tuple<int, int, long, long>;
    auto place = [](const json& f) {
      return Place{f.value("pid", 0), f.value("socket_fd", -1), f.value("message", -1L), f.value("slot", -1L)};
    };
    std::map<Place, json> got_fl;
    for (const json& f : got.value("in_flight", json::array())) got_fl[place(f)] = f;
    std::set<Place> seen_fl;
    for (const json& f : want.value("in_flight", json::array())) {
      Place k = place(f);
      std::string what = "end in flight in socket " + std::to_string(std::get<0>(k)) + ":" +
                         std::to_string(std::get<1>(k)) + " message " + std::to_string(std::get<2>(k)) + " slot " +
                         std::to_string(std::get<3>(k));
      seen_fl.insert(k);
      auto it = got_fl.find(k);
      if (it == got_fl.end()) {
        out.push_back(what + " missing");
        continue;
      }
      std::string why;
      if (!files.pair(f.value("file", ""), key_of(it->second.value("file", json(nullptr))), &why))
        out.push_back(what + ": open file description differs: " + why);
    }
    for (auto& [k, f] : got_fl)
      if (!seen_fl.count(k))
        out.push_back("unexpected end in flight in socket " + std::to_string(std::get<0>(k)) + ":" +
                      std::to_string(std::get<1>(k)));
  }

  // Open file descriptions, through the pairing the fds made.
  std::map<std::string, json> want_files = index_by(want.value("files", json::array()), "name");
  std::map<std::string, json> got_files = index_by(got.value("files", json::array()), "id");
  for (auto& [name, id] : files.by_name()) {
    std::string what = "file " + name + " (id " + id + ")";
    if (!want_files.count(key_of(name)) || !got_files.count(id)) {
      out.push_back(what + " not described");
      continue;
    }
    const json& w = want_files[key_of(name)];
    const json& g = got_files[id];
    c.field(what, w, g, "access");
    c.field(what, w, g, "flags", [](const json& j) { return json(join(compared_flags(j))); });
    c.field(what, w, g, "owner", norm_owner);
    c.field(what, w, g, "signal", [](const json& j) { return j.is_null() ? json(0) : j; });
    c.field(what, w, g, "fifo_reader");
    std::string why;
    if (!pipes.pair(w.value("pipe", ""), key_of(g.value("pipe", json(nullptr))), &why))
      out.push_back(what + ": pipe identity differs: " + why);
  }
  if (got_files.size() != files.size())
    out.push_back("image has " + std::to_string(got_files.size()) + " open files, the program " +
                  std::to_string(files.size()));

  std::map<std::string, json> want_pipes = index_by(want.value("pipes", json::array()), "name");
  std::map<std::string, json> got_pipes = index_by(got.value("pipes", json::array()), "id");
  for (auto& [name, id] : pipes.by_name()) {
    std::string what = "pipe " + name + " (id " + id + ")";
    if (!want_pipes.count(key_of(name)) || !got_pipes.count(id)) {
      out.push_back(what + " not described");
      continue;
    }
    const json& w = want_pipes[key_of(name)];
    const json& g = got_pipes[id];
    c.field(what, w, g, "kind");
    c.field(what, w, g, "path", [](const json& j) { return j.is_string() ? json(strip_deleted(j)) : j; });
    if (w.value("kind", "") == "fifo") c.field(what, w, g, "unlinked");
    c.field(what, w, g, "capacity");
    c.field(what, w, g, "bytes");
    c.field(what, w, g, "packets", norm_packets);
    c.field(what, w, g, "slots", slot_lengths);
    c.field(what, w, g, "outside_holders");
  }
  if (got_pipes.size() != pipes.size())
    out.push_back("image has " + std::to_string(got_pipes.size()) + " pipes, the program " +
                  std::to_string(pipes.size()));
  return out;
}

// ---- the live view ----

namespace {

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

long kcmp_file(int pid1, int fd1, int pid2, int fd2) {
  return syscall(SYS_kcmp, pid1, pid2, 0 /* KCMP_FILE */, fd1, fd2);
}

unsigned long fdinfo_flags(const Table& t, int fd) {
  std::string s = slurp(t.dir() + "/fdinfo/" + std::to_string(fd));
  size_t at = s.find("flags:");
  return at == std::string::npos ? 0 : std::stoul(s.substr(at + 6), nullptr, 8);
}

json flag_list(unsigned long fl) {
  json out = json::array();
  if (fl & O_NONBLOCK) out.push_back("O_NONBLOCK");
  if (fl & O_DIRECT) out.push_back("O_DIRECT");
  if (fl & O_ASYNC) out.push_back("O_ASYNC");
  return out;
}

// "reading" / "writing" when the process sleeps in read()/write() on fd (single-threaded view).
json blocked_on(int pid, int fd) {
  std::string s = slurp("/proc/" + std::to_string(pid) + "/syscall");
  long nr = -1;
  unsigned long arg0 = 0;
  if (sscanf(s.c_str(), "%ld 0x%lx", &nr, &arg0) != 2 || arg0 != static_cast<unsigned long>(fd)) return nullptr;
  if (nr == SYS_read) return "reading";
  if (nr == SYS_write) return "writing";
  return nullptr;
}

// What can only be asked of the open file description itself.
struct FileProbe {
  int capacity = -1, bytes = -1, signal = 0;
  json owner = nullptr;
};

FileProbe probe(int pidfd, int fd) {
  FileProbe p;
  int copy = static_cast<int>(syscall(SYS_pidfd_getfd, pidfd, fd, 0));
  if (copy < 0) return p;
  p.capacity = fcntl(copy, F_GETPIPE_SZ);
  if (ioctl(copy, FIONREAD, &p.bytes) != 0) p.bytes = -1;
  p.signal = fcntl(copy, F_GETSIG);
  struct f_owner_ex o = {};
  if (fcntl(copy, F_GETOWN_EX, &o) == 0 && o.pid != 0)
    p.owner = json{{"type", o.type == F_OWNER_TID ? "tid" : o.type == F_OWNER_PGRP ? "pgrp" : "pid"}, {"pid", o.pid}};
  close(copy);
  return p;
}

std::vector<int> pipe_fds(const Table& t) {
  std::vector<int> out;
  std::string dir = t.dir() + "/fd";
  DIR* d = opendir(dir.c_str());
  if (!d) return out;
  while (struct dirent* e = readdir(d)) {
    if (e->d_name[0] == '.') continue;
    struct stat st;
    if (stat((dir + "/" + e->d_name).c_str(), &st) == 0 && S_ISFIFO(st.st_mode)) out.push_back(atoi(e->d_name));
  }
  closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

json live_view(const json& want) {
  json processes = json::array(), pipes = json::array(), files = json::array(), fds = json::array();
  std::map<unsigned long, json> pipe_by_ino;
  // Representatives of the open files met so far, per pipe inode: (task, fd, file id).
  std::map<unsigned long, std::vector<std::tuple<int, int, int>>> reps;
  int next_file = 1;
  for (const json& proc : want.value("processes", json::array())) {
    int pid = proc.value("pid", 0);
    processes.push_back(json{{"pid", pid}, {"comm", [&] {
                                             std::string s = slurp("/proc/" + std::to_string(pid) + "/comm");
                                             if (!s.empty() && s.back() == '\n') s.pop_back();
                                             return s;
                                           }()}});
    for (const Table& t : tables_of(pid)) {
      // A thread's pidfd (PIDFD_THREAD, Linux 6.9) takes files from that thread's own table.
      int pidfd = static_cast<int>(syscall(SYS_pidfd_open, t.task(), t.tid ? 0x80 /* PIDFD_THREAD */ : 0));
      for (int fd : pipe_fds(t)) {
        std::string link = t.dir() + "/fd/" + std::to_string(fd);
        struct stat st;
        if (stat(link.c_str(), &st) != 0) continue;
        char target[4096];
        ssize_t n = readlink(link.c_str(), target, sizeof target - 1);
        std::string path = n > 0 ? std::string(target, static_cast<size_t>(n)) : "";
        bool fifo = path.rfind("pipe:", 0) != 0;
        unsigned long flags = fdinfo_flags(t, fd);
        FileProbe pr = pidfd >= 0 ? probe(pidfd, fd) : FileProbe{};
        unsigned long ino = st.st_ino;
        if (!pipe_by_ino.count(ino)) {
          json p{{"id", ino}, {"kind", fifo ? "fifo" : "pipe"}, {"capacity", pr.capacity}, {"bytes", pr.bytes}};
          p["path"] = fifo ? json(path) : json(nullptr);
          if (fifo) p["unlinked"] = st.st_nlink == 0;
          pipe_by_ino[ino] = p;
          pipes.push_back(p);
        }
        int file_id = 0;
        for (auto& [rtask, rfd, rid] : reps[ino])
          if (kcmp_file(t.task(), fd, rtask, rfd) == 0) file_id = rid;
        if (file_id == 0) {
          file_id = next_file++;
          reps[ino].emplace_back(t.task(), fd, file_id);
          unsigned long acc = flags & O_ACCMODE;
          files.push_back(json{{"id", file_id},
                               {"pipe", ino},
                               {"access", acc == O_RDONLY ? "read" : acc == O_WRONLY ? "write" : "readwrite"},
                               {"flags", flag_list(flags)},
                               {"owner", pr.owner},
                               {"signal", pr.signal}});
        }
        json f{{"pid", pid},
               {"fd", fd},
               {"file", file_id},
               {"cloexec", (flags & O_CLOEXEC) != 0},
               {"blocked", t.tid ? json(nullptr) : blocked_on(pid, fd)}};
        if (t.tid) f["tid"] = t.tid;
        fds.push_back(std::move(f));
      }
      if (pidfd >= 0) close(pidfd);
    }
  }
  return json{{"processes", processes}, {"pipes", pipes}, {"files", files}, {"fds", fds}};
}

}  // namespace zdtm_harness
