#!/usr/bin/env bash
# Keel on aarch64 (an edge board's CPU), checked on an x86-64 machine: builds the kernels' unit
# tests and the real-model tests (MiniLM against PyTorch's golden data, SmolLM2) for
# aarch64-unknown-linux-gnu with Debian's cross compiler and runs them under qemu-user. There the
# CPU backend runs its portable code (plain loops that LLVM compiles to NEON); the AVX paths are
# compiled out. Not part of CI (10-15 minutes on 2 cores). From the repository root:
#
#   bash scripts/check-aarch64.sh
#
# Installs gcc-aarch64-linux-gnu and qemu-user with apt-get (as root, or with sudo) when missing,
# and the target's standard library with rustup when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu

if ! command -v aarch64-linux-gnu-gcc > /dev/null || ! command -v qemu-aarch64 > /dev/null; then
    echo "installing gcc-aarch64-linux-gnu and qemu-user (the cross linker and the emulator)"
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    (DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user) > /dev/null
fi
if ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target" || {
        echo "error: the Rust standard library for $target is missing and rustup could not add it" >&2
        exit 1
    }
fi
bash scripts/setup-models.sh

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
# Its own target folder: the cross build shares nothing with the native one.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/aarch64"
cargo clippy --release --target "$target" -p keel-kernels -p keel-models -- -D warnings
cargo test --release --target "$target" -p keel-kernels --lib
cargo test --release --target "$target" -p keel-tests --test minilm --test smollm2
echo "aarch64: kernels and model tests passed under qemu"
