"""`ctr monitor`: a day without a log, an undrifted and a drifted live day, the MLflow run's artifacts and the CLI."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from ctr.cli import main
from ctr.data.landing import read_staged
from ctr.model.bundle import Bundle
from ctr.monitoring.monitor import NOTHING, monitor_day
from ctr.schema import FEATURE_COLUMNS
from ctr.serving.predlog import PredictionLog

from tests.conftest import END_DAY

TODAY = dt.datetime.now(dt.UTC).date()


@pytest.fixture(scope="module")
def reference(staged: Path, trained_bundle: Path, tmp_path_factory) -> Path:
    from ctr.validation.holdout import evaluate_day

    doc = evaluate_day(staged, END_DAY, trained_bundle, report_dir=tmp_path_factory.mktemp("eval"))
    return Path(doc["drift_reference"])


def _log(root: Path, table: pa.Table, bundle: Bundle, version: str, per_request: int = 25) -> int:
    """Log the table's rows as /v1/score JSON requests were logged by the service (rate 1.0)."""
    import orjson

    probs = bundle.predict_table(table)
    rows = [{k: v for k, v in r.items() if v is not None} for r in table.select(FEATURE_COLUMNS).to_pylist()]
    plog = PredictionLog(root, rate=1.0).start()
    for i in range(0, len(rows), per_request):
        plog.log("/v1/score", b"application/json", orjson.dumps({"rows": rows[i:i + per_request]}),
                 probs[i:i + per_request], version)
    plog.close()
    return len(rows)


def _holdout(staged: Path, n: int = 2000) -> pa.Table:
    return pa.concat_tables(read_staged(staged, END_DAY)).slice(0, n)


def test_no_log_is_nothing_to_monitor_not_a_failure(tmp_path: Path, capsys) -> None:
    doc = monitor_day(TODAY, tmp_path / "predictions", tmp_path / "out", reference=tmp_path / "unused.json")
    assert doc["status"] == NOTHING and "no prediction log" in doc["reason"] and doc["alerts"] == []
    assert json.loads((tmp_path / "out" / "monitor.json").read_text())["status"] == NOTHING
    assert main(["monitor", "--day", TODAY.isoformat(), "--predictions", str(tmp_path / "p"), "--out",
                 str(tmp_path / "o"), "--reference", str(tmp_path / "unused.json")]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == NOTHING


def test_live_traffic_like_the_holdout_is_ok(staged: Path, trained_bundle: Path, reference: Path, tmp_path: Path) -> None:
    n = _log(tmp_path / "predictions", _holdout(staged), Bundle.load(trained_bundle), "v7")
    doc = monitor_day(TODAY, tmp_path / "predictions", tmp_path / "out", reference=reference)
    assert doc["status"] == "ok" and doc["rows"] == n and doc["alerts"] == []
    v = doc["versions"]["v7"]
    assert max(v["drift"]["features"].values()) < 0.25 and v["drift"]["score_psi"] < 0.25
    assert 'id="status">ok' in (tmp_path / "out" / "monitor.html").read_text()
    # the same rows sent one per request are stored as raw bodies (not parsed by the writer): same numbers
    _log(tmp_path / "single", _holdout(staged), Bundle.load(trained_bundle), "v7", per_request=1)
    one = monitor_day(TODAY, tmp_path / "single", tmp_path / "out1", reference=reference)
    assert one["rows"] == n and one["versions"]["v7"]["rows_unreadable"] == 0
    assert one["versions"]["v7"]["drift"] == v["drift"]


def test_skewed_live_traffic_is_named(staged: Path, trained_bundle: Path, reference: Path, tmp_path: Path) -> None:
    t = _holdout(staged)
    t = t.set_column(t.schema.get_field_index("I5"), "I5", pc.add(pc.multiply(t.column("I5"), 20), 1000))
    _log(tmp_path / "predictions", t, Bundle.load(trained_bundle), "v7")
    doc = monitor_day(TODAY, tmp_path / "predictions", tmp_path / "out", reference=reference)
    assert doc["status"] == "drift"
    (alert,) = [a for a in doc["alerts"] if "training/serving skew" in a]
    assert "I5 PSI" in alert and [c for c, v in doc["versions"]["v7"]["drift"]["features"].items() if v > 0.25] == ["I5"]


def test_reference_and_artifacts_through_the_registry(staged: Path, trained_bundle: Path, reference: Path,
                                                      tmp_path: Path) -> None:
    """The reference comes from the version's MLflow run (evaluation/drift_reference.json); monitor.json and
    monitor.html go back to that run under monitoring/<day>/."""
    from ctr.registry import Registry

    reg = Registry(f"sqlite:///{tmp_path / 'mlflow.db'}", "ctr-test", artifact_root=tmp_path / "art",
                   cache_dir=tmp_path / "cache")
    rid = reg.ensure_run("ctr_retrain/2026-11-20", {"dag_id": "ctr_retrain"})
    reg.client.log_artifact(rid, str(reference), artifact_path="evaluation")
    v = reg.register(trained_bundle, "ctr_retrain/2026-11-20", {"dag_id": "ctr_retrain"}, {}, run_id=rid)
    _log(tmp_path / "predictions", _holdout(staged, 500), Bundle.load(trained_bundle), v.version)
    _log(tmp_path / "predictions", _holdout(staged, 50), Bundle.load(trained_bundle), "digest-only")
    doc = monitor_day(TODAY, tmp_path / "predictions", tmp_path / "out", registry=reg)
    assert doc["status"] == "ok" and doc["versions"][v.version]["mlflow_run_id"] == rid
    assert doc["versions"]["digest-only"]["status"] == "no reference"
    names = {Path(a.path).name for a in reg.client.list_artifacts(rid, f"monitoring/{TODAY.isoformat()}")}
    assert names == {"monitor.json", "monitor.html"}
    assert np.isfinite(doc["versions"][v.version]["mean_probability"])


def test_the_monitor_task_notifies_on_skew_and_never_fails(staged: Path, trained_bundle: Path, reference: Path,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DAG's monitor task on today's log of a registered version: drift -> the `monitor_drift` event at a
    real webhook receiver and the alerts in the XCom; without a log -> nothing to monitor, no event."""
    from types import SimpleNamespace

    from ctr.airflow import tasks as airflow_tasks
    from ctr.registry import Registry
    from ctr.settings import Settings

    from tests.e2e.live_airflow import WebhookReceiver

    monkeypatch.setenv("CTR_HOME", str(tmp_path))
    monkeypatch.setenv("CTR_ALERTS_CONN_ID", "alerts_monitor")
    ctx = {"params": {}, "dag": SimpleNamespace(dag_id="ctr_retrain"), "run_id": "test",
           "logical_date": dt.datetime(TODAY.year, TODAY.month, TODAY.day, 2, tzinfo=dt.UTC),
           "ti": SimpleNamespace(dag_id="ctr_retrain", task_id="monitor", run_id="test", try_number=1)}
    with WebhookReceiver() as receiver:
        monkeypatch.setenv("AIRFLOW_CONN_ALERTS_MONITOR", f"http://127.0.0.1:{receiver.port}/alerts")
        out = airflow_tasks.monitor(ctx)
        assert out["status"] == NOTHING and receiver.received == []
        reg = Registry.from_settings(Settings.from_env())
        rid = reg.ensure_run("ctr_retrain/2026-11-20", {"dag_id": "ctr_retrain"})
        reg.client.log_artifact(rid, str(reference), artifact_path="evaluation")
        v = reg.register(trained_bundle, "ctr_retrain/2026-11-20", {"dag_id": "ctr_retrain"}, {}, run_id=rid)
        t = _holdout(staged, 1000)
        t = t.set_column(t.schema.get_field_index("C6"), "C6", pa.array(["zz"] * t.num_rows))
        _log(Settings.from_env().predictions_dir, t, Bundle.load(trained_bundle), v.version)
        out = airflow_tasks.monitor(ctx)
        assert out["status"] == "drift" and any("C6 PSI" in a for a in out["alerts"])
        (got,) = receiver.received
    assert got["json"]["event"] == "monitor_drift" and "C6 PSI" in got["json"]["text"]
    assert Path(out["monitor_html"]).is_file()
