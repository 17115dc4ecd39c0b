// mapped_file.cpp: an image file mapped read-only, so parse() and a restore read the pipe data
// straight from the page cache: PipeRecord::data points into the mapping and nothing is copied.
//
// The fd is closed once the mapping exists (a mapping keeps the file alive). An empty file cannot
// be mapped (mmap of length 0 is EINVAL), so it becomes an empty span, which parse() refuses as a
// truncated image. Only regular files are mapped: a pipe or a tty has no pages to map.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <utility>

#include <fmt/format.h>

#include "image/image_io.hpp"
#include "sys/syscalls.hpp"
#include "sys/unique_fd.hpp"

namespace pipecr::image {

Expected<MappedFile> MappedFile::open(const std::string& path) {
  sys::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return tl::unexpected(sys::call_error("open", fmt::format("\"{}\", O_RDONLY", path)));
  struct stat st {};
  if (::fstat(fd.get(), &st) < 0) return tl::unexpected(sys::call_error("fstat", fmt::format("\"{}\"", path)));
  if (!S_ISREG(st.st_mode))
    return fail(Errc::invalid_argument, 0, fmt::format("image file \"{}\" is not a regular file", path));
  if (st.st_size == 0) return MappedFile(nullptr, 0);
  auto size = static_cast<size_t>(st.st_size);
  void* addr = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd.get(), 0);
  if (addr == MAP_FAILED)
    return tl::unexpected(sys::call_error("mmap", fmt::format("\"{}\", len={}, PROT_READ, MAP_PRIVATE", path, size)));
  return MappedFile(addr, size);
}

MappedFile::MappedFile(MappedFile&& o) noexcept
    : addr_(std::exchange(o.addr_, nullptr)), size_(std::exchange(o.size_, 0)) {}

MappedFile& MappedFile::operator=(MappedFile&& o) noexcept {
  if (this != &o) {
    std::swap(addr_, o.addr_);
    std::swap(size_, o.size_);
  }
  return *this;
}

MappedFile::~MappedFile() {
  if (addr_) ::munmap(addr_, size_);
}

}  // namespace pipecr::image
