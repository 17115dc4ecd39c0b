#!/usr/bin/env bats
# bash completion (completion/pipecr.bash), called the way bash calls it: COMP_WORDS and
# COMP_CWORD set, the function run, COMPREPLY checked against live processes started here.

load helpers

COMPLETION="$BATS_TEST_DIRNAME/../../completion/pipecr.bash"

# comp WORD...: complete the last WORD of the command line `WORD...` (an empty last word completes
# from nothing), as bash would with the default COMP_WORDBREAKS (which splits at ':').
comp() {
  COMP_WORDS=("$PIPECR" "${@:1}")
  COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
  COMP_LINE="pipecr ${*}"
  COMP_POINT=${#COMP_LINE}
  COMPREPLY=()
  # errexit is off inside, as in an interactive shell; COMPREPLY is what the tests check.
  _pipecr || { echo "_pipecr returned $?"; return 1; }
}

# has WORD: COMPREPLY contains WORD.
has() {
  local w
  for w in "${COMPREPLY[@]}"; do [ "$w" = "$1" ] && return 0; done
  echo "COMPREPLY has no '$1': ${COMPREPLY[*]}"
  return 1
}

setup() {
  TMP="$(mktemp -d)"
  source "$COMPLETION"
}

@test "the completion registers _pipecr for pipecr" {
  complete -p pipecr | grep -F -- "-F _pipecr pipecr"
}

@test "subcommands, then each subcommand's options, from --help" {
  comp ""
  for c in ls peek resize dump show restore check; do has "$c"; done
  comp r
  [ "${#COMPREPLY[@]}" -eq 2 ] && has resize && has restore
  comp ls --
  for o in --target --json --graph --dot --watch --count; do has "$o"; done
  comp resize --j
  [ "${COMPREPLY[*]}" = "--json" ]
  comp --v
  [ "${COMPREPLY[*]}" = "--version" ]
}

@test "-t, --target and --into complete live pids" {
  spawn sleep 'exec sleep 100' 3>&- &
  S=$(pid_of sleep)
  comp ls -t "${S:0:2}"
  has "$S"
  for c in "${COMPREPLY[@]}"; do [[ $c == "${S:0:2}"* ]]; done
  comp dump --target "$S"
  has "$S"
  comp restore x.img --into "$S"
  has "$S"
  kill "$S"; wait "$S" 2>/dev/null || true
  comp ls -t "$S"
  [ "${#COMPREPLY[@]}" -eq 0 ] || ! has "$S"
}

@test "peek and resize complete PID:FD of pipe and FIFO fds only" {
  mkfifo "$TMP/f"
  exec 8<>"$TMP/f"
  # sleep holds a pipe at 0, /dev/null at 1 and 2, the FIFO at 5 (O_RDWR: no open() wait), and
  # whatever bats leaves open above 100.
  true | spawn holder "exec sleep 100 >/dev/null 2>&1 5<>'$TMP/f'" 3>&- 8>&- &
  exec 8>&-
  H=$(pid_of holder)
  wait_fd "$H" 5
  comp peek "$H"
  has "$H:0" && has "$H:5"
  ! has "$H:1" 2>/dev/null
  ! has "$H:2" 2>/dev/null
  comp resize "$H"
  has "$H:0" && has "$H:5"
  # Bash splits "PID:FD" at ':' and replaces only what follows the colon.
  comp peek "$H" ":"
  has 0 && has 5
  ! has 1 2>/dev/null
  comp peek "$H" ":" 5
  [ "${COMPREPLY[*]}" = "5" ]
  # resize's second argument is a size.
  comp resize "$H" ":" 0 ""
  has 64k && has 1M
  # After PID:FD, peek takes options only.
  comp peek "$H" ":" 0 ""
  [ "${#COMPREPLY[@]}" -eq 0 ]
}

@test "show and restore complete image files, then restore a command after --" {
  mkdir "$TMP/dir"
  touch "$TMP/a.img" "$TMP/b.img" "$TMP/notes.txt"
  comp show "$TMP/"
  has "$TMP/a.img" && has "$TMP/b.img" && has "$TMP/dir"
  ! has "$TMP/notes.txt" 2>/dev/null
  comp restore "$TMP/a"
  [ "${COMPREPLY[*]}" = "$TMP/a.img" ]
  comp restore "$TMP/a.img" --exec 1 -- "bas"
  has bash
  comp dump -o "$TMP/no"
  [ "${COMPREPLY[*]}" = "$TMP/notes.txt" ]
}

# zcomp LINE: what an interactive zsh with completion/_pipecr offers on Tab after LINE.
zcomp() {
  zsh -f "$BATS_TEST_DIRNAME/zsh_complete.zsh" "$BATS_TEST_DIRNAME/../../completion" "$PIPECR" "$1"
}

@test "zsh: subcommands, options, live pids, PID:FD of pipes, sizes and images" {
  mkfifo "$TMP/f"
  spawn holder "exec sleep 100 </dev/null >/dev/null 2>&1 5<>'$TMP/f'" 3>&- &
  H=$(pid_of holder)
  wait_fd "$H" 5
  run zcomp "pipecr res"
  echo "$output"
  echo "$output" | grep -E "^resize +-- change the capacity of a live pipe"
  echo "$output" | grep -E "^restore +-- "
  run zcomp "pipecr ls --gr"
  echo "$output" | grep -F "pipecr ls --graph"
  run zcomp "pipecr ls -t $H"
  echo "$output" | grep -F "pipecr ls -t $H"
  # The FIFO at fd 5 is the holder's only pipe fd whose number starts with 5: completed in full.
  run zcomp "pipecr peek $H:5"
  echo "$output"
  echo "$output" | grep -F "pipecr peek $H:5 "
  ! echo "$output" | grep -F "$H:1"
  run zcomp "pipecr resize $H:5 "
  echo "$output" | grep -E "64k"
  echo "$output" | grep -E "1M"
  touch "$TMP/one.img" "$TMP/notes.txt"
  run zcomp "pipecr show $TMP/o"
  echo "$output" | grep -F "pipecr show $TMP/one.img"
}
