"""Evaluate a candidate and (optionally) the champion on the SAME holdout rows.

Metrics per model: AUC, logloss, expected calibration error (20 equal-mass bins), mean
predicted probability and the observed click rate. With a baseline, the AUC difference comes
with a 95% confidence interval from DeLong's paired test (fast O(n log n) form, Sun & Xu 2014);
`bootstrap_diff` is the paired bootstrap (fixed seed) kept as a cross-check and as an option.
`roc_points` and `reliability` give the curves the report draws, from the same bins as the ECE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

EPS = 1e-15
ECE_BINS = 20
Z95 = 1.959963984540054


def auc(y: np.ndarray, p: np.ndarray) -> float:
    y = np.asarray(y, dtype=bool)
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        return math.nan
    r = rankdata(p)
    return float((r[y].sum() - m * (m + 1) / 2.0) / (m * n))


def logloss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def ece(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over equal-mass bins of the predicted probability."""
    if len(p) == 0:
        return math.nan
    order = np.argsort(p, kind="stable")
    total = 0.0
    for idx in np.array_split(order, min(bins, len(p))):
        total += len(idx) * abs(float(p[idx].mean()) - float(y[idx].mean()))
    return total / len(p)


def reliability(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Equal-mass bins of the predicted probability (the ECE's bins): mean prediction, click rate, rows."""
    order = np.argsort(p, kind="stable")
    groups = [idx for idx in np.array_split(order, min(bins, len(p))) if len(idx)] if len(p) else []
    return {"mean_pred": [float(p[g].mean()) for g in groups], "observed": [float(y[g].mean()) for g in groups],
            "rows": [int(len(g)) for g in groups]}


def roc_points(y: np.ndarray, p: np.ndarray, max_points: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, thinned to max_points."""
    y = np.asarray(y, dtype=bool)
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1] if len(ps) else np.empty(0, dtype=int)
    tp = np.cumsum(ys)[last]
    fp = (last + 1) - tp
    tpr = np.r_[0.0, tp / max(int(y.sum()), 1)]
    fpr = np.r_[0.0, fp / max(int((~y).sum()), 1)]
    if len(fpr) > max_points:
        keep = np.unique(np.r_[np.linspace(0, len(fpr) - 1, max_points).astype(int), len(fpr) - 1])
        fpr, tpr = fpr[keep], tpr[keep]
    return fpr, tpr


def model_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {
        "auc": auc(y, p),
        "logloss": logloss(y, p),
        "ece": ece(y, p),
        "mean_pred": float(np.mean(p)) if len(p) else math.nan,
        "ctr": float(np.mean(y)) if len(y) else math.nan,
    }


@dataclass(frozen=True)
class AucDiff:
    estimate: float
    ci_low: float
    ci_high: float
    method: str = "delong"

    def to_json(self) -> dict[str, Any]:
        return {"estimate": self.estimate, "ci_low": self.ci_low, "ci_high": self.ci_high, "method": self.method}


def delong_diff(y: np.ndarray, p_candidate: np.ndarray, p_baseline: np.ndarray) -> AucDiff:
    """AUC(candidate) - AUC(baseline) with a 95% DeLong confidence interval (paired)."""
    y = np.asarray(y, dtype=bool)
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        return AucDiff(math.nan, math.nan, math.nan)
    aucs, v01, v10 = [], [], []
    for p in (p_candidate, p_baseline):
        pos, neg = p[y], p[~y]
        tx, ty = rankdata(pos), rankdata(neg)
        tz = rankdata(np.concatenate([pos, neg]))
        aucs.append((tz[:m].sum() - m * (m + 1) / 2.0) / (m * n))
        v01.append((tz[:m] - tx) / n)
        v10.append(1.0 - (tz[m:] - ty) / m)
    sx = np.cov(np.vstack(v01))
    sy = np.cov(np.vstack(v10))
    s = sx / m + sy / n
    var = float(s[0, 0] + s[1, 1] - 2 * s[0, 1])
    est = float(aucs[0] - aucs[1])
    half = Z95 * math.sqrt(max(var, 0.0))
    return AucDiff(est, est - half, est + half)


def bootstrap_diff(y: np.ndarray, p_candidate: np.ndarray, p_baseline: np.ndarray, n_boot: int = 1000,
                   seed: int = 0) -> AucDiff:
    """AUC(candidate) - AUC(baseline) with a 95% percentile CI from a paired bootstrap (same resampled rows)."""
    y = np.asarray(y, dtype=bool)
    rng = np.random.default_rng(seed)
    est = auc(y, p_candidate) - auc(y, p_baseline)
    diffs = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        diffs[b] = auc(y[idx], p_candidate[idx]) - auc(y[idx], p_baseline[idx])
    diffs = diffs[~np.isnan(diffs)]
    if len(diffs) == 0:
        return AucDiff(math.nan, math.nan, math.nan, "bootstrap")
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return AucDiff(float(est), float(lo), float(hi), f"paired bootstrap n={n_boot} seed={seed}")


METHODS = ("delong", "bootstrap")


def compare(y: np.ndarray, p_candidate: np.ndarray, p_baseline: np.ndarray | None,
            method: str = "delong") -> dict[str, Any]:
    """The metrics document (without the gate decision, which gate.py adds)."""
    if method not in METHODS:
        raise ValueError(f"AUC difference method {method!r} is unknown; use one of {', '.join(METHODS)}")
    y = np.asarray(y, dtype=np.float64)
    out: dict[str, Any] = {
        "rows": int(len(y)),
        "candidate": model_metrics(y, p_candidate),
        "baseline": None,
        "auc_diff": None,
    }
    if p_baseline is not None:
        out["baseline"] = model_metrics(y, p_baseline)
        diff = delong_diff(y, p_candidate, p_baseline) if method == "delong" else bootstrap_diff(y, p_candidate, p_baseline)
        out["auc_diff"] = diff.to_json()
    return out
