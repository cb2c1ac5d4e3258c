"""Writes a tiny BERT sentence encoder (random weights, 2 layers of width 32) as a Hugging Face
folder: config.json, model.safetensors, and the tokenizer.json of a real model. It loads in
milliseconds, so that scripts/test-ffi.sh can afford 1,000 load/free cycles; the code it runs is the
same as for all-MiniLM-L6-v2. Standard library only.

    python3 make_tiny_bert.py TOKENIZER_JSON OUT_DIR
"""

import json
import os
import random
import shutil
import struct
import sys
from array import array

HIDDEN, LAYERS, HEADS, FF, POSITIONS, VOCAB = 32, 2, 2, 64, 512, 30522


def tensors():
    yield "embeddings.word_embeddings.weight", [VOCAB, HIDDEN]
    yield "embeddings.position_embeddings.weight", [POSITIONS, HIDDEN]
    yield "embeddings.token_type_embeddings.weight", [2, HIDDEN]
    yield "embeddings.LayerNorm.weight", [HIDDEN]
    yield "embeddings.LayerNorm.bias", [HIDDEN]
    for i in range(LAYERS):
        p = f"encoder.layer.{i}"
        for name, out, inp in [
            ("attention.self.query", HIDDEN, HIDDEN),
            ("attention.self.key", HIDDEN, HIDDEN),
            ("attention.self.value", HIDDEN, HIDDEN),
            ("attention.output.dense", HIDDEN, HIDDEN),
            ("intermediate.dense", FF, HIDDEN),
            ("output.dense", HIDDEN, FF),
        ]:
            yield f"{p}.{name}.weight", [out, inp]
            yield f"{p}.{name}.bias", [out]
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"]:
            yield f"{p}.{norm}.weight", [HIDDEN]
            yield f"{p}.{norm}.bias", [HIDDEN]


def main():
    tokenizer, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    rng = random.Random(0)
    header, blobs, offset = {}, [], 0
    for name, shape in tensors():
        n = 1
        for d in shape:
            n *= d
        if name.endswith("LayerNorm.weight"):
            values = array("f", [1.0] * n)
        else:
            values = array("f", (rng.uniform(-0.1, 0.1) for _ in range(n)))
        blob = values.tobytes()
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)
    config = {
        "model_type": "bert",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": FF,
        "hidden_act": "gelu",
        "max_position_embeddings": POSITIONS,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    shutil.copyfile(tokenizer, os.path.join(out, "tokenizer.json"))


if __name__ == "__main__":
    main()
