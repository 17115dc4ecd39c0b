// mapped_file.cpp: an image, from a file or from stdin, held in a private spool and mapped
// read-only, so that parse() and a restore read the pipe data straight from the page cache:
// PipeRecord::data points into the mapping and nothing is copied to the heap.
//
// An image is untrusted input, and so is the file that holds it:
//   - the path is opened O_NONBLOCK|O_NOCTTY, and only a regular file is read: a FIFO would block
//     forever, a directory or a device is not an image (Errc::not_found, exit 66, naming the type);
//   - the first bytes (the file header and the first record's header, image::check_head()) are
//     checked before anything is copied: a file or a stdin that is no image (/dev/zero piped in) is
//     refused at once (Errc::bad_image, exit 65) instead of filling $TMPDIR;
//   - the bytes are copied (copy_file_range(), read()/write() where it is refused) into an unnamed
//     file (O_TMPFILE) in $TMPDIR or /tmp, which is then mapped. Mapping the user's file itself
//     would let anyone who can truncate it kill pipecr with SIGBUS in the middle of a show or a
//     restore; the spool has no name, only this process holds it, and a source that shrinks during
//     the copy just gives a shorter image, which parse() refuses as truncated. Memory stays
//     bounded (the spool is a file, not heap), and stdin (`-`) is spooled the same way, so the
//     whole image is parsed and validated before any target is touched. Cost, measured on ext4:
//     see docs/image-format.md, "Reading an image".
// The fds are closed once the mapping exists. An empty image maps to an empty span (which parse()
// refuses as truncated).
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdlib>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "image/encoding.hpp"
#include "image/image_io.hpp"
#include "sys/syscalls.hpp"
#include "sys/unique_fd.hpp"

namespace pipecr::image {
namespace {

Expected<sys::UniqueFd> make_spool() {
  const char* env = std::getenv("TMPDIR");
  std::string dir = env && *env ? env : "/tmp";
  sys::UniqueFd fd(::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600));
  if (fd) return fd;
  if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL)
    return tl::unexpected(sys::call_error("open", fmt::format("\"{}\", O_TMPFILE|O_RDWR (the image spool)", dir)));
  std::string templ = dir + "/.pipecr-spool-XXXXXX";  // no O_TMPFILE here: a named file, unlinked at once
  fd.reset(::mkostemp(templ.data(), O_CLOEXEC));
  if (!fd) return tl::unexpected(sys::call_error("mkostemp", templ));
  ::unlink(templ.c_str());
  return fd;
}

// Waits until fd can be read (stdin may be a non-blocking pipe or socket).
void wait_readable(int fd) {
  pollfd p{fd, POLLIN, 0};
  ::poll(&p, 1, -1);
}

Expected<void> write_all(int out, const std::byte* data, size_t len) {
  for (size_t done = 0; done < len;) {
    ssize_t w = ::write(out, data + done, len - done);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) return tl::unexpected(sys::call_error("write", "the image spool"));
    done += static_cast<size_t>(w);
  }
  return {};
}

// Reads the first kHeadSize bytes of `in` (fewer at its end) for check_head().
Expected<std::vector<std::byte>> read_head(int in, const std::string& name) {
  std::vector<std::byte> head(kHeadSize);
  size_t got = 0;
  while (got < head.size()) {
    ssize_t n = ::read(in, head.data() + got, head.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) {
      wait_readable(in);
      continue;
    }
    if (n < 0) return tl::unexpected(sys::call_error("read", name));
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  head.resize(got);
  return head;
}

// check_head()'s refusal, named after the source as parse()'s are by the commands.
Expected<void> check_head_of(std::span<const std::byte> head, uint64_t size, const std::string& name) {
  auto ok = check_head(head, size);
  if (!ok) return tl::unexpected(Error{ok.error().kind, EBADMSG, fmt::format("{}: {}", name, ok.error().what)});
  return {};
}

// Copies everything `in` has left to `out`. Returns the bytes copied.
Expected<uint64_t> copy_all(int in, int out, const std::string& name) {
  uint64_t total = 0;
  bool kernel_copy = true;
  std::vector<char> buf;
  for (;;) {
    ssize_t n;
    if (kernel_copy) {
      n = ::copy_file_range(in, nullptr, out, nullptr, size_t{1} << 30, 0);
      if (n < 0 && (errno == EXDEV || errno == EINVAL || errno == EOPNOTSUPP || errno == ENOSYS || errno == EBADF)) {
        kernel_copy = false;  // a pipe, a tty, another filesystem on an old kernel: copy by hand
        continue;
      }
    } else {
      if (buf.empty()) buf.resize(1 << 20);
      n = ::read(in, buf.data(), buf.size());
      if (n > 0)
        if (auto ok = write_all(out, reinterpret_cast<const std::byte*>(buf.data()), static_cast<size_t>(n)); !ok)
          return tl::unexpected(ok.error());
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) {  // stdin is a non-blocking pipe or socket: wait for it
      wait_readable(in);
      continue;
    }
    if (n < 0) return tl::unexpected(sys::call_error(kernel_copy ? "copy_file_range" : "read", name));
    if (n == 0) return total;
    total += static_cast<uint64_t>(n);
  }
}

struct Mapping {
  void* addr = nullptr;
  size_t size = 0;
};

Expected<Mapping> map_spool(int fd, uint64_t size, const std::string& name) {
  if (size == 0) return Mapping{};
  if (size > SIZE_MAX) return fail(Errc::system, EFBIG, fmt::format("{} is too large to map", name));
  void* addr = ::mmap(nullptr, static_cast<size_t>(size), PROT_READ, MAP_PRIVATE, fd, 0);
  if (addr == MAP_FAILED)
    return tl::unexpected(sys::call_error("mmap", fmt::format("the spool of {}, len={}", name, size)));
  return Mapping{addr, static_cast<size_t>(size)};
}

}  // namespace

const char* file_type_name(mode_t m) {
  if (S_ISDIR(m)) return "a directory";
  if (S_ISFIFO(m)) return "a FIFO";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  if (S_ISSOCK(m)) return "a socket";
  if (S_ISLNK(m)) return "a symbolic link";
  return "not a regular file";
}

// An unnamed, unlinked file in $TMPDIR (or /tmp) that only this process holds.
Expected<MappedFile> MappedFile::open(const std::string& path) {
  if (path == "-") return from_stdin();
  sys::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC));
  if (!fd) return tl::unexpected(sys::call_error("open", fmt::format("\"{}\", O_RDONLY|O_NONBLOCK", path)));
  struct stat st {};
  if (::fstat(fd.get(), &st) < 0) return tl::unexpected(sys::call_error("fstat", fmt::format("\"{}\"", path)));
  if (!S_ISREG(st.st_mode))
    return fail(Errc::not_found, EINVAL,
                fmt::format("image \"{}\" is {}, not a regular file (give `-` to read an image from stdin)", path,
                            file_type_name(st.st_mode)));
  // A file that is no image (a log file, a disk image given by mistake) is refused before it is
  // copied; a short file is copied and refused by parse() with its offset.
  const std::string name = fmt::format("\"{}\"", path);
  std::array<std::byte, kHeadSize> head{};
  ssize_t got = ::pread(fd.get(), head.data(), head.size(), 0);
  if (got < 0) return tl::unexpected(sys::call_error("pread", name));
  if (auto ok = check_head_of(std::span(head).first(static_cast<size_t>(got)), static_cast<uint64_t>(st.st_size),
                              name);
      !ok)
    return tl::unexpected(ok.error());
  auto spool = make_spool();
  if (!spool) return tl::unexpected(spool.error());
  auto size = copy_all(fd.get(), spool->get(), name);
  if (!size) return tl::unexpected(size.error());
  auto m = map_spool(spool->get(), *size, fmt::format("\"{}\"", path));
  if (!m) return tl::unexpected(m.error());
  return MappedFile(m->addr, m->size);
}

Expected<MappedFile> MappedFile::from_stdin() {
  struct stat st {};
  if (::fstat(STDIN_FILENO, &st) < 0) return tl::unexpected(sys::call_error("fstat", "stdin"));
  if (::isatty(STDIN_FILENO))
    return fail(Errc::invalid_argument, EINVAL, "stdin is a terminal: pipe an image into `-` (pipecr dump -o - | ...)");
  if (S_ISDIR(st.st_mode))
    return fail(Errc::not_found, EINVAL, "stdin is a directory, not an image");
  // The head is read and checked before the spool is made: garbage on stdin (/dev/zero) is refused
  // at once, not copied until $TMPDIR is full. Its size is not known (a pipe).
  auto head = read_head(STDIN_FILENO, "stdin");
  if (!head) return tl::unexpected(head.error());
  if (auto ok = check_head_of(*head, UINT64_MAX, "stdin"); !ok) return tl::unexpected(ok.error());
  auto spool = make_spool();
  if (!spool) return tl::unexpected(spool.error());
  if (auto ok = write_all(spool->get(), head->data(), head->size()); !ok) return tl::unexpected(ok.error());
  auto size = copy_all(STDIN_FILENO, spool->get(), "stdin");
  if (!size) return tl::unexpected(size.error());
  *size += head->size();
  auto m = map_spool(spool->get(), *size, "stdin");
  if (!m) return tl::unexpected(m.error());
  return MappedFile(m->addr, m->size);
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
