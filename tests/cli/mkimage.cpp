// mkimage.cpp: writes pipecr images of fixed, known content for the CLI tests of `pipecr show`.
//
//   pipecr_mkimage SCENARIO OUTPUT
//
// The images are built as Image values and written with image::encode, the same encoder the
// dumper's records go through, so the tests of `show` know every value without a live process:
//   mixed  two processes (4242 and its child 4243); a packet pipe (packets of 10, 100 and 4096
//          bytes) whose write end both share (fd 11) and whose read end the child holds at fd 12,
//          blocked reading; an unlinked FIFO with 11 bytes, opened twice, held outside the image
//          too; an empty pipe of one page. Owners, signals, flags and FD_CLOEXEC vary.
//   empty  no process, no pipe.
//   self   one pipe of the calling process (pid 0), as pipecr_ckpoint_pipe writes it.
//   many N N pipes of one process, 2 bytes queued in each, both ends held.
// Hostile images (issue 9), each: one process 6000 holding the read end of one pipe at fd 0:
//   bigpage         INFO page size 65536, slots of 4097, 100 and 3996 bytes ("A", "B", "A"): parses,
//                   but a pipe buffer here holds 4096 bytes;
//   hugecap         capacity 0xFFFFFFFF;
//   bigfd           a valid pipe held at fd 2147483647 (no process can have it open);
//   fifo PATH MODE  a FIFO at PATH (any bytes: relative, control characters) with MODE (octal),
//                   3 bytes queued.
#include <fcntl.h>
#include <signal.h>

#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include "image/image_io.hpp"

using namespace pipecr;

namespace {

constexpr uint32_t kLargefile = 0100000;

std::vector<std::byte> bytes_of(std::string_view s) {
  std::vector<std::byte> v(s.size());
  std::memcpy(v.data(), s.data(), s.size());
  return v;
}

ImageInfo test_info() {
  return ImageInfo{4096, 1700000000123456789ull, "6.18.0-test", "pipecr-mkimage"};
}

PipeRecord pipe_of(uint64_t id, uint64_t inode, uint32_t capacity) {
  PipeRecord p;
  p.id = id;
  p.inode = inode;
  p.capacity = capacity;
  p.mode = 0600;
  return p;
}

FileRecord file_of(uint64_t id, uint64_t pipe, uint32_t flags) {
  FileRecord f;
  f.id = id;
  f.pipe_id = pipe;
  f.flags = flags;
  return f;
}

// Holds the data the PipeRecords view until encode() has run.
struct Built {
  Image img;
  std::vector<std::vector<std::byte>> data;
  void add_pipe(PipeRecord p, std::vector<std::byte> bytes) {
    data.push_back(std::move(bytes));
    p.data = data.back();
    img.pipes.push_back(std::move(p));
  }
};

void mixed(Built& b) {
  b.data.reserve(3);
  b.img.processes = {ProcessRecord{4242, 1, "writer", {"writer", "-n", "3"}},
                     ProcessRecord{4243, 4242, "reader", {"reader", "it's here"}}};
  PipeRecord p1 = pipe_of(1, 1001, 65536);
  p1.slots = {{10, true}, {100, true}, {4096, true}};
  std::string d1 = "0123456789" + std::string(100, 'A') + std::string(4096, '\0');
  b.add_pipe(p1, bytes_of(d1));

  PipeRecord p2 = pipe_of(2, 1002, 16384);
  p2.kind = PipeKind::fifo;
  p2.path = "/tmp/pipecr-show.fifo";
  p2.unlinked = true;
  p2.outside_holders = true;
  p2.uid = 1000;
  p2.gid = 100;
  p2.mode = 0644;
  p2.slots = {{11, false}};
  b.add_pipe(p2, bytes_of("hello world"));

  b.add_pipe(pipe_of(3, 1003, 4096), {});

  FileRecord f1 = file_of(1, 1, O_RDONLY | O_NONBLOCK);
  f1.owner = Owner{F_OWNER_PID, 4243, true, 1000, 0};
  f1.signal = 37;
  FileRecord f3 = file_of(3, 2, O_RDWR | O_ASYNC | kLargefile);
  f3.owner = Owner{F_OWNER_TID, 4242, false, 0, 0};
  f3.signal = SIGIO;
  f3.fifo_reader = FifoReaderState::seen_writer;
  FileRecord f4 = file_of(4, 2, O_RDONLY | O_NONBLOCK | kLargefile);
  f4.owner = Owner{F_OWNER_PGRP, 4242, true, 0, 0};
  f4.fifo_reader = FifoReaderState::no_writer_yet;
  b.img.files = {f1, file_of(2, 1, O_WRONLY | O_DIRECT), f3, f4, file_of(5, 3, O_WRONLY), file_of(6, 3, O_RDONLY)};

  b.img.fds = {FdRecord{4242, 11, 2, false, Blocked::none}, FdRecord{4243, 11, 2, true, Blocked::none},
               FdRecord{4243, 12, 1, false, Blocked::reading}, FdRecord{4242, 3, 3, false, Blocked::writing},
               FdRecord{4243, 5, 4, false, Blocked::none}, FdRecord{4242, 7, 5, false, Blocked::none},
               FdRecord{4242, 8, 6, true, Blocked::none}};
}

void self(Built& b) {
  PipeRecord p = pipe_of(1, 77, 65536);
  p.slots = {{3, false}};
  b.add_pipe(p, bytes_of("abc"));
  b.img.files = {file_of(1, 1, O_RDONLY)};
  b.img.fds = {FdRecord{0, 5, 1, false, Blocked::none}};
}

void many(Built& b, size_t n) {
  b.data.reserve(n);
  b.img.processes = {ProcessRecord{5000, 1, "many", {"many"}}};
  for (size_t i = 0; i < n; ++i) {
    uint64_t id = i + 1;
    PipeRecord p = pipe_of(id, 100000 + id, 4096);
    p.slots = {{2, false}};
    b.add_pipe(p, bytes_of("hi"));
    b.img.files.push_back(file_of(2 * id - 1, id, O_RDONLY));
    b.img.files.push_back(file_of(2 * id, id, O_WRONLY));
    b.img.fds.push_back(FdRecord{5000, static_cast<int32_t>(2 * i + 3), 2 * id - 1, false, Blocked::none});
    b.img.fds.push_back(FdRecord{5000, static_cast<int32_t>(2 * i + 4), 2 * id, false, Blocked::none});
  }
}

void hostile(Built& b, std::string_view kind, const std::string& path, uint32_t mode) {
  b.data.reserve(1);
  b.img.processes = {ProcessRecord{6000, 1, "victim", {"victim"}}};
  PipeRecord p = pipe_of(1, 6001, 65536);
  std::string d;
  if (kind == "bigpage") {
    b.img.info.page_size = 65536;
    p.capacity = 1u << 20;
    p.slots = {{4097, false}, {100, false}, {3996, false}};
    d = std::string(4097, 'A') + std::string(100, 'B') + std::string(3996, 'A');
  } else if (kind == "hugecap" || kind == "bigfd") {
    if (kind == "hugecap") p.capacity = 0xFFFFFFFFu;
    p.slots = {{3, false}};
    d = "abc";
  } else {
    p.kind = PipeKind::fifo;
    p.path = path;
    p.mode = mode;
    p.slots = {{3, false}};
    d = "abc";
  }
  b.add_pipe(p, bytes_of(d));
  b.img.files = {file_of(1, 1, O_RDONLY)};
  b.img.fds = {FdRecord{6000, kind == "bigfd" ? 2147483647 : 0, 1, false, Blocked::none}};
}

int usage() {
  std::fputs("usage: pipecr_mkimage mixed|empty|self|many N|bigpage|hugecap|bigfd|fifo PATH MODE OUTPUT\n", stderr);
  return 64;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return usage();
  std::string_view scenario = argv[1];
  Built b;
  b.img.info = test_info();
  int out_arg = 2;
  if (scenario == "mixed") {
    mixed(b);
  } else if (scenario == "self") {
    self(b);
  } else if (scenario == "many" && argc == 4) {
    size_t n = 0;
    std::string_view s = argv[2];
    if (std::from_chars(s.data(), s.data() + s.size(), n).ec != std::errc()) return usage();
    many(b, n);
    out_arg = 3;
  } else if (scenario == "bigpage" || scenario == "hugecap" || scenario == "bigfd") {
    hostile(b, scenario, "", 0);
  } else if (scenario == "fifo" && argc == 5) {
    hostile(b, scenario, argv[2], static_cast<uint32_t>(std::strtoul(argv[3], nullptr, 8)));
    out_arg = 4;
  } else if (scenario != "empty") {
    return usage();
  }
  auto bytes = image::encode(b.img);
  if (!bytes) {
    std::fprintf(stderr, "pipecr_mkimage: %s\n", bytes.error().what.c_str());
    return 70;
  }
  std::FILE* f = std::fopen(argv[out_arg], "wb");
  if (!f || std::fwrite(bytes->data(), 1, bytes->size(), f) != bytes->size() || std::fclose(f) != 0) {
    std::perror(argv[out_arg]);
    return 73;
  }
  return 0;
}
