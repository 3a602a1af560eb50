"""Training: reproducible model.txt, bundle contents, degenerate columns, empty ranges, the job entry."""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ctr.model.bundle import Bundle
from ctr.schema import ARROW_SCHEMA, CAT_COLUMNS, INT_COLUMNS
from ctr.training.trainer import TrainConfig, TrainingError, train

from tests.conftest import REPO

DAY0 = dt.date(2026, 3, 1)
ROWS = 1500


def _stage(staging: Path, day: dt.date, table: pa.Table) -> None:
    d = staging / f"day={day.isoformat()}"
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.cast(ARROW_SCHEMA), d / "part-00000.parquet")


@pytest.fixture(scope="module")
def days_tables(tmp_path_factory: pytest.TempPathFactory) -> list[pa.Table]:
    from ctr.data.generate import GeneratorConfig, generate
    from ctr.data.reader import read_table

    land = tmp_path_factory.mktemp("train-landing")
    generate(land, 3, ROWS, DAY0 + dt.timedelta(days=2), GeneratorConfig(seed=11, cardinality_scale=0.001))
    return [read_table(str(land / f"day={(DAY0 + dt.timedelta(days=i)).isoformat()}" / "part-00000.tsv.gz"))[0]
            for i in range(3)]


@pytest.fixture(scope="module")
def staging(days_tables: list[pa.Table], tmp_path_factory: pytest.TempPathFactory) -> Path:
    s = tmp_path_factory.mktemp("train-staging")
    for i, t in enumerate(days_tables):
        _stage(s, DAY0 + dt.timedelta(days=i), t)
    return s


def _cfg(**kw) -> TrainConfig:
    base = {"start": DAY0, "end": DAY0 + dt.timedelta(days=2), "rounds": 25, "early_stopping": 10}
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("dataset_from", ["in-memory matrices", "lightgbm.Sequence"])
def test_two_trainings_give_identical_model_and_bundle(staging: Path, tmp_path: Path, monkeypatch, caplog,
                                                       dataset_from: str) -> None:
    if dataset_from == "lightgbm.Sequence":  # the large-range path (issue 10), forced on small data
        monkeypatch.setenv("CTR_TRAIN_IN_MEMORY_MAX_BYTES", "0")
    caplog.set_level(logging.INFO, logger="ctr.training.trainer")
    a = train(staging, tmp_path / "a", _cfg())
    assert ("lightgbm.Sequence" if dataset_from == "lightgbm.Sequence" else "in memory") in caplog.text
    b = train(staging, tmp_path / "b", _cfg())
    assert (a / "model.txt").read_bytes() == (b / "model.txt").read_bytes()
    for name in ("features.json", "probe.json", "MLmodel"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = train(staging, tmp_path / "c", _cfg(seed=7))
    assert (c / "model.txt").read_bytes() != (a / "model.txt").read_bytes()  # the seed does matter


def test_bundle_metadata_and_validation_split(staging: Path, tmp_path: Path) -> None:
    out = train(staging, tmp_path / "m", _cfg(params={"num_leaves": 7}), extra_metadata={"dag_run": "r1"})
    md = json.loads((out / "metadata.json").read_text())
    assert md["data_interval"] == {"start": "2026-03-01", "end": "2026-03-03"}
    assert md["validation"] == "2026-03-03"
    assert md["rows"] == {"train": 2 * ROWS, "valid": ROWS, "total": 3 * ROWS}
    assert md["params"]["num_leaves"] == 7 and md["params"]["deterministic"] is True
    assert md["seed"] == 42 and md["dag_run"] == "r1" and md["code_version"]
    assert 1 <= md["best_iteration"] <= md["trees_built"] <= 25
    assert set(md["vocab_sizes"]) == set(CAT_COLUMNS)
    b = Bundle.load(out)  # checks probe.json
    # refit (the default) on training + validation rows: best_iteration scaled by the rows (3 days / 2)
    assert md["refit"]["rows"] == 3 * ROWS and md["refit"]["trees"] == round(md["best_iteration"] * 3 / 2)
    assert b.booster.current_iteration() == md["refit"]["trees"]
    plain = Bundle.load(train(staging, tmp_path / "n", _cfg(params={"num_leaves": 7, "refit": False})))
    assert plain.booster.current_iteration() == plain.metadata["best_iteration"] and "refit" not in plain.metadata
    assert "import pickle" not in (out / "MLmodel").read_text() and not list(out.glob("*.pkl"))


def test_one_day_range_validates_on_its_last_tenth(staging: Path, tmp_path: Path) -> None:
    out = train(staging, tmp_path / "one", _cfg(end=DAY0, rounds=5))
    md = json.loads((out / "metadata.json").read_text())
    assert md["rows"] == {"train": 1350, "valid": 150, "total": ROWS}
    assert md["validation"] == "2026-03-01 (last tenth)"


def test_all_missing_and_all_unique_columns_train_and_are_reported(
        days_tables: list[pa.Table], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = tmp_path / "staging"
    for i, t in enumerate(days_tables):
        n = t.num_rows
        t = t.set_column(t.schema.get_field_index("C7"), "C7", pa.nulls(n, pa.string()))
        t = t.set_column(t.schema.get_field_index("I4"), "I4", pa.nulls(n, pa.int64()))
        t = t.set_column(t.schema.get_field_index("C12"), "C12", pa.array([f"{i:02x}{j:06x}" for j in range(n)]))
        _stage(s, DAY0 + dt.timedelta(days=i), t)
    with caplog.at_level(logging.WARNING, logger="ctr.training.trainer"):
        out = train(s, tmp_path / "deg", _cfg(rounds=5))
    md = json.loads((out / "metadata.json").read_text())
    notes = md["feature_notes"]
    assert any(n.startswith("C7: entirely missing") for n in notes)
    assert any(n.startswith("C12: every value is unique (3000)") for n in notes)
    assert any(n.startswith("I4: entirely missing") for n in notes)
    assert md["vocab_sizes"]["C7"] == 0 and md["vocab_sizes"]["C12"] == 0
    assert "C12: every value is unique" in caplog.text and "C7: entirely missing" in caplog.text
    Bundle.load(out)


def test_empty_and_bad_ranges_fail_naming_the_days(staging: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"2026-03-03\.\.2026-03-01 holds no days"):
        train(staging, tmp_path / "x", _cfg(start=DAY0 + dt.timedelta(days=2), end=DAY0))
    empty = tmp_path / "empty-staging"
    for i in range(2):
        _stage(empty, DAY0 + dt.timedelta(days=i), ARROW_SCHEMA.empty_table())
    with pytest.raises(TrainingError, match=r"days 2026-03-01\.\.2026-03-02 .*empty days: 2026-03-01, 2026-03-02"):
        train(empty, tmp_path / "y", _cfg(end=DAY0 + dt.timedelta(days=1)))
    with pytest.raises(Exception, match=r"day=2026-02-27 is not staged"):
        train(staging, tmp_path / "z", _cfg(start=DAY0 - dt.timedelta(days=2)))
    with pytest.raises(TrainingError, match="must not set 'seed'"):
        train(staging, tmp_path / "w", _cfg(params={"seed": 3}))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_job_entry_passes_params_and_fraction(staging: Path, tmp_path: Path) -> None:
    out = tmp_path / "job"
    cmd = [sys.executable, "-m", "ctr.training.job", "--staging", str(staging), "--from", "2026-03-01",
           "--to", "2026-03-03", "--out", str(out), "--seed", "5", "--sample-fraction", "0.5",
           "--params", json.dumps({"num_leaves": 5}), "--metadata", json.dumps({"run_id": "abc"}), "--rounds", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    md = json.loads((out / "metadata.json").read_text())
    assert md["params"]["num_leaves"] == 5 and md["seed"] == 5 and md["run_id"] == "abc"
    assert md["sample_fraction"] == 0.5 and 0.4 * 3 * ROWS < md["rows"]["total"] < 0.6 * 3 * ROWS
    shim = [sys.executable, str(REPO / "jobs" / "train.py")]  # the kept script entry is the same command line
    bad = subprocess.run(shim + ["--staging", str(staging), "--from", "2026-03-05", "--to", "2026-03-04",
                                    "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "2026-03-05..2026-03-04" in bad.stderr


def test_training_matrix_matches_transform(staging: Path, tmp_path: Path) -> None:
    """The chunked training matrix is the serving transform: the booster's own predictions on the
    validation rows (via the bundle) agree with Booster.predict on transform_table."""
    out = train(staging, tmp_path / "p", _cfg(rounds=5))
    b = Bundle.load(out)
    t = pq.read_table(staging / "day=2026-03-03" / "part-00000.parquet")
    x = b.transform.transform_table(t)
    assert x.shape == (ROWS, len(INT_COLUMNS) + len(CAT_COLUMNS))
    np.testing.assert_array_equal(b.booster.predict(b.transform.derive(x)), b.predict_table(t))


@pytest.mark.parametrize("days", [1, 2, 3])
def test_out_of_fold_folds_per_day_or_in_blocks(staging: Path, days: int) -> None:
    """Three or more days: a fold per fit day. One fit day (a one- or two-day range): 4 contiguous blocks,
    so no training row's statistic is empty (with a single fold, "every other fold" would be nothing)."""
    from ctr.training.trainer import plan_split

    split = plan_split(staging, _cfg(end=DAY0 + dt.timedelta(days=days - 1)))
    split.train_rows = sum(t.num_rows for role, t in split.chunks() if role == "train")
    folds = np.concatenate([f for role, f, _ in split.folded_chunks() if role == "train"])
    assert len(folds) == split.train_rows
    if days == 3:
        np.testing.assert_array_equal(folds, np.repeat([0, 1], ROWS))
    else:
        assert split.n_folds == 4 and list(np.unique(folds)) == [0, 1, 2, 3] and np.all(np.diff(folds) >= 0)


def test_a_range_above_rows_per_tree_trains_bagged_deterministically_and_records_it(staging: Path,
                                                                                   tmp_path: Path) -> None:
    cfg = _cfg(params={"rows_per_tree": 600})  # 3,000 training rows: bags of 600, learning rate x sqrt(2.5), no refit
    a = train(staging, tmp_path / "a", cfg)
    md = json.loads((a / "metadata.json").read_text())
    assert md["scaled"] == {"rows": 2 * ROWS, "rows_per_tree": 600, "bagging_fraction": 0.2,
                            "learning_rate": round(0.1 * 2.5 ** 0.5, 4), "refit": False}
    assert "refit" not in md and Bundle.load(a).booster.current_iteration() == md["best_iteration"]
    assert md["params"]["bagging_fraction"] == 0.2 and md["params"]["bagging_freq"] == 1
    assert md["params"]["learning_rate"] == md["scaled"]["learning_rate"]
    assert (train(staging, tmp_path / "b", cfg) / "model.txt").read_bytes() == (a / "model.txt").read_bytes()
    unscaled = train(staging, tmp_path / "c", _cfg())
    assert "scaled" not in json.loads((unscaled / "metadata.json").read_text())
    assert (unscaled / "model.txt").read_bytes() != (a / "model.txt").read_bytes()
