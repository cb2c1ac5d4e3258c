#!/usr/bin/env bash
# The CUDA checks, in one command, on a machine with an NVIDIA GPU (CI has none: there these
# tests skip with their reason). It runs:
#   1. `keel devices`: the driver, NVRTC and cuBLAS found, the GPU opened;
#   2. the backend conformance suite on CUDA (every op against the CPU, kernels/tests/conformance.rs);
#   3. the real models on CUDA against the CPU (tests/gpu.rs: MiniLM cosine >= 0.9999, SmolLM2's
#      greedy tokens identical for 16 steps, the engine's batching and prefix cache);
#   4. the benchmark harness with --device cuda (MiniLM throughput, SmolLM2 decode), and the same
#      scenarios on the CPU for the ratio, written to $KEEL_GPU_CHECK_OUT (default target/gpu-check).
# A test that cannot open the GPU fails here (KEEL_REQUIRE_CUDA=1) instead of skipping.
# KEEL_GPU_CHECK_MODELS=minilm runs only what needs MiniLM (where SmolLM2 is not installed).
#
#   bash scripts/gpu-check.sh                build with cargo, then run
#   bash scripts/gpu-check.sh --bundle DIR   only build, and copy the five programs into DIR
#   KEEL_GPU_CHECK_BIN=DIR bash scripts/gpu-check.sh
#                                            run a bundle's programs (a GPU machine without Rust)
# The models come from scripts/setup-models.sh (or KEEL_MODELS_DIR). The NVIDIA libraries are
# found by the dynamic loader; where CUDA's own folders are not on its path, or hold only
# versioned names (libcublas.so.13), this script puts them there.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${KEEL_GPU_CHECK_OUT:-$root/target/gpu-check}"
seconds="${KEEL_GPU_CHECK_SECONDS:-1}"
if [[ "${KEEL_GPU_CHECK_MODELS:-}" == minilm ]]; then
  models_filter="cuda::minilm" scenarios="minilm-throughput"
else
  models_filter="cuda::" scenarios="minilm-throughput smollm2"
fi

# The test programs, by cargo's names, and where each lives in a bundle.
build() {
  # --workspace throughout: the same features as the workspace build, so nothing is rebuilt.
  cargo build --release --locked --workspace --bins >&2 || exit 1
  local list
  list=$(cargo test --release --locked --workspace --test conformance --test cuda \
    --test gpu --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("executable") and m.get("target", {}).get("kind") == ["test"]:
        print(m["target"]["name"], m["executable"])') || exit 1
  echo "$list"
}

if [[ "${1:-}" == "--bundle" ]]; then
  dest="${2:?--bundle DIR}"
  mkdir -p "$dest"
  build | while read -r name exe; do cp "$exe" "$dest/$name"; done
  cp target/release/keel target/release/keel-harness "$dest/"
  strip "$dest"/* 2>/dev/null || true
  ls -l "$dest"
  exit 0
fi

# NVRTC and cuBLAS under the names the loader is asked for (cudarc asks for libnvrtc.so,
# libcublas.so, or their .so.12), from CUDA's folders or the pip packages' if the loader lacks them.
links="$(mktemp -d)"
for lib in nvrtc cublas; do
  if ldconfig -p | grep -qE "lib$lib\.so(\.12)? "; then continue; fi
  found=$(find /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib /usr/lib/x86_64-linux-gnu \
    /opt /usr/local/lib/python3*/dist-packages /usr/lib/python3*/dist-packages \
    -name "lib$lib.so*" 2>/dev/null | sort | tail -1)
  if [[ -n "$found" ]]; then
    ln -sf "$found" "$links/lib$lib.so"
    export LD_LIBRARY_PATH="$links:$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
done

if [[ -n "${KEEL_GPU_CHECK_BIN:-}" ]]; then
  bin="$(cd "$KEEL_GPU_CHECK_BIN" && pwd)"
  declare -A test=([conformance]="$bin/conformance" [cuda]="$bin/cuda" [gpu]="$bin/gpu")
  keel="$bin/keel" harness="$bin/keel-harness"
  # The tests read their golden files from this checkout, not from where they were built.
  export KEEL_GOLDEN_DIR="$root/tests/golden"
else
  bash scripts/setup-models.sh || exit 1
  declare -A test=()
  while read -r name exe; do test[$name]="$exe"; done < <(build)
  keel="$root/target/release/keel" harness="$root/target/release/keel-harness"
fi

export KEEL_REQUIRE_CUDA=1
mkdir -p "$out"
failed=()
step() {
  local name="$1"
  shift
  echo "== $name" >&2
  "$@" || failed+=("$name")
}
step "keel devices" "$keel" devices
"$keel" devices --json > "$out/devices.json" 2>/dev/null
step "cuda test" "${test[cuda]}" --exact asking_for_cuda_is_no_such_device_naming_what_is_missing --nocapture
step "conformance (cuda)" "${test[conformance]}" cuda:: --nocapture --test-threads=1
step "models (cuda)" "${test[gpu]}" "$models_filter" --nocapture --test-threads=1
for device in cuda cpu; do
  for scenario in $scenarios; do
    step "harness $scenario --device $device" "$harness" "$scenario" --device "$device" \
      --seconds "$seconds" --out "$out/$device"
  done
done
rm -rf "$links"
if ((${#failed[@]})); then
  printf 'gpu-check: FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "gpu-check: all passed; figures in $out" >&2
