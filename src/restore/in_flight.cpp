// restore/in_flight.cpp: see in_flight.hpp.
#include "restore/in_flight.hpp"

#include <fcntl.h>

#include <unordered_map>

#include <fmt/format.h>

#include "restore/plan.hpp"

namespace pipecr::restore {
namespace {

const char* side(const FileRecord& f) {
  switch (f.flags & O_ACCMODE) {
    case O_RDONLY: return "read";
    case O_WRONLY: return "write";
    default: return "read-write";
  }
}

std::string where(const InFlightRecord& e) {
  return fmt::format("in flight in socket fd {} of recorded process {} (message {})", e.sock_fd, e.pid, e.msg);
}

}  // namespace

std::string in_flight_outside(const Image& img, uint64_t pipe_id, const std::unordered_set<int32_t>& restored) {
  for (const InFlightRecord& e : img.in_flight) {
    if (restored.count(e.pid)) continue;
    const FileRecord* f = img.find_file(e.file_id);
    if (!f || f->pipe_id != pipe_id) continue;
    return fmt::format("an end of it is {}, which is not restored", where(e));
  }
  return {};
}

std::vector<std::string> in_flight_notes(const Plan& plan) {
  std::vector<std::string> notes;
  const Image& img = *plan.img;
  if (img.in_flight.empty()) return notes;
  std::unordered_map<uint64_t, const PlannedPipe*> planned;
  for (const PlannedPipe& pp : plan.pipes) planned[pp.pipe->id] = &pp;
  for (const InFlightRecord& e : img.in_flight) {
    const FileRecord* f = img.find_file(e.file_id);
    if (!f) continue;
    const PipeRecord* p = img.find_pipe(f->pipe_id);
    if (!p) continue;
    std::string name = p->kind == PipeKind::fifo ? fmt::format("FIFO {}", p->path)
                                                 : fmt::format("pipe {} (pipe:[{}])", p->id, p->inode);
    auto it = planned.find(p->id);
    if (it == planned.end()) {
      notes.push_back(fmt::format("{}: the {} end {} is left as it is: no restored fd holds that pipe, and a restore "
                                  "does not reach into socket queues",
                                  name, side(*f), where(e)));
    } else if (!it->second->choice.in_place) {
      notes.push_back(fmt::format("{}: the {} end {} stays on the old pipe: the pipe is replaced ({}), and its "
                                  "receiver will get the old pipe, not the restored one",
                                  name, side(*f), where(e), it->second->choice.why));
    }
  }
  return notes;
}

}  // namespace pipecr::restore
