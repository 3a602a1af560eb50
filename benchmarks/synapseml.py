"""SynapseML engine vs the local LightGBM engine, same landing days, one run: wall time, AUC, logloss.

Generates `--days` x `--rows-per-day` training rows (default 5 x 200k = 1M; the last day validates)
plus one holdout day, then trains three bundles, each as a user would (`ctr train` in a subprocess):
  lightgbm           `--engine lightgbm` (no Spark: stage, encode, lightgbm.train);
  synapseml-local    `--engine synapseml` on local[2] (one LightGBM worker, both cores);
  synapseml-cluster  `--engine synapseml` on a standalone master + 2 workers on 127.0.0.1 (one core
                     each: two LightGBM workers over loopback), started and stopped here.
Each bundle is scored with `ctr evaluate` on the same holdout rows. Wall seconds include process
start, Spark start-up and the job's own holdout scoring (the lightgbm row has none of those).

    .venv/bin/python benchmarks/synapseml.py [--rows-per-day 200000] [--days 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
END = dt.date(2026, 7, 5)
CODES_ONLY = {"derived": [], "refit": False}  # what the SynapseML engine trains on


def _run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    t0 = time.monotonic()
    with open(log, "w") as fh:
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=3600)
    secs = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"bench synapseml: {' '.join(cmd[2:5])} failed (exit {r.returncode}); log {log}:\n"
                         + log.read_text()[-3000:])
    return secs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows-per-day", type=int, default=200_000)
    ap.add_argument("--days", type=int, default=5, help="training days (the last one validates)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--worker-memory", default="4g", help="memory of each standalone worker")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "synapseml.json")
    ap.add_argument("--keep", action="store_true", help="keep the generated data and bundles")
    a = ap.parse_args(argv)

    from ctr.data.generate import GeneratorConfig, generate
    from ctr.training.spark_cluster import LocalCluster

    work = Path(tempfile.mkdtemp(prefix="ctr-bench-synapseml-"))
    try:
        landing = work / "landing"
        generate(landing, a.days + 1, a.rows_per_day, END, GeneratorConfig(seed=a.seed))
        start, last = END - dt.timedelta(days=a.days), END - dt.timedelta(days=1)
        base = {**os.environ, "CTR_HOME": str(work / "home"), "CTR_NUM_THREADS": "2",
                "CTR_SPARK_DRIVER_MEMORY": os.environ.get("CTR_SPARK_DRIVER_MEMORY", "6g")}
        base.pop("CTR_SPARK_CONF", None)
        train = [sys.executable, "-m", "ctr.cli", "train", "--data", str(landing), "--from", start.isoformat(),
                 "--to", last.isoformat(), "--seed", str(a.seed),
                 # like for like: SynapseML trains on the 39 codes without issue 16's derived features and refit
                 "--params", json.dumps(CODES_ONLY)]
        results: dict[str, dict] = {}

        def one(name: str, engine: str, env: dict[str, str]) -> None:
            out = work / name
            secs = _run([*train, "--engine", engine, "--out", str(out)], env, work / f"{name}.log")
            ev = subprocess.run([sys.executable, "-m", "ctr.cli", "evaluate", "--model", str(out), "--data", str(landing),
                                 "--day", END.isoformat()], capture_output=True, text=True, env=base, check=True)
            m = json.loads(ev.stdout)
            meta = json.loads((out / "metadata.json").read_text())
            results[name] = {"engine": engine, "wall_secs": round(secs, 1), "auc": m["candidate"]["auc"],
                             "logloss": m["candidate"]["logloss"], "trees": meta["best_iteration"],
                             "spark_master": meta.get("spark_master")}
            print(json.dumps({name: results[name]}), flush=True)

        one("lightgbm", "lightgbm", {**base, "CTR_SPARK_MASTER": "local[2]"})
        one("synapseml-local", "synapseml", {**base, "CTR_SPARK_MASTER": "local[2]"})
        with LocalCluster(workers=2, cores=1, memory=a.worker_memory) as c:
            conf = ";".join(f"{k}={v}" for k, v in c.session_conf().items())
            one("synapseml-cluster", "synapseml", {**base, "CTR_SPARK_MASTER": c.master_url, "CTR_SPARK_CONF": conf})
        ref = results["lightgbm"]
        for r in results.values():
            r["auc_minus_lightgbm"] = round(r["auc"] - ref["auc"], 5)
            r["wall_vs_lightgbm"] = round(r["wall_secs"] / ref["wall_secs"], 2)
        doc = {"benchmark": "synapseml", "command": "python benchmarks/synapseml.py" + "".join(f" {x}" for x in (argv or [])),
               "train_rows": a.days * a.rows_per_day, "holdout_rows": a.rows_per_day, "days": a.days,
               "results": results,
               "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
               "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
        print(json.dumps({k: (v["wall_secs"], round(v["auc"], 4), round(v["logloss"], 4)) for k, v in results.items()}))
        return 0
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
