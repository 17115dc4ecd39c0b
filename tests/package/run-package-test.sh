#!/usr/bin/env bash
# run-package-test.sh: build the Debian packages of this build, install them on this machine,
# use them as a user would, and remove them again.
#
#   1. cpack -G DEB: pipecr, libpipecr0, libpipecr-dev; their metadata checked (shlibdeps
#      dependencies, the -dev package's exact dependency on libpipecr0, libpipecr0's shlibs);
#   2. apt-get install ./*.deb (apt resolves their dependencies);
#   3. /usr/bin/pipecr: --version, check, ls --graph; man -w pipecr and libpipecr(3); the bash
#      completion loaded by bash-completion's own loader; tests/consumer built against /usr only,
#      with CMake find_package(pipecr) and with pkg-config, and run without LD_LIBRARY_PATH;
#   4. apt-get purge of the three, and of every package apt installed for them.
# An EXIT trap does step 4 whatever fails, and then checks that the installed package set is the
# one found at the start. Refuses to run (exit 1) when a pipecr package is already installed: it
# would not be put back.
#
# Usage: run-package-test.sh BUILD_DIR WORK_DIR SOURCE_DIR C_COMPILER   (as root)
set -euo pipefail

build=$1 work=$2 src=$3 cc=$4
pkgs=(pipecr libpipecr0 libpipecr-dev)
export DEBIAN_FRONTEND=noninteractive
unset PKG_CONFIG_PATH LD_LIBRARY_PATH CMAKE_PREFIX_PATH

step() { echo "== $*"; }
die() { echo "package test: $*" >&2; exit 1; }

((EUID == 0)) || die "must run as root: it installs and removes Debian packages"
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || die "needs apt-get and dpkg-deb (Debian)"

installed() { dpkg-query -W -f='${db:Status-Status} ${Package}\n' 2>/dev/null | sed -n 's/^installed //p' | sort; }

for p in "${pkgs[@]}"; do
  if installed | grep -x "$p" >/dev/null; then
    die "$p is already installed; remove it first (this test leaves the machine as it found it)"
  fi
done

rm -rf "$work"
mkdir -p "$work"
installed >"$work/before.txt"

cleanup() {
  local rc=$?
  set +e
  step "cleanup: purge the pipecr packages and what apt installed for them"
  installed >"$work/after.txt"
  local extra
  extra=$(comm -13 "$work/before.txt" "$work/after.txt")
  if [[ -n $extra ]]; then
    # shellcheck disable=SC2086 # one package name per word
    apt-get purge -y -q $extra </dev/null >"$work/purge.log" 2>&1 || { cat "$work/purge.log"; rc=1; }
  fi
  installed >"$work/final.txt"
  if ! cmp -s "$work/before.txt" "$work/final.txt"; then
    echo "package test: the installed packages differ from the start:" >&2
    diff "$work/before.txt" "$work/final.txt" >&2
    rc=1
  fi
  for f in /usr/bin/pipecr /usr/lib/libpipecr.so.0 /usr/include/pipecr/pipecr.h /usr/lib/pkgconfig/pipecr.pc; do
    [[ -e $f ]] && { echo "package test: $f is still there after the purge" >&2; rc=1; }
  done
  ((rc == 0)) && echo "package test: passed; the machine is as it was"
  exit "$rc"
}
trap cleanup EXIT

step "cpack -G DEB"
(cd "$build" && cpack -G DEB -B "$work/debs") >"$work/cpack.log" 2>&1 || { cat "$work/cpack.log"; die "cpack failed"; }
version=$(sed -n 's/^CMAKE_PROJECT_VERSION:STATIC=//p' "$build/CMakeCache.txt")
debs=()
for p in "${pkgs[@]}"; do
  f=$(ls "$work/debs/${p}_${version}"-*.deb 2>/dev/null | head -1)
  [[ -n $f ]] || die "cpack made no package $p (in $work/debs: $(ls "$work/debs"))"
  debs+=("$f")
done

step "package metadata"
dep() { dpkg-deb -f "$1" Depends; }
for f in "${debs[@]}"; do echo "$(dpkg-deb -f "$f" Package): Depends: $(dep "$f")"; done
[[ $(dep "${debs[0]}") == *libc6* && $(dep "${debs[0]}") == *libfmt* ]] || die "pipecr lacks its shlibdeps dependencies"
[[ $(dep "${debs[1]}") == *libc6* ]] || die "libpipecr0 lacks its shlibdeps dependencies"
[[ $(dep "${debs[2]}") == *"libpipecr0 (= $version-"* ]] || die "libpipecr-dev does not depend on this libpipecr0"
# (Listings go to files first: grep -q stopping early would kill dpkg-deb with SIGPIPE under pipefail.)
dpkg-deb --ctrl-tarfile "${debs[1]}" | tar -xO ./shlibs >"$work/shlibs"
grep -q "^libpipecr 0 libpipecr0" "$work/shlibs" || die "libpipecr0 has no shlibs file"
dpkg-deb -c "${debs[2]}" >"$work/dev.list"
grep -q "usr/lib/.*pkgconfig/pipecr.pc$" "$work/dev.list" || die "libpipecr-dev lacks pipecr.pc"
grep -q "usr/lib/.*cmake/pipecr/pipecrConfig.cmake$" "$work/dev.list" || die "libpipecr-dev lacks the CMake package"

step "apt-get install ${debs[*]##*/}"
apt-get install -y -q --no-install-recommends "${debs[@]}" </dev/null >"$work/install.log" 2>&1 ||
  { cat "$work/install.log"; die "apt-get install failed"; }
for p in "${pkgs[@]}"; do installed | grep -x "$p" >/dev/null || die "$p is not installed after apt-get install"; done

step "the installed command"
[[ $(command -v pipecr) == /usr/bin/pipecr ]] || die "pipecr on PATH is $(command -v pipecr), not /usr/bin/pipecr"
/usr/bin/pipecr --version | grep -x "pipecr $version" >/dev/null || die "pipecr --version: $(/usr/bin/pipecr --version)"
set +e
/usr/bin/pipecr check >"$work/check.txt" 2>&1
rc=$?
set -e
cat "$work/check.txt"
((rc == 0 || rc == 69)) || die "pipecr check exited $rc"
grep -q "^dump: " "$work/check.txt" && grep -q "^restore: " "$work/check.txt" || die "pipecr check printed no verdict"
/usr/bin/pipecr ls --graph -t $$ >/dev/null || die "pipecr ls --graph failed"

step "man -w pipecr"
command -v man >/dev/null || die "man is missing (scripts/setup installs man-db)"
page=$(man -w pipecr) || die "man -w pipecr found no page (are man pages excluded by /etc/dpkg/dpkg.cfg.d? scripts/setup)"
[[ $page == /usr/share/man/man1/pipecr.1* ]] || die "man -w pipecr gave $page"
page3=$(man -w 3 libpipecr) || die "man -w 3 libpipecr found no page"
[[ $page3 == /usr/share/man/man3/libpipecr.3* ]] || die "man -w 3 libpipecr gave $page3"
MANWIDTH=80 man pipecr >"$work/man.txt" 2>/dev/null || true
grep -q "pipecr resize" "$work/man.txt" || die "man pipecr does not render"

step "bash completion from where bash-completion looks"
compdir=$(pkg-config --variable=completionsdir bash-completion 2>/dev/null || echo /usr/share/bash-completion/completions)
[[ -f $compdir/pipecr ]] || die "no $compdir/pipecr"
[[ -f /usr/share/zsh/site-functions/_pipecr ]] || die "no zsh completion in /usr/share/zsh/site-functions"
if [[ -f /usr/share/bash-completion/bash_completion ]]; then
  # bash-completion's on-demand loader, as an interactive shell would use it on the first Tab.
  bash -c 'source /usr/share/bash-completion/bash_completion; __load_completion pipecr; complete -p pipecr' \
    >"$work/complete.txt" 2>&1 || true
  grep -q -- "-F _pipecr pipecr" "$work/complete.txt" || die "bash-completion does not load the pipecr completion"
fi

step "tests/consumer against the installed copy: CMake find_package(pipecr)"
cmake -S "$src/tests/consumer/project" -B "$work/cmake-build" -G Ninja -DCMAKE_C_COMPILER="$cc" \
  >"$work/consumer-configure.log" 2>&1 || { cat "$work/consumer-configure.log"; die "configure of the consumer failed"; }
found=$(sed -n 's/^pipecr_DIR:PATH=//p' "$work/cmake-build/CMakeCache.txt")
[[ $found == /usr/lib/*cmake/pipecr ]] || die "find_package(pipecr) found $found, not the package in /usr/lib"
cmake --build "$work/cmake-build" >"$work/consumer-build.log" 2>&1 || { cat "$work/consumer-build.log"; die "build failed"; }
"$work/cmake-build/consumer" || die "the CMake consumer failed"
ldd "$work/cmake-build/consumer" >"$work/ldd.txt"
grep -qE "libpipecr.so.0 => (/usr)?/lib/libpipecr.so.0 " "$work/ldd.txt" || die "the consumer does not load /usr/lib/libpipecr.so.0"

step "tests/consumer against the installed copy: pkg-config"
# shellcheck disable=SC2046 # pkg-config output is a list of words
"$cc" -std=c99 -Wall -Wextra -pedantic -Werror "$src/tests/consumer/consumer.c" -o "$work/pc-consumer" \
  $(pkg-config --cflags --libs pipecr) || die "pkg-config build of the consumer failed"
"$work/pc-consumer" || die "the pkg-config consumer failed"

step "apt-get purge ${pkgs[*]}"
apt-get purge -y -q "${pkgs[@]}" </dev/null >"$work/purge.log" 2>&1 || { cat "$work/purge.log"; die "apt-get purge failed"; }
! command -v pipecr >/dev/null || [[ $(command -v pipecr) != /usr/bin/pipecr ]] || die "/usr/bin/pipecr left behind"
! man -w pipecr >/dev/null 2>&1 || die "the pipecr man page is left behind"
