#!/usr/bin/env bats
# pipecr peek: the bytes queued in a live pipe, left in place.

load helpers

# A sleep whose stdin is a pipe holding "hello pipe\n" (the writer has exited).
start_holder() {
  printf 'hello pipe\n' | spawn holder 'exec sleep 100' 3>&- &
  H=$(pid_of holder)
  wait_fd "$H" 0
  # wait until the writer has written
  for i in $(seq 1 100); do
    [ "$(readlink /proc/$H/fd/0)" != "" ] && [ "$("$PIPECR" peek "$H:0" | wc -c)" -eq 11 ] && break
    sleep 0.05
  done
}

@test "peek prints the queued bytes raw when stdout is not a terminal" {
  start_holder
  run "$PIPECR" peek "$H:0"
  [ "$status" -eq 0 ]
  [ "$output" = "hello pipe" ]
}

@test "peek leaves the bytes in the pipe: twice gives the same" {
  start_holder
  "$PIPECR" peek "$H:0" > "$TMP/one"
  "$PIPECR" peek "$H:0" > "$TMP/two"
  cmp "$TMP/one" "$TMP/two"
  [ "$(cat "$TMP/one")" = "hello pipe" ]
}

@test "peek --hex shows a hexdump like hexdump -C" {
  start_holder
  run "$PIPECR" peek "$H:0" --hex
  [ "$status" -eq 0 ]
  echo "$output"
  echo "$output" | grep -F "$H:0: 11 of 11 bytes queued, capacity 65536"
  echo "$output" | grep -F "00000000  68 65 6c 6c 6f 20 70 69  70 65 0a                 |hello pipe.|"
  echo "$output" | grep -x "0000000b"
}

@test "peek -n limits the bytes shown" {
  start_holder
  run "$PIPECR" peek "$H:0" -n 5
  [ "$status" -eq 0 ]
  [ "$output" = "hello" ]
}

@test "peek through a write-only end" {
  spawn w 'printf abc; exec sleep 100' 3>&- | spawn r 'exec sleep 100' 3>&- &
  W=$(pid_of w)
  R=$(pid_of r)
  wait_fd "$R" 0
  for i in $(seq 1 100); do [ "$("$PIPECR" peek "$W:1")" = abc ] && break; sleep 0.05; done
  run "$PIPECR" peek "$W:1"
  [ "$status" -eq 0 ]
  [ "$output" = "abc" ]
  # still there for the reader's end too
  run "$PIPECR" peek "$R:0"
  [ "$output" = "abc" ]
}

@test "peek a FIFO held open read-write" {
  mkfifo "$TMP/f"
  spawn f "exec 7<>'$TMP/f'; printf fifo-data >&7; exec sleep 100" 3>&- &
  F=$(pid_of f)
  wait_fd "$F" 7
  for i in $(seq 1 100); do [ "$("$PIPECR" peek "$F:7")" = fifo-data ] && break; sleep 0.05; done
  run "$PIPECR" peek "$F:7"
  [ "$status" -eq 0 ]
  [ "$output" = "fifo-data" ]
}

@test "peek of a fd that is not a pipe exits 69" {
  spawn n 'exec sleep 100 < /dev/null' 3>&- &
  N=$(pid_of n)
  wait_fd "$N" 0
  sleep 0.1
  run "$PIPECR" peek "$N:0"
  [ "$status" -eq 69 ]
  [ "$output" = "pipecr peek: $N:0 is not a pipe or FIFO (/dev/null)" ]
}

@test "peek of a process that is gone exits 75" {
  true &
  pid=$!
  wait "$pid"
  run "$PIPECR" peek "$pid:0"
  [ "$status" -eq 75 ]
  [[ "$output" == "pipecr peek: "* ]]
}

@test "peek with a bad command line exits 64" {
  run "$PIPECR" peek
  [ "$status" -eq 64 ]
  run "$PIPECR" peek 1234
  [ "$status" -eq 64 ]
  run "$PIPECR" peek 12:x
  [ "$status" -eq 64 ]
  run "$PIPECR" peek 1:0 --bogus
  [ "$status" -eq 64 ]
  run "$PIPECR" peek 1:0 -n minus
  [ "$status" -eq 64 ]
}

@test "peek shows every byte of a packet pipe (no packet cut short)" {
  # Packets of 100, 4096, 904 and 1 bytes behind 65,500 stream bytes: a 64 KiB read() would end
  # inside the first packet and drop the rest of it, so peek must read slot-aware.
  python3 - "$TMP/p.pid" <<'PY' 3>&- &
import os, sys
r, w = os.pipe2(os.O_DIRECT)
os.set_blocking(w, True)
import fcntl
fcntl.fcntl(w, 1031, 1 << 17)               # F_SETPIPE_SZ: room for 17 + 4 slots
fcntl.fcntl(w, fcntl.F_SETFL, 0)
os.write(w, b"s" * 65500)                    # stream slots
fcntl.fcntl(w, fcntl.F_SETFL, os.O_DIRECT)
for n in (100, 5000, 1):
    os.write(w, bytes([65 + n % 26]) * n)    # packets
os.dup2(r, 0)
open(sys.argv[1], "w").write(str(os.getpid()))
os.execvp("sleep", ["sleep", "100"])
PY
  P=$(pid_of p)
  wait_fd "$P" 0
  "$PIPECR" peek "$P:0" > "$TMP/all"
  [ "$(wc -c < "$TMP/all")" -eq 70601 ]
  [ "$(tail -c 1 "$TMP/all")" = "B" ]
  "$PIPECR" peek "$P:0" -n 65600 > "$TMP/head"
  [ "$(wc -c < "$TMP/head")" -eq 65600 ]
}
