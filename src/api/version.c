/* version.c: the one C translation unit of libpipecr; it anchors the shared library's link. */
#include "pipecr/pipecr.h"

const char *pipecr_version(void) { return "0.1.0"; }
