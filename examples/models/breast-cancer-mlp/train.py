#!/usr/bin/env python3
"""Trains Keel's tabular example model: a small MLP on scikit-learn's bundled breast-cancer data
set (569 rows, 30 numeric features, classes malignant/benign), with PyTorch, and exports it here:
model.safetensors and keel.toml (features, labels, the data contract, the drift window), and the
reference outputs of the held-out rows to tests/golden/mlp.json.

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch scikit-learn==1.9.1 safetensors numpy
    /tmp/refenv/bin/python examples/models/breast-cancer-mlp/train.py

The split, which the Rust tests rely on, by row index i: i % 5 == 0 is held out for the tests
(114 rows); i % 5 == 1 is the calibration set of the reference profile (114 rows, `keel
profile`: data the model was not trained on, so its confidence there is what it will be on new
data); the other 341 train the model. Nothing in the outputs is typed by hand.
"""
import hashlib
import json
import math
import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_breast_cancer

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "..", "..", "..", "tests", "golden", "mlp.json")
LABELS = ["malignant", "benign"]

torch.manual_seed(0)
torch.set_num_threads(2)

data = load_breast_cancer()
x_all = data.data.astype(np.float32)
y_all = data.target.astype(np.int64)
names = [str(n) for n in data.feature_names]
held = np.arange(len(x_all)) % 5 == 0
train = np.arange(len(x_all)) % 5 >= 2
x_train, y_train = x_all[train], y_all[train]

mean = x_train.mean(axis=0)
scale = x_train.std(axis=0)  # population std (ddof=0)

model = torch.nn.Sequential(
    torch.nn.Linear(30, 16), torch.nn.ReLU(),
    torch.nn.Linear(16, 8), torch.nn.ReLU(),
    torch.nn.Linear(8, 2),
)
xt = (torch.tensor(x_train) - torch.tensor(mean)) / torch.tensor(scale)
yt = torch.tensor(y_train)
opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
for _ in range(200):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(xt), yt)
    loss.backward()
    opt.step()
model.eval()

tensors = {"scaler.mean": torch.tensor(mean), "scaler.scale": torch.tensor(scale)}
for i, layer in enumerate(m for m in model if isinstance(m, torch.nn.Linear)):
    tensors[f"layers.{i}.weight"] = layer.weight.detach().float().contiguous()
    tensors[f"layers.{i}.bias"] = layer.bias.detach().float().contiguous()
weights = os.path.join(HERE, "model.safetensors")
save_file(tensors, weights)


def probabilities(x):
    """The exported model, recomputed from the file with plain torch ops."""
    t = load_file(weights)
    h = (torch.tensor(x) - t["scaler.mean"]) / t["scaler.scale"]
    for i in range(3):
        h = h @ t[f"layers.{i}.weight"].T + t[f"layers.{i}.bias"]
        if i < 2:
            h = torch.relu(h)
    return torch.softmax(h, dim=-1)


with torch.inference_mode():
    p_all = probabilities(x_all)
pred = p_all.argmax(dim=-1).numpy()
train_acc = float((pred[train] == y_all[train]).mean())
held_acc = float((pred[held] == y_all[held]).mean())
print(f"accuracy: train {train_acc:.4f}, held-out {held_acc:.4f}")


def round_up(x, digits=3):
    """x rounded up to `digits` significant digits."""
    if x <= 0:
        return 0.0
    e = math.floor(math.log10(x)) - digits + 1
    return math.ceil(x / 10**e) * 10**e


sha = hashlib.sha256(open(weights, "rb").read()).hexdigest()
lines = [
    "# Written by train.py (scikit-learn's breast-cancer data, PyTorch).",
    'name = "breast-cancer-mlp"',
    'architecture = "mlp"',
    'weights = "model.safetensors"',
    f"labels = {json.dumps(LABELS)}",
    f"features = {json.dumps(names)}",
    "",
    "[[files]]",
    'path = "model.safetensors"',
    f'sha256 = "{sha}"',
    "",
    "[drift]",
    "window = 50",
]
for j, name in enumerate(names):
    top = float(f"{round_up(1.5 * float(x_all[:, j].max())):.6g}")
    action = "reject" if name.startswith("mean ") else "flag" if name.startswith("worst ") else "clamp"
    lines += [
        "",
        f'[contract.fields."{name}"]',
        'type = "number"',
        "required = true",
        f"range = [0.0, {top!r}]",
        f'range_action = "{action}"',
        'non_finite = "reject"',
    ]
lines += [
    "",
    "[contract.fields.observed_at]",
    'type = "timestamp"',
    "required = false",
    'max_age = "30d"',
    'max_age_action = "reject"',
    "",
    "[contract.fields.site]",
    'type = "category"',
    "required = false",
    'categories = ["clinic-a", "clinic-b", "clinic-c"]',
    'categories_action = "flag"',
]
# Its price (ten times the cheap breast-cancer-linear's) and its review policy: unsure answers
# and rows the contract flagged go to a reviewer, served provisionally.
lines += [
    "",
    "[cost]",
    "per_call = 0.01",
    "",
    "[review]",
    "provisional = true",
    "",
    "[[review.rules]]",
    'name = "unsure"',
    'when = "confidence"',
    "below = 0.9",
    'action = "review"',
    "",
    "[[review.rules]]",
    'name = "flagged input"',
    'when = "contract"',
    'equals = "flagged"',
    'action = "review"',
]
with open(os.path.join(HERE, "keel.toml"), "w") as f:
    f.write("\n".join(lines) + "\n")

rows = []
for i in np.flatnonzero(held):
    p = [float(v) for v in p_all[i].numpy()]
    rows.append({
        "index": int(i),
        "values": [float(v) for v in data.data[i]],
        "target": int(y_all[i]),
        "probabilities": p,
        "class": LABELS[int(np.argmax(p))],
    })
with open(GOLDEN, "w") as f:
    json.dump({
        "source": "examples/models/breast-cancer-mlp/train.py: PyTorch softmax of the exported model on float32 inputs",
        "labels": LABELS,
        "features": names,
        "split": "held-out rows: index % 5 == 0; calibration: index % 5 == 1; training: the rest",
        "heldout_accuracy": held_acc,
        "rows": rows,
    }, f, indent=1)
    f.write("\n")
print(f"wrote {weights}, keel.toml, {os.path.normpath(GOLDEN)}")
