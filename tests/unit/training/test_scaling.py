"""The LightGBM parameters the DAG's defaults scale with the training rows (ctr.training.scaling)."""

from __future__ import annotations

import datetime as dt

import pytest
from ctr.training.scaling import ROWS_PER_TREE, refit_by_rows, scale_to_rows
from ctr.training.trainer import DEFAULT_PARAMS, TrainConfig, TrainingError

FULL_CRITEO_TRAIN_ROWS = 32_743_299  # the 5 fit days of the 45.8M-row set (6 train days, the 6th validates) (benchmarks/results/scale.json)


def test_at_or_below_the_budget_nothing_changes() -> None:
    p = dict(DEFAULT_PARAMS)
    for rows in (1, 1_000_000, ROWS_PER_TREE):
        out, scaled = scale_to_rows(p, rows)
        assert out == p and scaled is None and refit_by_rows(rows)
    assert not refit_by_rows(ROWS_PER_TREE + 1) and refit_by_rows(10 ** 9, rows_per_tree=0)


def test_above_the_budget_each_tree_bags_the_budget_and_the_learning_rate_grows_at_most_twofold() -> None:
    p = {**DEFAULT_PARAMS, "learning_rate": 0.1}
    out, scaled = scale_to_rows(p, 8_000_000, 5_000_000)  # below twice the budget: bagging only
    assert out["bagging_fraction"] == 0.625 and out["bagging_freq"] == 1 and out["learning_rate"] == 0.1
    assert scaled == {"rows": 8_000_000, "rows_per_tree": 5_000_000, "bagging_fraction": 0.625}
    out, scaled = scale_to_rows(p, 20_000_000, 5_000_000)  # sqrt(20M / 10M)
    assert out["learning_rate"] == round(0.1 * 2 ** 0.5, 4) and out["bagging_fraction"] == 0.25
    out, scaled = scale_to_rows(p, FULL_CRITEO_TRAIN_ROWS, 5_000_000)
    assert out["bagging_fraction"] == round(5_000_000 / FULL_CRITEO_TRAIN_ROWS, 4) == 0.1527
    assert out["learning_rate"] == 0.181
    out, _ = scale_to_rows(p, 400_000_000, 5_000_000)
    assert out["learning_rate"] == 0.2  # capped
    assert p == {**DEFAULT_PARAMS, "learning_rate": 0.1}  # the input is not modified


@pytest.mark.parametrize("key", ["bagging_fraction", "subsample", "bagging_freq", "data_sample_strategy"])
def test_an_explicit_sampling_parameter_is_never_scaled(key: str) -> None:
    out, scaled = scale_to_rows({"learning_rate": 0.1, key: 0.5}, 40_000_000, 5_000_000, explicit={key})
    assert out == {"learning_rate": 0.2, key: 0.5}  # no bagging added beside the caller's choice
    assert scaled is not None and "bagging_fraction" not in scaled and scaled["learning_rate"] == 0.2


@pytest.mark.parametrize("key", ["learning_rate", "eta", "shrinkage_rate"])
def test_an_explicit_learning_rate_is_never_scaled(key: str) -> None:
    out, scaled = scale_to_rows({"learning_rate": 0.05}, 40_000_000, 5_000_000, explicit={key})
    assert out["learning_rate"] == 0.05 and scaled is not None and "learning_rate" not in scaled


def test_train_config_reads_rows_per_tree_from_lgb_params_and_never_scales_what_they_set() -> None:
    day = dt.date(2026, 3, 1)
    cfg = TrainConfig(day, day, params={"rows_per_tree": 1000, "learning_rate": 0.07})
    assert cfg.rows_per_tree == 1000 and "rows_per_tree" not in cfg.params and cfg.refit is None
    resolved, p, scaled = cfg.for_rows(100_000)
    assert p["learning_rate"] == 0.07 and p["bagging_fraction"] == 0.01 and p["bagging_freq"] == 1
    assert p["seed"] == 42 and resolved.refit is False and cfg.refit is None
    assert scaled == {"rows": 100_000, "rows_per_tree": 1000, "bagging_fraction": 0.01, "refit": False}
    small, p, scaled = cfg.for_rows(1000)
    assert small.refit is True and scaled is None and "bagging_fraction" not in p
    forced, _, scaled = TrainConfig(day, day, params={"rows_per_tree": 1000, "refit": True}).for_rows(100_000)
    assert forced.refit is True and "refit" not in scaled  # an explicit refit is kept
    off = TrainConfig(day, day, params={"rows_per_tree": 0})
    assert off.for_rows(10 ** 9)[1:] == (off.lgb_params(), None) and off.for_rows(10 ** 9)[0].refit is True
    with pytest.raises(TrainingError, match="rows_per_tree=-1 must be >= 0"):
        TrainConfig(day, day, params={"rows_per_tree": -1}).check()
