#!/usr/bin/env bats
# Bad command lines: exactly one line on stderr, "pipecr <cmd>: <what is wrong> (see pipecr <cmd>
# --help)", naming the bad word in plain words, nothing on stdout, and exit 64 (README, "Exit
# codes"). --help and --version still exit 0.

load helpers

# usage_error PREFIX TEXT ARG...: `pipecr ARG...` exits 64 with one stderr line that starts with
# PREFIX, holds TEXT and the --help hint, and prints nothing on stdout.
usage_error() {
  local prefix=$1 text=$2 status=0
  shift 2
  "$PIPECR" "$@" >"$TMP/out" 2>"$TMP/err" </dev/null || status=$?
  echo "pipecr $*: exit $status"
  cat "$TMP/err"
  [ "$status" -eq 64 ]
  [ ! -s "$TMP/out" ]
  [ "$(wc -l <"$TMP/err")" -eq 1 ]
  [[ "$(cat "$TMP/err")" == "$prefix"* ]]
  grep -qF -- "$text" "$TMP/err"
  grep -qF -- "(see ${prefix%: } --help)" "$TMP/err"
}

@test "an unknown option, a missing option or argument, an extra argument: one line naming it" {
  usage_error "pipecr dump: " "unknown option '--bogus'" dump --bogus -t 1 -o "$TMP/x"
  usage_error "pipecr dump: " "-t/--target is required" dump
  usage_error "pipecr peek: " "TARGET is missing" peek
  usage_error "pipecr show: " "unexpected argument 'b'" show a b
  usage_error "pipecr restore: " "IMAGE is missing" restore
  usage_error "pipecr restore: " "--exec needs a value (RECORDED)" restore "$TMP/img" --exec
  usage_error "pipecr ls: " "--count requires --watch" ls -n 3
  usage_error "pipecr check: " "unexpected argument 'extra'" check extra
  usage_error "pipecr resize: " "unknown option '--bogus'" resize 1:0 64k --bogus
  [ ! -e "$TMP/x" ]
}

@test "a value that is not a number names the option and the value" {
  usage_error "pipecr dump: " "--target: 'abc' is not a valid number" dump -t abc -o "$TMP/x"
  usage_error "pipecr dump: " "--timeout: 'soon' is not a valid number" dump -t 1 -o "$TMP/x" --timeout soon
  usage_error "pipecr ls: " "--target: 'nonsense' is not a valid number" ls -t nonsense
  usage_error "pipecr peek: " "--bytes: 'minus' is not a valid number" peek 1:0 -n minus
  [ ! -e "$TMP/x" ]
}

@test "an unknown command or option before any command is named, not 'a subcommand is required'" {
  usage_error "pipecr: " "unknown command 'nosuchcmd'" nosuchcmd
  usage_error "pipecr: " "unknown option '--bogus'" --bogus
  usage_error "pipecr: " "give a command: ls, peek, resize, dump, show, restore, check"
  ! grep -qi "subcommand is required" "$TMP/err"
}

@test "--help and --version exit 0 on stdout, with nothing on stderr" {
  for args in "--help" "--version" "dump --help" "restore -h" "ls --help"; do
    # shellcheck disable=SC2086
    "$PIPECR" $args >"$TMP/out" 2>"$TMP/err"
    [ -s "$TMP/out" ]
    [ ! -s "$TMP/err" ]
  done
  "$PIPECR" --version | grep -E "^pipecr [0-9]+\.[0-9]+\.[0-9]+$"
}
