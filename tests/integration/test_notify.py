"""The `ctr_alerts` webhook notifier against a real HTTP receiver on 127.0.0.1.

The connection comes from AIRFLOW_CONN_<ID> exactly as on a worker; the live-Airflow drills
(tests/e2e/test_live_airflow.py::test_e_...) prove the same events leave real task runs.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from types import SimpleNamespace

import pytest
from ctr.airflow import notify

from tests.e2e.live_airflow import REPO, WebhookReceiver

pytestmark = pytest.mark.integration


@pytest.fixture
def receiver():
    with WebhookReceiver() as r:
        yield r


def _context(run_id: str = "manual__2026-11-20", task_id: str = "gate") -> dict:
    from airflow.sdk import DAG

    return {"dag": DAG("ctr_retrain", schedule=None), "run_id": run_id,
            "ti": SimpleNamespace(dag_id="ctr_retrain", task_id=task_id, run_id=run_id, try_number=1),
            "logical_date": dt.datetime(2026, 11, 20, 2, tzinfo=dt.UTC), "params": {}}


def _use_conn(monkeypatch, conn_id: str, value: dict | str) -> None:
    monkeypatch.setenv("CTR_ALERTS_CONN_ID", conn_id)
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", value if isinstance(value, str) else json.dumps(value))


def test_failure_event_reaches_webhook_with_auth_and_headers(receiver, monkeypatch):
    _use_conn(monkeypatch, "alerts_a", {"conn_type": "http", "host": "127.0.0.1", "port": receiver.port, "schema": "http",
                                        "password": "s3cret-token", "extra": {"endpoint": "/hooks/ctr", "headers": {"X-Team": "ml"}}})
    ctx = {**_context(task_id="train"), "exception": RuntimeError("training job failed (exit 3)")}
    notify.on_task_failure()(ctx)  # exactly what Airflow calls as on_failure_callback
    (got,) = receiver.received
    assert got["path"] == "/hooks/ctr"
    assert got["headers"]["Authorization"] == "Bearer s3cret-token" and got["headers"]["X-Team"] == "ml"
    body = got["json"]
    assert body["event"] == "task_failed" and body["task_id"] == "train" and body["dag_id"] == "ctr_retrain"
    assert body["run_id"] == "manual__2026-11-20" and body["logical_date"].startswith("2026-11-20T02:00")
    assert body["details"]["error"] == "RuntimeError: training job failed (exit 3)"
    assert "ctr_retrain.train" in body["text"]


def test_uri_connection_and_templated_message(receiver, monkeypatch):
    _use_conn(monkeypatch, "alerts_b", f"http://127.0.0.1:{receiver.port}/alerts")
    notify.WebhookNotifier("rollback", message="rolled back in {{ run_id }}")(_context(run_id="scheduled__x"))
    (got,) = receiver.received
    assert got["path"] == "/alerts" and got["json"]["text"] == "rolled back in scheduled__x"
    assert got["json"]["event"] == "rollback"


def test_no_connection_is_a_logged_noop(receiver, monkeypatch, caplog):
    monkeypatch.setenv("CTR_ALERTS_CONN_ID", "ctr_alerts_not_configured")
    monkeypatch.delenv("AIRFLOW_CONN_CTR_ALERTS_NOT_CONFIGURED", raising=False)
    with caplog.at_level(logging.INFO, logger="ctr.airflow.notify"):
        notify.send(_context(), "gate_rejected", "rejected")
    assert receiver.received == []
    assert "no connection 'ctr_alerts_not_configured'" in caplog.text


def test_receiver_error_is_logged_not_raised_and_url_stays_secret(monkeypatch, caplog):
    with WebhookReceiver(status=500) as bad:
        _use_conn(monkeypatch, "alerts_c", {"conn_type": "http", "host": f"http://127.0.0.1:{bad.port}/T0/B0/secretpath"})
        with caplog.at_level(logging.INFO, logger="ctr.airflow.notify"):
            notify.send(_context(), "rollback", "rolled back")
        assert len(bad.received) == 1 and bad.received[0]["path"] == "/T0/B0/secretpath"
        assert "HTTP 500" in caplog.text and "alerts_c" in caplog.text and "secretpath" not in caplog.text
        with pytest.raises(Exception, match="500"):
            notify.WebhookNotifier("rollback", raise_on_error=True).notify(_context())


def test_unknown_event_is_refused():
    with pytest.raises(ValueError, match="unknown notification event"):
        notify.WebhookNotifier("gate_exploded")


def test_gate_task_sends_rejection(receiver, monkeypatch, tmp_path):
    import json

    from ctr.airflow import tasks as airflow_tasks

    _use_conn(monkeypatch, "alerts_d", {"conn_type": "http", "host": "127.0.0.1", "port": receiver.port})
    pushed = {}
    ctx = _context()
    ctx["ti"].xcom_push = lambda key, value: pushed.update({key: value})
    reasons = ["lower 95% CI bound of AUC diff -0.0123 < -0.005"]
    metrics = tmp_path / "metrics.json"  # the gate reads it for the review rules (a clear failure: no review)
    metrics.write_text(json.dumps({"auc_diff": {"ci_low": -0.0123}}))
    evaluated = {"gate": {"passed": False, "forced": False, "reasons": reasons}, "candidate_auc": 0.71,
                 "champion_version": "3", "metrics_path": str(metrics)}
    assert airflow_tasks.gate(ctx, evaluated) is False
    assert pushed["decision"] == {"passed": False, "forced": False, "reasons": reasons, "warnings": [], "drifted": [],
                                  "review": None}
    (got,) = receiver.received
    body = got["json"]
    assert body["event"] == "gate_rejected" and body["details"]["reasons"] == reasons
    assert body["details"]["champion_version"] == "3" and "2026-11-20" in body["text"] and "REJECTED" in body["text"]
    # a passing gate sends nothing
    assert airflow_tasks.gate(ctx, {**evaluated, "gate": {"passed": True, "forced": False, "reasons": []}}) is True
    assert len(receiver.received) == 1


def test_every_task_of_the_dag_alerts_on_failure():
    import runpy

    dag = runpy.run_path(str(REPO / "dags" / "ctr_retrain.py"))["dag"]
    assert dag.task_ids
    for task in dag.tasks:
        callbacks = task.on_failure_callback if isinstance(task.on_failure_callback, list) else [task.on_failure_callback]
        assert any(isinstance(c, notify.WebhookNotifier) and c.event == "task_failed" for c in callbacks), task.task_id


def test_the_dags_deadline_alert_posts_deadline_missed_with_the_runs_link(receiver, monkeypatch):
    """The DeadlineAlert of ctr_retrain: CTR_DEADLINE_HOURS after the run is queued, its AsyncCallback posts the run's
    link (here called as the triggerer calls it, with the context the scheduler builds)."""
    import asyncio
    import runpy

    from airflow.sdk import DeadlineReference

    monkeypatch.setenv("CTR_DEADLINE_HOURS", "0.01")
    dag = runpy.run_path(str(REPO / "dags" / "ctr_retrain.py"))["dag"]
    (alert,) = dag.deadline
    assert alert.reference == DeadlineReference.DAGRUN_QUEUED_AT and alert.interval == dt.timedelta(seconds=36)
    assert alert.callback.path == "ctr.airflow.notify.deadline_missed"
    _use_conn(monkeypatch, "ctr_alerts_t", {"conn_type": "http", "host": "127.0.0.1", "port": receiver.port,
                                            "schema": "http", "extra": {"endpoint": "/hooks/ctr"}})
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "http://airflow.example:8080")
    ctx = {"dag_run": {"dag_id": "ctr_retrain", "dag_run_id": "scheduled__2026-11-20T02:00:00+00:00", "state": "running",
                       "logical_date": "2026-11-20T02:00:00Z", "data_interval_end": "2026-11-21T02:00:00Z"},
           "deadline": {"id": "d1", "deadline_time": "2026-11-21T08:00:00+00:00"}}
    asyncio.run(notify.deadline_missed(context=ctx))
    ev = receiver.wait_for("deadline_missed", timeout=10)
    link = "http://airflow.example:8080/dags/ctr_retrain/runs/scheduled__2026-11-20T02%3A00%3A00%2B00%3A00"
    assert ev["run_id"] == "scheduled__2026-11-20T02:00:00+00:00" and ev["details"]["url"] == link
    assert "has neither promoted nor rejected a candidate by its deadline 2026-11-21T08:00:00+00:00" in ev["text"]
    assert link in ev["text"] and ev["details"]["state"] == "running"
    # `airflow dags test` (in-process) cannot run a DAG with deadline alerts in Airflow 3.3.2: none there
    monkeypatch.setattr("sys.argv", ["airflow", "dags", "test", "ctr_retrain", "2026-11-20"])
    assert notify.deadline(6) is None and runpy.run_path(str(REPO / "dags" / "ctr_retrain.py"))["dag"].deadline is None
