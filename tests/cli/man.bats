#!/usr/bin/env bats
# The manual pages (man/*.scd) against the command and the header: an option that `pipecr CMD
# --help` lists but the page does not describe under CMD, a command without a section, or a C
# function without a description fails here, so the page and --help cannot drift apart.

load helpers

MAN_DIR="$BATS_TEST_DIRNAME/../../man"
HEADER="$BATS_TEST_DIRNAME/../../include/pipecr/pipecr.h"

# The subcommands `pipecr --help` lists.
subcommands() {
  "$PIPECR" --help | sed -n '/^Subcommands:/,/^$/p' | sed -n 's/^  \([a-z][a-z-]*\) .*/\1/p'
}

# The options one help text lists: long names, and short ones, the first tokens of each option line.
help_options() {
  sed -n '/^Options:/,/^$/p' | sed -nE 's/^  (-[a-zA-Z0-9]),(--[a-z][a-z0-9-]*).*/\1\n\2/p; s/^  (--[a-z][a-z0-9-]*).*/\1/p'
}

# The positional arguments one help text lists.
help_positionals() {
  sed -n '/^Positionals:/,/^$/p' | sed -n 's/^  \([a-z][a-z_-]*\) .*/\1/p'
}

# The text of section "## CMD" of pipecr.1.scd, up to the next heading.
man_section() {
  awk -v want="## $1" '$0 == want {on = 1; next} /^#/ {on = 0} on' "$MAN_DIR/pipecr.1.scd"
}

@test "every subcommand has a section in pipecr(1), and every option it lists is described there" {
  missing=()
  cmds=$(subcommands)
  [ -n "$cmds" ]
  for cmd in $cmds; do
    section=$(man_section "$cmd")
    if [ -z "$section" ]; then missing+=("section ## $cmd"); continue; fi
    help=$("$PIPECR" "$cmd" --help)
    for opt in $(echo "$help" | help_options); do
      [ "$opt" = "-h" ] || [ "$opt" = "--help" ] && continue
      # An option is described by a definition line of its own: "*-n*, *--bytes* _BYTES_" or
      # "*--hex*" at the start of a line (a mention in the synopsis or in prose does not count).
      grep -qE -- "^(\*-[a-zA-Z0-9]\*, )?\*$opt\*( |,|$)" <<<"$section" || missing+=("$cmd $opt")
    done
    for pos in $(echo "$help" | help_positionals); do
      case $pos in
        target) want="_PID_:_FD_" ;;
        *) want="_$(echo "$pos" | tr a-z A-Z)_" ;;
      esac
      grep -qF -- "$want" <<<"$section" || missing+=("$cmd <$pos> as $want")
    done
  done
  printf 'not in pipecr.1.scd: %s\n' "${missing[@]}"
  [ "${#missing[@]}" -eq 0 ]
}

@test "the global options are in pipecr(1), and it has the sections criu(8) has" {
  for opt in $("$PIPECR" --help | help_options); do
    grep -qE -- "^(\*-[a-zA-Z0-9]\*, )?\*$opt\*( |,|$)" "$MAN_DIR/pipecr.1.scd"
  done
  for s in NAME SYNOPSIS DESCRIPTION COMMANDS "EXIT STATUS" EXAMPLES FILES "SEE ALSO"; do
    grep -qx "# $s" "$MAN_DIR/pipecr.1.scd"
  done
}

@test "every exit code of pipecr --help is in EXIT STATUS" {
  section=$(awk '$0 == "# EXIT STATUS" {on = 1; next} /^# / {on = 0} on' "$MAN_DIR/pipecr.1.scd")
  codes=$("$PIPECR" --help | sed -n '/^Exit codes:/,$p' | sed -n 's/^  \([0-9][0-9]*\) .*/\1/p')
  [ -n "$codes" ]
  for c in $codes; do grep -qx "\*$c\*" <<<"$section"; done
}

@test "every function of pipecr.h is described in libpipecr(3)" {
  fns=$(sed -n 's/^PIPECR_API .*[ *]\(pipecr_[a-z_]*\)(.*/\1/p' "$HEADER")
  [ -n "$fns" ]
  for f in $fns; do
    grep -qF "*$f*()" "$MAN_DIR/libpipecr.3.scd" || { echo "libpipecr.3.scd does not describe $f"; false; }
  done
}

@test "the pages build with scdoc and render with man without warnings" {
  command -v scdoc >/dev/null || skip "scdoc not installed (scripts/setup installs it)"
  for page in pipecr.1 libpipecr.3; do
    scdoc < "$MAN_DIR/$page.scd" > "$TMP/$page"
    if command -v man >/dev/null; then
      out=$(MANWIDTH=80 man --warnings -l "$TMP/$page" 2>&1 >/dev/null)
      [ -z "$out" ] || { echo "$out"; false; }
      MANWIDTH=80 man -l "$TMP/$page" 2>/dev/null | grep -q "^NAME"
    fi
  done
}

@test "pipecr CMD --help shows pipecr(1)'s description of CMD (one source)" {
  for cmd in $(subcommands); do
    # restore sets a footer of its own (cmd_restore.cpp), which takes the place of the page's.
    [ "$cmd" = restore ] && continue
    # The first line of the description: after the synopsis line, markup taken out.
    first=$(man_section "$cmd" | awk 'seen && NF {print; exit} /^\*pipecr / {seen = 1}' |
            sed -E 's/\*//g; s/(^|[^[:alnum:]])_/\1/g; s/_([^[:alnum:]]|$)/\1/g; s/\\(.)/\1/g')
    [ -n "$first" ]
    "$PIPECR" "$cmd" --help | grep -qxF -- "$first" || { echo "pipecr $cmd --help lacks: $first"; false; }
  done
}
