// info.cpp: page size, time, kernel release and tool version stamped into every image.
#include "image/info.hpp"

#include <sys/utsname.h>
#include <unistd.h>

#include <chrono>
#include <fstream>

namespace pipecr::image {

std::string boot_id() {
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::string id;
  if (!std::getline(in, id) || id.size() > 64) return {};
  return id;
}

ImageInfo current_info() {
  ImageInfo info;
  info.page_size = static_cast<uint32_t>(::sysconf(_SC_PAGESIZE));
  info.created_unix_ns = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count());
  struct utsname u {};
  if (::uname(&u) == 0) info.kernel = u.release;
  info.tool = "pipecr 0.1.0";
  info.boot_id = boot_id();
  return info;
}

}  // namespace pipecr::image
