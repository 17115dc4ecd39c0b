// image.cpp: lookups over the plain records of an Image.
//
// Records are looked up by id. pipecr's dump numbers them 1, 2, 3... in record order, so the record
// at index id - 1 is tried first (O(1): a restore of 90,000 pipes looks up every fd's file and pipe,
// and a scan each time was quadratic); any other numbering falls back to a scan.
#include "pipecr/image.hpp"

namespace pipecr {
namespace {

template <typename Record>
const Record* find_by_id(const std::vector<Record>& records, uint64_t id) {
  if (id >= 1 && id <= records.size() && records[id - 1].id == id) return &records[id - 1];
  for (const Record& r : records)
    if (r.id == id) return &r;
  return nullptr;
}

}  // namespace

const PipeRecord* Image::find_pipe(uint64_t id) const { return find_by_id(pipes, id); }

const FileRecord* Image::find_file(uint64_t id) const { return find_by_id(files, id); }

}  // namespace pipecr
