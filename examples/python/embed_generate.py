"""Embed and generate with libkeel from Python (ctypes): the Python twin of
examples/c/embed_generate.c, with the same inputs and the same dump format.

    PYTHONPATH=examples/python python3 examples/python/embed_generate.py MINILM_DIR SMOLLM2_GGUF [DUMP_FILE]
"""

import struct
import sys

import keel

# The inputs: the same in examples/c/embed_generate.c and ffi/examples/reference.rs.
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Keel runs models inside the host process.",
    "Ünïcödé text, too: 日本語.",
]
# A question the 135M model answers right on its quantized weights (see embed_generate.c).
PROMPT = "What is 2+2?"
MAX_TOKENS = 32


def main():
    if len(sys.argv) < 3:
        sys.exit(f"usage: {sys.argv[0]} MINILM_DIR SMOLLM2_GGUF [DUMP_FILE]")
    lines = []
    with keel.Engine(keel.DEVICE_CPU) as engine:
        minilm = engine.load(sys.argv[1])
        minilm.alias("embed")
        print(f"loaded {minilm.name} ({minilm.architecture}), version {minilm.id[:12]}")
        vectors = engine.embed("embed", TEXTS)
        print(f"{len(vectors)} embeddings of dimension {len(vectors[0])}; cosine similarities:")
        for a in vectors:
            print("".join(f" {sum(x * y for x, y in zip(a, b)):6.3f}" for b in vectors))
        for i, v in enumerate(vectors):
            bits = struct.unpack(f"<{len(v)}I", struct.pack(f"<{len(v)}f", *v))
            lines.append(f"embedding {i} {len(v)} " + " ".join(f"{b:08x}" for b in bits))

        smollm = engine.load(sys.argv[2])
        print(f"\n> {PROMPT}")
        completion = engine.generate(
            smollm.id, PROMPT, max_tokens=MAX_TOKENS, on_token=lambda t: print(t, end="", flush=True)
        )
        print(f"\n({len(completion.tokens)} tokens, finish: {completion.finish})")
        lines.append(f"completion {len(completion.tokens)} {completion.finish}")
        lines.append("tokens" + "".join(f" {t}" for t in completion.tokens))
        lines.append("text " + completion.text.encode().hex())
        smollm.free()
        minilm.free()
    if len(sys.argv) > 3:
        with open(sys.argv[3], "w") as f:
            f.write("\n".join(lines) + "\n")
    assert keel.live_handles() == 0, f"{keel.live_handles()} handles left live"


if __name__ == "__main__":
    main()
