"""Evaluate a candidate bundle and the champion's bundle on one staged holdout day."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ctr.data.landing import read_staged
from ctr.model.bundle import Bundle
from ctr.monitoring.drift import REFERENCE_FILE, Profile, Reference, drift_summary, reference_from_staging
from ctr.schema import LABEL
from ctr.validation.gate import GateConfig, decide, verdict
from ctr.validation.metrics import compare

log = logging.getLogger(__name__)


def score_day(staging: Path, day: dt.date, bundles: list[Bundle],
              each: Callable[[pa.Table], Any] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels and each bundle's probabilities on the same rows of `day`, read in batches (`each` sees every batch)."""
    ys: list[np.ndarray] = []
    ps: list[list[np.ndarray]] = [[] for _ in bundles]
    for t in read_staged(staging, day):
        if each is not None:
            each(t)
        ys.append(t.column(LABEL).to_numpy().astype(np.float64))
        for i, b in enumerate(bundles):
            ps[i].append(b.predict_table(t))
    y = np.concatenate(ys) if ys else np.empty(0)
    return y, [np.concatenate(p) if p else np.empty(0) for p in ps]


def evaluation_document(y: np.ndarray, candidate: np.ndarray, baseline: np.ndarray | None, *, day: dt.date,
                        gate: GateConfig, candidate_version: str, baseline_version: str | None,
                        drift: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metrics document (metrics.json) of one holdout day: the comparison, the versions, the gate decision.

    The one builder: the DAG's evaluate (`evaluate_day`) and the Spark job's holdout evaluation both
    call it with the labels and scores they computed.
    """
    doc = compare(y, candidate, baseline)
    doc["day"] = day.isoformat()
    doc["candidate_version"] = candidate_version
    doc["baseline_version"] = baseline_version
    if drift is not None:
        doc["drift"] = drift
    doc["gate"] = decide(doc, gate)
    return doc


def training_days(bundle: Bundle, staging: Path) -> list[dt.date] | None:
    """The bundle's training range (metadata `data_interval`) when every day of it is staged, else None."""
    from ctr.data.landing import daterange, load_report

    iv = bundle.metadata.get("data_interval") or {}
    try:
        days = daterange(dt.date.fromisoformat(iv["start"]), dt.date.fromisoformat(iv["end"]))
    except (KeyError, TypeError, ValueError):
        return None
    return days if days and all(load_report(staging, d) is not None for d in days) else None


def drift_reference(staging: Path, candidate: Bundle, train_days: list[dt.date]) -> Reference:
    """The training range's bins and counts (the candidate's vocabulary's top values for the categoricals)."""
    return reference_from_staging(staging, train_days, top_values=candidate.transform.vocab)


def drift_section(ref: Reference, holdout: Profile, holdout_scores: np.ndarray, staging: Path, candidate: Bundle,
                  valid_day: dt.date) -> dict[str, Any]:
    """metrics.json's `drift`: PSI per feature (holdout vs training range) and of the candidate's scores
    (holdout vs its validation day, the last training day)."""
    _, (valid_scores,) = score_day(staging, valid_day, [candidate])
    return drift_from_scores(ref, holdout, holdout_scores, valid_scores, valid_day)


def drift_from_scores(ref: Reference, holdout: Profile, holdout_scores: np.ndarray, valid_scores: np.ndarray,
                      valid_day: dt.date) -> dict[str, Any]:
    """The drift section from the holdout's profile and the candidate's scores on the holdout and the
    validation day: what `drift_section` computes from staging and the Spark job from its executors' output."""
    sref = Reference(ref.int_edges, ref.cat_top, ref.counts, ref.rows).with_scores(valid_scores, f"validation day {valid_day}")
    sprof = sref.add_scores(sref.empty_profile(), holdout_scores)
    return drift_summary(ref.feature_psi(holdout), sref.score_psi(sprof), reference=ref.source, rows=holdout.rows,
                         score_reference=sref.score_source)


def evaluate_day(staging: Path, day: dt.date, model: Path, baseline: Path | None = None,
                 gate_params: dict[str, Any] | None = None, report_dir: Path | None = None,
                 title: str | None = None, train_days: list[dt.date] | None = None) -> dict[str, Any]:
    """Score `model` (and `baseline`) freshly on the rows of `day`; the metrics document with the gate decision.

    Feature drift (PSI, `drift` in the document, rule max_feature_psi) is computed against
    `train_days` (default: the candidate's training range from its metadata, when staged; without
    one the document has no `drift` and the log says why). With `report_dir`, also writes
    report.html and its PNGs there (the document's "report" key) and `drift_reference.json`
    (the training range's bins plus the candidate's holdout scores: what `ctr monitor` compares
    live traffic with).
    """
    cfg = GateConfig.from_params(gate_params or {})  # bad params fail before any scoring
    bundles = [Bundle.load(model)] + ([Bundle.load(baseline)] if baseline else [])
    days = train_days if train_days is not None else training_days(bundles[0], staging)
    ref = drift_reference(staging, bundles[0], days) if days else None
    if ref is None:
        log.warning("evaluate: no drift check: the candidate's training range is not staged under %s", staging)
    prof = ref.empty_profile() if ref is not None else None
    y, probs = score_day(staging, day, bundles, each=None if ref is None else (lambda t: ref.add_table(prof, t)))
    if len(y) == 0:
        raise ValueError(f"holdout day={day.isoformat()} has no valid rows under {staging}; stage it first")
    drift = None
    if ref is not None and prof is not None and days:
        drift = drift_section(ref, prof, probs[0], staging, bundles[0], days[-1])
        log.info("evaluate: drift vs %s: largest feature PSI %s; score PSI %s", ref.source,
                 ", ".join(f"{m['feature']} {m['psi']:.3f}" for m in drift["largest"]), drift["score_psi"])
    doc = evaluation_document(y, probs[0], probs[1] if baseline else None, day=day, gate=cfg,
                              candidate_version=bundles[0].version,
                              baseline_version=bundles[1].version if baseline else None, drift=drift)
    log.info("evaluate: day=%s rows=%d candidate_auc=%.4f baseline_auc=%s gate=%s", day, len(y), doc["candidate"]["auc"],
             f"{doc['baseline']['auc']:.4f}" if baseline else "none", verdict(doc["gate"]))
    if report_dir is not None:
        from ctr.validation.report import write_report

        doc["report"] = str(write_report(report_dir, y, probs[0], probs[1] if baseline else None, doc,
                                         title=title or f"ctr evaluation, holdout day {day.isoformat()}"))
        if ref is not None:
            ref.with_scores(probs[0], f"candidate {bundles[0].version} on holdout day {day.isoformat()}")
            path = Path(report_dir) / REFERENCE_FILE
            path.write_text(json.dumps(ref.to_json(), sort_keys=True) + "\n")
            doc["drift_reference"] = str(path)
    return doc
