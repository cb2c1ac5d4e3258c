#!/usr/bin/env python3
"""Trains the cheap model of the breast-cancer cascade: scikit-learn's logistic regression on four
of the thirty features, exported as a one-layer `mlp` (model.safetensors + keel.toml), and its
reference probabilities on the held-out rows (tests/golden/linear.json, from predict_proba).

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install scikit-learn==1.9.1 numpy safetensors
    /tmp/refenv/bin/python examples/models/breast-cancer-linear/train.py

Same split as breast-cancer-mlp/train.py (by row index i: i % 5 == 0 held out, i % 5 >= 2
trains). Its price in keel.toml is a tenth of the MLP's: the cascade asks it first and escalates
to the MLP when it is unsure.
"""
import hashlib
import json
import os

import numpy as np
from safetensors.numpy import save_file
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "..", "..", "..", "tests", "golden", "linear.json")
LABELS = ["malignant", "benign"]
FEATURES = ["mean radius", "mean texture", "mean smoothness", "mean symmetry"]

data = load_breast_cancer()
names = [str(n) for n in data.feature_names]
columns = [names.index(f) for f in FEATURES]
x_all = data.data[:, columns].astype(np.float32)
y_all = data.target.astype(np.int64)
held = np.arange(len(x_all)) % 5 == 0
train = np.arange(len(x_all)) % 5 >= 2

mean = x_all[train].mean(axis=0)
scale = x_all[train].std(axis=0)
model = LogisticRegression().fit((x_all[train] - mean) / scale, y_all[train])

# Two logits whose softmax is the logistic regression's sigmoid: 0 for malignant, w.x + b for benign.
weight = np.zeros((2, len(FEATURES)), dtype=np.float32)
weight[1] = model.coef_[0]
bias = np.array([0.0, model.intercept_[0]], dtype=np.float32)
weights = os.path.join(HERE, "model.safetensors")
save_file({
    "scaler.mean": mean.astype(np.float32),
    "scaler.scale": scale.astype(np.float32),
    "layers.0.weight": weight,
    "layers.0.bias": bias,
}, weights)

p_all = model.predict_proba((x_all - mean) / scale)
pred = p_all.argmax(axis=1)
print(f"accuracy: train {(pred[train] == y_all[train]).mean():.4f}, held-out {(pred[held] == y_all[held]).mean():.4f}")

sha = hashlib.sha256(open(weights, "rb").read()).hexdigest()
lines = [
    "# Written by train.py (scikit-learn's breast-cancer data, logistic regression).",
    'name = "breast-cancer-linear"',
    'architecture = "mlp"',
    'weights = "model.safetensors"',
    f"labels = {json.dumps(LABELS)}",
    f"features = {json.dumps(FEATURES)}",
    "",
    "[[files]]",
    'path = "model.safetensors"',
    f'sha256 = "{sha}"',
    "",
    "[cost]",
    "per_call = 0.001",
]
with open(os.path.join(HERE, "keel.toml"), "w") as f:
    f.write("\n".join(lines) + "\n")

with open(GOLDEN, "w") as f:
    json.dump({
        "source": "examples/models/breast-cancer-linear/train.py: scikit-learn LogisticRegression.predict_proba",
        "labels": LABELS,
        "features": FEATURES,
        "rows": [{"index": int(i), "probabilities": [float(v) for v in p_all[i]]} for i in np.flatnonzero(held)],
    }, f, indent=1)
    f.write("\n")
print(f"wrote {weights}, keel.toml, {os.path.normpath(GOLDEN)}")
