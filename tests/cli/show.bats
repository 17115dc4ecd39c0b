#!/usr/bin/env bats
# pipecr show: an image described for people (--data: with its bytes) and as JSON (docs/json.md).
#
# The images come from pipecr_mkimage (tests/cli/mkimage.cpp, path in MKIMAGE): fixed content, so
# every value can be checked exactly. "mixed" holds two processes, a packet pipe, an unlinked FIFO
# held outside the image too, and an empty pipe; see mkimage.cpp for every field.

load helpers

: "${MKIMAGE:?set MKIMAGE to the pipecr_mkimage binary}"

mk() {
  "$MKIMAGE" "$@"
}

@test "show: header, processes, pipes with their files and fds" {
  mk mixed "$TMP/img"
  run "$PIPECR" show "$TMP/img"
  echo "$output"
  [ "$status" -eq 0 ]
  echo "$output" | grep -F "format 1, made by pipecr-mkimage on Linux 6.18.0-test, 2023-11-14T22:13:20Z, page size 4096"
  echo "$output" | grep -F "2 processes, 3 pipes (4217 bytes queued), 6 open files, 7 fds; 2 fds blocked"
  echo "$output" | grep -E "^ +4243 +4242  reader +reader 'it'\\\\''s here'$"
  echo "$output" | grep -F "pipe 1: pipe, inode 1001, capacity 65536, 4206 bytes queued (6.4%), 3 slots, 3 packets"
  echo "$output" | grep -F "pipe 2: fifo /tmp/pipecr-show.fifo (unlinked), inode 1002, capacity 16384, 11 bytes queued (0.1%), 1 slot"
  echo "$output" | grep -F "inode owner 1000:100, mode 0644; OUTSIDE HOLDERS"
  echo "$output" | grep -F "file 1  read       O_NONBLOCK; owner pid 4243 (process), uid 1000, euid 0; signal SIGRTMIN+3 (37)"
  echo "$output" | grep -F "file 3  readwrite  O_ASYNC,O_LARGEFILE; owner tid 4242 (thread); signal SIGIO (29)"
  echo "$output" | grep -F "owner pgrp 4242 (process group), uid 0, euid 0; reader has seen no writer yet"
  echo "$output" | grep -F "fd 4243:12  (reader)  BLOCKED reading"
  echo "$output" | grep -F "fd 4242:3  (writer)  BLOCKED writing"
  echo "$output" | grep -F "fd 4243:11  (reader)  cloexec"
  # the fds sharing one open file are listed under it, in the pipe they belong to
  echo "$output" | awk '/^pipe 1:/{p=1} /^pipe 2:/{p=0} p' | grep -A2 -F "file 2  write      O_DIRECT" | grep -F "fd 4242:11"
  # no data without --data
  [ "$(echo "$output" | grep -c -F "00000000")" -eq 0 ]
}

@test "show --data: a hexdump per pipe, packet boundaries marked" {
  mk mixed "$TMP/img"
  run "$PIPECR" show --data "$TMP/img"
  echo "$output"
  [ "$status" -eq 0 ]
  echo "$output" | grep -F -- "-- slot 0: packet 1, 10 bytes at offset 0"
  echo "$output" | grep -F "00000000  30 31 32 33 34 35 36 37  38 39                    |0123456789|"
  echo "$output" | grep -F -- "-- slot 1: packet 2, 100 bytes at offset 10"
  echo "$output" | grep -F "0000000a  41 41 41 41 41 41 41 41  41 41 41 41 41 41 41 41  |AAAAAAAAAAAAAAAA|"
  echo "$output" | grep -F -- "-- slot 2: packet 3, 4096 bytes at offset 110"
  echo "$output" | grep -F "00000000  68 65 6c 6c 6f 20 77 6f  72 6c 64                 |hello world|"
  echo "$output" | grep -F "data: none queued"
}

@test "show --json: the documented fields with their exact values" {
  mk mixed "$TMP/img"
  "$PIPECR" show --json "$TMP/img" > "$TMP/doc.json"
  jq -e '.format_version == 1' "$TMP/doc.json"
  jq -e '.info == {page_size: 4096, kernel: "6.18.0-test", tool: "pipecr-mkimage", boot_id: "",
                   created: "2023-11-14T22:13:20Z", created_unix_ns: 1700000000123456789}' "$TMP/doc.json"
  jq -e '.processes == [{pid: 4242, ppid: 1, comm: "writer", argv: ["writer", "-n", "3"]},
                        {pid: 4243, ppid: 4242, comm: "reader", argv: ["reader", "it'"'"'s here"]}]' "$TMP/doc.json"
  jq -e '.pipes[0] == {id: 1, kind: "pipe", path: null, unlinked: false, inode: 1001, dev: null, capacity: 65536,
                       bytes: 4206, slots: [{len: 10, packet: true}, {len: 100, packet: true}, {len: 4096, packet: true}],
                       packets: [10, 100, 4096], outside_holders: false, uid: 0, gid: 0, mode: 384}' "$TMP/doc.json"
  jq -e '.pipes[1] == {id: 2, kind: "fifo", path: "/tmp/pipecr-show.fifo", unlinked: true, inode: 1002, dev: 0,
                       capacity: 16384, bytes: 11, slots: [{len: 11, packet: false}], packets: null,
                       outside_holders: true, uid: 1000, gid: 100, mode: 420}' "$TMP/doc.json"
  jq -e '.pipes[2] | .bytes == 0 and .slots == [] and .packets == null' "$TMP/doc.json"
  jq -e '.files[0] == {id: 1, pipe: 1, access: "read", flags: ["O_NONBLOCK"], flags_octal: "04000",
                       owner: {type: "pid", pid: 4243, uid: 1000, euid: 0}, signal: 37,
                       signal_name: "SIGRTMIN+3", fifo_reader: null}' "$TMP/doc.json"
  jq -e '.files[1] | .access == "write" and .flags == ["O_DIRECT"] and .owner == null
                     and .signal == 0 and .signal_name == null' "$TMP/doc.json"
  jq -e '.files[2] | .access == "readwrite" and .flags == ["O_ASYNC", "O_LARGEFILE"]
                     and .owner == {type: "tid", pid: 4242, uid: null, euid: null}
                     and .signal == 29 and .signal_name == "SIGIO" and .fifo_reader == "seen_writer"' "$TMP/doc.json"
  jq -e '.files[3] | .owner.type == "pgrp" and .fifo_reader == "no_writer_yet"
                     and .flags == ["O_NONBLOCK", "O_LARGEFILE"]' "$TMP/doc.json"
  jq -e '[.files[] | .access] == ["read", "write", "readwrite", "read", "write", "read"]' "$TMP/doc.json"
  jq -e '.fds == [{pid: 4242, fd: 11, file: 2, cloexec: false, blocked: null},
                  {pid: 4243, fd: 11, file: 2, cloexec: true, blocked: null},
                  {pid: 4243, fd: 12, file: 1, cloexec: false, blocked: "reading"},
                  {pid: 4242, fd: 3, file: 3, cloexec: false, blocked: "writing"},
                  {pid: 4243, fd: 5, file: 4, cloexec: false, blocked: null},
                  {pid: 4242, fd: 7, file: 5, cloexec: false, blocked: null},
                  {pid: 4242, fd: 8, file: 6, cloexec: true, blocked: null}]' "$TMP/doc.json"
  # no data without --data
  jq -e '[.pipes[] | has("data_base64")] == [false, false, false]' "$TMP/doc.json"
}

@test "show --json --data: each pipe's bytes in data_base64" {
  mk mixed "$TMP/img"
  "$PIPECR" show --json --data "$TMP/img" > "$TMP/doc.json"
  jq -e '.pipes[1].data_base64 == "aGVsbG8gd29ybGQ=" and .pipes[2].data_base64 == ""' "$TMP/doc.json"
  jq -r '.pipes[0].data_base64' "$TMP/doc.json" | base64 -d > "$TMP/p1"
  { printf 0123456789; head -c 100 /dev/zero | tr '\0' A; head -c 4096 /dev/zero; } > "$TMP/want"
  cmp "$TMP/p1" "$TMP/want"
}

@test "show: an in-process image (pid 0) and an empty image" {
  mk self "$TMP/self"
  run "$PIPECR" show --data "$TMP/self"
  echo "$output"
  [ "$status" -eq 0 ]
  echo "$output" | grep -F "fd self:5"
  echo "$output" | grep -F "|abc|"
  run "$PIPECR" show --json "$TMP/self"
  [ "$status" -eq 0 ]
  echo "$output" | jq -e '.processes == [] and .fds == [{pid: 0, fd: 5, file: 1, cloexec: false, blocked: null}]'

  mk empty "$TMP/empty"
  run "$PIPECR" show "$TMP/empty"
  [ "$status" -eq 0 ]
  echo "$output" | grep -F "0 processes, 0 pipes (0 bytes queued), 0 open files, 0 fds; 0 fds blocked"
  run "$PIPECR" show --json "$TMP/empty"
  [ "$status" -eq 0 ]
  echo "$output" | jq -e '.processes == [] and .pipes == [] and .files == [] and .fds == []'
}

@test "show: 10,000 pipes" {
  mk many 10000 "$TMP/many"
  run "$PIPECR" show "$TMP/many"
  [ "$status" -eq 0 ]
  echo "$output" | grep -F "1 process, 10000 pipes (20000 bytes queued), 20000 open files, 20000 fds"
  echo "$output" | grep -F "pipe 10000: pipe, inode 110000"
  echo "$output" | grep -F "fd 5000:20002  (many)"
  "$PIPECR" show --json "$TMP/many" > "$TMP/many.json"
  jq -e '(.pipes | length) == 10000 and (.files | length) == 20000 and (.fds | length) == 20000
         and .fds[-1] == {pid: 5000, fd: 20002, file: 20000, cloexec: false, blocked: null}' "$TMP/many.json"
}

@test "show: a truncated image exits 65, naming the file and the offset" {
  mk mixed "$TMP/img"
  size=$(stat -c %s "$TMP/img")
  head -c $((size - 7)) "$TMP/img" > "$TMP/cut"
  run "$PIPECR" show "$TMP/cut"
  echo "$output"
  [ "$status" -eq 65 ]
  echo "$output" | grep -E "^pipecr show: \"$TMP/cut\": image offset [0-9]+: "
  [ "${#lines[@]}" -eq 1 ]

  : > "$TMP/zero"
  run "$PIPECR" show --json "$TMP/zero"
  echo "$output"
  [ "$status" -eq 65 ]
  echo "$output" | grep -E "\"$TMP/zero\": image offset 0"
}

@test "show: a corrupted byte exits 65" {
  mk mixed "$TMP/img"
  cp "$TMP/img" "$TMP/bad"
  # flip one byte of the packet data in the middle of the file
  printf '\xff' | dd of="$TMP/bad" bs=1 seek=2000 conv=notrunc status=none
  [ "$(cmp "$TMP/img" "$TMP/bad" | wc -l)" -eq 1 ]
  run "$PIPECR" show "$TMP/bad"
  echo "$output"
  [ "$status" -eq 65 ]
  echo "$output" | grep -E "image offset [0-9]+: "
}

@test "show: a missing image exits 66, naming the file" {
  run "$PIPECR" show "$TMP/nonexistent.img"
  echo "$output"
  [ "$status" -eq 66 ]
  echo "$output" | grep -F "pipecr show:"
  echo "$output" | grep -F "$TMP/nonexistent.img"
}

@test "show: a bad command line exits 64" {
  run "$PIPECR" show
  [ "$status" -eq 64 ]
  mk mixed "$TMP/img"
  run "$PIPECR" show --no-such-option "$TMP/img"
  [ "$status" -eq 64 ]
  run "$PIPECR" show "$TMP/img" "$TMP/img"
  [ "$status" -eq 64 ]
}
