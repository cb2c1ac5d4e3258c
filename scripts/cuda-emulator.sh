#!/usr/bin/env bash
# Runs a command against an emulated CUDA driver and cuBLAS (kernels/cuda/emulator/) and the real
# NVRTC of the pip package (scripts/setup-models.sh): the CUDA backend's host code and our
# kernels, run on a machine without a GPU. Slow (a block at a time on one core) and blind to what
# only hardware shows (timing, the memory model); scripts/gpu-check.sh is the check on a GPU.
#   bash scripts/cuda-emulator.sh cargo test --release --workspace --test conformance cuda::
set -euo pipefail
if [[ "$(uname -m)" != x86_64 ]]; then
  echo "cuda-emulator: x86-64 only (its fibers switch stacks in x86-64 assembly)" >&2
  exit 1
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/target/cuda-emulator"
mkdir -p "$out"
# Each .cu in a namespace of its own (their helpers share names), its kernels in the table.
python3 - "$root/kernels/cuda" "$out/kernels.cpp" <<'PY'
import pathlib, re, sys
src, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
parts, table = ['#include "emulate.h"', '#include "kernel.h"'], []
for cu in sorted(src.glob("*.cu")):
    text = cu.read_text()
    text = re.sub(r'asm\("cvt\.rn\.f16\.f32 %0, %1;" : "=h"\((\w+)\) : "f"\((.+?)\)\);',
                  r'\1 = emu::f32_to_f16(\2);', text)
    pieces = text.split('extern "C" __global__ void ')
    for piece in pieces[1:]:
        name = piece.split("(")[0]
        syncs = bool(re.search(r"__syncthreads|__shfl|block_sum|block_max|warp_reduce", piece))
        table.append(f'{{"{name}", {str(syncs).lower()}, [](void **a) {{ invoke(k_{cu.stem}::{name}, a); }}}}')
    parts.append(f"namespace k_{cu.stem} {{\n" + text.replace('extern "C" __global__', "__global__") + "\n}")
parts.append("const std::vector<Kernel> &kernels() {\n    static const std::vector<Kernel> all = {\n        "
             + ",\n        ".join(table) + "};\n    return all;\n}")
dest.write_text("\n".join(parts) + "\n")
PY
emu="$root/kernels/cuda/emulator"
if [[ ! -f "$out/libcuda.so" || -n "$(find "$emu" "$out/kernels.cpp" "$root/kernels/cuda" -newer "$out/libcuda.so" -type f)" ]]; then
  g++ -O2 -std=c++17 -shared -fPIC -Wall -I "$emu" "$emu/driver.cpp" "$out/kernels.cpp" -o "$out/libcuda.so"
fi
# One library answers for both: cudarc opens libcuda.so and libcublas.so by name.
ln -sf libcuda.so "$out/libcublas.so"
nvrtc="${KEEL_MODELS_DIR:-$root/.models/site}/nvidia/cuda_nvrtc/lib"
ln -sf "$nvrtc/libnvrtc.so.12" "$out/libnvrtc.so"
export LD_LIBRARY_PATH="$out:$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export KEEL_CUDA_CACHE="$out/cache"
exec "$@"
