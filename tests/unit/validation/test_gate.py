"""Gate decisions, table-driven, plus two cases decided from real paired scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ctr.validation.gate import GateConfig, decide, verdict
from ctr.validation.metrics import compare

CFG = GateConfig()  # the documented defaults: min_auc 0.70, max_auc_drop 0.005, max_logloss_rise 0.005, max_ece 0.05


def m(auc: float, logloss: float = 0.45, ece: float = 0.01) -> dict[str, float]:
    return {"auc": auc, "logloss": logloss, "ece": ece, "mean_pred": 0.25, "ctr": 0.25}


def doc(cand: dict, base: dict | None = None, diff: tuple[float, float, float] | None = None) -> dict:
    d = None if diff is None else {"estimate": diff[0], "ci_low": diff[1], "ci_high": diff[2], "method": "delong"}
    return {"rows": 10_000, "candidate": cand, "baseline": base, "auc_diff": d}


CASES = [
    # name, metrics document, config, passed, forced, failed rules
    ("first run, good model", doc(m(0.78)), CFG, True, False, []),
    ("first run, below the floor", doc(m(0.65)), CFG, False, False, ["min_auc"]),
    ("tie", doc(m(0.78), m(0.78), (0.0, -0.002, 0.002)), CFG, True, False, []),
    ("significant regression", doc(m(0.76, 0.47), m(0.78, 0.45), (-0.02, -0.026, -0.014)), CFG, False, False,
     ["max_auc_drop", "max_logloss_rise"]),
    ("insignificant dip", doc(m(0.779, 0.4505), m(0.780, 0.450), (-0.001, -0.004, 0.002)), CFG, True, False, []),
    ("dip whose CI reaches past the allowed drop", doc(m(0.779), m(0.780), (-0.001, -0.0061, 0.004)), CFG, False, False,
     ["max_auc_drop"]),
    ("better model", doc(m(0.80, 0.44), m(0.78, 0.45), (0.02, 0.015, 0.025)), CFG, True, False, []),
    ("better AUC, logloss much worse", doc(m(0.80, 0.47), m(0.78, 0.45), (0.02, 0.015, 0.025)), CFG, False, False,
     ["max_logloss_rise"]),
    ("calibration failure", doc(m(0.80, 0.44, ece=0.08), m(0.78, 0.45), (0.02, 0.015, 0.025)), CFG, False, False,
     ["max_ece"]),
    ("calibration failure on the first run", doc(m(0.80, ece=0.051)), CFG, False, False, ["max_ece"]),
    ("forced deploy of a regression", doc(m(0.60, 0.6, 0.2), m(0.78), (-0.18, -0.19, -0.17)),
     GateConfig(force_deploy=True), True, True, ["min_auc", "max_ece", "max_auc_drop", "max_logloss_rise"]),
    ("forced deploy of a good model is not 'forced'", doc(m(0.80, 0.44), m(0.78), (0.02, 0.01, 0.03)),
     GateConfig(force_deploy=True), True, False, []),
    ("NaN AUC (one class only) never passes", doc(m(float("nan"))), CFG, False, False, ["min_auc"]),
    ("stricter floor from params", doc(m(0.78)), GateConfig.from_params({"min_auc": 0.8}), False, False, ["min_auc"]),
]


@pytest.mark.parametrize(("name", "metrics", "cfg", "passed", "forced", "failed"), CASES, ids=[c[0] for c in CASES])
def test_gate_table(name: str, metrics: dict, cfg: GateConfig, passed: bool, forced: bool, failed: list[str]) -> None:
    d = decide(metrics, cfg)
    assert (d["passed"], d["forced"]) == (passed, forced)
    assert [c["rule"] for c in d["checks"] if not c["ok"]] == failed
    # every failed rule is stated with its numbers
    for rule in failed:
        line = next(r for r in d["reasons"] if r.startswith(rule + ":"))
        assert any(ch.isdigit() for ch in line)
    if forced:
        assert "force_deploy" in d["reasons"][-1] and verdict(d) == "PASSED (forced)"
    if not failed:
        assert d["reasons"][-1].startswith("all rules passed")
    assert verdict(d) in ({"PASSED", "PASSED (forced)"} if passed else {"REJECTED"})
    with_champion = metrics["baseline"] is not None
    assert {c["rule"] for c in d["checks"]} == ({"min_auc", "max_ece"} | ({"max_auc_drop", "max_logloss_rise"} if with_champion else set()))


def test_rejection_reasons_quote_the_numbers() -> None:
    d = decide(doc(m(0.76, 0.47), m(0.78, 0.45), (-0.02, -0.026, -0.014)), CFG)
    assert d["reasons"][0] == ("max_auc_drop: AUC diff -0.0200 (95% CI -0.0260..-0.0140, delong); "
                               "lower bound must be >= -0.0050 (champion AUC 0.7800)")
    assert d["reasons"][1] == "max_logloss_rise: logloss 0.4700 vs champion 0.4500 (rise +0.0200, limit +0.0050)"


def _scores(seed: int, n: int, noise: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, a champion's scores and a candidate's scores sharing the signal (calibrated logits)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.2, 1.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    champ = 1 / (1 + np.exp(-z))
    cand = 1 / (1 + np.exp(-(z + rng.normal(0, noise, n))))
    return y, cand, champ


def test_real_scores_small_noise_is_an_insignificant_dip_and_passes() -> None:
    y, cand, champ = _scores(1, 20_000, 0.08)
    d = decide(compare(y, cand, champ), CFG)
    assert compare(y, cand, champ)["auc_diff"]["ci_high"] > 0  # the dip is not significant
    assert d["passed"], d["reasons"]


def test_real_scores_large_noise_is_a_significant_regression_and_fails() -> None:
    y, cand, champ = _scores(1, 20_000, 0.3)
    metrics = compare(y, cand, champ)
    d = decide(metrics, CFG)
    assert metrics["auc_diff"]["ci_high"] < 0
    assert not d["passed"] and "max_auc_drop" in d["reasons"][0]


def test_params_are_validated_and_coerced() -> None:
    cfg = GateConfig.from_params({"min_auc": "0.72", "force_deploy": "true", "max_ece": None, "train_days": 7})
    assert cfg == GateConfig(min_auc=0.72, force_deploy=True)
    with pytest.raises(ValueError, match="max_auc_drop"):
        GateConfig.from_params({"max_auc_drop": "lots"})
    with pytest.raises(ValueError, match=">= 0"):
        GateConfig.from_params({"max_ece": -0.1})


def test_dag_params_default_to_the_gate_defaults() -> None:
    """The DAG's gate params (read from the file, without importing Airflow) match GateConfig's defaults."""
    import ast
    from dataclasses import asdict
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parents[3] / "dags" / "ctr_retrain.py").read_text())
    params = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values, strict=True):
                if isinstance(k, ast.Constant) and isinstance(v, ast.Call) and getattr(v.func, "id", "") == "Param":
                    params[k.value] = ast.literal_eval(v.args[0])
    assert {k: params[k] for k in asdict(GateConfig())} == asdict(GateConfig())


def test_two_percent_slice_is_rejected_against_a_champion_trained_on_everything(staged, trained_bundle, tmp_path) -> None:
    """Real bundles on a real staged holdout day: the 2% model loses, every failed rule is named, a report is written."""
    import datetime as dt

    from ctr.training.trainer import TrainConfig, train
    from ctr.validation.holdout import evaluate_day

    from tests.conftest import END_DAY

    slice_bundle = train(staged, tmp_path / "slice", TrainConfig(start=END_DAY - dt.timedelta(days=7),
                                                                  end=END_DAY - dt.timedelta(days=1), rounds=60,
                                                                  sample_fraction=0.02))
    doc = evaluate_day(staged, END_DAY, slice_bundle, trained_bundle, gate_params={"min_auc": 0.5},
                       report_dir=tmp_path / "report")
    assert doc["rows"] > 5000 and doc["baseline"] is not None
    assert doc["auc_diff"]["ci_high"] < 0  # significantly worse, not noise
    assert not doc["gate"]["passed"] and verdict(doc["gate"]) == "REJECTED"
    failed = [c["rule"] for c in doc["gate"]["checks"] if not c["ok"]]
    assert "max_auc_drop" in failed
    assert [r.split(":")[0] for r in doc["gate"]["reasons"]] == failed
    assert Path(doc["report"]).is_file()
    # the champion scored against itself is a tie and passes: the CI collapses to zero
    same = evaluate_day(staged, END_DAY, trained_bundle, trained_bundle, gate_params={"min_auc": 0.5})
    assert same["auc_diff"]["estimate"] == 0.0 and same["gate"]["checks"][2]["ok"]
