// validate_test.cpp: image::validate(), rule by rule (validate.hpp), on records built in memory.
// Each case starts from an image that passes and breaks one rule; the error must be bad_image and
// name the rule. The page size of "this machine" is passed explicitly where it matters (4096 and
// 65536), so the 64 KiB-page rules are tested here too.
#include <fcntl.h>

#include <functional>
#include <string>

#include <gtest/gtest.h>

#include "image/validate.hpp"

namespace pipecr::image {
namespace {

struct Fixture {
  Image img;
  std::string data = std::string(3, 'x');
  Fixture() {
    img.processes.push_back({10, 1, "cat", {"cat"}});
    PipeRecord p;
    p.id = 1, p.capacity = 65536, p.mode = 0600, p.slots = {{3, false}};
    img.pipes.push_back(p);
    PipeRecord f;
    f.id = 2, f.kind = PipeKind::fifo, f.capacity = 65536, f.mode = 0644, f.path = "/run/a fifo";
    img.pipes.push_back(f);
    img.files.push_back(FileRecord{.id = 1, .pipe_id = 1, .flags = O_RDONLY});
    img.files.push_back(FileRecord{.id = 2, .pipe_id = 2, .flags = O_WRONLY});
    img.fds.push_back(FdRecord{.pid = 10, .fd = 0, .file_id = 1});
    img.fds.push_back(FdRecord{.pid = 10, .fd = 1, .file_id = 2});
    bind();
  }
  void bind() { img.pipes[0].data = std::as_bytes(std::span(data.data(), data.size())); }
};

void expect_refused(const std::function<void(Fixture&)>& breakit, const std::string& says, uint32_t page = 4096) {
  Fixture f;
  ASSERT_TRUE(validate(f.img, page));
  breakit(f);
  auto r = validate(f.img, page);
  ASSERT_FALSE(r) << "expected a refusal saying: " << says;
  EXPECT_EQ(r.error().kind, Errc::bad_image);
  EXPECT_NE(r.error().what.find(says), std::string::npos) << r.error().what;
}

TEST(Validate, AValidImagePasses) {
  Fixture f;
  EXPECT_TRUE(validate(f.img));
  EXPECT_TRUE(validate(Image{}));
}

TEST(Validate, SlotLengthIsBoundByThePageSizeOfThisMachine) {
  expect_refused([](Fixture& f) {
    f.img.info.page_size = 65536;  // what INFO says does not matter
    f.data.assign(5000, 'y');
    f.img.pipes[0].slots = {{5000, false}};
    f.bind();
  }, "page size 4096");
  // On a 64 KiB-page machine the same slot is fine.
  Fixture f;
  f.data.assign(5000, 'y');
  f.img.pipes[0].slots = {{5000, false}};
  f.bind();
  EXPECT_TRUE(validate(f.img, 65536));
}

TEST(Validate, CapacityIsWhatFSetpipeSzSets) {
  for (uint32_t cap : {0u, 100u, 4095u, 12288u, 0xFFFFFFFFu, 0x80000001u})
    expect_refused([cap](Fixture& f) { f.img.pipes[0].capacity = cap; }, "capacity");
  Fixture f;
  f.img.pipes[0].capacity = 1u << 31;  // the kernel's largest: valid (a machine may refuse it: EPERM)
  EXPECT_TRUE(validate(f.img));
  // 65536 is 16 slots here but a single one with 64 KiB pages: 2 slots do not fit there.
  expect_refused([](Fixture& f) {
    f.img.pipes[0].slots = {{1, false}, {2, false}};
  }, "holds 1 pages", 65536);
}

TEST(Validate, DataMatchesSlots) {
  expect_refused([](Fixture& f) { f.img.pipes[0].slots = {{2, false}}; }, "bytes of data");
  expect_refused([](Fixture& f) { f.img.pipes[0].slots = {{3, false}, {0, false}}; }, "slot 1 holds 0");
}

TEST(Validate, FifoPathsAreAbsoluteAndPlain) {
  for (std::string p : {std::string(""), std::string("rel/f"), std::string("./f"), std::string("/a/../f"),
                        std::string("/a/./f"), std::string("/a\0b", 4), std::string(5000, '/')})
    expect_refused([p](Fixture& f) { f.img.pipes[1].path = p; }, "FIFO 2 path");
  expect_refused([](Fixture& f) { f.img.pipes[0].path = "/x"; }, "anonymous pipe 1 has a FIFO path");
}

TEST(Validate, ModesBeyond0777AreRefused) {
  for (uint32_t m : {06777u, 04000u, 02644u, 01777u, 010644u})
    expect_refused([m](Fixture& f) { f.img.pipes[1].mode = m; }, "beyond 0777");
}

TEST(Validate, IdsAndReferencesAreConsistent) {
  expect_refused([](Fixture& f) { f.img.pipes[1].id = 1; }, "pipe id 1 appears twice");
  expect_refused([](Fixture& f) { f.img.files[1].pipe_id = 9; }, "names pipe 9");
  expect_refused([](Fixture& f) { f.img.files[1].id = 1; }, "file id 1 appears twice");
  expect_refused([](Fixture& f) { f.img.files[0].flags = O_ACCMODE; }, "access mode 3");
  expect_refused([](Fixture& f) { f.img.files[0].owner.pid = -5; },
                 "owner pid -5: an owner is a positive id, or 0 for none");
  expect_refused([](Fixture& f) { f.img.fds[1].file_id = 7; }, "names file 7");
  expect_refused([](Fixture& f) { f.img.fds[1].pid = 11; }, "does not record");
  expect_refused([](Fixture& f) { f.img.fds[1].fd = 0; }, "fd 0 of pid 10 appears twice");
  expect_refused([](Fixture& f) { f.img.fds[1].fd = -1; }, "negative");
  expect_refused([](Fixture& f) { f.img.processes.push_back(f.img.processes[0]); }, "appears twice");
}

TEST(Validate, EndsInFlightNameTheirFileAndProcess) {
  auto flying = [](Fixture& f) {
    f.img.in_flight.push_back(InFlightRecord{.file_id = 2, .pid = 10, .sock_fd = 5, .sock_ino = 9, .msg = 0});
  };
  Fixture ok;
  flying(ok);
  EXPECT_TRUE(validate(ok.img));
  expect_refused([&](Fixture& f) { flying(f), f.img.in_flight[0].file_id = 7; }, "names file 7");
  expect_refused([&](Fixture& f) { flying(f), f.img.in_flight[0].pid = 11; }, "does not record");
  expect_refused([&](Fixture& f) { flying(f), f.img.in_flight[0].sock_fd = -2; }, "socket fd -2");
  expect_refused([&](Fixture& f) { flying(f), flying(f); }, "holds two ends in flight");
}

}  // namespace
}  // namespace pipecr::image
