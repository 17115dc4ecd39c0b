// info.hpp: the ImageInfo of an image made now, on this machine.
#pragma once

#include <string>

#include "pipecr/image.hpp"

namespace pipecr::image {

[[nodiscard]] ImageInfo current_info();

// /proc/sys/kernel/random/boot_id of this boot, "" when it cannot be read.
[[nodiscard]] std::string boot_id();

}  // namespace pipecr::image
