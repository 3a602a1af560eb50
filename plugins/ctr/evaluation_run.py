"""Evaluate a candidate bundle and the champion's bundle on one staged holdout day."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np

from ctr.bundle import Bundle
from ctr.data.landing import read_staged
from ctr.evaluate import compare
from ctr.schema import LABEL


def score_day(staging: Path, day: dt.date, bundles: list[Bundle]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels and each bundle's probabilities on the same rows of `day`, read in batches."""
    ys: list[np.ndarray] = []
    ps: list[list[np.ndarray]] = [[] for _ in bundles]
    for t in read_staged(staging, day):
        ys.append(t.column(LABEL).to_numpy().astype(np.float64))
        for i, b in enumerate(bundles):
            ps[i].append(b.predict_table(t))
    y = np.concatenate(ys) if ys else np.empty(0)
    return y, [np.concatenate(p) if p else np.empty(0) for p in ps]


def evaluate_day(staging: Path, day: dt.date, model: Path, baseline: Path | None = None,
                 gate_params: dict[str, Any] | None = None) -> dict[str, Any]:
    from ctr.gate import GateConfig, decide

    bundles = [Bundle.load(model)] + ([Bundle.load(baseline)] if baseline else [])
    y, probs = score_day(staging, day, bundles)
    if len(y) == 0:
        raise ValueError(f"holdout day={day.isoformat()} has no valid rows under {staging}")
    doc = compare(y, probs[0], probs[1] if baseline else None)
    doc["day"] = day.isoformat()
    doc["candidate_version"] = bundles[0].version
    doc["baseline_version"] = bundles[1].version if baseline else None
    doc["gate"] = decide(doc, GateConfig.from_params(gate_params or {}))
    return doc
