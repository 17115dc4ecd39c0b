# bash completion for pipecr(1)                                   -*- shell-script -*-
#
# Installed as <completionsdir>/pipecr (pkg-config --variable=completionsdir bash-completion,
# usually /usr/share/bash-completion/completions), which bash-completion loads on first use.
# Needs nothing from bash-completion itself, so it also works when sourced directly.
#
# Subcommands and options are read from `pipecr --help` and `pipecr CMD --help` (cached per
# shell), so they follow the installed binary. Values: live pids for -t/--target and --into;
# PID:FD pairs of pipe and FIFO fds (from /proc/PID/fd) for peek and resize; image files (*.img
# first, else any file) for show and restore; files for dump -o; a command after restore's `--`.

# _pipecr_pids PREFIX: the pids of live processes starting with PREFIX.
_pipecr_pids() {
  local d pid out=()
  for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    [[ $pid == "$1"* ]] && out+=("$pid")
  done
  printf '%s\n' "${out[@]}"
}

# _pipecr_pipe_fds PREFIX: PID:FD for every fd that is a pipe or FIFO, starting with PREFIX. With
# a PREFIX of "PID:..." only that process is looked at.
_pipecr_pipe_fds() {
  local prefix=$1 dirs=() d fd pid
  if [[ $prefix == *:* ]]; then
    dirs=("/proc/${prefix%%:*}")
  else
    dirs=(/proc/[0-9]*)
  fi
  for d in "${dirs[@]}"; do
    pid=${d#/proc/}
    [[ $pid == "${prefix%%:*}"* ]] || continue
    for fd in "$d"/fd/*; do
      [[ -p $fd ]] || continue  # -p follows the link: pipes and FIFOs
      [[ $pid:${fd##*/} == "$prefix"* ]] && printf '%s\n' "$pid:${fd##*/}"
    done 2>/dev/null
  done
}

# _pipecr_help [CMD]: the help text of pipecr or of one subcommand, cached.
_pipecr_help() {
  local key=${1:-_}
  key=${key//-/_}
  local var=_pipecr_help_cache_$key
  if [[ -z ${!var+set} ]]; then
    printf -v "$var" '%s' "$("${_pipecr_cmd:-pipecr}" ${1:+"$1"} --help 2>/dev/null)"
  fi
  printf '%s\n' "${!var}"
}

_pipecr_subcommands() {
  _pipecr_help | sed -n '/^Subcommands:/,/^$/s/^  \([a-z][a-z-]*\) .*/\1/p'
}

_pipecr_options() {
  _pipecr_help "$1" | sed -n '/^Options:/,/^$/p' |
    sed -nE 's/^  (-[a-zA-Z0-9]),(--[a-z][a-z0-9-]*).*/\1\n\2/p; s/^  (--[a-z][a-z0-9-]*).*/\1/p'
}

# _pipecr_files PREFIX: image files (*.img) and directories; any file when no image matches.
_pipecr_images() {
  local out
  out=$(compgen -f -X '!*.img' -- "$1"; compgen -d -- "$1")
  [[ -z $out ]] && out=$(compgen -f -- "$1")
  printf '%s\n' "$out"
}

_pipecr() {
  local _pipecr_cmd=${COMP_WORDS[0]}
  local i cword=$COMP_CWORD
  # Undo bash's split of PID:FD at ':' (when COMP_WORDBREAKS has it): cur is the whole word.
  local cur=${COMP_WORDS[cword]} start=$cword
  while ((start > 0)) && { [[ ${COMP_WORDS[start]} == : ]] || [[ ${COMP_WORDS[start - 1]} == : ]]; }; do
    start=$((start - 1))
  done
  cur=""
  for ((i = start; i <= cword; i++)); do cur+=${COMP_WORDS[i]}; done
  local prev=""
  if ((start > 0)); then prev=${COMP_WORDS[start - 1]}; fi

  # The words before the current one, with PID ":" FD joined again.
  local args=() w
  for ((i = 1; i < start; i++)); do
    w=${COMP_WORDS[i]}
    if [[ $w == : || (${#args[@]} -gt 0 && ${COMP_WORDS[i - 1]} == :) ]]; then
      args[${#args[@]} - 1]+=$w
    else
      args+=("$w")
    fi
  done
  # The subcommand, the positional arguments given so far, and whether `--` came.
  local sub="" npos=0 dashdash=0 skip=0
  for w in "${args[@]}"; do
    if ((skip)); then skip=0; continue; fi
    if ((dashdash)); then npos=$((npos + 1)); continue; fi
    case $w in
      --) [[ -n $sub ]] && { dashdash=1; npos=0; } ;;
      -t | --target | --into | --exec | -o | --output | -n | --bytes | --count | --timeout) skip=1 ;;
      -*) ;;
      *) if [[ -z $sub ]]; then sub=$w; else npos=$((npos + 1)); fi ;;
    esac
  done

  local IFS=$'\n' words=()
  if [[ -z $sub ]]; then
    if [[ $cur == -* ]]; then
      words=($(compgen -W $'--help\n--version' -- "$cur"))
    else
      words=($(compgen -W "$(_pipecr_subcommands)" -- "$cur"))
    fi
    COMPREPLY=("${words[@]}")
    return 0
  fi

  if ((dashdash)); then  # restore ... -- COMMAND [ARG...]
    if ((npos == 0)); then COMPREPLY=($(compgen -c -- "$cur")); else COMPREPLY=($(compgen -f -- "$cur")); fi
    return 0
  fi

  case $prev in
    -t | --target | --into)
      words=($(_pipecr_pids "$cur"))
      COMPREPLY=("${words[@]}")
      return 0
      ;;
    -o | --output)
      COMPREPLY=($(compgen -f -- "$cur"))
      return 0
      ;;
    --exec | -n | --bytes | --count | --watch | --timeout)
      COMPREPLY=()
      return 0
      ;;
  esac

  if [[ $cur == -* ]]; then
    COMPREPLY=($(compgen -W "$(_pipecr_options "$sub")" -- "$cur"))
    [[ $sub == restore ]] && COMPREPLY+=($(compgen -W "--" -- "$cur"))
    return 0
  fi

  case $sub in
    peek | resize)
      if ((npos == 0)); then
        words=($(_pipecr_pipe_fds "$cur"))
      elif [[ $sub == resize && $npos -eq 1 ]]; then
        words=($(compgen -W $'4k\n16k\n64k\n256k\n1M' -- "$cur"))
      fi
      ;;
    show | restore)
      if ((npos == 0)); then words=($(_pipecr_images "$cur")); fi
      ;;
  esac
  # Bash replaces only the part after the last ':' of the word: give it only that part.
  if [[ $cur == *:* && ${COMP_WORDBREAKS:-:} == *:* ]]; then
    local k
    for k in "${!words[@]}"; do words[k]=${words[k]##*:}; done
  fi
  COMPREPLY=("${words[@]}")
  return 0
}

complete -F _pipecr pipecr
