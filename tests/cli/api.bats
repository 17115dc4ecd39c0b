#!/usr/bin/env bats
# api.bats: the C API (pipecr_ckpoint_pipe, pipecr_restore_pipe) and the command are one engine: an
# image either one makes, the other restores, to the same pipe. API_TOOL (tests/cli/api_tool.c)
# makes the reference pipe (16 KiB, "hello engine" in two slots, O_NONBLOCK read end at fd 5, write
# end at fd 6) and prints what it sees; every restore must print exactly what `api_tool make` prints.

load helpers

: "${API_TOOL:?set API_TOOL to pipecr_api_tool}"

expected() {
  "$API_TOOL" make
}

@test "the reference pipe is what the tool says" {
  run expected
  [ "$status" -eq 0 ]
  [ "$output" = "cap=16384 queued=12 bytes=hello engine r=rdonly,nonblock w=wronly" ]
}

@test "an image of pipecr_ckpoint_pipe restored in-process gives the same pipe" {
  want="$(expected)"
  "$API_TOOL" ckpt "$TMP/api.img"
  run "$API_TOOL" restore "$TMP/api.img"
  [ "$status" -eq 0 ]
  [ "$output" = "$want" ]
}

@test "an image of pipecr_ckpoint_pipe is restored by pipecr restore --exec" {
  want="$(expected)"
  "$API_TOOL" ckpt "$TMP/api.img"
  # The in-process image records no process: its fds are of recorded process 0.
  run "$PIPECR" restore "$TMP/api.img" --exec 0 -- "$API_TOOL" show 5 6
  [ "$status" -eq 0 ]
  [ "$output" = "$want" ]
  # show and ls read it as any image: one pipe, two fds.
  run "$PIPECR" show "$TMP/api.img"
  [ "$status" -eq 0 ]
}

@test "a pipecr dump of one process is restored in-process by pipecr_restore_pipe" {
  want="$(expected)"
  spawn holder "exec '$API_TOOL' hold '$TMP/hold.pid' </dev/null >/dev/null 2>&1" 3>&- &
  for i in $(seq 1 100); do [ -s "$TMP/hold.pid" ] && break; sleep 0.05; done
  PID=$(cat "$TMP/hold.pid")
  wait_fd "$PID" 6
  "$PIPECR" dump -t "$PID" -o "$TMP/cli.img"
  kill -9 "$PID"
  run "$API_TOOL" restore "$TMP/cli.img"
  [ "$status" -eq 0 ]
  [ "$output" = "$want" ]
  # And the same image through the command, for the record: the same pipe again.
  run "$PIPECR" restore "$TMP/cli.img" --exec "$PID" -- "$API_TOOL" show 5 6
  [ "$status" -eq 0 ]
  [ "$output" = "$want" ]
}
