#!/usr/bin/env bats
# links.bats: a real event-loop program keeps hearing its pipe after `pipecr restore --into`
# (issue 7). The program is Python asyncio (links/asyncio_reader.py): its loop watches the read
# end of a pipe with epoll (loop.add_reader). A restore in place keeps the watch; one that puts a
# new pipe there (--replace) adds the watch the dump recorded again on the new file. The same holds
# for an epoll in a thread's own fd table (links/thread_epoll.py).

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

@test "asyncio: with --replace the loop still hears its pipe: the epoll watch follows the new file" {
  start
  say "one;"
  heard "one;"
  "$PIPECR" dump -t "$PID" -o "$TMP/img"
  run "$PIPECR" restore --replace "$TMP/img" --into "$PID"
  echo "$output"
  [ "$status" -eq 0 ]
  [[ "$output" == *"(0 in place, 1 replaced;"* ]]
  # Said, not done in silence: which epoll got which watch back.
  [[ "$output" == *"note: epoll fd "*" of process $PID: 1 watch re-added on the restored pipe ends (fd 40)"* ]]
  [[ "$output" != *"will not hear"* ]]
  say "two;END"
  heard "one;two;END"
}

@test "asyncio: the dump records the loop's epoll watch; show and show --json print it" {
  start
  "$PIPECR" dump -t "$PID" -o "$TMP/img"
  local epfd
  epfd=$(for f in /proc/$PID/fd/*; do [ "$(readlink "$f")" = "anon_inode:[eventpoll]" ] && basename "$f"; done | head -1)
  [ -n "$epfd" ]
  run "$PIPECR" show "$TMP/img"
  echo "$output"
  [ "$status" -eq 0 ]
  echo "$output" | grep -F "Epoll watches on pipe ends"
  echo "$output" | grep -E "^  epoll 1 \(fd $epfd of $PID\) watches fd 40 \(file [0-9]+, pipe [0-9]+\): EPOLLIN,EPOLLERR,EPOLLHUP; data 0x[0-9a-f]*28$"
  "$PIPECR" show --json "$TMP/img" > "$TMP/doc.json"
  # Python's epoll sets data.fd (40) and leaves the upper half of the data as it finds it.
  jq -e --argjson pid "$PID" --argjson ep "$epfd" '[.fds[] | select(.pid == $pid and .fd == 40) | .file][0] as $f |
      .epoll_watches | length == 1 and .[0].epoll == 1 and
      .[0].pid == $pid and .[0].epoll_fd == $ep and .[0].fd == 40 and .[0].file == $f and
      .[0].events == ["EPOLLIN", "EPOLLERR", "EPOLLHUP"] and .[0].events_hex == "0x19" and
      (.[0].data_hex | endswith("28"))' "$TMP/doc.json"
  say "END"
  heard "END"
}

@test "a thread's own fd table: its epoll watch is dumped with the thread, shown, and follows --replace" {
  python3 "$BATS_TEST_DIRNAME/links/thread_epoll.py" "$TMP/loop.pid" "$TMP/heard" &
  local i tid
  PID=
  for i in $(seq 1 200); do
    [ -s "$TMP/loop.pid" ] && PID=$(cat "$TMP/loop.pid") && break
    sleep 0.05
  done
  [ -n "$PID" ]
  tid=$(cat "$TMP/loop.pid.tid")
  [ "$tid" != "$PID" ]
  printf 'one;' > "/proc/$PID/task/$tid/fd/41"
  heard "one;"
  "$PIPECR" dump -t "$PID" -o "$TMP/img"
  run "$PIPECR" show "$TMP/img"
  echo "$output"
  echo "$output" | grep -E "^  epoll 1 \(fd 44 of $PID/$tid\) watches fd 40 \(file [0-9]+, pipe [0-9]+\): EPOLLIN,EPOLLERR,EPOLLHUP; data 0x[0-9a-f]*28$"
  "$PIPECR" show --json "$TMP/img" > "$TMP/doc.json"
  jq -e --argjson pid "$PID" --argjson tid "$tid" '.epoll_watches | length == 1 and .[0].pid == $pid and
      .[0].tid == $tid and .[0].epoll_fd == 44 and .[0].fd == 40' "$TMP/doc.json"
  run "$PIPECR" restore --replace "$TMP/img" --into "$PID"
  echo "$output"
  [ "$status" -eq 0 ]
  [[ "$output" == *"(0 in place, 1 replaced;"* ]]
  [[ "$output" == *"note: epoll fd 44 of thread $tid of process $PID: 1 watch re-added on the restored pipe ends (fd 40)"* ]]
  [[ "$output" != *"will not hear"* ]]
  # The thread, blocked in epoll_wait on its own table's epoll through the restore, hears the new pipe.
  printf 'two;END' > "/proc/$PID/task/$tid/fd/41"
  heard "one;two;END"
}

# fifo_bytes PATH: the bytes queued in the FIFO at PATH (opened O_RDWR|O_NONBLOCK: never blocks).
fifo_bytes() {
  python3 -c "
import fcntl, os, struct, termios, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_NONBLOCK)
print(struct.unpack('i', fcntl.ioctl(fd, termios.FIONREAD, b'\0' * 4))[0])" "$1"
}

@test "FIFO: another process holding it refuses the restore unless allowed" {
  mkfifo "$TMP/f"
  spawn target "exec 3<>'$TMP/f'; printf recorded >&3; exec sleep 100" &
  local target
  target=$(pid_of target)
  "$PIPECR" dump -t "$target" -o "$TMP/img"
  # A stranger opens it after the dump: it would read what the restore puts there.
  spawn stranger "exec sleep 100 < '$TMP/f'" &
  local stranger
  stranger=$(pid_of stranger)
  for i in $(seq 1 100); do [ "$(readlink /proc/$stranger/fd/0)" = "$TMP/f" ] && break; sleep 0.05; done
  run "$PIPECR" restore "$TMP/img" --into "$target"
  echo "$output"
  [ "$status" -eq 69 ]
  [[ "$output" == *"process $stranger (sleep) has it open and is not restored"* ]]
  [[ "$output" == *"--allow-outside-fifo-holders"* ]]
  [ "$(echo "$output" | wc -l)" -eq 1 ]
  # Allowed: the FIFO is replaced (a FIFO that holds bytes is refused, so drain it first).
  python3 -c "import os; fd=os.open('/proc/$target/fd/3', os.O_RDONLY|os.O_NONBLOCK); os.read(fd, 100)"
  run "$PIPECR" restore "$TMP/img" --into "$target" --allow-outside-fifo-holders
  echo "$output"
  [ "$status" -eq 0 ]
  [[ "$output" == *"note: FIFO $TMP/f: process $stranger (sleep) has it open"* ]]
  [ "$(fifo_bytes "/proc/$target/fd/3")" -eq 8 ]
}

@test "FIFO: restored in the target's mount namespace, not pipecr's" {
  mkdir "$TMP/d"
  mkfifo "$TMP/d/f"   # pipecr's namespace: this FIFO must get nothing
  spawn target "exec unshare -m sh -c \"mount -t tmpfs none '$TMP/d' && mkfifo '$TMP/d/f' && exec 3<>'$TMP/d/f' && printf recorded >&3 && exec sleep 100\"" &
  local target
  target=$(pid_of target)
  for i in $(seq 1 100); do [ "$(readlink /proc/$target/fd/3 2>/dev/null)" = "$TMP/d/f" ] && break; sleep 0.05; done
  "$PIPECR" dump -t "$target" -o "$TMP/img"
  # Held after the dump (so that the dump does not take it for the same FIFO by its path), so bytes
  # written into it would stay.
  spawn host "exec 3<>'$TMP/d/f'; exec sleep 100" &
  local host
  host=$(pid_of host)
  for i in $(seq 1 100); do [ "$(readlink /proc/$host/fd/3 2>/dev/null)" = "$TMP/d/f" ] && break; sleep 0.05; done
  local theirs
  theirs=$(stat -L -c %d:%i "/proc/$target/fd/3")
  [ "$theirs" != "$(stat -L -c %d:%i "$TMP/d/f")" ]
  for mode in "" "--replace"; do
    # Empty the target's FIFO, then restore it.
    python3 -c "import os; fd=os.open('/proc/$target/fd/3', os.O_RDONLY|os.O_NONBLOCK); os.read(fd, 100)"
    [ "$(fifo_bytes "/proc/$target/fd/3")" -eq 0 ]
    run "$PIPECR" restore -v "$TMP/img" --into "$target" $mode
    echo "$output"
    [ "$status" -eq 0 ]
    [ "$(fifo_bytes "/proc/$target/fd/3")" -eq 8 ]
    [ "$(stat -L -c %d:%i "/proc/$target/fd/3")" = "$theirs" ]
    [ "$(fifo_bytes "/proc/$host/fd/3")" -eq 0 ]
  done
}
