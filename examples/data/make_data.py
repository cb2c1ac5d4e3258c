"""Writes the sample inputs that README.md's commands use (committed beside this script):

- breast-cancer-held-out.csv: the held-out split of scikit-learn's breast-cancer data (every
  fifth row, as examples/models/breast-cancer-mlp/train.py holds it out), a header row of the
  model's feature names;
- breast-cancer-rescaled.csv: the same rows with `mean radius` times 1.5 (a drifted sensor);
- breast-cancer-calibration.csv: the calibration split (i % 5 == 1), which the model's
  reference profile is built from.

    python3 examples/data/make_data.py .models/site/sklearn/datasets/data/breast_cancer.csv
"""

import pathlib
import sys
import tomllib

here = pathlib.Path(__file__).parent
data = sys.argv[1]
manifest = here.parent / "models" / "breast-cancer-mlp" / "keel.toml"
names = tomllib.load(open(manifest, "rb"))["features"]
rows = [line.split(",")[:30] for line in open(data).read().splitlines()[1:]]
held = [r for i, r in enumerate(rows) if i % 5 == 0]
calibration = [r for i, r in enumerate(rows) if i % 5 == 1]
header = ",".join(f'"{n}"' if "," in n else n for n in names) + "\n"
with open(here / "breast-cancer-held-out.csv", "w") as f:
    f.write(header + "".join(",".join(r) + "\n" for r in held))
with open(here / "breast-cancer-rescaled.csv", "w") as f:
    f.write(header + "".join(",".join([repr(float(r[0]) * 1.5)] + r[1:]) + "\n" for r in held))
with open(here / "breast-cancer-calibration.csv", "w") as f:
    f.write(header + "".join(",".join(r) + "\n" for r in calibration))
