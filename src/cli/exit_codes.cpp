// exit_codes.cpp: Errc -> sysexits code. One switch, no default, so that a new Errc fails to
// compile with -Wall (-Wswitch) until it is given a code here.
#include "cli/exit_codes.hpp"

namespace pipecr::cli {

int exit_code_for(Errc kind) {
  switch (kind) {
    case Errc::system: return kExitSystem;
    case Errc::bad_image: return kExitBadImage;
    case Errc::image_version: return kExitBadImage;
    case Errc::unsupported: return kExitUnsupported;
    case Errc::capacity: return kExitUnsupported;
    case Errc::gone: return kExitGone;
    case Errc::permission: return kExitPermission;
    case Errc::invalid_argument: return kExitUsage;
    case Errc::no_space: return kExitSystem;
    case Errc::not_found: return kExitNoImage;
    case Errc::cannot_create: return kExitCantCreate;
  }
  return kExitSystem;
}

int exit_code_for(const Error& e) { return exit_code_for(e.kind); }

const char* exit_codes_help() {
  return "Exit codes:\n"
         "  0   success\n"
         "  64  bad command line\n"
         "  65  image corrupt, not supported, or refused on this machine\n"
         "  66  image not found or not a regular file\n"
         "  69  kernel or object not supported (not a pipe, capacity not allowed, feature missing)\n"
         "  71  other system error\n"
         "  73  cannot create the output, or it is not a regular file\n"
         "  75  a target process is gone\n"
         "  77  permission denied";
}

}  // namespace pipecr::cli
