"""Evaluate a candidate bundle and the champion's bundle on one staged holdout day."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ctr.data.landing import read_staged
from ctr.model.bundle import Bundle
from ctr.schema import LABEL
from ctr.validation.gate import GateConfig, decide, verdict
from ctr.validation.metrics import compare

log = logging.getLogger(__name__)


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


def evaluation_document(y: np.ndarray, candidate: np.ndarray, baseline: np.ndarray | None, *, day: dt.date,
                        gate: GateConfig, candidate_version: str, baseline_version: str | None) -> dict[str, Any]:
    """The metrics document (metrics.json) of one holdout day: the comparison, the versions, the gate decision.

    The one builder: the DAG's evaluate (`evaluate_day`) and the Spark job's holdout evaluation both
    call it with the labels and scores they computed.
    """
    doc = compare(y, candidate, baseline)
    doc["day"] = day.isoformat()
    doc["candidate_version"] = candidate_version
    doc["baseline_version"] = baseline_version
    doc["gate"] = decide(doc, gate)
    return doc


def evaluate_day(staging: Path, day: dt.date, model: Path, baseline: Path | None = None,
                 gate_params: dict[str, Any] | None = None, report_dir: Path | None = None,
                 title: str | None = None) -> dict[str, Any]:
    """Score `model` (and `baseline`) freshly on the rows of `day`; the metrics document with the gate decision.

    With `report_dir`, also writes report.html and its PNGs there (the document's "report" key).
    """
    cfg = GateConfig.from_params(gate_params or {})  # bad params fail before any scoring
    bundles = [Bundle.load(model)] + ([Bundle.load(baseline)] if baseline else [])
    y, probs = score_day(staging, day, bundles)
    if len(y) == 0:
        raise ValueError(f"holdout day={day.isoformat()} has no valid rows under {staging}; stage it first")
    doc = evaluation_document(y, probs[0], probs[1] if baseline else None, day=day, gate=cfg,
                              candidate_version=bundles[0].version,
                              baseline_version=bundles[1].version if baseline else None)
    log.info("evaluate: day=%s rows=%d candidate_auc=%.4f baseline_auc=%s gate=%s", day, len(y), doc["candidate"]["auc"],
             f"{doc['baseline']['auc']:.4f}" if baseline else "none", verdict(doc["gate"]))
    if report_dir is not None:
        from ctr.validation.report import write_report

        doc["report"] = str(write_report(report_dir, y, probs[0], probs[1] if baseline else None, doc,
                                         title=title or f"ctr evaluation, holdout day {day.isoformat()}"))
    return doc
