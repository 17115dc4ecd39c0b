/* pipecr.h: the C API of pipecr, the checkpoint/restore engine for Linux pipes.
 *
 * Usable from C and C++. Both calls work on the calling process only; for other processes use the
 * `pipecr` command or the C++ API. Errors are returned as negative errno values; no call prints,
 * exits or leaves a fd of the caller changed when it fails. */
#ifndef PIPECR_PIPECR_H
#define PIPECR_PIPECR_H

#include <stddef.h>

#include "pipecr/export.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PIPECR_FORMAT_VERSION 1

/* Checkpoint the pipe behind fd (either end, or a FIFO) into img. Returns the image's size in bytes (> 0) or
   -errno. If img_size is too small it returns -ENOSPC and, when needed is not NULL, stores the size required in
   *needed; img may be NULL with img_size 0 to ask for the size. The pipe is left untouched.
   Other errors: -EBADF (fd not open), -ENOTSUP (not a pipe or FIFO, or a notification pipe). */
PIPECR_API long pipecr_ckpoint_pipe(int fd, void *img, size_t img_size, size_t *needed);

/* Restore the pipe in img: fd[0] receives the read end, fd[1] the write end. On input fd[i] >= 0 asks for that fd
   number (whatever is open there is replaced), -1 for any free number. Returns 0 or -errno: -EBADMSG for a corrupt
   or truncated image, or one that cannot be restored exactly on this machine (slots longer than its page size,
   a capacity F_SETPIPE_SZ cannot set, a relative FIFO path, a mode beyond 0777), -EPROTONOSUPPORT for an unknown format version, -EINVAL for bad arguments, -EPERM when the
   recorded capacity is above /proc/sys/fs/pipe-max-size and the caller lacks CAP_SYS_RESOURCE. On failure no fd
   of the caller is changed. */
PIPECR_API int pipecr_restore_pipe(int fd[2], const void *img, size_t img_size);

/* The library's version, "MAJOR.MINOR.PATCH". */
PIPECR_API const char *pipecr_version(void);

/* A static description of a negative errno returned above ("pipe capacity above pipe-max-size" ...), never NULL. */
PIPECR_API const char *pipecr_strerror(int negative_errno);

#ifdef __cplusplus
}
#endif

#endif /* PIPECR_PIPECR_H */
