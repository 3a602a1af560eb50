"""Feature drift (PSI): the numbers, and the gate rejecting a drifted holdout day naming exactly the drifted features."""

from __future__ import annotations

import datetime as dt
import gzip
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from ctr.data.landing import daterange, read_staged, stage_day
from ctr.data.tsv import to_tsv_bytes
from ctr.monitoring.drift import PSI_FLOOR, build_reference, int_bins, psi_counts
from ctr.schema import ALL_COLUMNS
from ctr.validation.gate import GateConfig, decide
from ctr.validation.holdout import evaluate_day

from tests.conftest import END_DAY

SHIFTED, REPLACED = "I5", "C6"


def test_psi_by_hand() -> None:
    assert psi_counts([10, 10], [10, 10]) == 0.0
    want = (0.2 - 0.5) * math.log(0.2 / 0.5) + (0.8 - 0.5) * math.log(0.8 / 0.5)
    assert psi_counts([50, 50], [20, 80]) == pytest.approx(want, rel=1e-12)
    # an empty bin is floored, not infinite
    assert psi_counts([100, 0], [50, 50]) == pytest.approx((0.5 - 1) * math.log(0.5) + (0.5 - PSI_FLOOR) * math.log(0.5 / PSI_FLOOR))
    assert math.isnan(psi_counts([0, 0], [1, 2]))
    with pytest.raises(ValueError, match="same bins"):
        psi_counts([1, 2], [1, 2, 3])


def test_bins_missing_and_rare() -> None:
    edges = np.array([0.0, 3.0])
    assert int_bins(np.array([-1.0, 0.0, 1.0, 3.0, 4.0, np.nan]), edges).tolist() == [0, 0, 1, 1, 2, 3]
    t = pa.table({**{c: pa.array([1, 2, None, 4], pa.int64()) for c in ALL_COLUMNS if c.startswith("I")},
                  **{c: pa.array(["a", "a", "b", None]) for c in ALL_COLUMNS if c.startswith("C")}})
    ref = build_reference([t], {c: ["a"] for c in ALL_COLUMNS if c.startswith("C")})
    assert ref.counts["C1"] == [2, 1, 1]  # "a", rare ("b"), missing
    assert sum(ref.counts["I1"]) == 4 and ref.counts["I1"][-1] == 1  # the missing bin
    assert ref.feature_psi(ref.profile([t]))["C1"] == 0.0


def _unseen(v: str, vocab: set[str]) -> str:
    """A valid 8-hex value (so the row is not quarantined) that the vocabulary does not hold."""
    x = int(v, 16)
    while True:
        x = (x + 0x9E3779B9) % 2**32
        if f"{x:08x}" not in vocab:
            return f"{x:08x}"


def _drifted(table: pa.Table, top: list[str], vocab: set[str]) -> pa.Table:
    """I5 shifted (x20 + 1000), C6's top values replaced by valid values never seen in training."""
    i5 = pc.add(pc.multiply(table.column(SHIFTED), 20), 1000)
    c6 = table.column(REPLACED).to_pylist()
    top_set = set(top)
    c6 = pa.array([_unseen(v, vocab) if v in top_set else v for v in c6], pa.string())
    t = table.set_column(table.schema.get_field_index(SHIFTED), SHIFTED, i5)
    return t.set_column(t.schema.get_field_index(REPLACED), REPLACED, c6)


@pytest.fixture(scope="module")
def drifted_staging(tiny_landing: Path, staged: Path, trained_bundle: Path, tmp_path_factory) -> Path:
    """The tiny landing zone's training days with a drifted holdout day, staged."""
    from ctr.model.bundle import Bundle

    root = tmp_path_factory.mktemp("drifted-landing")
    days = daterange(END_DAY - dt.timedelta(days=7), END_DAY - dt.timedelta(days=1))
    for d in days:
        (root / f"day={d.isoformat()}").symlink_to(tiny_landing / f"day={d.isoformat()}")
    vocab = Bundle.load(trained_bundle).transform.vocab[REPLACED]
    top = vocab[:20]
    holdout = pa.concat_tables(read_staged(staged, END_DAY)).select(ALL_COLUMNS)
    out = root / f"day={END_DAY.isoformat()}"
    out.mkdir()
    (out / "part-00000.tsv.gz").write_bytes(gzip.compress(to_tsv_bytes(_drifted(holdout, top, set(vocab)))))
    staging, q = tmp_path_factory.mktemp("drifted-staging"), tmp_path_factory.mktemp("drifted-q")
    for d in [*days, END_DAY]:
        report = stage_day(str(root), staging, q, d)
    assert report.rows_quarantined == 0 and report.rows_ok == holdout.num_rows  # drifted, not malformed
    return staging


LENIENT = {"min_auc": 0.5, "max_ece": 1.0}  # only the drift rule decides here


def test_undrifted_day_passes_the_drift_rule(staged: Path, trained_bundle: Path, tmp_path: Path) -> None:
    doc = evaluate_day(staged, END_DAY, trained_bundle, gate_params=LENIENT, report_dir=tmp_path / "report")
    drift = doc["drift"]
    assert set(drift["features"]) == {c for c in ALL_COLUMNS if c != "label"}
    assert max(drift["features"].values()) < 0.1, drift["largest"]
    assert drift["score_psi"] is not None and drift["score_psi"] < 0.1
    assert doc["gate"]["passed"] and doc["gate"]["drifted"] == [] and doc["gate"]["warnings"] == []
    assert Path(doc["drift_reference"]).is_file()


def test_drifted_day_is_rejected_naming_exactly_the_drifted_features(drifted_staging: Path, trained_bundle: Path,
                                                                      tmp_path: Path) -> None:
    doc = evaluate_day(drifted_staging, END_DAY, trained_bundle, gate_params=LENIENT, report_dir=tmp_path / "report")
    g = doc["gate"]
    assert not g["passed"]
    assert sorted(g["drifted"]) == sorted([SHIFTED, REPLACED])
    assert {c for c, v in doc["drift"]["features"].items() if v > 0.25} == {SHIFTED, REPLACED}
    (reason,) = [r for r in g["reasons"] if r.startswith("max_feature_psi:")]
    assert f"{SHIFTED} PSI" in reason and f"{REPLACED} PSI" in reason and "limit 0.25" in reason
    assert [m["feature"] for m in doc["drift"]["largest"][:2]] == sorted([SHIFTED, REPLACED], key=lambda c: -doc["drift"]["features"][c])
    html = Path(doc["report"]).read_text()
    assert 'id="drift"' in html and f"{SHIFTED} PSI" in html and f"{REPLACED} PSI" in html
    # a looser limit passes the same day; force_deploy is not needed
    looser = decide(doc, GateConfig(min_auc=0.5, max_ece=1.0, max_feature_psi=1e6))
    assert looser["passed"] and any(w.startswith("feature_psi:") for w in looser["warnings"])


def test_check_time_drift_names_exactly_the_drifted_features(staged: Path, drifted_staging: Path) -> None:
    """check_data's PSI (ctr.data.checks.drift_check, bins from the training range itself) warns about the
    drifted day naming I5 and C6 above the limit, and stays quiet on the undrifted day."""
    from ctr.data.checks import drift_check

    train = daterange(END_DAY - dt.timedelta(days=7), END_DAY - dt.timedelta(days=1))
    drift, warnings = drift_check(drifted_staging, train, END_DAY)
    assert {c for c, v in drift["features"].items() if v > 0.25} == {SHIFTED, REPLACED}
    assert drift["rows"] > 0 and len(drift["features"]) == 39 and drift["score_psi"] is None
    high = [w for w in warnings if "above max_feature_psi 0.25" in w]
    assert len(high) == 1 and f"{SHIFTED} PSI" in high[0] and f"{REPLACED} PSI" in high[0]
    assert high[0].startswith(f"day={END_DAY}: feature drift vs training range ")
    calm, quiet = drift_check(staged, train, END_DAY)
    assert quiet == [] and max(calm["features"].values()) < 0.1, calm["largest"]


def test_gate_task_names_the_drifted_features_in_its_log_and_xcom(drifted_staging: Path, trained_bundle: Path,
                                                                   tmp_path: Path, monkeypatch, caplog, capfd) -> None:
    """The DAG's gate task (ctr.airflow.tasks.gate) on the drifted day's evaluation: rejected, the
    decision XCom's `drifted` holds exactly I5 and C6, and the task log names both with their PSI."""
    import json
    import logging
    from types import SimpleNamespace

    from airflow.sdk import DAG
    from ctr.airflow import tasks as airflow_tasks

    monkeypatch.setenv("CTR_ALERTS_CONN_ID", "ctr_alerts_not_configured")  # the rejection notice: a logged no-op
    doc = evaluate_day(drifted_staging, END_DAY, trained_bundle, gate_params=LENIENT, report_dir=tmp_path / "report")
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(doc))
    pushed: dict = {}
    ti = SimpleNamespace(dag_id="ctr_retrain", task_id="gate", run_id="manual__drift", try_number=1,
                         xcom_push=lambda key, value: pushed.update({key: value}))
    ctx = {"dag": DAG("ctr_retrain", schedule=None), "run_id": "manual__drift", "ti": ti, "params": {},
           "logical_date": dt.datetime.combine(END_DAY, dt.time(2), dt.UTC)}
    evaluated = {"gate": doc["gate"], "metrics_path": str(metrics), "candidate_auc": doc["candidate"]["auc"],
                 "champion_version": None}
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="ctr.dag"):
        assert airflow_tasks.gate(ctx, evaluated) is False
    assert sorted(pushed["decision"]["drifted"]) == sorted([SHIFTED, REPLACED]) and not pushed["decision"]["passed"]
    # the task log (stdout under Airflow's structlog set-up, or the logging records)
    out = capfd.readouterr().out.splitlines() + [r.getMessage() for r in caplog.records]
    lines = [ln for ln in out if "gate: max_feature_psi:" in ln]
    assert lines and all(f"{SHIFTED} PSI" in ln and f"{REPLACED} PSI" in ln for ln in lines), out
