// image_file.cpp: writing a dump to a file atomically.
//
// The image is written to an unnamed file (O_TMPFILE) in the target directory, synced, linked under
// a temporary name and renamed over the path: a dump that fails or is killed leaves nothing at the
// path (at worst, when killed between link and rename, a ".pipecr-*" file beside it). Where the
// filesystem has no O_TMPFILE, a mkstemp() file is used and unlinked on failure.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
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

Expected<DumpStats> dump_to_file(const DumpOptions& opts, const std::string& path, Image* records) {
  OutputFile out(path);
  auto fd = out.open();
  if (!fd) return tl::unexpected(fd.error());
  image::FdSink sink(*fd, path);
  auto stats = dump_processes(opts, sink, records);
  if (!stats) return stats;
  if (auto f = sink.flush(); !f) return tl::unexpected(f.error());
  if (auto c = out.commit(); !c) return tl::unexpected(c.error());
  return stats;
}

}  // namespace pipecr::dump
