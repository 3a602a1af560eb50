"""Metrics and the paired AUC-difference CI, checked against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ctr.validation.metrics import (
    Z95,
    auc,
    bootstrap_diff,
    compare,
    delong_diff,
    ece,
    logloss,
    reliability,
    roc_points,
)
from sklearn.metrics import log_loss, roc_auc_score

# A small table with ties inside and across classes (scores for two models on the same rows).
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0], dtype=float)
A = np.array([0.9, 0.8, 0.6, 0.4, 0.7, 0.3, 0.2, 0.4, 0.1, 0.5, 0.6, 0.6])
B = np.array([0.7, 0.9, 0.3, 0.5, 0.8, 0.2, 0.4, 0.1, 0.3, 0.6, 0.5, 0.2])


def _psi(x: float, y: float) -> float:
    return 1.0 if x > y else 0.5 if x == y else 0.0


def delong_direct(y: np.ndarray, pa: np.ndarray, pb: np.ndarray) -> tuple[float, float]:
    """DeLong et al. (1988) straight from the definition: O(m*n) kernel, structural components."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    m, n = len(pos), len(neg)
    v10 = np.zeros((2, m))
    v01 = np.zeros((2, n))
    aucs = []
    for k, p in enumerate((pa, pb)):
        kernel = np.array([[_psi(p[i], p[j]) for j in neg] for i in pos])
        aucs.append(kernel.mean())
        v10[k] = kernel.mean(axis=1)
        v01[k] = kernel.mean(axis=0)
    s10 = np.array([[np.sum((v10[r] - aucs[r]) * (v10[c] - aucs[c])) / (m - 1) for c in range(2)] for r in range(2)])
    s01 = np.array([[np.sum((v01[r] - aucs[r]) * (v01[c] - aucs[c])) / (n - 1) for c in range(2)] for r in range(2)])
    s = s10 / m + s01 / n
    return aucs[0] - aucs[1], s[0, 0] + s[1, 1] - 2 * s[0, 1]


def test_auc_and_logloss_match_sklearn() -> None:
    assert auc(Y, A) == pytest.approx(roc_auc_score(Y, A), abs=1e-12)
    assert auc(Y, B) == pytest.approx(roc_auc_score(Y, B), abs=1e-12)
    assert logloss(Y, A) == pytest.approx(log_loss(Y, A), abs=1e-12)


def test_delong_matches_direct_computation_on_small_table() -> None:
    est, var = delong_direct(Y, A, B)
    d = delong_diff(Y, A, B)
    assert d.estimate == pytest.approx(est, abs=1e-12)
    half = Z95 * math.sqrt(var)
    assert d.ci_low == pytest.approx(est - half, abs=1e-12)
    assert d.ci_high == pytest.approx(est + half, abs=1e-12)
    assert d.method == "delong"


def test_delong_matches_direct_computation_on_random_scores() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(300) < 0.3).astype(float)
    pa = np.round(rng.random(300) * 0.5 + 0.4 * y, 2)  # rounding makes ties
    pb = np.round(pa + rng.normal(0, 0.15, 300), 2)
    est, var = delong_direct(y, pa, pb)
    d = delong_diff(y, pa, pb)
    assert d.estimate == pytest.approx(est, abs=1e-12)
    assert (d.ci_high - d.ci_low) / 2 == pytest.approx(Z95 * math.sqrt(var), rel=1e-9)


def test_identical_models_give_a_zero_width_interval() -> None:
    d = delong_diff(Y, A, A.copy())
    assert (d.estimate, d.ci_low, d.ci_high) == (0.0, 0.0, 0.0)


def test_bootstrap_agrees_with_delong_and_is_seeded() -> None:
    rng = np.random.default_rng(11)
    y = (rng.random(3000) < 0.25).astype(float)
    signal = rng.normal(0, 1, 3000) + 1.2 * y
    pa = 1 / (1 + np.exp(-(signal + rng.normal(0, 0.5, 3000))))
    pb = 1 / (1 + np.exp(-(signal + rng.normal(0, 1.0, 3000))))
    dl = delong_diff(y, pa, pb)
    bs = bootstrap_diff(y, pa, pb, n_boot=400, seed=5)
    assert bs.estimate == pytest.approx(dl.estimate, abs=1e-12)
    assert bs.ci_low == pytest.approx(dl.ci_low, abs=0.01)
    assert bs.ci_high == pytest.approx(dl.ci_high, abs=0.01)
    assert bootstrap_diff(y, pa, pb, n_boot=400, seed=5) == bs
    assert dl.ci_low > 0  # the less noisy model is significantly better


def test_ece_of_a_hand_made_case() -> None:
    y = np.array([0, 0, 1, 1], dtype=float)
    p = np.array([0.1, 0.3, 0.6, 0.8])
    # two equal-mass bins: |0.2 - 0| and |0.7 - 1| -> (2*0.2 + 2*0.3) / 4
    assert ece(y, p, bins=2) == pytest.approx(0.25)
    rel = reliability(y, p, bins=2)
    assert rel == {"mean_pred": pytest.approx([0.2, 0.7]), "observed": [0.0, 1.0], "rows": [2, 2]}


def test_perfectly_calibrated_scores_have_small_ece() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.5, 200_000)
    y = (rng.random(len(p)) < p).astype(float)
    assert ece(y, p) < 0.005
    assert ece(y, np.clip(p * 1.5, 0, 1)) > 0.05


def test_roc_points_integrate_to_the_auc() -> None:
    fpr, tpr = roc_points(Y, A)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc(Y, A), abs=1e-12)


def test_compare_document_shape() -> None:
    doc = compare(Y, A, B)
    assert doc["rows"] == 12
    assert set(doc["candidate"]) == {"auc", "logloss", "ece", "mean_pred", "ctr"}
    assert set(doc["auc_diff"]) == {"estimate", "ci_low", "ci_high", "method"}
    first = compare(Y, A, None)
    assert first["baseline"] is None and first["auc_diff"] is None
    assert compare(Y, A, B, method="bootstrap")["auc_diff"]["method"].startswith("paired bootstrap")
    with pytest.raises(ValueError, match="unknown"):
        compare(Y, A, B, method="magic")
