# helpers.bash: shared by the pipecr bats tests.
#
# Background processes are started through spawn, which records their pids for teardown and
# closes bats's fd 3 in them (a background process holding fd 3 makes bats wait for it forever).

: "${PIPECR:?set PIPECR to the pipecr binary}"

setup() {
  TMP="$(mktemp -d)"
}

teardown() {
  local f
  for f in "$TMP"/*.pid; do
    [ -e "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}

# spawn NAME SHELL-COMMAND...: runs the command in the background as `sh -c`; the process (which
# should exec its final program) writes its pid to $TMP/NAME.pid. A pipeline of spawns is built
# by the caller with `|`.
spawn() {
  local name="$1"
  shift
  sh -c "echo \$\$ > '$TMP/$name.pid'; $*"
}

# pid_of NAME: waits (up to 5 s) for $TMP/NAME.pid and prints it.
pid_of() {
  local i
  for i in $(seq 1 100); do
    if [ -s "$TMP/$1.pid" ]; then
      cat "$TMP/$1.pid"
      return 0
    fi
    sleep 0.05
  done
  return 1
}

# wait_wchan PID PATTERN: waits (up to 5 s) until the process sleeps in a kernel function matching PATTERN.
wait_wchan() {
  local i
  for i in $(seq 1 100); do
    grep -q "$2" "/proc/$1/wchan" 2>/dev/null && return 0
    sleep 0.05
  done
  return 1
}

# wait_queued PID FD: waits until /proc/PID/fd/FD exists (the process started and holds it).
wait_fd() {
  local i
  for i in $(seq 1 100); do
    [ -e "/proc/$1/fd/$2" ] && return 0
    sleep 0.05
  done
  return 1
}

pipe_inode() {
  readlink "/proc/$1/fd/$2" | sed -n 's/^pipe:\[\([0-9]*\)\]$/\1/p'
}
