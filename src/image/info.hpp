// info.hpp: the ImageInfo of an image made now, on this machine.
#pragma once

#include "pipecr/image.hpp"

namespace pipecr::image {

[[nodiscard]] ImageInfo current_info();

}  // namespace pipecr::image
