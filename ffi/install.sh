#!/usr/bin/env bash
# Builds libkeel and installs it under PREFIX: lib/libkeel.so, lib/libkeel.a, include/keel.h and
# lib/pkgconfig/keel.pc. Then `PKG_CONFIG_PATH=PREFIX/lib/pkgconfig pkg-config --cflags --libs keel`.
#
#   ffi/install.sh PREFIX            (builds with cargo first)
#   KEEL_NO_BUILD=1 ffi/install.sh PREFIX   (installs what target/release holds)
set -euo pipefail
prefix=${1:?usage: ffi/install.sh PREFIX}
cd "$(dirname "$0")/.."
if [[ -z "${KEEL_NO_BUILD:-}" ]]; then
    cargo build --release -p keel-cli -p keel-ffi
fi
target=${CARGO_TARGET_DIR:-target}/release
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
prefix=$(cd "$prefix" && pwd)
install -m 755 "$target/libkeel.so" "$prefix/lib/libkeel.so"
install -m 644 "$target/libkeel.a" "$prefix/lib/libkeel.a"
install -m 644 include/keel.h "$prefix/include/keel.h"
sed -e "s|@LIBDIR@|$prefix/lib|" -e "s|@INCLUDEDIR@|$prefix/include|" -e "s|@VERSION@|$version|" \
    ffi/keel.pc.in > "$prefix/lib/pkgconfig/keel.pc"
echo "installed libkeel $version under $prefix"
