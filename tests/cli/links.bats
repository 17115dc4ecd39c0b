#!/usr/bin/env bats
# links.bats: a real event-loop program keeps hearing its pipe after `pipecr restore --into`
# (issue 7). The program is Python asyncio (links/asyncio_reader.py): its loop watches the read
# end of a pipe with epoll (loop.add_reader). A restore that puts a new pipe there leaves the watch
# on the old file; a restore in place keeps it.

load helpers

PROG="$BATS_TEST_DIRNAME/links/asyncio_reader.py"

# start: runs the reader; sets PID once it is up.
start() {
  python3 "$PROG" "$TMP/reader.pid" "$TMP/heard" &
  PID=
  local i
  for i in $(seq 1 200); do
    [ -s "$TMP/reader.pid" ] && PID=$(cat "$TMP/reader.pid") && break
    sleep 0.05
  done
  [ -n "$PID" ]
}

# say TEXT: writes TEXT into the reader's pipe through its write end.
say() { printf '%s' "$1" > "/proc/$PID/fd/41"; }

# heard TEXT: waits (up to 10 s) until the reader has heard exactly TEXT.
heard() {
  local i
  for i in $(seq 1 200); do
    [ "$(cat "$TMP/heard" 2>/dev/null)" = "$1" ] && return 0
    sleep 0.05
  done
  echo "heard: '$(cat "$TMP/heard" 2>/dev/null)', expected '$1'"
  return 1
}

@test "asyncio: the loop hears its pipe after a restore over the intact state" {
  start
  say "one;"
  heard "one;"
  "$PIPECR" dump -t "$PID" -o "$TMP/img"
  run "$PIPECR" restore -v "$TMP/img" --into "$PID"
  echo "$output"
  [ "$status" -eq 0 ]
  [[ "$output" == *"refilled in place"* ]]
  [[ "$output" == *"(1 in place, 0 replaced;"* ]]
  say "two;END"
  heard "one;two;END"
  wait "$(cat "$TMP/reader.pid")" 2>/dev/null || true
}

@test "asyncio: bytes queued at the dump reach the loop after a restore" {
  start
  # Stop the reader so the bytes stay queued while it is dumped; it reads them once let go.
  kill -STOP "$PID"
  say "queued;"
  "$PIPECR" dump -t "$PID" -o "$TMP/img"
  # Drain the pipe behind the loop's back, as a crash of its content would.
  python3 -c "import os,sys; fd=os.open('/proc/$PID/fd/40', os.O_RDONLY|os.O_NONBLOCK); os.read(fd, 65536)"
  run "$PIPECR" restore "$TMP/img" --into "$PID"
  echo "$output"
  [ "$status" -eq 0 ]
  [[ "$output" == *"(1 in place, 0 replaced;"* ]]
  kill -CONT "$PID"
  heard "queued;"
  say "END"
  heard "queued;END"
}

@test "asyncio: with --replace the loop goes deaf (why refill in place exists)" {
  start
  "$PIPECR" dump -t "$PID" -o "$TMP/img"
  run "$PIPECR" restore --replace "$TMP/img" --into "$PID"
  [ "$status" -eq 0 ]
  [[ "$output" == *"(0 in place, 1 replaced;"* ]]
  say "lost;END"
  sleep 1
  [ "$(cat "$TMP/heard" 2>/dev/null)" = "" ]
  kill -9 "$PID"
}
