#!/usr/bin/env bash
# The test command (README): installs what the tests need, then runs every check CI runs.
# Model numerics run in release mode: debug-mode candle is far too slow.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-models.sh
bash scripts/setup-system.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release --locked -- -D warnings
# The core builds without the production modules (and without rusqlite): they wrap it, it never
# imports them.
cargo check -p keel --no-default-features --release --locked
# The fleet store's suite (tests/store.rs) runs on a PostgreSQL server of its own, stopped at exit.
trap 'bash scripts/setup-postgres.sh stop' EXIT
KEEL_TEST_POSTGRES=$(bash scripts/setup-postgres.sh)
export KEEL_TEST_POSTGRES
cargo test --workspace --release --locked
# The CUDA backend has no GPU here: its host code and kernels run on an emulated driver, against
# the CPU (scripts/gpu-check.sh is the check on a GPU).
bash scripts/cuda-emulator.sh cargo test --workspace --release --locked --test conformance cuda::
bash scripts/cuda-emulator.sh cargo test --workspace --release --locked --test gpu cuda::minilm
bash scripts/cuda-emulator.sh cargo test --workspace --release --locked --lib a_cuda_engine_embeds_like_the_cpu
# The C ABI: header freshness, C/C++/Python examples, misuse, valgrind, threads, load cycles.
bash scripts/test-ffi.sh
# Every snippet of README.md and docs/ runs (or is an excerpt of a program that does), as written.
python3 scripts/check-docs.py
