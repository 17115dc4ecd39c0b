// image_file.cpp: writing a dump to a file atomically.
//
// Only a regular file is ever written: the path is checked first (lstat, then stat through a
// symbolic link). A device node, a FIFO, a socket or a directory is refused (Errc::cannot_create,
// exit 73), whether named directly or through a symbolic link (/proc/self/fd/1 of a terminal or a
// pipe, a link to /dev/null): as root, renaming an image over /dev/null would replace it. A symbolic
// link to a regular file (or to a missing file in an existing directory) is followed: the image
// replaces the file it points to, and the link stays. To write an image to stdout, the CLI passes
// `-` and streams (cmd_dump.cpp); it never comes here.
//
// The image is written to an unnamed file (O_TMPFILE) in the target directory, synced, linked under
// a temporary name and renamed over the path: a dump that fails or is killed leaves nothing at the
// path (at worst, when killed between link and rename, a ".pipecr-*" file beside it). Where the
// filesystem has no O_TMPFILE, a mkstemp() file is used and unlinked on failure.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <random>
#include <string>

#include <fmt/format.h>

#include "dump/process.hpp"
#include "sys/syscalls.hpp"

namespace pipecr::dump {
namespace {

std::string dir_of(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

Error cannot_create(const std::string& path, const char* call) {
  int err = errno;
  Error e = errno_error(err, fmt::format("{}({})", call, path));
  e.kind = Errc::cannot_create;
  return e;
}

// The path the image will be renamed to: path itself, or what its symbolic link resolves to, as
// long as that is a regular file or does not exist yet. Errc::cannot_create otherwise.
Expected<std::string> output_path(const std::string& path) {
  if (path.empty()) return fail(Errc::invalid_argument, EINVAL, "the output path is empty");
  struct stat st {};
  if (::lstat(path.c_str(), &st) < 0) {
    if (errno == ENOENT) return path;  // a new file (a missing directory fails at open)
    return tl::unexpected(cannot_create(path, "lstat"));
  }
  if (S_ISREG(st.st_mode)) return path;
  if (!S_ISLNK(st.st_mode))
    return fail(Errc::cannot_create, EEXIST,
                fmt::format("\"{}\" is {}: dump -o writes only a regular file (or `-` for stdout)", path,
                            image::file_type_name(st.st_mode)));
  std::string target;
  if (::stat(path.c_str(), &st) == 0) {
    if (!S_ISREG(st.st_mode))
      return fail(Errc::cannot_create, EEXIST,
                  fmt::format("\"{}\" is a symbolic link to {}: dump -o writes only a regular file (or `-` for "
                              "stdout)",
                              path, image::file_type_name(st.st_mode)));
    char* real = ::realpath(path.c_str(), nullptr);
    if (!real) return tl::unexpected(cannot_create(path, "realpath"));
    target = real;
    std::free(real);
    return target;
  }
  if (errno != ENOENT) return tl::unexpected(cannot_create(path, "stat"));
  // A dangling link: refused rather than guessed at (its target may name a FIFO-to-be, a /proc link...).
  return fail(Errc::cannot_create, ENOENT,
              fmt::format("\"{}\" is a symbolic link to a missing file: give the file's own path", path));
}

class OutputFile {
 public:
  explicit OutputFile(std::string path) : path_(std::move(path)) {}
  ~OutputFile() {
    if (!named_.empty()) ::unlink(named_.c_str());
  }

  Expected<int> open() {
    fd_.reset(::open(dir_of(path_).c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600));
    if (fd_) return fd_.get();
    std::string templ = fmt::format("{}/.pipecr-XXXXXX", dir_of(path_));
    fd_.reset(::mkostemp(templ.data(), O_CLOEXEC));
    if (!fd_) return tl::unexpected(cannot_create(path_, "open"));
    named_ = templ;
    return fd_.get();
  }

  Expected<void> commit() {
    if (::fchmod(fd_.get(), 0600) < 0 || ::fsync(fd_.get()) < 0) return tl::unexpected(cannot_create(path_, "fsync"));
    if (named_.empty()) {
      std::mt19937_64 rng(std::random_device{}());
      named_ = fmt::format("{}/.pipecr-{:016x}", dir_of(path_), rng());
      std::string self = fmt::format("/proc/self/fd/{}", fd_.get());
      if (::linkat(AT_FDCWD, self.c_str(), AT_FDCWD, named_.c_str(), AT_SYMLINK_FOLLOW) < 0) {
        named_.clear();
        return tl::unexpected(cannot_create(path_, "linkat"));
      }
    }
    // Checked again just before the rename: the dump may have taken a while.
    struct stat st {};
    if (::lstat(path_.c_str(), &st) == 0 && !S_ISREG(st.st_mode))
      return fail(Errc::cannot_create, EEXIST,
                  fmt::format("\"{}\" became {} during the dump: not replaced", path_, image::file_type_name(st.st_mode)));
    if (::rename(named_.c_str(), path_.c_str()) < 0) return tl::unexpected(cannot_create(path_, "rename"));
    named_.clear();
    return {};
  }

 private:
  std::string path_;
  std::string named_;  // a name the file has that is not path_ (removed unless committed)
  sys::UniqueFd fd_;
};

}  // namespace

Expected<DumpStats> dump_to_file(const DumpOptions& opts, const std::string& given, Image* records) {
  auto path = output_path(given);
  if (!path) return tl::unexpected(path.error());
  OutputFile out(*path);
  auto fd = out.open();
  if (!fd) return tl::unexpected(fd.error());
  image::FdSink sink(*fd, given);
  auto stats = dump_processes(opts, sink, records);
  if (!stats) return stats;
  if (auto f = sink.flush(); !f) return tl::unexpected(f.error());
  if (auto c = out.commit(); !c) return tl::unexpected(c.error());
  return stats;
}

}  // namespace pipecr::dump
