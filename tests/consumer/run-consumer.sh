#!/usr/bin/env bash
# run-consumer.sh: the install test. Installs the current build into a fresh prefix, then builds
# consumer.c against that prefix twice, the two ways a downstream project would:
#   1. a CMake project (project/) with find_package(pipecr) and target pipecr::pipecr;
#   2. a bare `cc ... $(pkg-config --cflags --libs pipecr)` with PKG_CONFIG_PATH at the prefix;
# and runs both with LD_LIBRARY_PATH at the prefix's lib. Only the installed files are used, so a
# header, library or package file missing from the install rules fails here.
#
# Usage: run-consumer.sh BUILD_DIR WORK_DIR LIBDIR C_COMPILER SANITIZE(ON|OFF)
# WORK_DIR is wiped first and left behind afterwards for inspection.
set -euo pipefail

build=$1 work=$2 libdir=$3 cc=$4 sanitize=$5
here=$(cd "$(dirname "$0")" && pwd)
prefix=$work/prefix

step() { echo "== $*"; }
die() { echo "run-consumer: $*" >&2; exit 1; }

# With PIPECR_SANITIZE=ON, libpipecr.so is built with -fsanitize=address,undefined and so needs the
# ASan runtime loaded before any other library ("ASan runtime does not come first in initial library
# list" otherwise). Building the consumer with the same flags and the same compiler links that
# runtime first, which is how a user of an instrumented library would build; it is simpler and
# more faithful than LD_PRELOAD of libasan.so, whose path depends on the compiler version.
cflags=(-std=c99 -Wall -Wextra -pedantic -Werror)
san=()
if [[ $sanitize == ON ]]; then
  san=("-fsanitize=address,undefined")
fi

rm -rf "$work"
mkdir -p "$work"

step "cmake --install $build --prefix $prefix"
cmake --install "$build" --prefix "$prefix" >"$work/install.log" || { cat "$work/install.log"; die "install failed"; }

step "check the install layout"
for f in "$libdir/libpipecr.so" include/pipecr/pipecr.h "$libdir/cmake/pipecr/pipecrConfig.cmake" \
         "$libdir/cmake/pipecr/pipecrConfigVersion.cmake" "$libdir/pkgconfig/pipecr.pc"; do
  [[ -e $prefix/$f ]] || die "missing from the install: $f"
done

export LD_LIBRARY_PATH=$prefix/$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

step "consumer 1: CMake find_package(pipecr), target pipecr::pipecr"
cmake -S "$here/project" -B "$work/cmake-build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_COMPILER="$cc" -DCMAKE_PREFIX_PATH="$prefix" \
  -DCMAKE_C_FLAGS="${san[*]}" -DCMAKE_EXE_LINKER_FLAGS="${san[*]}" >"$work/cmake-configure.log" \
  || { cat "$work/cmake-configure.log"; die "configure of the CMake consumer failed"; }
found=$(sed -n 's/^pipecr_DIR:PATH=//p' "$work/cmake-build/CMakeCache.txt")
[[ $found == "$prefix"/* ]] || die "find_package(pipecr) found $found, not the package in $prefix"
cmake --build "$work/cmake-build" || die "build of the CMake consumer failed"
"$work/cmake-build/consumer" || die "the CMake consumer failed"

step "consumer 2: cc \$(pkg-config --cflags --libs pipecr)"
export PKG_CONFIG_PATH=$prefix/$libdir/pkgconfig
pc_cflags=$(pkg-config --cflags pipecr) || die "pkg-config --cflags pipecr failed"
pc_libs=$(pkg-config --libs pipecr) || die "pkg-config --libs pipecr failed"
echo "pkg-config: cflags '$pc_cflags' libs '$pc_libs'"
# The .pc file must describe where it was installed, not the configure-time CMAKE_INSTALL_PREFIX.
pc_includedir=$(pkg-config --variable=includedir pipecr)
[[ -e $pc_includedir/pipecr/pipecr.h ]] ||
  die "pipecr.pc says includedir=$pc_includedir, which has no pipecr/pipecr.h (the .pc is not relocated to $prefix)"
mkdir -p "$work/pc-build"
# shellcheck disable=SC2086 # pkg-config output is a list of words
"$cc" "${cflags[@]}" "${san[@]}" "$here/consumer.c" -o "$work/pc-build/consumer" $pc_cflags $pc_libs ||
  die "build of the pkg-config consumer failed"
"$work/pc-build/consumer" || die "the pkg-config consumer failed"

echo "run-consumer: both consumers passed"
