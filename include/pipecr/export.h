/* export.h: PIPECR_API marks what libpipecr.so exports; everything else is built hidden. */
#ifndef PIPECR_EXPORT_H
#define PIPECR_EXPORT_H
#define PIPECR_API __attribute__((visibility("default")))
#endif
