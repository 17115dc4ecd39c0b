#!/usr/bin/env bats
# pipecr ls: live pipes, their fill level, who holds each end, who is blocked on them.

load helpers

@test "ls shows a full pipe and the writer blocked on it" {
  spawn yes 'exec yes' 3>&- | spawn sleep 'exec sleep 100' 3>&- &
  Y=$(pid_of yes); S=$(pid_of sleep)
  wait_wchan "$Y" pipe_write
  ino=$(pipe_inode "$S" 0)
  run "$PIPECR" ls -t "$Y" -t "$S"
  [ "$status" -eq 0 ]
  echo "$output"
  # The pipe's line: full, with the writer blocked.
  echo "$output" | grep -E "^pipe:\[$ino\]  65536/65536 bytes 100%  WRITER BLOCKED"
  # Its ends: yes writes (blocked), sleep holds the read end and does not read.
  echo "$output" | grep -E "^    w +$Y:1 +yes .*BLOCKED in write\(\) tid $Y"
  echo "$output" | grep -E "^    r +$S:0 +sleep"
}

@test "ls shows a starved reader" {
  spawn sleep 'exec sleep 100' 3>&- | spawn cat 'exec cat' 3>&- &
  S=$(pid_of sleep); C=$(pid_of cat)
  wait_wchan "$C" pipe_read
  run "$PIPECR" ls -t "$S" -t "$C"
  [ "$status" -eq 0 ]
  echo "$output" | grep -E "0/65536 bytes +0%  READER BLOCKED"
  echo "$output" | grep -E "^    r +$C:0 +cat .*BLOCKED in read\(\)"
}

@test "ls finds processes without -t" {
  spawn yes 'exec yes' 3>&- | spawn sleep 'exec sleep 100' 3>&- &
  Y=$(pid_of yes)
  wait_wchan "$Y" pipe_write
  run "$PIPECR" ls
  [ "$status" -eq 0 ]
  # bash's subshell for the pipeline element shares yes's stdout: both show on one row.
  echo "$output" | grep -E "^    w +([0-9]+:1,)?$Y:1 .*yes.*BLOCKED in write\(\) tid $Y"
}

@test "ls --json is one document with the pipe, its ends and the blocked writer" {
  spawn yes 'exec yes' 3>&- | spawn sleep 'exec sleep 100' 3>&- &
  Y=$(pid_of yes); S=$(pid_of sleep)
  wait_wchan "$Y" pipe_write
  ino=$(pipe_inode "$S" 0)
  "$PIPECR" ls -t "$Y" -t "$S" --json > "$TMP/ls.json"
  python3 - "$TMP/ls.json" "$ino" "$Y" "$S" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
ino, y, s = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
p = [p for p in doc["pipes"] if p["inode"] == ino][0]
assert p["kind"] == "pipe" and p["path"] is None
assert p["capacity"] == 65536 and p["bytes"] == 65536 and p["fill_percent"] == 100.0, p
assert "writer_blocked" in p["state"] and "full" in p["state"], p["state"]
w = [e for e in p["ends"] if e["access"] == "write"][0]
assert {"pid": y, "fd": 1} == {k: w["holders"][0][k] for k in ("pid", "fd")}
r = [e for e in p["ends"] if e["access"] == "read"][0]
assert r["holders"][0]["pid"] == s and r["holders"][0]["comm"] == "sleep"
assert p["blocked"][0]["pid"] == y and p["blocked"][0]["op"] == "writing" and p["blocked"][0]["fd"] == 1
PY
}

@test "ls groups fds sharing one open file description" {
  # sh's fd 1 and fd 5 (a dup) share the write end.
  spawn w 'exec 5>&1; exec sleep 100' 3>&- | spawn r 'exec sleep 100' 3>&- &
  W=$(pid_of w); R=$(pid_of r)
  wait_fd "$W" 5
  run "$PIPECR" ls -t "$W" -t "$R"
  [ "$status" -eq 0 ]
  echo "$output" | grep -E "^    w +$W:1,$W:5 +sleep"
}

@test "ls -t of a process that is gone exits 75" {
  true &
  pid=$!
  wait "$pid"
  run "$PIPECR" ls -t "$pid"
  [ "$status" -eq 75 ]
  [[ "$output" == "pipecr ls: "* ]]
}

@test "ls with a bad command line exits 64" {
  run "$PIPECR" ls -t nonsense
  [ "$status" -eq 64 ]
  run "$PIPECR" ls --no-such-option
  [ "$status" -eq 64 ]
  run "$PIPECR" ls -t 0
  [ "$status" -eq 64 ]
}

@test "ls sees a reader blocked in splice() and names the call" {
  # python's os.splice() from its stdin, an empty pipe, into a pipe of its own: it sleeps in
  # pipe_wait_readable on fd 0.
  spawn sleeper 'exec sleep 100' 3>&- | spawn splicer 'exec python3 -c "import os; r, w = os.pipe(); os.splice(0, w, 16)"' 3>&- &
  P=$(pid_of splicer)
  wait_wchan "$P" pipe_wait_readable
  run "$PIPECR" ls -t "$P"
  [ "$status" -eq 0 ]
  echo "$output" | grep -E "^    r +$P:0 .*BLOCKED in splice\(\) tid $P"
  "$PIPECR" ls -t "$P" --json | python3 -c '
import json, sys
doc = json.load(sys.stdin)
b = [b for p in doc["pipes"] for b in p["blocked"]]
assert b and b[0]["call"] == "splice" and b[0]["op"] == "reading" and b[0]["fd"] == 0, b'
}
