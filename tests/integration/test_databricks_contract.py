"""The Databricks path at its boundary: the provider's hook and DatabricksSubmitRunOperator against a
local server speaking the Jobs API 2.1/2.2 wire format, which really runs the shipped job file with the
shipped wheel on local pyspark.

* shipping imports the job file and the ctr wheel (content-addressed) through the Workspace API;
* a worker that died after submitting, then its retry: the same idempotency token attaches to the
  existing run (one run on the server), and the run produces a bundle + metrics.json;
* a failing job: the cluster's error text is in the task's exception (and so in the task log);
* killing the task (on_kill) cancels the run and stops its process;
* the deferrable path: the provider's trigger polls the same server to the terminal state.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import threading
import time
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.fake_databricks import FakeDatabricks

pytestmark = pytest.mark.integration

CONN_ID = "databricks_ctr_test"
DAY = dt.date(2026, 11, 20)


class _TI:
    """The part of a TaskInstance the operator touches (xcom_push)."""

    def __init__(self) -> None:
        self.xcom: dict[str, object] = {}
        self.stats_tags: dict[str, str] = {}

    def xcom_push(self, key: str, value: object) -> None:
        self.xcom[key] = value


@pytest.fixture(scope="module")
def landing(tmp_path_factory) -> Path:
    from ctr.data.generate import GeneratorConfig, generate

    root = tmp_path_factory.mktemp("dbx-landing")
    generate(root, 3, 1500, DAY, GeneratorConfig(seed=5))
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake-databricks")
    api = FakeDatabricks(root, env={"CTR_SPARK_MASTER": "local[2]", "CTR_HOME": str(root / "home")}).start()
    old = os.environ.get(f"AIRFLOW_CONN_{CONN_ID.upper()}")
    os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = json.dumps(
        {"conn_type": "databricks", "host": "127.0.0.1", "port": api.port, "schema": "http", "password": api.token})
    yield api
    api.stop()
    if old is None:
        os.environ.pop(f"AIRFLOW_CONN_{CONN_ID.upper()}", None)


@pytest.fixture(scope="module")
def shipped(server):
    from ctr.airflow.databricks import CtrDatabricksHook
    from ctr.training.databricks import JOB_SCRIPT, artifact_digest, artifact_paths, build_wheel

    hook = CtrDatabricksHook(CONN_ID)
    wheel = build_wheel(server.root / "build")
    paths = artifact_paths("/Workspace/Shared/ctr", wheel.name, artifact_digest(wheel))
    assert not hook.workspace_exists(paths["wheel"])
    hook.workspace_mkdirs(paths["dir"])
    hook.workspace_import(paths["python_file"], JOB_SCRIPT)
    hook.workspace_import(paths["wheel"], wheel.read_bytes())
    assert hook.workspace_exists(paths["wheel"]) and hook.workspace_exists(paths["python_file"])
    with zipfile.ZipFile(server.local_path(paths["wheel"])) as z:
        assert "ctr/training/spark_job.py" in z.namelist()
    return paths


def _payload(shipped, landing: Path, out: Path, *, token: str, holdout: dt.date = DAY, engine: str = "lightgbm"):
    from ctr.training.databricks import DatabricksSettings, TrainRequest, submit_payload

    s = DatabricksSettings(landing=str(landing), engine=engine, num_workers=2)
    req = TrainRequest(start=(DAY - dt.timedelta(days=2)).isoformat(), end=(DAY - dt.timedelta(days=1)).isoformat(),
                       holdout=holdout.isoformat(), out=str(out), gate_params={"min_auc": 0.5, "max_ece": 0.2})  # tiny data: floors that test the plumbing, not the model
    return submit_payload(req, s, python_file=shipped["python_file"], wheel=shipped["wheel"], token=token,
                          run_name="ctr_retrain contract")


def _operator(payload, task_id: str = "train_databricks"):
    from ctr.airflow.databricks import CtrDatabricksSubmitRunOperator

    return CtrDatabricksSubmitRunOperator(task_id=task_id, json=payload, databricks_conn_id=CONN_ID,
                                          polling_period_seconds=1, databricks_retry_delay=1, deferrable=False)


def _context(ti: _TI) -> dict:
    return {"ti": ti, "params": {}}


def test_payload_shape():
    from ctr.training.databricks import (
        DatabricksConfigError,
        DatabricksSettings,
        TrainRequest,
        idempotency_token,
        submit_payload,
    )

    long_run = "manual__2026-11-20T02:00:00.123456+00:00" * 3
    tok = idempotency_token("ctr_retrain", long_run, "train_databricks")
    assert len(tok) <= 64 and tok == idempotency_token("ctr_retrain", long_run, "train_databricks")
    assert tok != idempotency_token("ctr_retrain", long_run + "x", "train_databricks")
    s = DatabricksSettings(landing="abfss://landing@acct.dfs.core.windows.net/criteo", storage_account="acct")
    p = submit_payload(TrainRequest(start="2026-11-13", end="2026-11-19", holdout="2026-11-20", out="abfss://m@acct.dfs.core.windows.net/r"),
                       s, python_file="/Workspace/x/train_spark.py", wheel="/Workspace/x/ctr.whl", token=tok, run_name="r")
    nc = p["new_cluster"]
    assert "autoscale" not in nc and nc["num_workers"] == 4 and "libraries" not in nc
    # the pair the local Spark runs (jobs/synapseml/pom.xml), from Maven Central: no `repo`
    assert nc["spark_version"] == "16.4.x-scala2.12"
    assert {"maven": {"coordinates": "com.microsoft.azure:synapseml-lightgbm_2.12:1.1.3",
                      "exclusions": ["com.microsoft.ml.lightgbm:lightgbmlib"]}} in p["libraries"]
    assert {"maven": {"coordinates": "com.microsoft.ml.lightgbm:lightgbmlib:3.3.500"}} in p["libraries"]
    pom = (REPO / "jobs" / "synapseml" / "pom.xml").read_text()
    assert "<synapseml.version>1.1.3</synapseml.version>" in pom and "<lightgbmlib.version>3.3.500<" in pom
    assert {"whl": "/Workspace/x/ctr.whl"} in p["libraries"]
    assert "--engine" in p["spark_python_task"]["parameters"]
    s4 = DatabricksSettings(landing="x", spark_version="17.3.x-scala2.13")
    with pytest.raises(DatabricksConfigError, match="Spark 3.5 / Scala 2.12 runtimes"):
        submit_payload(TrainRequest("a", "b", "c", "d"), s4, python_file="f", wheel="w", token="t", run_name="r")
    s4 = DatabricksSettings(landing="x", spark_version="17.3.x-scala2.13", engine="lightgbm")
    assert not any("maven" in lib for lib in submit_payload(
        TrainRequest("a", "b", "c", "d"), s4, python_file="f", wheel="w", token="t", run_name="r")["libraries"])


def test_retry_attaches_to_the_same_run_and_the_run_succeeds(server, shipped, landing, tmp_path):
    from ctr.airflow.databricks import CtrDatabricksHook
    from ctr.model.bundle import Bundle
    from ctr.training.databricks import idempotency_token

    token = idempotency_token("ctr_retrain", "manual__contract_ok", "train_databricks")
    payload = _payload(shipped, landing, tmp_path / "out", token=token)
    before = len(server.runs)
    # try 1: the worker submits, then dies before it could record or poll the run
    first = CtrDatabricksHook(CONN_ID).submit_run(payload)
    # try 2: the operator submits again with the same token and attaches to that run
    ti = _TI()
    _operator(payload).execute(_context(ti))
    assert len(server.runs) == before + 1, "a retry must not start a second run"
    assert ti.xcom["run_id"] == first
    assert str(ti.xcom["run_page_url"]).startswith(server.url) and f"/run/{first}" in str(ti.xcom["run_page_url"])
    run = server.runs[first]
    assert (run.life_cycle_state, run.result_state) == ("TERMINATED", "SUCCESS")
    assert ".whl" in json.loads((tmp_path / "out" / "model" / "metadata.json").read_text())["ctr_location"]
    Bundle.load(tmp_path / "out" / "model")
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["day"] == DAY.isoformat() and m["gate"]["passed"] and m["candidate"]["auc"] > 0.55
    # the cluster's drift section and reference come back in the output prefix (fetch copies it whole)
    assert len(m["drift"]["features"]) == 39 and "max_feature_psi" in {c["rule"] for c in m["gate"]["checks"]}
    assert json.loads((tmp_path / "out" / "drift_reference.json").read_text())["format"] == 1


def test_failing_job_surfaces_the_cluster_error(server, shipped, landing, tmp_path):
    from airflow.providers.common.compat.sdk import AirflowException
    from ctr.training.databricks import idempotency_token

    # a training range that includes the holdout day: the job refuses it before touching data
    payload = _payload(shipped, landing, tmp_path / "out", holdout=DAY - dt.timedelta(days=1),
                       token=idempotency_token("ctr_retrain", "manual__contract_fail", "train_databricks"))
    with pytest.raises(AirflowException) as e:
        _operator(payload).execute(_context(_TI()))
    msg = str(e.value)
    assert "result_state': 'FAILED'" in msg or "FAILED" in msg
    assert "holdout day 2026-11-19 lies inside the training range" in msg, msg


def test_killing_the_task_cancels_the_run(server, shipped, landing, tmp_path):
    from airflow.providers.common.compat.sdk import AirflowException
    from ctr.training.databricks import idempotency_token

    payload = _payload(shipped, landing, tmp_path / "out", token=idempotency_token("ctr_retrain", "manual__kill", "t"))
    op = _operator(payload)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            op.execute(_context(_TI()))
        except BaseException as e:  # noqa: BLE001 - the thread reports what ended it
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (op.run_id and server.runs[op.run_id].life_cycle_state == "RUNNING"):
        time.sleep(0.2)
    run_ = server.runs[op.run_id]
    assert run_.life_cycle_state == "RUNNING"
    op.on_kill()
    t.join(timeout=120)
    assert not t.is_alive()
    assert (run_.life_cycle_state, run_.result_state) == ("TERMINATED", "CANCELED")
    assert run_.proc is not None and run_.proc.poll() is not None, "the job process must be stopped"
    assert errors and isinstance(errors[0], AirflowException) and "CANCELED" in str(errors[0])
    assert not (tmp_path / "out" / "model").exists()


def test_deferrable_trigger_reaches_the_terminal_state(server, shipped, landing, tmp_path):
    from airflow.providers.common.compat.sdk import AirflowException
    from airflow.providers.databricks.triggers.databricks import DatabricksExecutionTrigger
    from ctr.training.databricks import idempotency_token

    payload = _payload(shipped, landing, tmp_path / "out", holdout=DAY - dt.timedelta(days=1),
                       token=idempotency_token("ctr_retrain", "manual__deferred", "train_databricks"))
    op = _operator(payload)
    op.deferrable = True
    from airflow.providers.common.compat.sdk import TaskDeferred

    with pytest.raises(TaskDeferred) as d:
        op.__class__.__mro__[1].execute(op, _context(_TI()))  # the provider's execute, deferrable
    trigger = d.value.trigger
    assert isinstance(trigger, DatabricksExecutionTrigger)

    async def first_event():
        async for ev in trigger.run():
            return ev.payload

    event = asyncio.run(first_event())
    assert json.loads(event["run_state"])["result_state"] == "FAILED"
    with pytest.raises(AirflowException, match="lies inside the training range"):
        op.execute_complete(_context(_TI()), event)


def test_unresolvable_maven_library_fails_the_cluster_start(server, shipped, landing, tmp_path):
    from ctr.airflow.databricks import CtrDatabricksHook
    from ctr.training.databricks import idempotency_token

    payload = _payload(shipped, landing, tmp_path / "out", token=idempotency_token("ctr_retrain", "maven", "t"),
                       engine="synapseml")
    assert any("maven" in lib for lib in payload["libraries"])
    payload["libraries"] = [{"maven": {"coordinates": "com.microsoft.ml.lightgbm:lightgbmlib:0.0.1"}} if "maven" in lib
                            and "lightgbmlib" in lib["maven"]["coordinates"] else lib for lib in payload["libraries"]]
    run_id = CtrDatabricksHook(CONN_ID).submit_run(payload)
    deadline = time.monotonic() + 30
    while server.runs[run_id].life_cycle_state in ("PENDING", "RUNNING") and time.monotonic() < deadline:
        time.sleep(0.1)
    run = server.runs[run_id]
    assert run.life_cycle_state == "INTERNAL_ERROR" and "lightgbmlib:0.0.1" in run.state_message, run.state_message


def test_settings_switches_and_join():
    from ctr.airflow.databricks import join, resolve_deferrable
    from ctr.training.databricks import (
        DatabricksConfigError,
        DatabricksSettings,
        new_cluster,
        synapseml_libraries,
    )

    assert resolve_deferrable("auto", True) is True and resolve_deferrable("auto", False) is False
    assert resolve_deferrable("false", True) is False and resolve_deferrable("TRUE", False) is True
    with pytest.raises(ValueError, match="auto, true or false"):
        resolve_deferrable("maybe", False)
    s = DatabricksSettings.from_env({"CTR_DATABRICKS_NUM_WORKERS": "6", "CTR_DATABRICKS_STORAGE_ACCOUNT": "acct",
                                     "CTR_DATABRICKS_SPARK_CONF": "spark.a=1; spark.b = 2"})
    nc = new_cluster(s)
    assert nc["num_workers"] == 6 and nc["spark_conf"]["spark.a"] == "1" and nc["spark_conf"]["spark.b"] == "2"
    assert nc["spark_conf"]["fs.azure.account.auth.type.acct.dfs.core.windows.net"] == "OAuth"
    with pytest.raises(DatabricksConfigError, match="CTR_DATABRICKS_NUM_WORKERS"):
        DatabricksSettings.from_env({"CTR_DATABRICKS_NUM_WORKERS": "many"})
    with pytest.raises(DatabricksConfigError, match="Spark 3.5 / Scala 2.12"):
        synapseml_libraries("17.3.x-scala2.12")
    with pytest.raises(DatabricksConfigError, match="Spark 3.5 / Scala 2.12"):
        synapseml_libraries("16.4.x-scala2.13")
    assert join(None, {"bundle": "/b"}) == {"bundle": "/b"} and join({"bundle": "/a"}, None) == {"bundle": "/a"}
    with pytest.raises(RuntimeError, match="neither train nor fetch"):
        join(None, None)
