#!/usr/bin/env bats
# Untrusted input (issue 9): hostile images, image paths that are not regular files, output paths
# that are not regular files, images through pipes (`-o -`, `show -`, `restore -`), and control
# characters in names. Every refusal is one escaped line, the documented exit code, and no change:
# the target's fd 0 is checked to be the same pipe afterwards.

load helpers

: "${MKIMAGE:?set MKIMAGE to the pipecr_mkimage binary}"

# A sleep whose stdin is a pipe holding "hello pipe\n" (the writer has exited).
start_holder() {
  printf 'hello pipe\n' | spawn holder 'exec sleep 100' 3>&- &
  H=$(pid_of holder)
  wait_fd "$H" 0
  for i in $(seq 1 100); do
    [ "$("$PIPECR" peek "$H:0" | wc -c)" -eq 11 ] && break
    sleep 0.05
  done
}

# A sleep with an empty pipe as stdin (another sleep holds its write end), to restore into.
start_target() {
  spawn feeder 'exec sleep 100' 3>&- | spawn target 'exec sleep 100' 3>&- &
  T=$(pid_of target)
  wait_fd "$T" 0
  T_IN=$(readlink "/proc/$T/fd/0")
}

target_unchanged() {
  [ "$(readlink "/proc/$T/fd/0")" = "$T_IN" ]
  [ "$(awk '/^State:/{print $2}' "/proc/$T/status")" = "S" ]
}

@test "restore: slots longer than a page here (INFO page size 65536) are refused, 65, target untouched" {
  start_target
  "$MKIMAGE" bigpage "$TMP/img"
  run "$PIPECR" restore "$TMP/img" --into "$T=6000"
  echo "$output"
  [ "$status" -eq 65 ]
  echo "$output" | grep -F "cannot be restored here" | grep -F "page size 4096"
  [ "$(echo "$output" | wc -l)" -eq 1 ]
  target_unchanged
  # show describes it and says a restore here refuses it
  run "$PIPECR" show "$TMP/img"
  [ "$status" -eq 0 ]
  echo "$output" | grep -F "restore here: REFUSED"
}

@test "restore: capacity 0xFFFFFFFF is a bad image (65), not a system error" {
  start_target
  "$MKIMAGE" hugecap "$TMP/img"
  run "$PIPECR" restore "$TMP/img" --into "$T=6000"
  echo "$output"
  [ "$status" -eq 65 ]
  echo "$output" | grep -F "capacity 4294967295"
  target_unchanged
}

@test "restore: a relative FIFO path is refused, never resolved against the working directory" {
  start_target
  mkfifo "$TMP/f"
  "$MKIMAGE" fifo f 0600 "$TMP/img"
  cd "$TMP"
  run "$PIPECR" restore "$TMP/img" --into "$T=6000"
  echo "$output"
  [ "$status" -eq 65 ]
  echo "$output" | grep -F "path is not absolute"
  target_unchanged
}

@test "restore --create-fifos: a recorded mode beyond 0777 (6777) is refused and nothing is created" {
  start_target
  "$MKIMAGE" fifo "$TMP/new.fifo" 6777 "$TMP/img"
  run "$PIPECR" restore "$TMP/img" --into "$T=6000" --create-fifos
  echo "$output"
  [ "$status" -eq 65 ]
  echo "$output" | grep -F "mode 06777 has bits beyond 0777"
  [ ! -e "$TMP/new.fifo" ]
  target_unchanged
  # 0640 is created with exactly that mode
  "$MKIMAGE" fifo "$TMP/ok.fifo" 640 "$TMP/img2"
  run "$PIPECR" restore "$TMP/img2" --into "$T=6000" --create-fifos
  echo "$output"
  [ "$status" -eq 0 ]
  [ "$(stat -c %a "$TMP/ok.fifo")" = 640 ]
  [ "$("$PIPECR" peek "$T:0")" = "abc" ]
}

@test "control characters in a FIFO path are escaped in errors and in show" {
  start_target
  "$MKIMAGE" fifo "$TMP/x"$'\n'$'\e'"[31mred" 0600 "$TMP/img"
  run "$PIPECR" restore "$TMP/img" --into "$T=6000"
  echo "$output"
  [ "$status" -eq 66 ]
  [ "$(echo "$output" | wc -l)" -eq 1 ]
  echo "$output" | grep -F 'x\x0a\x1b[31mred does not exist'
  ! echo "$output" | grep -q $'\e'
  run "$PIPECR" show "$TMP/img"
  [ "$status" -eq 0 ]
  echo "$output" | grep -F 'x\x0a\x1b[31mred'
  ! echo "$output" | grep -q $'\e'
  target_unchanged
}

@test "ls: a FIFO name with control characters is escaped" {
  mkfifo "$TMP/y"$'\n'$'\e'"[1mz"
  spawn holder "exec sleep 100 <> '$TMP/y"$'\n'$'\e'"[1mz'" 3>&- &
  H=$(pid_of holder)
  wait_fd "$H" 0
  run "$PIPECR" ls -t "$H"
  echo "$output"
  [ "$status" -eq 0 ]
  echo "$output" | grep -F 'y\x0a\x1b[1mz'
  ! echo "$output" | grep -q $'\e'
  for view in --graph --dot; do
    run "$PIPECR" ls -t "$H" "$view"
    echo "$output"
    [ "$status" -eq 0 ]
    echo "$output" | grep -F 'x0a'
    ! echo "$output" | grep -q $'\e'
  done
}

@test "restore: the prlimit advice for fd 2147483647 does not overflow" {
  start_target
  "$MKIMAGE" bigfd "$TMP/img"
  run "$PIPECR" restore "$TMP/img" --into "$T=6000"
  echo "$output"
  [ "$status" -eq 71 ]
  echo "$output" | grep -F -- "--nofile=2147483712"
  target_unchanged
}

@test "image paths: a FIFO, a directory and a device are refused at once with 66" {
  mkfifo "$TMP/fifo"
  for path in "$TMP/fifo" "$TMP" /dev/zero; do
    for cmd in show restore; do
      extra=()
      [ "$cmd" = restore ] && extra=(--into 1)
      run timeout 10 "$PIPECR" "$cmd" "$path" "${extra[@]}"
      echo "$cmd $path: $status $output"
      [ "$status" -eq 66 ]
      echo "$output" | grep -F "not a regular file"
    done
  done
}

@test "image paths: a file that is not an image is refused (65) before it is copied" {
  head -c 100000 /dev/urandom > "$TMP/junk"
  run "$PIPECR" show "$TMP/junk"
  echo "$output"
  [ "$status" -eq 65 ]
  echo "$output" | grep -F "not a pipecr image (bad magic)"
}

# show - / restore - with SOURCE on stdin: the spool may not grow past 10 MiB (ulimit -f), so a pipecr
# that copied garbage before looking at it dies of SIGXFSZ instead of filling $TMPDIR.
stdin_image() {
  local source=$1
  shift
  run timeout 20 bash -c "ulimit -f 10240; export TMPDIR='$TMP/spool'; $source | '$PIPECR' $*"
}

@test "show -, restore -: garbage on stdin is refused (65) from its first bytes, before it is copied" {
  start_target
  mkdir "$TMP/spool"
  local t0 ms
  for cmd in "show -" "restore - --into $T"; do
    t0=$(date +%s%N)
    stdin_image "cat /dev/zero" "$cmd"
    ms=$((($(date +%s%N) - t0) / 1000000))
    echo "$cmd: exit $status after $ms ms: $output"
    [ "$status" -eq 65 ]
    [ "${#lines[@]}" -eq 1 ]
    [ "$output" = "pipecr ${cmd%% *}: stdin: image offset 0: not a pipecr image (bad magic)" ]
    [ "$ms" -lt 3000 ]
  done
  target_unchanged
  # a good file header, then no INFO record: refused at the first record's header
  "$MKIMAGE" bigpage "$TMP/img"
  stdin_image "{ head -c 24 '$TMP/img'; cat /dev/zero; }" show -
  echo "$output"
  [ "$status" -eq 65 ]
  [ "$output" = "pipecr show: stdin: image offset 24: first record is type 0x0, not INFO" ]
  # an INFO record whose length no image can hold
  stdin_image "{ head -c 32 '$TMP/img'; printf '\\377\\377\\377\\377\\377\\377\\377\\377'; cat /dev/zero; }" show -
  echo "$output"
  [ "$status" -eq 65 ]
  [[ "$output" == "pipecr show: stdin: image offset 24: record INFO length 18446744073709551615 cannot fit in any image"* ]]
  # nothing was left in the spool directory, and a real image still reads from stdin
  [ -z "$(ls -A "$TMP/spool")" ]
  stdin_image "cat '$TMP/img'" show -
  [ "$status" -eq 0 ]
}

@test "dump -o: a device, a FIFO and links to them are refused (73) and left as they were" {
  start_holder
  mkfifo "$TMP/fifo"
  ln -s /dev/null "$TMP/null-link"
  ln -s "$TMP/fifo" "$TMP/fifo-link"
  for out in /dev/null "$TMP/fifo" "$TMP/null-link" "$TMP/fifo-link" "$TMP" /proc/self/fd/0; do
    run "$PIPECR" dump -t "$H" -o "$out" < /dev/null
    echo "$out: $status $output"
    [ "$status" -eq 73 ]
  done
  [ -c /dev/null ]
  [ -p "$TMP/fifo" ]
  [ -L "$TMP/null-link" ] && [ -L "$TMP/fifo-link" ]
  # a link to a regular file: the file is replaced by the image, the link stays
  touch "$TMP/real"
  ln -s "$TMP/real" "$TMP/real-link"
  run "$PIPECR" dump -t "$H" -o "$TMP/real-link"
  [ "$status" -eq 0 ]
  [ -L "$TMP/real-link" ]
  "$PIPECR" show "$TMP/real" | grep -F "11 bytes queued"
}

@test "dump -o - | show - and dump -o - | restore - --into: images through pipes" {
  start_holder
  start_target
  run bash -c "'$PIPECR' dump -t $H -o - | '$PIPECR' show -"
  echo "$output"
  [ "$status" -eq 0 ]
  echo "$output" | grep -F "image (stdin)"
  echo "$output" | grep -F "1 process, " | grep -F " (11 bytes queued)"
  run bash -c "'$PIPECR' dump -t $H -o - | '$PIPECR' restore - --into $T=$H"
  echo "$output"
  [ "$status" -eq 0 ]
  [ "$(readlink "/proc/$T/fd/0")" != "$T_IN" ]
  [ "$("$PIPECR" peek "$T:0")" = "hello pipe" ]
  # the holder still has its bytes: a dump leaves them
  [ "$("$PIPECR" peek "$H:0")" = "hello pipe" ]
  # and into the dumped process itself: it still holds that pipe, so it is left as it is (a note)
  run bash -c "'$PIPECR' dump -t $H -o - | '$PIPECR' restore - --into $H"
  echo "$output"
  [ "$status" -eq 0 ]
  [ "$("$PIPECR" peek "$H:0")" = "hello pipe" ]
}

@test "restore -: a bad image on stdin is refused before the target is touched" {
  start_target
  "$MKIMAGE" bigpage "$TMP/img"
  run bash -c "cat '$TMP/img' | '$PIPECR' restore - --into $T=6000"
  [ "$status" -eq 65 ]
  echo "$output" | grep -F "stdin: cannot be restored here"
  head -c 100 "$TMP/img" > "$TMP/short"
  run bash -c "'$PIPECR' restore - --into $T=6000 < '$TMP/short'"
  [ "$status" -eq 65 ]
  target_unchanged
}

@test "dump -o - refuses a terminal; --version names the image format" {
  run "$PIPECR" --version
  [ "$status" -eq 0 ]
  echo "$output" | grep -F "image format: reads version 1, writes version 1"
  if command -v script >/dev/null; then
    start_holder
    run script -qec "'$PIPECR' dump -t $H -o -" /dev/null
    echo "$output"
    [ "$status" -eq 64 ]
    echo "$output" | grep -F "stdout is a terminal"
  fi
}
