// hexdump.hpp: bytes as `hexdump -C` shows them, for `pipecr peek` on a terminal.
//
// Lines of 16 bytes: an 8-digit hex offset, the bytes in hex in two groups of 8, and the printable
// ASCII between bars; a run of lines identical to the one before collapses into one "*" line, and
// a last line gives the total length, so a 64 KiB pipe of zeros is three lines.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace pipecr::cli {

// The whole dump, ending with a newline. `base` is the offset shown for data[0].
[[nodiscard]] std::string format_hexdump(std::span<const std::byte> data, uint64_t base = 0);

}  // namespace pipecr::cli
