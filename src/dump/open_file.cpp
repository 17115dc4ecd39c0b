// dump/open_file.cpp: the state of an open file description, whatever its kind (open_file.hpp).
#include "dump/open_file.hpp"

#include <fcntl.h>

#include <fmt/format.h>

#include "sys/syscalls.hpp"

#ifndef F_GETOWNER_UIDS
#define F_GETOWNER_UIDS 17  // <linux/fcntl.h>: not in glibc's <fcntl.h>
#endif

namespace pipecr::dump {

Expected<FileRecord> file_state(int fd, bool with_flags) {
  FileRecord f;
  if (with_flags) {
    auto fl = sys::get_fl(fd);
    if (!fl) return tl::unexpected(fl.error());
    f.flags = static_cast<uint32_t>(*fl);
  }
  struct f_owner_ex own {};
  if (::fcntl(fd, F_GETOWN_EX, &own) < 0)
    return tl::unexpected(sys::call_error("fcntl", fmt::format("fd={}, F_GETOWN_EX", fd)));
  f.owner.type = own.type;
  f.owner.pid = own.pid;
  if (own.pid != 0) {
    uint32_t uids[2] = {0, 0};
    if (::fcntl(fd, F_GETOWNER_UIDS, uids) == 0) {
      f.owner.has_uids = true;
      f.owner.uid = uids[0];
      f.owner.euid = uids[1];
    }
  }
  int sig = ::fcntl(fd, F_GETSIG);
  if (sig < 0) return tl::unexpected(sys::call_error("fcntl", fmt::format("fd={}, F_GETSIG", fd)));
  f.signal = sig;
  return f;
}

}  // namespace pipecr::dump
