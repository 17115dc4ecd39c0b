#!/usr/bin/env bats
# pipecr check, and the command line as a whole (help, exit codes).

load helpers

@test "check exits 0 on this machine and prints a table" {
  run "$PIPECR" check
  [ "$status" -eq 0 ]
  echo "$output" | grep -E "^tee +ok +dump"
  echo "$output" | grep -E "^kcmp +ok"
  echo "$output" | grep -E "^dump: +ready"
  echo "$output" | grep -E "^restore: +ready"
}

@test "check --json is one JSON document" {
  "$PIPECR" check --json > "$TMP/check.json"
  python3 -c 'import json,sys; json.load(sys.stdin)' < "$TMP/check.json"
  python3 - "$TMP/check.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
assert doc["dump_ready"] is True and doc["restore_ready"] is True
names = {f["name"] for f in doc["features"]}
for n in ("tee", "pidfd_getfd", "kcmp", "ptrace_seize", "cap_sys_resource", "pipe_max_size", "proc_fd_count", "procmap_query", "own_seccomp"):
    assert n in names, n
PY
}

@test "--help lists the subcommands and the exit codes" {
  run "$PIPECR" --help
  [ "$status" -eq 0 ]
  echo "$output" | grep -E "^  ls "
  echo "$output" | grep -E "^  peek "
  echo "$output" | grep -E "^  check "
  echo "$output" | grep -F "Exit codes:"
  echo "$output" | grep -E "^  75 +a target process is gone"
}

@test "every subcommand's --help ends with the exit codes" {
  local cmds
  cmds=$("$PIPECR" --help | sed -n '/^Subcommands:/,/^$/p' | sed -n 's/^  \([a-z][a-z-]*\) .*/\1/p')
  [ -n "$cmds" ]
  for cmd in $cmds; do
    "$PIPECR" "$cmd" --help >"$TMP/help"
    grep -qx "Exit codes:" "$TMP/help" || { echo "pipecr $cmd --help has no exit codes"; false; }
    tail -1 "$TMP/help" | grep -E "^  77 +permission denied$" || { echo "pipecr $cmd --help does not end with them"; false; }
  done
}

@test "a bad command line exits 64 with one message" {
  run "$PIPECR"
  [ "$status" -eq 64 ]
  [ "${#lines[@]}" -eq 1 ]
  run "$PIPECR" no-such-command
  [ "$status" -eq 64 ]
  [ "${#lines[@]}" -eq 1 ]
  [[ "$output" == "pipecr: unknown command 'no-such-command'"* ]]
  run "$PIPECR" check --bogus
  [ "$status" -eq 64 ]
  [ "${#lines[@]}" -eq 1 ]
  [[ "$output" == "pipecr check: unknown option '--bogus'"* ]]
}
