// image_io.hpp: reading and writing pipecr images (format v1, docs/image-format.md).
//
// The writer streams: records go to a Sink as they are added, and a pipe's data is passed in
// chunks, so writing an image never holds more than one chunk of queued bytes. The reader
// takes the whole image as bytes in memory (a buffer, or a read-only mapping of the file),
// verifies every checksum, length and cross-reference, and returns plain records whose
// PipeRecord::data views those bytes: nothing is copied and nothing is parsed twice.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "pipecr/error.hpp"
#include "pipecr/image.hpp"

namespace pipecr::image {

// Where a Writer's bytes go.
class Sink {
 public:
  virtual ~Sink() = default;
  [[nodiscard]] virtual Expected<void> write(std::span<const std::byte> bytes) = 0;
};

class MemorySink final : public Sink {
 public:
  [[nodiscard]] Expected<void> write(std::span<const std::byte> bytes) override;
  [[nodiscard]] std::vector<std::byte>& bytes() { return buf_; }
 private:
  std::vector<std::byte> buf_;
};

// Appends to a fd (a file, a pipe), buffered; flush() before closing. `name` is used in errors.
class FdSink final : public Sink {
 public:
  FdSink(int fd, std::string name);
  ~FdSink() override;
  [[nodiscard]] Expected<void> write(std::span<const std::byte> bytes) override;
  [[nodiscard]] Expected<void> flush();
 private:
  [[nodiscard]] Expected<void> flush_direct(std::span<const std::byte> bytes);
  int fd_;
  std::string name_;
  std::vector<std::byte> buf_;
};

// Writes one image. Call begin(), then records in this order: processes, pipes (each pipe's
// record may be followed by its data: begin_data, data..., end_data), files, fds and epoll watches;
// then finish().
// The writer checks the order and the data lengths; misuse returns Errc::invalid_argument.
// It also refuses (invalid_argument, nothing written) any record the reader would refuse: zero or
// duplicate ids, references to records not yet added, slot lengths outside 1..page_size, strings
// over their limits. A failed Sink write, or end_data() short of the announced length, leaves the
// writer unusable (the output holds a partial record); other refusals leave it as it was.
class Writer {
 public:
  explicit Writer(Sink& sink);
  [[nodiscard]] Expected<void> begin(const ImageInfo& info);
  [[nodiscard]] Expected<void> add(const ProcessRecord& p);
  [[nodiscard]] Expected<void> add(const PipeRecord& p);  // metadata and slot table; not p.data
  [[nodiscard]] Expected<void> begin_data(uint64_t pipe_id, uint64_t len);
  [[nodiscard]] Expected<void> data(std::span<const std::byte> chunk);
  [[nodiscard]] Expected<void> end_data();
  [[nodiscard]] Expected<void> add(const FileRecord& f);
  [[nodiscard]] Expected<void> add(const FdRecord& f);  // tid != 0: a THREAD_FD record
  // In the fds section: after its FILE and its process's PROCESS record (optional record).
  [[nodiscard]] Expected<void> add(const InFlightRecord& f);
  // After the PROCESS records of both processes, before any PIPE.
  [[nodiscard]] Expected<void> add(const SharedFdTable& s);
  // In the fds section (after the FILE it names); optional record EPOLL_WATCH.
  [[nodiscard]] Expected<void> add(const EpollWatch& w);
  [[nodiscard]] Expected<void> finish();
  ~Writer();
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;

 private:
  struct State;
  State* st_;
};

// Parse and verify a whole image. Errors: Errc::bad_image (truncated, corrupt, inconsistent: the
// message names the byte offset and the problem), Errc::image_version (a format version or a
// required record type this build does not know).
[[nodiscard]] Expected<Image> parse(std::span<const std::byte> bytes);

// The first bytes of an image that check_head() looks at: the file header and the header of the
// first record.
inline constexpr size_t kHeadSize = 40;
// Checks the first bytes of an image before the rest is read, so that a source that is no image
// (a log file, /dev/zero on stdin) is refused at once instead of being copied whole: the magic, the
// file header's checksum and version, and that the first record is an INFO record whose length
// could fit in the `size` bytes of the image (pass UINT64_MAX when the size is not known, e.g. a
// pipe). `head` is the first min(kHeadSize, image size) bytes; what it does not hold is left to
// parse(), which reports a short image as truncated. Errors as parse(), with the same offsets (a
// first record that is not INFO is named as such before its length and checksum are read).
[[nodiscard]] Expected<void> check_head(std::span<const std::byte> head, uint64_t size);

// Encode a complete Image held in memory (PipeRecord::data set for every pipe with slots).
[[nodiscard]] Expected<std::vector<std::byte>> encode(const Image& img);

// An image file, or stdin, copied into a private unnamed spool file and mapped read-only
// (mapped_file.cpp says why). open("-") reads stdin. Errors: Errc::not_found (missing, or not a
// regular file: a FIFO, a directory, a device; opened without blocking), Errc::permission,
// Errc::invalid_argument (stdin is a terminal), Errc::bad_image or Errc::image_version (its first
// bytes are no image, check_head(): refused before anything is copied, the message starts with the
// file's name or "stdin"), Errc::system. An empty image maps to an empty span
// (which parse() refuses as truncated). The source may change or shrink afterwards: the mapping
// does not see it (no SIGBUS).
// What a file that is not a regular file is, for messages: "a directory", "a FIFO", "a socket" ...
[[nodiscard]] const char* file_type_name(mode_t m);

class MappedFile {
 public:
  [[nodiscard]] static Expected<MappedFile> open(const std::string& path);
  [[nodiscard]] static Expected<MappedFile> from_stdin();
  MappedFile(MappedFile&& o) noexcept;
  MappedFile& operator=(MappedFile&& o) noexcept;
  ~MappedFile();
  [[nodiscard]] std::span<const std::byte> bytes() const { return {static_cast<const std::byte*>(addr_), size_}; }

 private:
  MappedFile(void* addr, size_t size) : addr_(addr), size_(size) {}
  void* addr_ = nullptr;
  size_t size_ = 0;
};

}  // namespace pipecr::image
