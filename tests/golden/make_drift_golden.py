#!/usr/bin/env python3
"""Reference values of Keel's drift statistics, computed by scipy on fixed samples. Run by hand
when the cases change; the JSON it writes is committed (tests/observe.rs reads it).

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install numpy scipy
    /tmp/refenv/bin/python tests/golden/make_drift_golden.py

Samples are rounded to 6 decimals before any statistic is computed, so that Rust reads exactly
the numbers scipy saw. PSI has no scipy function: it is the formula, sum (a - r) ln(a / r), with
each proportion floored at 1e-4, computed here in numpy.
"""
import json
import os

import numpy as np
from scipy import stats
from scipy.spatial.distance import jensenshannon

rng = np.random.default_rng(7)
r6 = lambda x: np.round(np.asarray(x, dtype=np.float64), 6)
samples = {
    "normal_vs_shifted": (rng.normal(0, 1, 400), rng.normal(0.3, 1, 300)),
    "lognormal_vs_rescaled": (rng.lognormal(0, 0.5, 500), 1.5 * rng.lognormal(0, 0.5, 500)),
    "uniform_vs_uniform": (rng.uniform(0, 1, 200), rng.uniform(0, 1, 250)),
    "tied_values": (rng.integers(0, 5, 120).astype(float), rng.integers(1, 6, 90).astype(float)),
    "small": (rng.normal(0, 1, 7), rng.normal(1, 2, 13)),
    "big_normal": (rng.normal(5, 2, 2000), rng.normal(5.4, 2.2, 2000)),
    "big_lognormal": (rng.lognormal(1, 0.7, 2000), rng.lognormal(1.1, 0.7, 2000)),
}
cases = []
for name, (a, b) in samples.items():
    a, b = r6(a), r6(b)
    cases.append({
        "name": name,
        "a": a.tolist(),
        "b": b.tolist(),
        "ks": float(stats.ks_2samp(a, b).statistic),
        "wasserstein": float(stats.wasserstein_distance(a, b)),
    })

def psi(r, a):
    r, a = np.asarray(r, float), np.asarray(a, float)
    r, a = np.maximum(r / r.sum(), 1e-4), np.maximum(a / a.sum(), 1e-4)
    return float(((a - r) * np.log(a / r)).sum())

distributions = []
for k in [2, 5, 10, 16]:
    p = r6(rng.dirichlet(np.ones(k)))
    q = r6(rng.dirichlet(np.ones(k)))
    q[0] = 0.0  # an empty bin
    counts = rng.multinomial(300, p / p.sum()).astype(float)
    distributions.append({
        "p": p.tolist(),
        "q": q.tolist(),
        "js": float(jensenshannon(p, q)),
        "psi": psi(p, q),
        "counts": counts.tolist(),
        "chi_square": float(stats.chisquare(counts, p / p.sum() * counts.sum()).statistic),
    })

quantiles = [{"p": p, "dof": d, "x": float(stats.chi2.isf(p, d))}
             for p in [0.05, 0.01, 1e-3, 1e-4, 1e-5] for d in [3, 5, 10, 15, 30]]

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "drift_stats.json")
with open(out, "w") as f:
    json.dump({"source": "tests/golden/make_drift_golden.py (scipy " + __import__("scipy").__version__ + ")",
               "samples": cases, "distributions": distributions, "chi2_upper": quantiles}, f)
    f.write("\n")
print("wrote", out)
