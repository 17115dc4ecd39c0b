/* version.c: the one C translation unit of libpipecr; it anchors the shared library's link. */
const char *pipecr_version(void) { return "0.1.0"; }
