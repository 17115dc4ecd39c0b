// restore/open_file.cpp: the state of an open file description, whatever its kind (open_file.hpp).
#include "restore/open_file.hpp"

#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <fmt/format.h>

#include "sys/syscalls.hpp"

namespace pipecr::restore {
namespace {

// Switches this thread's real and effective uid for the lifetime of the object (raw syscall: glibc's
// setresuid would switch every thread of the process). Keeps saved uid so it can switch back.
class ThreadCreds {
 public:
  ThreadCreds(uid_t ruid, uid_t euid) {
    ::getresuid(&r_, &e_, &s_);
    if (ruid == r_ && euid == e_) return;
    ok_ = ::syscall(SYS_setresuid, ruid, euid, -1) == 0;
    switched_ = ok_;
  }
  ~ThreadCreds() {
    if (switched_) ::syscall(SYS_setresuid, r_, e_, s_);
  }
  ThreadCreds(const ThreadCreds&) = delete;
  ThreadCreds& operator=(const ThreadCreds&) = delete;

 private:
  uid_t r_ = 0, e_ = 0, s_ = 0;
  bool ok_ = true;
  bool switched_ = false;
};

}  // namespace

Expected<void> set_file_state(int fd, const FileRecord& file, bool keep_async) {
  auto fl = sys::get_fl(fd);
  if (!fl) return tl::unexpected(fl.error());
  constexpr int kSettable = O_NONBLOCK | O_DIRECT;
  int want = (*fl & ~(kSettable | (keep_async ? 0 : O_ASYNC))) | (static_cast<int>(file.flags) & kSettable);
  if (want != *fl)
    if (auto s = sys::set_fl(fd, want); !s) return s;
  if (file.owner.pid != 0) {
    struct f_owner_ex own {static_cast<__pid_type>(file.owner.type), file.owner.pid};
    // F_SETOWN records the caller's uid/euid for the permission check on each signal; take the
    // recorded ones where this thread may switch to them.
    ThreadCreds creds(file.owner.has_uids ? file.owner.uid : ::getuid(),
                      file.owner.has_uids ? file.owner.euid : ::geteuid());
    if (::fcntl(fd, F_SETOWN_EX, &own) < 0)
      return tl::unexpected(sys::call_error(
          "fcntl", fmt::format("fd={}, F_SETOWN_EX, type={}, pid={}", fd, file.owner.type, file.owner.pid)));
  }
  if (file.signal != 0 && ::fcntl(fd, F_SETSIG, file.signal) < 0)
    return tl::unexpected(sys::call_error("fcntl", fmt::format("fd={}, F_SETSIG, {}", fd, file.signal)));
  return {};
}

Expected<void> apply_file_state(int fd, const FileRecord& file, std::vector<std::string>& notes) {
  auto ok = set_file_state(fd, file);
  if (ok || file.owner.pid == 0) return ok;
  FileRecord no_owner = file;
  no_owner.owner = Owner{};
  if (auto again = set_file_state(fd, no_owner); !again) return again;
  notes.push_back(fmt::format("pipe {} file {}: signal owner not set: {}", file.pipe_id, file.id, ok.error().what));
  return {};
}

Expected<void> set_async(int fd, const FileRecord& file) {
  if (!(file.flags & O_ASYNC)) return {};
  auto fl = sys::get_fl(fd);
  if (!fl) return tl::unexpected(fl.error());
  return sys::set_fl(fd, *fl | O_ASYNC);
}

Expected<sys::UniqueFd> reopen(int fd, int mode) {
  std::string self = fmt::format("/proc/self/fd/{}", fd);
  sys::UniqueFd out(::open(self.c_str(), mode | O_NONBLOCK | O_CLOEXEC));
  if (!out)
    return tl::unexpected(sys::call_error(
        "open", fmt::format("{}, {}", self, mode == O_RDONLY ? "O_RDONLY" : mode == O_WRONLY ? "O_WRONLY" : "O_RDWR")));
  return out;
}

}  // namespace pipecr::restore
