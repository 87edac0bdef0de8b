#!/usr/bin/env bash
# Builds the C binding and installs it into PREFIX: lib/libforkvm.so and lib/libforkvm.a (cargo
# builds them as libforkvm_ffi.*, since the Rust library `forkvm` is forkvm's), include/forkvm.h
# and lib/pkgconfig/forkvm.pc.
#
#   forkvm-ffi/install.sh [--debug] PREFIX
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
if [ "${1:-}" = --debug ]; then
    profile=debug
    shift
fi
prefix=${1:?usage: forkvm-ffi/install.sh [--debug] PREFIX}
mkdir -p "$prefix"
prefix=$(cd "$prefix" && pwd)

if [ "$profile" = release ]; then
    cargo build -p forkvm-ffi --release --quiet
else
    cargo build -p forkvm-ffi --quiet
fi
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
version=$(cargo pkgid -p forkvm-ffi | sed 's/.*[#@]//')
mkdir -p "$prefix/include" "$prefix/lib/pkgconfig"
cp forkvm-ffi/include/forkvm.h "$prefix/include/"
cp "$target/$profile/libforkvm_ffi.so" "$prefix/lib/libforkvm.so"
cp "$target/$profile/libforkvm_ffi.a" "$prefix/lib/libforkvm.a"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" forkvm-ffi/forkvm.pc.in \
    >"$prefix/lib/pkgconfig/forkvm.pc"
