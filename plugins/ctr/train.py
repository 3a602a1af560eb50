"""LightGBM training on a range of staged days, writing a model bundle.

Deterministic: `seed`, `deterministic=True`, a fixed thread count and row-wise histograms, so
two trainings on the same data give a byte-identical `model.txt`. Early stopping watches a
time-ordered validation slice: the last day of the training range (or, for a one-day range,
its last tenth); the holdout day is never seen here.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

import ctr
from ctr.bundle import Bundle, bundle_digest, write_probe
from ctr.data.landing import daterange, read_staged
from ctr.features import CAT_INDEX, FeatureTransform
from ctr.schema import FEATURE_COLUMNS, LABEL

log = logging.getLogger(__name__)

DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "metric": ["auc", "binary_logloss"],
    "learning_rate": 0.08,
    "num_leaves": 63,
    "min_data_in_leaf": 100,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.9,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "max_bin": 255,
    "cat_smooth": 10.0,
    "cat_l2": 10.0,
    "max_cat_threshold": 64,
    "min_data_per_group": 50,
    "deterministic": True,
    "force_row_wise": True,
    "verbosity": -1,
}
DEFAULT_ROUNDS = 400
EARLY_STOPPING = 30


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainConfig:
    start: dt.date
    end: dt.date                      # inclusive
    seed: int = 42
    num_threads: int = 2
    rounds: int = DEFAULT_ROUNDS
    early_stopping: int = EARLY_STOPPING
    sample_fraction: float = 1.0      # < 1 trains on a deterministic slice (used to test the gate)
    min_count: int = 10
    max_vocab: int = 10_000
    params: dict[str, Any] = field(default_factory=dict)

    def lgb_params(self) -> dict[str, Any]:
        p = {**DEFAULT_PARAMS, **self.params}
        p.update(seed=self.seed, num_threads=self.num_threads)
        return p


def code_version() -> str:
    """`ctr` version plus the git commit when running from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return f"{ctr.__version__}+g{sha}"
    except (OSError, subprocess.SubprocessError):
        return ctr.__version__


def _sample(table: pa.Table, fraction: float, seed: int, salt: int) -> pa.Table:
    if fraction >= 1.0:
        return table
    rng = np.random.default_rng([seed, salt])
    return table.filter(pa.array(rng.random(table.num_rows) < fraction))


def load_days(staging: Path, days: Iterable[dt.date], fraction: float, seed: int) -> list[tuple[dt.date, pa.Table]]:
    out = []
    for day in days:
        parts = [_sample(t, fraction, seed, day.toordinal() * 1000 + i) for i, t in enumerate(read_staged(staging, day))]
        out.append((day, pa.concat_tables(parts)))
    return out


def split_validation(days: list[tuple[dt.date, pa.Table]]) -> tuple[pa.Table, pa.Table]:
    """Time-ordered split: the last day validates; a single day splits at its last tenth."""
    if len(days) >= 2:
        return pa.concat_tables([t for _, t in days[:-1]]), days[-1][1]
    t = days[0][1]
    cut = int(t.num_rows * 0.9)
    return t.slice(0, cut), t.slice(cut)


def train(staging: Path, out_dir: Path, cfg: TrainConfig, extra_metadata: dict[str, Any] | None = None) -> Path:
    """Train on staged days [cfg.start, cfg.end] and write a bundle to `out_dir`."""
    import lightgbm as lgb

    days = daterange(cfg.start, cfg.end)
    if not days:
        raise TrainingError(f"empty training range {cfg.start}..{cfg.end}")
    t0 = time.monotonic()
    loaded = load_days(staging, days, cfg.sample_fraction, cfg.seed)
    rows = sum(t.num_rows for _, t in loaded)
    if rows == 0:
        raise TrainingError(f"no rows to train on in days {days[0]}..{days[-1]} (staged under {staging})")
    train_t, valid_t = split_validation(loaded)
    transform = FeatureTransform.fit((t for _, t in loaded[:-1] if len(loaded) > 1), cfg.min_count, cfg.max_vocab) \
        if len(loaded) > 1 else FeatureTransform.fit([train_t], cfg.min_count, cfg.max_vocab)
    for note in transform.notes:
        log.warning("features: %s", note)
    x_tr = transform.transform_table(train_t)
    y_tr = train_t.column(LABEL).to_numpy().astype(np.float64)
    x_va = transform.transform_table(valid_t)
    y_va = valid_t.column(LABEL).to_numpy().astype(np.float64)
    if len(np.unique(y_tr)) < 2:
        raise TrainingError(f"training rows of {days[0]}..{days[-1]} hold a single class; cannot train a click model")
    log.info("train rows=%d valid rows=%d features=%d read_secs=%.1f", len(y_tr), len(y_va), x_tr.shape[1], time.monotonic() - t0)
    params = cfg.lgb_params()
    dtrain = lgb.Dataset(x_tr, y_tr, feature_name=FEATURE_COLUMNS, categorical_feature=CAT_INDEX, free_raw_data=True)
    dvalid = lgb.Dataset(x_va, y_va, reference=dtrain)
    evals: dict[str, Any] = {}
    t1 = time.monotonic()
    booster = lgb.train(
        params,
        dtrain,
        num_boost_round=cfg.rounds,
        valid_sets=[dvalid],
        valid_names=["valid"],
        callbacks=[
            lgb.early_stopping(cfg.early_stopping, first_metric_only=True, verbose=False),
            lgb.log_evaluation(period=25),
            lgb.record_evaluation(evals),
        ],
    )
    train_secs = time.monotonic() - t1
    best = booster.best_iteration or cfg.rounds
    log.info("trees built=%d best_iteration=%d train_secs=%.1f", booster.current_iteration(), best, train_secs)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(out_dir / "model.txt"), num_iteration=best)
    transform.save(out_dir / "features.json")
    valid_auc = evals.get("valid", {}).get("auc", [None])[best - 1] if evals else None
    metadata = {
        "data_interval": {"start": cfg.start.isoformat(), "end": cfg.end.isoformat()},
        "rows": {"train": int(len(y_tr)), "valid": int(len(y_va)), "total": int(rows)},
        "click_rate": float(np.concatenate([y_tr, y_va]).mean()),
        "vocab_sizes": {c: len(v) for c, v in transform.vocab.items()},
        "feature_notes": transform.notes,
        "params": params,
        "rounds": cfg.rounds,
        "best_iteration": int(best),
        "valid_auc": valid_auc,
        "seed": cfg.seed,
        "sample_fraction": cfg.sample_fraction,
        "code_version": code_version(),
        "engine": "lightgbm",
        **(extra_metadata or {}),
    }
    (out_dir / "metadata.json").write_text(json.dumps(metadata, indent=1, sort_keys=True) + "\n")
    finalize_bundle(out_dir, valid_t)
    log.info("bundle written to %s (total secs %.1f)", out_dir, time.monotonic() - t0)
    return out_dir


def finalize_bundle(out_dir: Path, sample: pa.Table) -> None:
    """Write probe.json (known inputs/outputs) and MLmodel once model/features/metadata exist."""
    from ctr.pyfunc import write_mlmodel

    b = Bundle.load(out_dir, check_probe=False)
    rows = [
        {k: v for k, v in r.items() if k != LABEL and v is not None}
        for r in sample.slice(0, 16).to_pylist()
    ]
    rows.append({})  # an all-missing row
    rows.append({"C1": "ffffffff", "I1": 3})  # an unseen categorical value
    write_probe(out_dir, rows, b)
    write_mlmodel(out_dir, model_uuid=bundle_digest(out_dir)[:32])
