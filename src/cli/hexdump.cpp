// hexdump.cpp: see hexdump.hpp.
#include "cli/hexdump.hpp"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

namespace pipecr::cli {
namespace {

constexpr size_t kLine = 16;

void append_line(std::string& out, std::span<const std::byte> line, uint64_t offset) {
  static constexpr char kHex[] = "0123456789abcdef";
  out += fmt::format("{:08x}  ", offset);
  for (size_t i = 0; i < kLine; ++i) {
    if (i < line.size()) {
      auto b = static_cast<unsigned char>(line[i]);
      out += kHex[b >> 4];
      out += kHex[b & 15];
      out += ' ';
    } else {
      out += "   ";
    }
    if (i == 7) out += ' ';
  }
  out += " |";
  for (std::byte c : line) {
    auto b = static_cast<unsigned char>(c);
    out += (b >= 0x20 && b < 0x7f) ? static_cast<char>(b) : '.';
  }
  out += "|\n";
}

}  // namespace

std::string format_hexdump(std::span<const std::byte> data, uint64_t base) {
  std::string out;
  out.reserve((data.size() / kLine + 2) * 80);
  bool squeezing = false;
  for (size_t off = 0; off < data.size(); off += kLine) {
    auto line = data.subspan(off, std::min(kLine, data.size() - off));
    bool same = off >= kLine && line.size() == kLine &&
                std::memcmp(line.data(), data.data() + off - kLine, kLine) == 0;
    if (same) {
      if (!squeezing) out += "*\n";
      squeezing = true;
      continue;
    }
    squeezing = false;
    append_line(out, line, base + off);
  }
  if (!data.empty()) out += fmt::format("{:08x}\n", base + data.size());
  return out;
}

}  // namespace pipecr::cli
