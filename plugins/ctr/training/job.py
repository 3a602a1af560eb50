"""The local training job's command line, run by the DAG's `train` task in a subprocess (local compute).

Thin on purpose: parse arguments, call `ctr.training.trainer.train`. The same arguments drive
`ctr.training.spark_entry` (jobs/train_spark.py), the Spark/Databricks entry point.

    python -m ctr.training.job --staging DIR --from 2026-11-13 --to 2026-11-19 --out BUNDLE [--seed 42]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--staging", required=True, type=Path)
    p.add_argument("--from", dest="start", required=True, type=dt.date.fromisoformat)
    p.add_argument("--to", dest="end", required=True, type=dt.date.fromisoformat)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--sample-fraction", type=float, default=1.0)
    p.add_argument("--params", default="{}", help="JSON LightGBM parameter overrides")
    p.add_argument("--rounds", type=int, default=None, help="maximum number of trees (default: ctr.training.trainer's)")
    p.add_argument("--min-count", type=int, default=None, help="vocabulary: minimum count of a kept value")
    p.add_argument("--max-vocab", type=int, default=None, help="vocabulary: maximum values kept per column")
    p.add_argument("--metadata", default="{}", help="JSON merged into metadata.json (lineage)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from ctr.training.trainer import TrainConfig, train

    optional = {k: v for k, v in (("rounds", a.rounds), ("min_count", a.min_count), ("max_vocab", a.max_vocab))
                if v is not None}
    try:
        cfg = TrainConfig(start=a.start, end=a.end, seed=a.seed, num_threads=a.num_threads,
                          sample_fraction=a.sample_fraction, params=json.loads(a.params), **optional)
        train(a.staging, a.out, cfg, extra_metadata=json.loads(a.metadata))
    except Exception as e:
        logging.getLogger("ctr.training.job").error("training failed: %s", e)
        print(f"train: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
