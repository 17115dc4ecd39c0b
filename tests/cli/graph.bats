#!/usr/bin/env bats
# pipecr ls --graph / --dot / --json / --watch: pipelines drawn as chains, from real pipelines.

load helpers

PTY_RUN="$BATS_TEST_DIRNAME/pty_run.py"
# The interpreter itself, not a wrapper script (pyenv's shim is bash for a while): comm is python3.
PY=$(python3 -c 'import sys; print(sys.executable)')

# wait_comm PID NAME: waits (up to 10 s) until the process runs NAME (after its exec).
wait_comm() {
  local i
  for i in $(seq 1 200); do
    [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] && return 0
    sleep 0.05
  done
  return 1
}

# seq | gzip | sleep: sleep never reads, so both pipes fill and seq and gzip block in write().
start_stuck_pipeline() {
  spawn seq 'exec seq 1 100000000' 3>&- | spawn gzip 'exec gzip -1' 3>&- | spawn sleep 'exec sleep 100' 3>&- &
  Q=$(pid_of seq); G=$(pid_of gzip); Z=$(pid_of sleep)
  wait_wchan "$G" pipe_write
  wait_wchan "$Q" pipe_write
}

# python3 writes a line every 10 ms through stdio (block-buffered on a pipe, unless
# PYTHONUNBUFFERED says otherwise) to cat, which starves.
start_buffering_writer() {
  spawn py "exec env -u PYTHONUNBUFFERED $PY -c 'import time
while True:
    print(\"tick\")
    time.sleep(0.01)'" 3>&- | spawn cat 'exec cat' 3>&- &
  P=$(pid_of py); C=$(pid_of cat)
  wait_comm "$P" python3
  wait_wchan "$C" pipe_read
}

@test "ls --graph draws a stuck pipeline as one chain with blocked writers marked" {
  start_stuck_pipeline
  run "$PIPECR" ls --graph -t "$Q" -t "$G" -t "$Z"
  echo "$output"
  [ "$status" -eq 0 ]
  echo "$output" | grep -xF "seq($Q)! -> [65536/65536 full, WRITER BLOCKED] -> gzip($G)! -> [65536/65536 full, WRITER BLOCKED] -> sleep($Z)"
  echo "$output" | grep -F "! = blocked in read(), write() or open() on the pipe beside it"
  # Not a terminal: no colour.
  ! echo "$output" | grep -q $'\x1b'
}

@test "ls --graph without -t finds the same chain among every process" {
  start_stuck_pipeline
  run "$PIPECR" ls --graph
  [ "$status" -eq 0 ]
  # Each stage's bash subshell (the spawn function) shares its stdin and stdout: shared pipes.
  echo "$output" | grep -E "^\{bash\([0-9]+\),seq\($Q\)!\} -> \[65536/65536 full, WRITER BLOCKED, shared\] -> \{bash\([0-9]+\),gzip\($G\)!\} -> \[65536/65536 full, WRITER BLOCKED, shared\] -> \{bash\([0-9]+\),sleep\($Z\)\}$"
}

@test "ls --graph says a starved reader's writer probably buffers its output, and not for an idle writer" {
  start_buffering_writer
  spawn idle 'exec sleep 100' 3>&- | spawn idlecat 'exec cat' 3>&- &
  I=$(pid_of idle); K=$(pid_of idlecat)
  wait_wchan "$K" pipe_read
  wait_wchan "$I" nanosleep  # past its exec and start-up, which do use CPU
  run "$PIPECR" ls --graph -t "$P" -t "$C" -t "$I" -t "$K"
  echo "$output"
  [ "$status" -eq 0 ]
  echo "$output" | grep -xF "python3($P) -> [0/65536 empty, READER BLOCKED] -> cat($C)!"
  echo "$output" | grep -xF "sleep($I) -> [0/65536 empty, READER BLOCKED] -> cat($K)!"
  echo "$output" | grep -F "hint: cat($C) waits on an empty pipe while its writer python3($P) is"
  echo "$output" | grep -F "python3 probably buffers its output (stdio block-buffers a pipe). Make it line-buffered: stdbuf -oL"
  # sleep is idle, not buffering: no hint about it.
  [ "$(echo "$output" | grep -c '^hint:')" -eq 1 ]
  # The same writer unbuffered (-u) writes every line at once: cat is served, no hint.
  spawn pyu "exec $PY -u -c 'import time
while True:
    print(\"tick\")
    time.sleep(0.01)'" 3>&- | spawn catu 'exec cat' 3>&- &
  U=$(pid_of pyu); V=$(pid_of catu)
  wait_comm "$U" python3
  wait_wchan "$V" pipe_read
  run "$PIPECR" ls --graph -t "$U" -t "$V"
  echo "$output"
  echo "$output" | grep -F "python3($U) -> ["
  ! echo "$output" | grep -q '^hint:'
  run "$PIPECR" ls --graph --json -t "$P" -t "$C" -t "$I" -t "$K"
  echo "$output" | jq -e ".hints | length == 1 and .[0].kind == \"stdio_buffering\" and .[0].reader == $C and .[0].writer == $P"
}

@test "ls --graph shows FIFOs by path and processes blocked opening them" {
  mkfifo "$TMP/f"
  spawn reader "exec cat '$TMP/f'" 3>&- &
  R=$(pid_of reader)
  wait_wchan "$R" wait_for_partner
  run "$PIPECR" ls --graph -t "$R"
  echo "$output"
  # No fd yet: nobody writes, capacity and fill unknown, cat blocked in open().
  echo "$output" | grep -F "(none) -> [fifo $TMP/f ?/?, OPEN WAITING] -> cat($R)!"
  spawn writer "exec sleep 100 > '$TMP/f'" 3>&- &
  W=$(pid_of writer)
  wait_wchan "$R" pipe_read
  run "$PIPECR" ls --graph -t "$R" -t "$W"
  echo "$output"
  echo "$output" | grep -F "sleep($W) -> [fifo $TMP/f 0/65536 empty, READER BLOCKED] -> cat($R)!"
}

@test "ls --graph marks a pipe held by several processes as shared" {
  spawn w "sleep 100 & echo \$! > '$TMP/child.pid'; exec sleep 101" 3>&- | spawn r 'exec cat' 3>&- &
  W=$(pid_of w); R=$(pid_of r); K=$(pid_of child)
  wait_wchan "$R" pipe_read
  run "$PIPECR" ls --graph -t "$W" -t "$K" -t "$R"
  echo "$output"
  lo=$(( W < K ? W : K )); hi=$(( W < K ? K : W ))
  echo "$output" | grep -xF "{sleep($lo),sleep($hi)} -> [0/65536 empty, READER BLOCKED, shared] -> cat($R)!"
}

@test "ls --dot writes a Graphviz digraph of the pipeline" {
  start_stuck_pipeline
  i1=$(pipe_inode "$G" 0); i2=$(pipe_inode "$Z" 0)
  run "$PIPECR" ls --dot -t "$Q" -t "$G" -t "$Z"
  echo "$output"
  [ "$status" -eq 0 ]
  [ "${lines[0]}" = "digraph pipecr {" ] && [ "${lines[-1]}" = "}" ]
  echo "$output" | grep -xF "  p$Q [shape=box, label=\"seq\\n$Q\"];"
  echo "$output" | grep -xF "  i$i1 [shape=ellipse, color=red, label=\"pipe:[$i1]\\n65536/65536 full\"];"
  echo "$output" | grep -xF "  p$Q -> i$i1 [color=red, penwidth=2, label=\"blocked\"];"
  echo "$output" | grep -xF "  i$i1 -> p$G;"
  echo "$output" | grep -xF "  i$i2 -> p$Z;"
  if command -v dot >/dev/null; then echo "$output" | dot -Tsvg >/dev/null; fi
}

@test "ls --graph --json gives the chain in flow order" {
  start_stuck_pipeline
  i1=$(pipe_inode "$G" 0); i2=$(pipe_inode "$Z" 0)
  run "$PIPECR" ls --graph --json -t "$Q" -t "$G" -t "$Z"
  [ "$status" -eq 0 ]
  echo "$output" | jq -e ".chains | any(. == [$i1, $i2])"
  echo "$output" | jq -e ".pipes[] | select(.inode == $i1) | .writers == [$Q] and .readers == [$G]
                          and .blocked_writers == [$Q] and (.state | index(\"full\")) and .shared == false"
  echo "$output" | jq -e "[.processes[].comm] | sort == [\"gzip\", \"seq\", \"sleep\"]"
}

@test "ls --graph colours only on a terminal, and never with NO_COLOR" {
  start_stuck_pipeline
  python3 "$PTY_RUN" "$TMP/tty" 20 -- "$PIPECR" ls --graph -t "$Q" -t "$G" -t "$Z"
  grep -qF $'\x1b[1;31m[65536/65536 full, WRITER BLOCKED]\x1b[0m' "$TMP/tty"
  NO_COLOR=1 python3 "$PTY_RUN" "$TMP/nocolor" 20 -- "$PIPECR" ls --graph -t "$Q" -t "$G" -t "$Z"
  grep -qF "seq($Q)! -> [65536/65536 full, WRITER BLOCKED] -> gzip($G)!" "$TMP/nocolor"
  ! grep -q $'\x1b' "$TMP/nocolor"
}

# A writer moving 64 KiB every 50 ms into cat, which copies it to /dev/null.
start_flow() {
  spawn flow "exec $PY -c 'import os, time
b = b\"x\" * 65536
while True:
    os.write(1, b)
    time.sleep(0.05)'" 3>&- | spawn sink 'exec cat > /dev/null' 3>&- &
  F=$(pid_of flow); S=$(pid_of sink)
  wait_comm "$F" python3
  wait_fd "$S" 0
}

@test "ls --watch on a terminal redraws in place with bytes per second" {
  start_flow
  NO_COLOR=1 python3 "$PTY_RUN" "$TMP/watch" 30 -- "$PIPECR" ls --watch 0.5 -n 3 -t "$F" -t "$S"
  python3 - "$TMP/watch" "$F" "$S" <<'PY'
import re, sys
raw = open(sys.argv[1], "rb").read().decode().replace("\r\n", "\n")  # the pty's onlcr
f, s = sys.argv[2], sys.argv[3]
# One full clear at the start, then every frame from the cursor home, lines cleared to their end,
# the rest of the screen cleared after: no flicker.
assert raw.startswith("\x1b[?25l\x1b[H\x1b[2J"), repr(raw[:40])
assert raw.count("\x1b[2J") == 1, raw.count("\x1b[2J")
frames = raw.split("\x1b[H")[2:]
assert len(frames) == 3, len(frames)
for i, fr in enumerate(frames, 1):
    assert fr.rstrip("\x1b[?25h").endswith("\x1b[J"), repr(fr[-20:])
    lines = fr.split("\n")
    assert all(l.endswith("\x1b[K") for l in lines[:-1]), lines
    assert f"frame {i}" in lines[0], lines[0]
    assert f"python3({f}" in fr and f"cat({s}" in fr, fr
# From the second frame on, the writer's and the reader's rates show.
for fr in frames[1:]:
    # (the writer may show a read rate too: /proc/PID/io counts every read() of its own, e.g. imports)
    w = re.search(rf"python3\({f}(?: r:[0-9.]+[kMG]?/s)? w:([0-9.]+)([kMG]?)/s\)", fr)
    r = re.search(rf"cat\({s} r:([0-9.]+)([kMG]?)/s", fr)
    assert w and r, fr
    assert w.group(2) in ("k", "M") and r.group(2) in ("k", "M"), (w.group(0), r.group(0))
assert raw.endswith("\x1b[?25h"), repr(raw[-20:])
PY
}

@test "ls --watch stops on Ctrl-C with exit 0 and the cursor shown again" {
  start_flow
  run python3 "$PTY_RUN" "$TMP/watch" 30 --sigint-after 1.5 -- "$PIPECR" ls --watch 0.3 -t "$F" -t "$S"
  [ "$status" -eq 0 ]
  tail -c 6 "$TMP/watch" | grep -qF $'\x1b[?25h'
  [ "$(grep -o 'frame [0-9]*' "$TMP/watch" | wc -l)" -ge 2 ]
}

@test "ls --watch --json writes one document per frame, with rates" {
  start_flow
  run "$PIPECR" ls --watch 0.4 -n 2 --json -t "$F" -t "$S"
  [ "$status" -eq 0 ]
  [ "${#lines[@]}" -eq 2 ]
  echo "${lines[0]}" | jq -e ".frame == 1 and (.processes[] | select(.pid == $F) | .write_bytes_per_second == null)"
  echo "${lines[1]}" | jq -e ".frame == 2 and (.processes[] | select(.pid == $F) | .write_bytes_per_second > 100000)"
  echo "${lines[1]}" | jq -e ".processes[] | select(.pid == $S) | .read_bytes_per_second > 100000"
}

@test "ls --graph and --watch refuse bad combinations with exit 64" {
  run "$PIPECR" ls --graph --dot
  [ "$status" -eq 64 ]
  run "$PIPECR" ls --dot --json
  [ "$status" -eq 64 ]
  echo "$output" | grep -F "choose one output format"
  run "$PIPECR" ls --watch 0
  [ "$status" -eq 64 ]
  echo "$output" | grep -F "give SECONDS between 0.1 and 86400"
  run "$PIPECR" ls -n 3
  [ "$status" -eq 64 ]
}
