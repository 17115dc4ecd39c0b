// image_reader_fuzz.cpp: libFuzzer target for the image reader (src/image/reader.cpp).
//
// Every record carries an XXH3 checksum, so almost every mutation of a seed dies at the first
// checksum and the decoders behind it would never be reached. The target therefore parses each
// input twice: as it is (the checksum and framing code), and after recomputing the checksums of
// the header and of every record whose length fits (the decoders, the limits and the cross-record
// checks). Production code is the same in both: nothing is switched off for fuzzing.
//
// Whatever parses must survive a round trip: encode() must accept it (the writer must never be
// stricter than the reader) and re-encoding the re-parsed image must give the same bytes.
// A violation aborts, which libFuzzer reports as a crash.
#include <xxhash.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "image/encoding.hpp"
#include "image/image_io.hpp"

namespace {

using pipecr::image::get_le;

void put_le64_at(std::vector<std::byte>& b, size_t at, uint64_t v) {
  for (size_t i = 0; i < 8; ++i) b[at + i] = static_cast<std::byte>((v >> (8 * i)) & 0xFF);
}

// Recompute the header checksum and those of every well-framed record, in place.
void reseal(std::vector<std::byte>& b) {
  using namespace pipecr::image;
  if (b.size() < kFileHeaderSize) return;
  put_le64_at(b, 16, XXH3_64bits(b.data(), 16));
  size_t pos = kFileHeaderSize;
  while (b.size() - pos >= kRecordOverhead) {
    uint64_t len = get_le<uint64_t>(b.data() + pos + 8);
    if (len > b.size() - pos - kRecordOverhead) return;
    put_le64_at(b, pos + kRecordHeaderSize + len, XXH3_64bits(b.data() + pos, kRecordHeaderSize + len));
    pos += kRecordOverhead + len;
  }
}

void check_round_trip(const pipecr::Image& img) {
  auto first = pipecr::image::encode(img);
  if (!first) std::abort();  // the reader accepted what the writer refuses
  auto again = pipecr::image::parse(*first);
  if (!again) std::abort();  // the writer made what the reader refuses
  auto second = pipecr::image::encode(*again);
  if (!second || *second != *first) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto in = std::as_bytes(std::span(data, size));
  if (auto img = pipecr::image::parse(in)) check_round_trip(*img);
  std::vector<std::byte> sealed(in.begin(), in.end());
  reseal(sealed);
  if (auto img = pipecr::image::parse(sealed)) check_round_trip(*img);
  return 0;
}
