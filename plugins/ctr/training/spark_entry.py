"""The Spark/Databricks training job's command line (the spark_python_task): parse arguments, call spark_job.

On Databricks the task's python_file is `ctr.training.databricks.JOB_SCRIPT`, which calls `main` from
the shipped wheel; locally `python -m ctr.training.spark_entry` (or jobs/train_spark.py) is the same.

    python -m ctr.training.spark_entry --data abfss://landing@acct.dfs.core.windows.net/criteo \
        --from 2026-11-13 --to 2026-11-19 --holdout 2026-11-20 \
        --out abfss://models@acct.dfs.core.windows.net/ctr/runs/ctr_retrain/2026-11-20 --engine synapseml

Writes OUT/model/ (the bundle), OUT/metrics.json (gate format), OUT/data_report.json and
OUT/quarantine/. Exit status 0 on success; on failure the last stderr line names the problem
(Databricks shows it as the run's error, and the Airflow task log repeats it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys


def _json_object(s: str) -> dict:
    v = json.loads(s)
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}")
    return v


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="landing zone root (folder, file:// or abfss:// URI)")
    p.add_argument("--from", dest="start", required=True, type=dt.date.fromisoformat)
    p.add_argument("--to", dest="end", required=True, type=dt.date.fromisoformat)
    p.add_argument("--holdout", type=dt.date.fromisoformat, default=None, help="evaluation day (metrics.json)")
    p.add_argument("--out", required=True, help="output prefix (folder or abfss:// URI)")
    p.add_argument("--engine", choices=["lightgbm", "synapseml"], default="lightgbm")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num-threads", type=int, default=2, help="driver-side LightGBM threads (engine lightgbm)")
    p.add_argument("--executor-cores", type=int, default=None, help="cores per executor (synapseml numThreads = this - 1)")
    p.add_argument("--sample-fraction", type=float, default=1.0)
    p.add_argument("--max-bad-fraction", type=float, default=0.001)
    p.add_argument("--params", type=_json_object, default={}, help="JSON LightGBM parameter overrides")
    p.add_argument("--gate-params", type=_json_object, default={}, help="JSON gate thresholds (DAG params)")
    p.add_argument("--baseline", default=None, help="champion bundle to compare against on the holdout day")
    p.add_argument("--metadata", type=_json_object, default={}, help="JSON merged into metadata.json (lineage)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    from ctr.training.spark_job import JobArgs, run_job, spark_session

    try:
        args = JobArgs(data=a.data, start=a.start, end=a.end, out=a.out, holdout=a.holdout, engine=a.engine, seed=a.seed,
                       params=a.params, num_threads=a.num_threads, sample_fraction=a.sample_fraction,
                       max_bad_fraction=a.max_bad_fraction, gate_params=a.gate_params, baseline=a.baseline,
                       metadata=a.metadata, executor_cores=a.executor_cores)
        summary = run_job(spark_session(), args)
    except Exception as e:
        logging.getLogger("ctr.training.spark_entry").exception("training job failed")
        print(f"train_spark: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    m = summary.get("metrics") or {}
    print(json.dumps({"bundle": summary["bundle"], "auc": (m.get("candidate") or {}).get("auc"),
                      "gate_passed": (m.get("gate") or {}).get("passed")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
