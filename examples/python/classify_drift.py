"""Tabular classification with a data contract, drift and metrics, from Python (ctypes): the
breast-cancer MLP of examples/models classifies rows of scikit-learn's breast-cancer CSV; a row
out of range is refused by the contract, one flagged; a window of 50 rows with `mean radius`
rescaled by 1.5 raises the drift alarm; the metrics text shows it all.

    PYTHONPATH=examples/python python3 examples/python/classify_drift.py MODEL_DIR BREAST_CANCER_CSV

(BREAST_CANCER_CSV: sklearn/datasets/data/breast_cancer.csv, which scripts/setup-models.sh
installs into .models/site.) Exits non-zero if any of it does not happen.
"""

import sys

import keel


def main():
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} MODEL_DIR BREAST_CANCER_CSV")
    model_dir, data = sys.argv[1:]
    with open(model_dir + "/keel.toml") as f:
        names = next(l for l in f if l.startswith("features")).split("=", 1)[1]
    names = [n.strip().strip('"') for n in names.strip().strip("[]").split(",")]
    rows = [[float(x) for x in line.split(",")[:30]] for line in open(data).read().splitlines()[1:]]
    held = [dict(zip(names, r)) for i, r in enumerate(rows) if i % 5 == 0]

    with keel.Engine() as engine:
        model = engine.load(model_dir)
        answer = engine.classify(model.id, held[0])
        print("row 0:", answer["classes"][0]["class"], answer["classes"][0]["probabilities"])
        try:
            engine.classify(model.id, dict(held[0], **{"mean radius": -1.0}))
            sys.exit("a row out of range was not refused")
        except keel.KeelError as e:
            assert e.code == keel.ERR_CONTRACT, e
            print("refused:", e)
        flagged = engine.classify(model.id, dict(held[0], **{"worst area": 1e6}))
        print("flagged:", flagged["contract"]["violations"][0]["field"])
        for row in held[:50]:
            engine.classify(model.id, dict(row, **{"mean radius": row["mean radius"] * 1.5}))
        drift = engine.drift(model.id)
        print("drift after a window of rescaled rows:", drift["state"])
        assert drift["state"] == "alarm", drift["state"]
        metrics = engine.metrics()
        assert 'keel_drift_state{model="breast-cancer-mlp"' in metrics
        print(next(l for l in metrics.splitlines() if l.startswith("keel_contract_violations_total")))


if __name__ == "__main__":
    main()
