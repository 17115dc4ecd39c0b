#!/usr/bin/env bats
# `note:` lines describe what a restore did: a failed restore prints only its one error line, never
# the notes of a plan that did not run; a restore that succeeds prints them.

load helpers

# trace NAME PID: a python3 process that holds PID ptrace-seized (PTRACE_SEIZE: PID keeps running,
# not stopped) until it is killed; its pid is in $TMP/NAME.pid, so teardown kills it, and the kernel
# detaches PID when it dies.
trace() {
  spawn "$1" "exec python3 -c '
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
if libc.ptrace(ctypes.c_long(0x4206), ctypes.c_int(int(sys.argv[1])), None, None) != 0:
    sys.exit(\"PTRACE_SEIZE: errno %d\" % ctypes.get_errno())
time.sleep(1000)
' $2" 3>&- &
}

# tracer_of PID: the TracerPid of PID's status.
tracer_of() {
  awk '/^TracerPid:/{print $2}' "/proc/$1/status"
}

@test "restore into a traced target: one error line (77), no notes; untraced: the notes" {
  spawn seq 'exec seq 1 100000' 3>&- | spawn sleep 'exec sleep 600' 3>&- &
  local seq sleep tracer i
  seq=$(pid_of seq)
  sleep=$(pid_of sleep)
  wait_fd "$sleep" 0
  wait_wchan "$seq" pipe_write
  "$PIPECR" dump -t "$seq" -t "$sleep" -o "$TMP/pl.img"
  trace tracer "$sleep"
  tracer=$(pid_of tracer)
  for i in $(seq 1 100); do [ "$(tracer_of "$sleep")" = "$tracer" ] && break; sleep 0.05; done
  [ "$(tracer_of "$sleep")" = "$tracer" ]

  run "$PIPECR" restore "$TMP/pl.img" --into "$sleep=$sleep"
  echo "$output"
  [ "$status" -eq 77 ]
  [ "${#lines[@]}" -eq 1 ]
  [[ "$output" == "pipecr restore: "* ]]
  [[ "$output" == *"$tracer"* ]]  # names the tracer
  [[ "$output" != *"note:"* ]]

  # The tracer gone, the same restore succeeds and says what it left out (the pipe seq holds too is
  # left as it is), notes first, then the summary.
  kill -9 "$tracer"
  for i in $(seq 1 100); do [ "$(tracer_of "$sleep")" = 0 ] && break; sleep 0.05; done
  [ "$(tracer_of "$sleep")" = 0 ]
  run "$PIPECR" restore "$TMP/pl.img" --into "$sleep=$sleep"
  echo "$output"
  [ "$status" -eq 0 ]
  [[ "${lines[0]}" == "pipecr restore: note: fd 0 of process $sleep left as it is: "* ]]
  [[ "${lines[-1]}" == "restored "*" into 1 process" ]]
  [ "$(awk '/^State:/{print $2}' "/proc/$sleep/status")" = "S" ]
}
