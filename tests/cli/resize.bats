#!/usr/bin/env bats
# pipecr resize: the capacity of another process's live pipe, and nothing else, changes.

load helpers

# A python process holding a pipe: fd R (read end, blocking) and fd W (write end, O_NONBLOCK),
# with "pipecr resize test\n" queued. Sets H, R, W.
start_holder() {
  spawn holder "exec python3 -c '
import os, sys, time
r, w = os.pipe()
os.set_blocking(w, False)
os.write(w, b\"pipecr resize test\\n\")
open(sys.argv[1], \"w\").write(\"%d %d\\n\" % (r, w))
time.sleep(100)
' '$TMP/fds'" 3>&- &
  H=$(pid_of holder)
  for i in $(seq 1 100); do [ -s "$TMP/fds" ] && break; sleep 0.05; done
  read -r R W < "$TMP/fds"
}

flags_of() { sed -n 's/^flags:[[:space:]]*//p' "/proc/$1/fdinfo/$2"; }

@test "resize grows a pipe another process holds, and changes nothing else" {
  start_holder
  rflags=$(flags_of "$H" "$R"); wflags=$(flags_of "$H" "$W")
  ino=$(pipe_inode "$H" "$R")
  before=$("$PIPECR" peek "$H:$R" | od -c)
  run "$PIPECR" resize "$H:$R" 1M
  echo "$output"
  [ "$status" -eq 0 ]
  [ "$output" = "$H:$R: capacity 65536 -> 1048576 bytes (19 queued)" ]
  # The capacity is the pipe's: the other end sees it too.
  cap=$("$PIPECR" ls -t "$H" --json | jq ".pipes[] | select(.inode == $ino) | .capacity")
  [ "$cap" -eq 1048576 ]
  # Same pipe at the same fds, same flags on both ends, same bytes.
  [ "$(pipe_inode "$H" "$R")" = "$ino" ] && [ "$(pipe_inode "$H" "$W")" = "$ino" ]
  [ "$(flags_of "$H" "$R")" = "$rflags" ]
  [ "$(flags_of "$H" "$W")" = "$wflags" ]
  [ "$("$PIPECR" peek "$H:$R" | od -c)" = "$before" ]
}

@test "resize through the write end, sizes with suffixes, rounded up to pages" {
  start_holder
  run "$PIPECR" resize "$H:$W" 64k
  [ "$status" -eq 0 ]
  [ "$output" = "$H:$W: capacity 65536 -> 65536 bytes (19 queued)" ]
  run "$PIPECR" resize "$H:$W" 5000
  [ "$output" = "$H:$W: capacity 65536 -> 8192 bytes (19 queued)" ]
  run "$PIPECR" resize "$H:$R" 256KiB --json
  [ "$status" -eq 0 ]
  echo "$output" | jq -e ".pid == $H and .fd == $R and .requested == 262144 and .old_capacity == 8192
                          and .capacity == 262144 and .bytes == 19"
}

@test "resize below the queued bytes: EBUSY, said so, pipe unchanged" {
  spawn yes 'exec yes' 3>&- | spawn sleep 'exec sleep 100' 3>&- &
  Y=$(pid_of yes); S=$(pid_of sleep)
  wait_wchan "$Y" pipe_write
  ino=$(pipe_inode "$S" 0)
  before=$("$PIPECR" peek "$S:0" | md5sum)
  run "$PIPECR" resize "$S:0" 4096
  echo "$output"
  [ "$status" -eq 69 ]
  [ "${#lines[@]}" -eq 1 ]
  echo "$output" | grep -F "pipecr resize: $S:0: cannot shrink the pipe to 4096 bytes: it holds 65536 bytes"
  echo "$output" | grep -F "(EBUSY)"
  run "$PIPECR" ls -t "$S" --json
  echo "$output" | jq -e ".pipes[] | select(.inode == $ino) | .capacity == 65536 and .bytes == 65536"
  [ "$("$PIPECR" peek "$S:0" | md5sum)" = "$before" ]
  # The writer is still blocked on the same full pipe.
  grep -q pipe_write "/proc/$Y/wchan"
}

@test "resize above pipe-max-size without CAP_SYS_RESOURCE: EPERM, said so" {
  start_holder
  max=$(cat /proc/sys/fs/pipe-max-size)
  ino=$(pipe_inode "$H" "$R")
  # Drop CAP_SYS_RESOURCE whatever this machine grants (CAP_SYS_PTRACE stays for pidfd_getfd).
  run setpriv --inh-caps=-sys_resource --bounding-set=-sys_resource "$PIPECR" resize "$H:$R" $((max * 2))
  echo "$output"
  [ "$status" -eq 69 ]
  echo "$output" | grep -F "pipecr resize: $H:$R: $((max * 2)) bytes is above /proc/sys/fs/pipe-max-size ($max)"
  echo "$output" | grep -F "CAP_SYS_RESOURCE (EPERM)"
  run "$PIPECR" ls -t "$H" --json
  echo "$output" | jq -e ".pipes[] | select(.inode == $ino) | .capacity == 65536"
}

@test "resize refuses bad input with one line and exit 64, 69 or 75" {
  start_holder
  run "$PIPECR" resize "$H" 64k
  [ "$status" -eq 64 ] && [ "${#lines[@]}" -eq 1 ]
  echo "$output" | grep -F "'$H' is not PID:FD"
  run "$PIPECR" resize "$H:$R" 64q
  [ "$status" -eq 64 ] && [ "${#lines[@]}" -eq 1 ]
  echo "$output" | grep -F "'64q' is not a size"
  run "$PIPECR" resize "$H:$R" 4G
  [ "$status" -eq 64 ]
  run "$PIPECR" resize "$H:99" 64k
  [ "$status" -eq 64 ]
  echo "$output" | grep -F "$H:99 is not an open fd"
  exec 7<"$TMP/fds"
  run "$PIPECR" resize "$$:7" 64k
  exec 7<&-
  [ "$status" -eq 69 ]
  echo "$output" | grep -F "$$:7 is not a pipe or FIFO"
  run "$PIPECR" resize 999999999:0 64k
  [ "$status" -eq 75 ] || [ "$status" -eq 71 ]
  echo "$output" | grep -F "process 999999999 does not exist"
  # Nothing changed.
  ino=$(pipe_inode "$H" "$R")
  run "$PIPECR" ls -t "$H" --json
  echo "$output" | jq -e ".pipes[] | select(.inode == $ino) | .capacity == 65536 and .bytes == 19"
}
