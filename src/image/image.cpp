// image.cpp: lookups over the plain records of an Image.
#include "pipecr/image.hpp"

namespace pipecr {

const PipeRecord* Image::find_pipe(uint64_t id) const {
  for (const PipeRecord& p : pipes)
    if (p.id == id) return &p;
  return nullptr;
}

const FileRecord* Image::find_file(uint64_t id) const {
  for (const FileRecord& f : files)
    if (f.id == id) return &f;
  return nullptr;
}

}  // namespace pipecr
