// packer_test.cpp: SnapshotPacker::add_unknown(), the snapshot without FIONREAD, on real pipes:
// an empty pipe costs one tee and no FIONREAD (with and without a writer), nor does a pipe with
// bytes while its scratch pipe has room; a full pipe and a packet pipe come back byte for byte with
// their slot layout and are left as they were, a write end is EBADF, and the two cases where the
// tee's answer is ambiguous (an EAGAIN into a scratch pipe that is full, a tee cut short by one)
// ask FIONREAD and still put every byte where it belongs (settle(), where()).
#include <fcntl.h>
#include <unistd.h>

#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "dump/pipe.hpp"
#include "sys/syscalls.hpp"

namespace pipecr::dump {
namespace {

constexpr size_t kPage = 4096;

sys::PipePair pipe_of(int flags, int size = 0) {
  auto p = sys::make_pipe(O_CLOEXEC | O_NONBLOCK | flags);
  EXPECT_TRUE(p) << p.error().what;
  if (size > 0) {
    auto s = sys::set_pipe_size(p->read.get(), size);
    EXPECT_TRUE(s) << s.error().what;
  }
  return std::move(*p);
}

// Writes `n` bytes of `fill` as one write (one slot per page, or per packet on a packet pipe).
void put(int fd, size_t n, char fill) {
  std::string s(n, fill);
  ASSERT_EQ(::write(fd, s.data(), s.size()), static_cast<ssize_t>(n));
}

int queued(int fd) {
  auto q = sys::bytes_queued(fd);
  return q ? *q : -1;
}

std::string as_string(const std::vector<std::byte>& b) {
  return std::string(reinterpret_cast<const char*>(b.data()), b.size());
}

// /proc/sys/fs/pipe-max-size: the size of the packer's scratch pipes.
size_t pipe_max() {
  static const size_t size = [] {
    auto p = sys::make_pipe(O_CLOEXEC);
    if (!p) return size_t{0};
    size_t s = 1 << 20;
    while (s > kPage && !sys::set_pipe_size(p->read.get(), static_cast<int>(s))) s /= 2;
    return s;
  }();
  return size;
}

TEST(SnapshotPacker, EmptyPipeIsOneTeeWithoutFionread) {
  SnapshotPacker packer;
  using Writers = SnapshotPacker::Writers;
  Writers writers = Writers::unknown;
  auto with_writer = pipe_of(0);
  auto piece = packer.add_unknown(with_writer.read.get(), &writers);  // EAGAIN into a fresh scratch pipe
  ASSERT_TRUE(piece) << piece.error().what;
  EXPECT_EQ(piece->bytes, 0u);
  EXPECT_EQ(writers, Writers::some);

  auto no_writer = pipe_of(0);
  no_writer.write.reset();
  piece = packer.add_unknown(no_writer.read.get(), &writers);  // tee returns 0: no writer
  ASSERT_TRUE(piece) << piece.error().what;
  EXPECT_EQ(piece->bytes, 0u);
  EXPECT_EQ(writers, Writers::none);
  EXPECT_EQ(packer.fionread_calls(), 0u);
  EXPECT_EQ(packer.scratch_pipes(), 1u);

  // Once the scratch pipe holds bytes, an EAGAIN may mean "full": poll() on the scratch pipe
  // (room left) decides "empty", and whether a writer is open is not known.
  auto data = pipe_of(0);
  put(data.write.get(), 7, 'd');
  piece = packer.add_unknown(data.read.get(), &writers);
  ASSERT_TRUE(piece) << piece.error().what;
  EXPECT_EQ(piece->bytes, 7u);
  EXPECT_EQ(writers, Writers::unknown);
  piece = packer.add_unknown(with_writer.read.get(), &writers);
  ASSERT_TRUE(piece) << piece.error().what;
  EXPECT_EQ(piece->bytes, 0u);
  EXPECT_EQ(writers, Writers::unknown);
  ASSERT_TRUE(packer.settle());
  EXPECT_EQ(packer.fionread_calls(), 0u);
}

TEST(SnapshotPacker, WriteEndIsEbadf) {
  SnapshotPacker packer;
  auto p = pipe_of(0);
  put(p.write.get(), 10, 'w');
  auto piece = packer.add_unknown(p.write.get());
  ASSERT_FALSE(piece);
  EXPECT_EQ(piece.error().err, EBADF);
  EXPECT_EQ(piece.error().kind, Errc::invalid_argument);
  EXPECT_EQ(queued(p.read.get()), 10);
}

TEST(SnapshotPacker, FullAndPacketPipesComeBackWholeAndStayAsTheyWere) {
  SnapshotPacker packer;
  auto full = pipe_of(0);  // 16 slots of 4 KiB: full
  for (int i = 0; i < 16; ++i) put(full.write.get(), kPage, static_cast<char>('a' + i));
  auto packet = pipe_of(O_DIRECT);
  put(packet.write.get(), 5, 'x');
  put(packet.write.get(), 1, 'y');
  put(packet.write.get(), 300, 'z');
  auto empty = pipe_of(0);

  auto a = packer.add_unknown(full.read.get());
  ASSERT_TRUE(a) << a.error().what;
  EXPECT_EQ(a->bytes, 16 * kPage);
  auto b = packer.add_unknown(packet.read.get());  // it linked bytes: a had room after it, a is whole
  ASSERT_TRUE(b) << b.error().what;
  EXPECT_EQ(b->bytes, 306u);
  auto c = packer.add_unknown(empty.read.get());  // EAGAIN into a used scratch pipe with room: empty
  ASSERT_TRUE(c) << c.error().what;
  EXPECT_EQ(c->bytes, 0u);
  ASSERT_TRUE(packer.settle());
  EXPECT_EQ(packer.fionread_calls(), 0u);
  EXPECT_EQ(a->scratch, 0u);
  EXPECT_EQ(b->scratch, 0u);
  EXPECT_EQ(packer.where(*a).scratch, 0u);
  EXPECT_EQ(packer.where(*b).bytes, 306u);
  packer.seal();

  // The sources are untouched.
  EXPECT_EQ(queued(full.read.get()), static_cast<int>(16 * kPage));
  EXPECT_EQ(queued(packet.read.get()), 306);

  SnapshotReader reader;
  std::vector<std::byte> bytes;
  auto slots = reader.read_head(packer.scratch_fd(0), a->bytes, bytes);
  ASSERT_TRUE(slots) << slots.error().what;
  ASSERT_EQ(slots->size(), 16u);
  std::string want;
  for (int i = 0; i < 16; ++i) want += std::string(kPage, static_cast<char>('a' + i));
  EXPECT_EQ(as_string(bytes), want);
  for (const Slot& s : *slots) EXPECT_FALSE(s.packet);

  slots = reader.read_head(packer.scratch_fd(0), b->bytes, bytes);
  ASSERT_TRUE(slots) << slots.error().what;
  ASSERT_EQ(slots->size(), 3u);
  EXPECT_EQ(as_string(bytes), std::string(5, 'x') + "y" + std::string(300, 'z'));
  EXPECT_EQ((*slots)[0].len, 5u);
  EXPECT_EQ((*slots)[1].len, 1u);
  EXPECT_EQ((*slots)[2].len, 300u);
  for (const Slot& s : *slots) EXPECT_TRUE(s.packet);
}

// Pieces of exactly 16 pages: 16 full slots (stream or packets) are read through the 16-slot
// window at once; 16 pages in 17 slots are not, and the walk gives each slot.
TEST(SnapshotPacker, SixteenPagesInSixteenSlotsOrInMore) {
  SnapshotPacker packer;
  auto packets = pipe_of(O_DIRECT);  // each full-page write is one packet
  for (int i = 0; i < 16; ++i) put(packets.write.get(), kPage, static_cast<char>('a' + i));
  auto seventeen = pipe_of(0, static_cast<int>(32 * kPage));
  for (int i = 0; i < 15; ++i) put(seventeen.write.get(), kPage, 's');
  for (char c : {'t', 'u'}) {  // two half-page slots: tee'd buffers never merge with a neighbour
    auto half = pipe_of(0);
    put(half.write.get(), kPage / 2, c);
    auto n = sys::tee_nb(half.read.get(), seventeen.write.get(), kPage);
    ASSERT_TRUE(n && *n == kPage / 2);
  }
  auto a = packer.add_unknown(packets.read.get());
  auto b = packer.add_unknown(seventeen.read.get());
  ASSERT_TRUE(a && b);
  ASSERT_EQ(a->bytes, 16 * kPage);
  ASSERT_EQ(b->bytes, 16 * kPage);
  packer.seal();
  SnapshotReader reader;
  std::vector<std::byte> bytes;
  auto slots = reader.read_head(packer.scratch_fd(a->scratch), a->bytes, bytes);
  ASSERT_TRUE(slots) << slots.error().what;
  ASSERT_EQ(slots->size(), 16u);
  for (const Slot& s : *slots) {
    EXPECT_EQ(s.len, kPage);
    EXPECT_TRUE(s.packet);
  }
  EXPECT_EQ(as_string(bytes).substr(15 * kPage), std::string(kPage, 'p'));
  slots = reader.read_head(packer.scratch_fd(b->scratch), b->bytes, bytes);
  ASSERT_TRUE(slots) << slots.error().what;
  std::vector<uint32_t> lens;
  for (const Slot& s : *slots) {
    lens.push_back(s.len);
    EXPECT_FALSE(s.packet);
  }
  std::vector<uint32_t> want(15, kPage);
  want.push_back(kPage / 2);
  want.push_back(kPage / 2);
  EXPECT_EQ(lens, want);
  EXPECT_EQ(as_string(bytes), std::string(15 * kPage, 's') + std::string(kPage / 2, 't') + std::string(kPage / 2, 'u'));
}

// A scratch pipe filled to its last slot: the next tee answers EAGAIN whether its source is empty
// or not. FIONREAD tells them apart: the empty one is empty, the full one goes to a fresh scratch.
TEST(SnapshotPacker, EagainIntoAFullScratchPipeIsNotTakenForEmpty) {
  const size_t slots = pipe_max() / kPage;
  if (slots < 16 || slots % 16 != 0) GTEST_SKIP() << "pipe-max-size " << pipe_max() << " is not a multiple of 64 KiB";
  SnapshotPacker packer;
  std::vector<sys::PipePair> fill;
  for (size_t i = 0; i < slots / 16; ++i) {  // exactly fills scratch pipe 0
    fill.push_back(pipe_of(0));
    for (int k = 0; k < 16; ++k) put(fill.back().write.get(), kPage, 'f');
    auto piece = packer.add_unknown(fill.back().read.get());
    ASSERT_TRUE(piece) << piece.error().what;
    ASSERT_EQ(piece->scratch, 0u);
    ASSERT_EQ(piece->bytes, 16 * kPage);
  }
  auto empty = pipe_of(0);
  auto e = packer.add_unknown(empty.read.get());
  ASSERT_TRUE(e) << e.error().what;
  EXPECT_EQ(e->bytes, 0u);
  // The scratch pipe is full: the last piece in it is checked (FIONREAD: whole), then the empty one.
  EXPECT_EQ(packer.fionread_calls(), 2u);
  auto data = pipe_of(0);
  put(data.write.get(), 100, 'd');
  auto d = packer.add_unknown(data.read.get());
  ASSERT_TRUE(d) << d.error().what;
  EXPECT_EQ(d->bytes, 100u);
  EXPECT_EQ(d->scratch, 1u);
  ASSERT_TRUE(packer.settle());
  packer.seal();
  SnapshotReader reader;
  std::vector<std::byte> bytes;
  auto got = reader.read_head(packer.scratch_fd(1), d->bytes, bytes);
  ASSERT_TRUE(got) << got.error().what;
  EXPECT_EQ(as_string(bytes), std::string(100, 'd'));
}

// A source with more slots than the scratch pipe has left: the tee is cut short, what it linked
// stays as dead weight, and the whole source goes into a fresh scratch pipe.
TEST(SnapshotPacker, ShortTeeGoesWholeIntoAFreshScratchPipe) {
  const size_t slots = pipe_max() / kPage;
  if (slots < 32) GTEST_SKIP() << "pipe-max-size " << pipe_max() << " is below 128 KiB";
  SnapshotPacker packer;
  auto first = pipe_of(0, static_cast<int>(pipe_max()));  // leaves 8 slots free
  for (size_t k = 0; k < slots - 8; ++k) put(first.write.get(), kPage, 'p');
  auto a = packer.add_unknown(first.read.get());
  ASSERT_TRUE(a) << a.error().what;
  ASSERT_EQ(a->bytes, (slots - 8) * kPage);
  auto big = pipe_of(0);  // 16 slots: does not fit in 8
  for (int k = 0; k < 16; ++k) put(big.write.get(), kPage, static_cast<char>('A' + k));
  auto b = packer.add_unknown(big.read.get());  // 8 slots linked: short, not known yet
  ASSERT_TRUE(b) << b.error().what;
  EXPECT_EQ(b->bytes, 8 * kPage);
  EXPECT_EQ(b->scratch, 0u);
  ASSERT_TRUE(packer.settle());  // the scratch pipe is full: FIONREAD says short, again into a fresh one
  EXPECT_EQ(packer.fionread_calls(), 1u);
  const auto moved = packer.where(*b);
  EXPECT_EQ(moved.bytes, 16 * kPage);
  EXPECT_EQ(moved.scratch, 1u);
  EXPECT_EQ(queued(big.read.get()), static_cast<int>(16 * kPage));
  // A later piece goes after it; an earlier one was proven whole by b's linking bytes.
  EXPECT_EQ(packer.where(*a).scratch, 0u);
  auto small = pipe_of(0);
  put(small.write.get(), 10, 'm');
  auto m = packer.add_unknown(small.read.get());
  ASSERT_TRUE(m) << m.error().what;
  EXPECT_EQ(m->scratch, 1u);
  ASSERT_TRUE(packer.settle());
  packer.seal();
  SnapshotReader reader;
  std::vector<std::byte> bytes;
  auto got = reader.read_head(packer.scratch_fd(0), a->bytes, bytes);
  ASSERT_TRUE(got) << got.error().what;
  EXPECT_EQ(as_string(bytes), std::string((slots - 8) * kPage, 'p'));
  got = reader.read_head(packer.scratch_fd(1), moved.bytes, bytes);
  ASSERT_TRUE(got) << got.error().what;
  std::string want;
  for (int k = 0; k < 16; ++k) want += std::string(kPage, static_cast<char>('A' + k));
  EXPECT_EQ(as_string(bytes), want);
  got = reader.read_head(packer.scratch_fd(1), m->bytes, bytes);
  ASSERT_TRUE(got) << got.error().what;
  EXPECT_EQ(as_string(bytes), std::string(10, 'm'));
}

}  // namespace
}  // namespace pipecr::dump
