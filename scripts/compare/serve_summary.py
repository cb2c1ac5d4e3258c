"""The table of scripts/compare/serve.sh, from the JSON files of its rounds (OUT/keel-R.json,
OUT/llama-embed-R.json, OUT/llama-chat-R.json, OUT/overhead/serve.json): medians over the
rounds for each server, and Keel's ratio to llama-server per round (each round ran both, back to
back, so a busy neighbour slows both sides of a ratio alike): its median and range.

    python3 scripts/compare/serve_summary.py OUT ROUNDS [LLAMA_CMAKE_ARGS]
"""
import json
import statistics
import sys

out, rounds = sys.argv[1], int(sys.argv[2])
cmake = sys.argv[3] if len(sys.argv) > 3 else ""


def load(name):
    return {(x["task"], x["clients"]): x for x in json.load(open(f"{out}/{name}.json"))["results"]}


def figure(x):
    """What a row is judged by: generated tokens/s for chat, requests/s for embeddings."""
    return x["tokens_per_s"] if x["task"] == "chat" else x["requests_per_s"]


per_round = []
for r in range(1, rounds + 1):
    keel = load(f"keel-{r}")
    llama = {**load(f"llama-embed-{r}"), **load(f"llama-chat-{r}")}
    per_round.append((keel, llama))


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


rows = []
for key in sorted(per_round[0][0]):
    keel = [k[key] for k, _ in per_round]
    llama = [l[key] for _, l in per_round]
    ratios = [figure(k) / figure(l) for k, l in zip(keel, llama) if figure(l)]
    row = {"task": key[0], "clients": key[1], "ratio_median": median(ratios), "ratios": ratios}
    for server, xs in (("keel serve", keel), ("llama-server", llama)):
        row[server] = {
            k: median([x[k] for x in xs])
            for k in ("requests_per_s", "tokens_per_s", "latency_p99_ms", "ttft_p99_ms")
        }
        row[server]["errors"] = sum(x["errors"] for x in xs)
    rows.append(row)
overhead = json.load(open(f"{out}/overhead/serve.json"))["overhead"]
result = {"rounds": rounds, "llama_cmake_args": cmake, "results": rows, "overhead": overhead}
json.dump(result, open(f"{out}/serve-compare.json", "w"), indent=1)


def fmt(v):
    return "-" if v is None else f"{v:.1f}"


print("| load | keel serve | llama-server | ratio (per round) |")
print("|---|---:|---:|---|")
for r in rows:
    k, l = r["keel serve"], r["llama-server"]
    if r["task"] == "chat":
        what = f"SmolLM2 streamed chat, 64 tokens, {r['clients']} client(s): tokens/s (p99 TTFT ms)"
        a, b = f"{fmt(k['tokens_per_s'])} ({fmt(k['ttft_p99_ms'])})", f"{fmt(l['tokens_per_s'])} ({fmt(l['ttft_p99_ms'])})"
    else:
        what = f"MiniLM embeddings, {r['clients']} clients: requests/s (p99 ms)"
        a, b = f"{fmt(k['requests_per_s'])} ({fmt(k['latency_p99_ms'])})", f"{fmt(l['requests_per_s'])} ({fmt(l['latency_p99_ms'])})"
    errors = k["errors"] + l["errors"]
    spread = f"{min(r['ratios']):.2f}-{max(r['ratios']):.2f}"
    print(f"| {what} | {a} | {b} | **{r['ratio_median']:.2f}** ({spread}){' errors: ' + str(errors) if errors else ''} |")
print(f"\nkeel serve at 32 clients: {overhead['ratio_median']:.3f}x the same embeddings made "
      f"in-process by 32 threads (median of 3 pairs)")
print(f"(medians of {rounds} rounds; written to {out}/serve-compare.json)")
