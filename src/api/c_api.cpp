// c_api.cpp: the C API (include/pipecr/pipecr.h) over the C++ API. Errors become -errno.
#include <cerrno>
#include <cstring>

#include "pipecr/pipe.hpp"
#include "pipecr/pipecr.h"

extern "C" long pipecr_ckpoint_pipe(int fd, void* img, size_t img_size, size_t* needed) {
  if (img == nullptr && img_size != 0) return -EINVAL;
  auto bytes = pipecr::checkpoint_pipe(fd);
  if (!bytes) return bytes.error().negative_errno();
  if (bytes->size() > img_size) {
    if (needed) *needed = bytes->size();
    return -ENOSPC;
  }
  std::memcpy(img, bytes->data(), bytes->size());
  if (needed) *needed = bytes->size();
  return static_cast<long>(bytes->size());
}

extern "C" int pipecr_restore_pipe(int fd[2], const void* img, size_t img_size) {
  if (fd == nullptr || (img == nullptr && img_size != 0)) return -EINVAL;
  auto r = pipecr::restore_pipe({static_cast<const std::byte*>(img), img_size}, fd[0], fd[1]);
  if (!r) return r.error().negative_errno();
  fd[0] = r->read_fd;
  fd[1] = r->write_fd;
  return 0;
}

extern "C" const char* pipecr_strerror(int negative_errno) {
  switch (-negative_errno) {
    case 0: return "success";
    case EBADMSG: return "image corrupt or truncated";
    case EPROTONOSUPPORT: return "image format version or record not supported";
    case EINVAL: return "invalid argument";
    case ENOSPC: return "image buffer too small";
    case ENOTSUP: return "not a pipe or FIFO, or a notification pipe";
    case EPERM: return "not permitted (pipe capacity above pipe-max-size without CAP_SYS_RESOURCE?)";
    case EBADF: return "fd not open";
    default: return std::strerror(-negative_errno);
  }
}
