#!/usr/bin/env zsh -f
# zsh_complete.zsh FPATH_DIR PIPECR LINE: what an interactive zsh offers on Tab after LINE.
#
# Starts `zsh -f -i` on a pseudo-terminal (zsh/zpty), with FPATH_DIR first in fpath and
# compinit run, makes `pipecr` resolve to PIPECR, types LINE and a Tab, and prints everything the
# shell drew, escape sequences removed: the completed line and any list of matches.
emulate -L zsh
setopt extendedglob
zmodload zsh/zpty
local dir=$1 pipecr=$2 line=$3 out= chunk
zpty z zsh -f -i
zpty -w z "PS1='%% '; fpath=(${(q)dir} \$fpath); autoload -Uz compinit; compinit -u -D"
zpty -w z 'unsetopt beep; setopt nolistambiguous; zstyle ":completion:*" menu no'
zpty -w z "alias pipecr=${(q)pipecr}"
zpty -w z 'print READY'
# Wait for the shell to have read its setup.
for i in {1..100}; do
  zpty -r -t z chunk && out+=$chunk
  [[ $out == *READY* ]] && break
  sleep 0.05
done
out=
zpty -w -n z "$line"$'\t'
sleep 1
for i in {1..40}; do
  if zpty -r -t z chunk; then out+=$chunk; else sleep 0.05; fi
done
zpty -d z
# Escape sequences and carriage returns out.
out=${out//$'\e'\[[0-9;?]#[a-zA-Z]/}
print -r -- ${out//$'\r'/}
