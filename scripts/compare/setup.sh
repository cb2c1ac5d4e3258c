#!/usr/bin/env bash
# The peers' side of the comparisons, made once: a Python venv (numpy, torch, transformers,
# tokenizers, onnx, onnxscript, onnxruntime, cmake, ninja from PyPI), llama.cpp built from the
# source package of llama-cpp-python for this CPU (llama-bench, llama-batched-bench,
# llama-server and the shared library), and llama-cpp-python installed on that build. Run by
# scripts/compare/run.sh and scripts/compare/serve.sh; each step is skipped when done.
#
# Settings (environment): KEEL_COMPARE_VENV, KEEL_COMPARE_LLAMA_CPP_PYTHON,
# KEEL_COMPARE_TORCH_INDEX, KEEL_COMPARE_LLAMA_CMAKE_ARGS, PYTHON (see run.sh).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
llama_cpp_python="${KEEL_COMPARE_LLAMA_CPP_PYTHON:-0.3.36}"
venv="${KEEL_COMPARE_VENV:-$root/target/compare/venv}"
llama="$root/target/compare/llama"
py="$venv/bin/python"
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
llama_args="${KEEL_COMPARE_LLAMA_CMAKE_ARGS:-$(llama_cmake_args)}"

stamp="$venv/.keel-compare-ready"
src="$llama/llama_cpp_python-$llama_cpp_python"
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
  "$py" -m pip install --quiet numpy torch transformers tokenizers sentencepiece onnx onnxscript \
    onnxruntime cmake ninja
  rm -rf "$llama" && mkdir -p "$llama"
  "$py" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$llama_cpp_python" -d "$llama"
  tar -xzf "$llama/llama_cpp_python-$llama_cpp_python.tar.gz" -C "$llama"
fi
# The build (incremental: a no-op when done). The server is a target of its own, so that a build
# made before it was added gains it without starting over.
if [[ ! -f "$llama/build/build.ninja" ]] || ! grep -q "LLAMA_BUILD_SERVER:BOOL=ON" "$llama/build/CMakeCache.txt"; then
  say "configuring llama.cpp $llama_cpp_python's vendored source for this CPU"
  # shellcheck disable=SC2086 # the options are words
  PATH="$venv/bin:$PATH" cmake -S "$src/vendor/llama.cpp" -B "$llama/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON $llama_args >/dev/null
fi
if [[ ! -x "$llama/build/bin/llama-server" || ! -f "$stamp" ]]; then
  say "building llama.cpp (10-15 minutes on 2 cores the first time)"
fi
PATH="$venv/bin:$PATH" cmake --build "$llama/build" -j "$(nproc 2>/dev/null || echo 2)" \
  --target llama llama-bench llama-batched-bench llama-server >/dev/null
if [[ ! -f "$stamp" ]]; then
  say "installing llama-cpp-python on that build (LLAMA_BUILD=OFF: no second compile)"
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
    "$py" -m pip install --quiet --no-cache-dir "$src"
  touch "$stamp"
fi
echo "$llama_args" >"$llama/cmake-args"
