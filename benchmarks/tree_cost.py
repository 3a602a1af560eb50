"""What one LightGBM tree costs against the rows it is grown on: the measurement behind ctr.training.scaling.

    .venv/bin/python benchmarks/tree_cost.py --dataset BIN --bundle BUNDLE [--fractions 1,0.5,0.25,0.15,0.08]
        [--trees 15] [--out benchmarks/results/tree_cost.json]

BIN is a binned training Dataset saved by the train job (`CTR_TRAIN_SAVE_DATASET=BIN`, as
benchmarks/scale.py sets it), BUNDLE the bundle that job wrote (its metadata's LightGBM parameters are
used, without the validation metric). For each bagging fraction, two trainings in this process, of 3
and of `--trees` trees; the difference over the extra trees is the marginal seconds a tree, so the
Dataset load and the first trees' setup are not counted. A least-squares line through the points gives
seconds per million bagged rows and a fixed part per tree, which is then divided by the Dataset's rows
(gradients, out-of-bag scores and drawing the bag all touch every row).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--fractions", default="1,0.5,0.25,0.15,0.08")
    ap.add_argument("--trees", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/tree_cost.json"))
    a = ap.parse_args()

    import lightgbm as lgb

    md = json.loads((a.bundle / "metadata.json").read_text())
    params = {k: v for k, v in md["params"].items() if k not in ("metric", "bagging_fraction", "bagging_freq")}
    data = lgb.Dataset(str(a.dataset), params=params).construct()
    rows = data.num_data()
    points = []
    for frac in (float(f) for f in a.fractions.split(",")):
        p = {**params, **({"bagging_fraction": frac, "bagging_freq": 1} if frac < 1 else {})}
        t0 = time.monotonic()
        lgb.train(p, data, num_boost_round=3)
        t1 = time.monotonic()
        lgb.train(p, data, num_boost_round=a.trees)
        t2 = time.monotonic()
        per_tree = ((t2 - t1) - (t1 - t0)) / (a.trees - 3)
        points.append({"bagging_fraction": frac, "bag_rows": round(rows * frac), "secs_per_tree": round(per_tree, 4)})
        print(json.dumps(points[-1]), flush=True)
    x = np.array([p["bag_rows"] for p in points]) / 1e6
    y = np.array([p["secs_per_tree"] for p in points])
    slope, fixed = np.polyfit(x, y, 1)
    doc = {
        "benchmark": "tree_cost",
        "command": "benchmarks/tree_cost.py " + " ".join(f"--{k} {v}" for k, v in vars(a).items()),
        "rows": rows, "features": data.num_feature(), "trees": a.trees, "points": points,
        "fit": {"secs_per_million_bagged_rows": round(float(slope), 4), "fixed_secs_per_tree": round(float(fixed), 4),
                "fixed_secs_per_tree_per_million_rows": round(float(fixed) / (rows / 1e6), 4)},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "lightgbm": lgb.__version__,
                    "loadavg": os.getloadavg()},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["fit"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
