// pipe_api.cpp: the in-process checkpoint, checkpoint_pipe(): a thin layer over the dump engine.
//
// The calling process is one more target of dump/process.cpp (dump_self_pipe): the same collection,
// records and writer as `pipecr dump`, with the caller's own fds as the source (a copy is a dup(),
// nothing is stopped). The image goes to memory.
#include "dump/process.hpp"
#include "image/image_io.hpp"
#include "pipecr/pipe.hpp"

namespace pipecr {

Expected<std::vector<std::byte>> checkpoint_pipe(int fd) {
  image::MemorySink sink;
  if (auto ok = dump::dump_self_pipe(fd, sink); !ok) return tl::unexpected(ok.error());
  return std::move(sink.bytes());
}

}  // namespace pipecr
