// image_restore_fuzz.cpp: libFuzzer target for restore driven by an untrusted image: parse(),
// validate() (src/image/validate.cpp), and the in-process restore into the calling process
// (restore_pipe(): capacity, refill, owner, flags, fd install), all under ASan/UBSan.
//
// As in image_reader_fuzz.cpp, each input is tried as it is and with its checksums recomputed, so
// that mutations reach the decoders, the validator and restore. For each image that parses:
//   - every anonymous pipe is rebuilt with restore::set_capacity() + restore::refill() WITHOUT
//     validate() first: refill must never write past a buffer or crash whatever the record says;
//     it may only fail cleanly;
//   - restore_pipe() is called; it validates itself. The oracle: an image that validate() accepts is
//     never refused as bad_image later (validate() is complete), and when the restore succeeds the
//     new pipe holds exactly the recorded bytes (FIONREAD and a read of everything) and both fds are
//     new ones; an image that validate() refuses is refused by restore_pipe() as bad_image too.
// Named FIFOs are not restored (their paths are real files of this machine: the fuzzer must not
// open other people's FIFOs); unlinked FIFOs are, in a private directory under $TMPDIR or /tmp.
// A violation aborts, which libFuzzer reports as a crash.
#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <xxhash.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "image/encoding.hpp"
#include "image/image_io.hpp"
#include "image/validate.hpp"
#include "pipecr/pipe.hpp"
#include "restore/pipe.hpp"
#include "sys/syscalls.hpp"
#include "sys/unique_fd.hpp"

namespace {

using pipecr::image::get_le;

void put_le64_at(std::vector<std::byte>& b, size_t at, uint64_t v) {
  for (size_t i = 0; i < 8; ++i) b[at + i] = static_cast<std::byte>((v >> (8 * i)) & 0xFF);
}

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

// Refill without validation: must not crash, may fail.
void raw_refill(const pipecr::Image& img) {
  size_t done = 0;
  for (const pipecr::PipeRecord& p : img.pipes) {
    if (p.kind != pipecr::PipeKind::anonymous || ++done > 4) continue;
    auto ends = pipecr::sys::make_pipe(O_CLOEXEC);
    if (!ends) std::abort();
    pipecr::restore::RefillOptions opts{true, false};
    if (!pipecr::restore::set_capacity(ends->write.get(), p, opts)) continue;
    (void)pipecr::restore::refill(ends->write.get(), p, opts);
  }
}

bool named_fifo(const pipecr::Image& img) {
  for (const pipecr::PipeRecord& p : img.pipes)
    if (p.kind == pipecr::PipeKind::fifo && !p.unlinked) return true;
  return false;
}

void check_restored(const pipecr::PipeRecord& p, int rfd) {
  int queued = -1;
  if (::ioctl(rfd, FIONREAD, &queued) < 0 || static_cast<uint64_t>(queued) != p.bytes()) std::abort();
  std::vector<std::byte> got(p.bytes() + 1);
  size_t have = 0;
  int fl = ::fcntl(rfd, F_GETFL);
  ::fcntl(rfd, F_SETFL, fl | O_NONBLOCK);
  for (;;) {
    ssize_t n = ::read(rfd, got.data() + have, got.size() - have);
    if (n <= 0) break;
    have += static_cast<size_t>(n);
    if (have == got.size()) break;
  }
  if (have != p.bytes() || (have && std::memcmp(got.data(), p.data.data(), have) != 0)) std::abort();
}

void one(std::span<const std::byte> bytes) {
  auto img = pipecr::image::parse(bytes);
  if (!img) return;
  raw_refill(*img);
  if (named_fifo(*img)) return;
  const bool valid = static_cast<bool>(pipecr::image::validate(*img));
  auto r = pipecr::restore_pipe(bytes, -1, -1);
  if (!r) {
    if (valid && r.error().kind == pipecr::Errc::bad_image) std::abort();  // validate() missed a rule
    if (!valid && r.error().kind != pipecr::Errc::bad_image) std::abort();  // refused late, or for another reason
    return;
  }
  if (!valid) std::abort();  // restored what validate() refuses
  pipecr::sys::UniqueFd rfd(r->read_fd), wfd(r->write_fd);
  if (r->read_fd <= 2 || r->write_fd <= 2 || r->read_fd == r->write_fd) std::abort();
  check_restored(img->pipes.front(), rfd.get());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto in = std::as_bytes(std::span(data, size));
  one(in);
  std::vector<std::byte> sealed(in.begin(), in.end());
  reseal(sealed);
  one(sealed);
  return 0;
}
