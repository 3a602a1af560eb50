"""ctr_retrain with compute=databricks, pointed at the local Jobs API server: a full `airflow dags test` run.

ship_to_databricks imports the wheel and job file through the Workspace API, train_databricks is the
provider's DatabricksSubmitRunOperator (the server runs the job on local pyspark with the synapseml engine
and the task's Maven libraries, as the real cluster would), the bundle is fetched, and everything after
`train` runs as in the local path, through promote.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess

import pytest
from ctr.data.generate import GeneratorConfig, generate
from ctr.training.databricks import idempotency_token

from tests.e2e.airflow_env import BIN
from tests.integration.fake_databricks import FakeDatabricks

pytestmark = pytest.mark.e2e

D = dt.date(2026, 11, 20)


def test_compute_databricks_full_run(airflow_install, tmp_path_factory):
    landing = tmp_path_factory.mktemp("dbx-e2e-landing")
    generate(landing, 3, 3000, D, GeneratorConfig(seed=13))
    inst = airflow_install(landing)
    out = tmp_path_factory.mktemp("dbx-e2e-out")
    api = FakeDatabricks(tmp_path_factory.mktemp("dbx-e2e-ws"), env={"CTR_SPARK_MASTER": "local[2]"}).start()
    try:
        env = {**inst.env,
               "AIRFLOW_CONN_DATABRICKS_DEFAULT": json.dumps({"conn_type": "databricks", "host": "127.0.0.1", "port": api.port,
                                                              "schema": "http", "password": api.token}),
               "CTR_DATABRICKS_LANDING": str(landing), "CTR_DATABRICKS_OUTPUT": str(out),
               "CTR_DATABRICKS_ENGINE": "synapseml", "CTR_DATABRICKS_EXECUTOR_CORES": "2",
               "CTR_DATABRICKS_POLLING_SECONDS": "1",
               "CTR_DATABRICKS_DEFERRABLE": "false"}
        conf = {"compute": "databricks", "train_days": 2, "min_auc": 0.5}
        r = subprocess.run([str(BIN / "airflow"), "dags", "test", "ctr_retrain", D.isoformat(), "--conf", json.dumps(conf)],
                           env=env, text=True, capture_output=True, timeout=900)
        log = r.stdout + r.stderr
        (inst.root / "dags-test-databricks.log").write_text(log)
        assert r.returncode == 0, log[-4000:]

        assert len(api.runs) == 1
        (run,) = api.runs.values()
        assert (run.life_cycle_state, run.result_state) == ("TERMINATED", "SUCCESS")
        params = run.request["spark_python_task"]["parameters"]
        assert params[params.index("--holdout") + 1] == D.isoformat()
        assert ("POST", "/api/2.0/workspace/import") in api.requests
        assert any(lib.get("maven", {}).get("coordinates", "").startswith("com.microsoft.azure:synapseml-lightgbm_2.12:")
                   for lib in run.request["libraries"])

        run_dir = inst.ctr_home / "runs" / "ctr_retrain" / D.isoformat()
        m = json.loads((run_dir / "metrics.json").read_text())
        assert m["gate"]["passed"], m["gate"]
        meta = json.loads((run_dir / "candidate" / "metadata.json").read_text())
        assert meta["engine"] == "spark-synapseml" and meta["holdout_day"] == D.isoformat()
        cluster = json.loads((run_dir / "databricks" / "metrics.json").read_text())
        assert cluster["candidate"]["auc"] == pytest.approx(m["candidate"]["auc"], abs=1e-9)

        run_id = _run_id(inst)
        assert run.request["idempotency_token"] == idempotency_token("ctr_retrain", run_id, "train_databricks")
        states = inst.airflow("tasks", "states-for-dag-run", "ctr_retrain", run_id, "-o", "json").stdout
        by_task = {t["task_id"]: t["state"] for t in json.loads(_last_json(states))}
        assert by_task["train"] == "skipped"
        for t in ("databricks.choose_compute", "databricks.ship_to_databricks", "databricks.databricks_request",
                  "databricks.train_databricks", "databricks.fetch_databricks_bundle", "trained",
                  "evaluate", "register", "build_image", "rollout", "verify", "promote"):
            assert by_task[t] == "success", (t, by_task)
        assert f"/run/{run.run_id}" in log  # the provider logs the run page link
    finally:
        api.stop()


def _last_json(stdout: str) -> str:
    return next(ln for ln in reversed(stdout.splitlines()) if ln.startswith(("[", "{")))


def _run_id(inst) -> str:
    out = inst.airflow("dags", "list-runs", "ctr_retrain", "-o", "json").stdout
    runs = json.loads(_last_json(out))
    return sorted(runs, key=lambda r: r.get("start_date") or "")[-1]["run_id"]
