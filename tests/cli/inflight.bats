#!/usr/bin/env bats
# Pipe ends in flight (sent with SCM_RIGHTS, not received yet): dump records them, show and
# `ls --in-flight` show them, restore says what it leaves as it is. The holder is a small Python
# program (socket.send_fds): a pipe with bytes whose two ends wait in the queue of the socket it
# keeps at fd 9, closed everywhere else.

load helpers

holder() {
  cat > "$TMP/holder.py" <<'PY'
import os, socket, sys, time
os.closerange(3, 4096)  # nothing inherited: the pipe below is the only one
r, w = os.pipe()
os.write(w, b"bytes in a pipe whose ends are in flight")
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
os.dup2(b.fileno(), 9, inheritable=False)
a.send(b"no files")
socket.send_fds(a, [b"ends"], [r, w])
os.close(r)
os.close(w)
b.close()
open(sys.argv[1], "w").write("ready")
time.sleep(120)
PY
  spawn holder "exec python3 '$TMP/holder.py' '$TMP/ready'" &
  local i
  for i in $(seq 1 100); do
    [ -s "$TMP/ready" ] && break
    sleep 0.05
  done
  [ -s "$TMP/ready" ]
}

@test "dump records ends in flight; show, show --json and restore name them" {
  holder
  pid="$(pid_of holder)"
  run "$PIPECR" dump -t "$pid" -o "$TMP/img" -v
  echo "$output"
  [ "$status" -eq 0 ]
  echo "$output" | grep -F "2 ends in flight"
  # python3 holds fewer than 65 fds: no agent, the table read slot by slot or listed.
  echo "$output" | grep -E "pipecr dump: 1 fd tables: 0 read by an agent in the target, [01] listed"
  echo "$output" | grep -E "ms before the stop, [0-9.]+ ms after it, [0-9.]+ ms writing"
  run "$PIPECR" show "$TMP/img"
  echo "$output"
  [ "$status" -eq 0 ]
  echo "$output" | grep -F "1 pipe (40 bytes queued), 2 open files, 0 fds, 2 ends in flight"
  [ "$(echo "$output" | grep -c -F "in flight: socket fd 9 of $pid (python3), socket inode ")" -eq 2 ]
  echo "$output" | grep -F ", message 1, file 0 of it (received after 12 bytes)"
  echo "$output" | grep -F ", message 1, file 1 of it (received after 12 bytes)"
  "$PIPECR" show --json "$TMP/img" > "$TMP/doc.json"
  jq -e --argjson pid "$pid" '[.in_flight[] | {pid, socket_fd, message, slot, "end": .end}] ==
      [{pid: $pid, socket_fd: 9, message: 1, slot: 0, "end": 12}, {pid: $pid, socket_fd: 9, message: 1, slot: 1, "end": 12}]' \
    "$TMP/doc.json"
  jq -e '[.in_flight[].file] as $f | [.files[] | select(.id == $f[0]) | .access] == ["read"] and
         [.files[] | select(.id == $f[1]) | .access] == ["write"]' "$TMP/doc.json"
  # The pipe is held only in flight: restore leaves it, and says so per end.
  run "$PIPECR" restore "$TMP/img" --into "$pid=$pid" -v
  echo "$output"
  [ "$status" -eq 0 ]
  echo "$output" | grep -F "the read end in flight in socket fd 9 of recorded process $pid (message 1) is left as it is"
  echo "$output" | grep -F "the write end in flight in socket fd 9 of recorded process $pid (message 1) is left as it is"
}

@test "ls --in-flight: the ends are held by PID sock:FD (in flight), also in --json and --graph --json" {
  holder
  pid="$(pid_of holder)"
  run "$PIPECR" ls -t "$pid"
  echo "$output"
  [ "$status" -eq 0 ]
  echo "$output" | grep -F "0 pipe(s)"
  run "$PIPECR" ls -t "$pid" --in-flight
  echo "$output"
  [ "$status" -eq 0 ]
  echo "$output" | grep -E "^pipe:\[[0-9]+\]  40/65536 bytes"
  echo "$output" | grep -E "^ +w +$pid sock:9 \(in flight\)"
  echo "$output" | grep -E "^ +r +$pid sock:9 \(in flight\)"
  "$PIPECR" ls -t "$pid" --in-flight --json > "$TMP/ls.json"
  jq -e --argjson pid "$pid" '[.pipes[0].ends[].holders[] | {pid, fd, in_flight}] | sort_by(.in_flight.message) ==
      [{pid: $pid, fd: null, in_flight: {socket_fd: 9, message: 1}}, {pid: $pid, fd: null, in_flight: {socket_fd: 9, message: 1}}]' \
    "$TMP/ls.json"
  "$PIPECR" ls -t "$pid" --in-flight --graph --json > "$TMP/graph.json"
  jq -e --argjson pid "$pid" '.pipes[0].in_flight == [{pid: $pid, socket_fd: 9}, {pid: $pid, socket_fd: 9}]' "$TMP/graph.json"
  # Nothing was consumed: the holder's queue still has both messages, SO_PEEK_OFF off.
  run "$PIPECR" ls -t "$pid" --in-flight
  echo "$output" | grep -E "^ +r +$pid sock:9 \(in flight\)"
}
