"""Speed benchmark: the whole training step against raw `lightgbm.train`, same data, same run.

Generates and stages `--days` x `--rows-per-day` rows (default 5 x 200k = 1M), then times
  (ours)  `python -m ctr.training.job` in a subprocess, as the DAG's train task runs it: read staged Parquet,
          count vocabularies, encode, LightGBM with early stopping on the last day, write the
          bundle (model.txt, features.json, metadata.json, probe.json, MLmodel);
  (raw)   `lightgbm.train` in a subprocess on the already-encoded numpy matrix of the same
          training rows (encoded beforehand, untimed), the same parameters and the same number
          of trees that (ours) built, no validation set.
Ratio = ours / raw (wall seconds); also reported: ours measured inside the process (without
interpreter start-up and imports) and the peak RSS of each subprocess.

    .venv/bin/python benchmarks/train.py [--rows-per-day 200000] [--days 5] [--repeats 1]
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
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
END = dt.date(2026, 7, 5)

RAW_CHILD = r"""
import json, resource, sys, time
import numpy as np
import lightgbm as lgb
x = np.load(sys.argv[1]); y = np.load(sys.argv[2]); params = json.loads(sys.argv[3]); rounds = int(sys.argv[4])
cat = json.loads(sys.argv[5])
t0 = time.monotonic()
d = lgb.Dataset(x, y, categorical_feature=cat, free_raw_data=True)
b = lgb.train(params, d, num_boost_round=rounds)
secs = time.monotonic() - t0
print(json.dumps({"secs": secs, "trees": b.current_iteration(),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall time and peak RSS (MiB) of one child process, via os.wait4."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out_path_out: list[str] = []
    out_path_err: list[str] = []

    def pump(stream, sink):
        sink.append(stream.read())

    threads = [threading.Thread(target=pump, args=(proc.stdout, out_path_out)),
               threading.Thread(target=pump, args=(proc.stderr, out_path_err))]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    for t in threads:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    res = subprocess.CompletedProcess(cmd, proc.returncode, "".join(out_path_out), "".join(out_path_err))
    return wall, usage.ru_maxrss / 1024, res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows-per-day", type=int, default=200_000)
    ap.add_argument("--days", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--num-threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train.json")
    a = ap.parse_args(argv)

    import numpy as np
    from ctr.data.generate import GeneratorConfig, generate
    from ctr.data.landing import daterange, read_staged, stage_day
    from ctr.features.transform import CAT_INDEX, FeatureTransform
    from ctr.schema import LABEL

    work = Path(tempfile.mkdtemp(prefix="ctr-bench-train-"))
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    try:
        land, staging = work / "landing", work / "staging"
        generate(land, a.days, a.rows_per_day, END, GeneratorConfig(seed=a.seed))
        days = daterange(END - dt.timedelta(days=a.days - 1), END)
        for d in days:
            stage_day(str(land), staging, work / "quarantine", d)
        runs = []
        for rep in range(a.repeats):
            out = work / f"bundle-{rep}"
            cmd = [sys.executable, "-m", "ctr.training.job", "--staging", str(staging), "--from",
                   days[0].isoformat(), "--to", days[-1].isoformat(), "--out", str(out), "--seed", str(a.seed),
                   "--num-threads", str(a.num_threads)]
            ours_wall, ours_rss, res = run_timed(cmd, env)
            if res.returncode != 0:
                raise RuntimeError(f"ctr.training.job failed: {res.stderr[-2000:]}")
            md = json.loads((out / "metadata.json").read_text())
            inner = [ln for ln in res.stderr.splitlines() if "bundle written" in ln]
            inner_secs = float(inner[-1].rsplit("total_secs=", 1)[1]) if inner else None
            if rep == 0:  # encode the same training rows once, untimed
                transform = FeatureTransform.load(out / "features.json")
                train_days = days[:-1]
                tables = [t for d in train_days for t in read_staged(staging, d)]
                # the model input: codes + derived features (the served tables; same width and work as the job's)
                x = np.concatenate([transform.derive(transform.transform_table(t)) for t in tables])
                y = np.concatenate([t.column(LABEL).to_numpy().astype(np.float64) for t in tables])
                np.save(work / "x.npy", x)
                np.save(work / "y.npy", y)
                n_rows = len(y) + md["rows"]["valid"]
                del x, y, tables
            params = dict(md["params"])
            params.pop("metric", None)
            raw_cmd = [sys.executable, "-c", RAW_CHILD, str(work / "x.npy"), str(work / "y.npy"), json.dumps(params),
                       str(md["trees_built"] + md.get("refit", {}).get("trees", 0)), json.dumps(CAT_INDEX)]
            raw_wall, raw_rss, rres = run_timed(raw_cmd, env)
            if rres.returncode != 0:
                raise RuntimeError(f"raw lightgbm.train failed: {rres.stderr[-2000:]}")
            raw = json.loads(rres.stdout.strip().splitlines()[-1])
            runs.append({"ours_job_wall_secs": round(ours_wall, 2), "ours_train_fn_secs": inner_secs,
                         "ours_peak_rss_mb": round(ours_rss, 1), "raw_lgb_train_secs": round(raw["secs"], 2),
                         "raw_process_wall_secs": round(raw_wall, 2), "raw_peak_rss_mb": round(raw_rss, 1),
                         "trees": md["trees_built"], "best_iteration": md["best_iteration"],
                         "ratio_job_vs_raw": round(ours_wall / raw["secs"], 3),
                         "ratio_train_fn_vs_raw": round(inner_secs / raw["secs"], 3) if inner_secs else None})
            print(json.dumps(runs[-1]), flush=True)
        doc = {
            "benchmark": "train",
            "command": "python benchmarks/train.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "rows": n_rows, "train_rows": md["rows"]["train"], "valid_rows": md["rows"]["valid"],
            "days": a.days, "num_threads": a.num_threads, "params": md["params"],
            "runs": runs,
            "ratio_job_vs_raw_median": float(np.median([r["ratio_job_vs_raw"] for r in runs])),
            "ratio_train_fn_vs_raw_median": float(np.median([r["ratio_train_fn_vs_raw"] for r in runs
                                                             if r["ratio_train_fn_vs_raw"] is not None])),
            "goal": "ratio <= 1.3",
            "load_average_at_end": os.getloadavg(),
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
            "finished_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
        print(json.dumps({k: doc[k] for k in ("ratio_job_vs_raw_median", "ratio_train_fn_vs_raw_median")}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
