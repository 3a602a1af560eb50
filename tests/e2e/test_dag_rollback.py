"""A bundle that fails verification is rolled back end to end on the local default.

run 1 (day D): version 1 deployed, verified, champion.
run 2 (day D+1, force_deploy + fail_verify drill): version 2 registered and rolled out; verify
fails -> the service is rolled back to version 1, the verify task fails, promote does not run,
and the champion pointer stays on version 1.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3

import httpx
import pytest
from ctr.data.generate import GeneratorConfig, generate
from ctr.registry import Registry

pytestmark = pytest.mark.e2e

D = dt.date(2026, 11, 20)
CONF = {"min_auc": 0.6}


@pytest.fixture(scope="module")
def install(airflow_install, tmp_path_factory):
    landing = tmp_path_factory.mktemp("rollback-landing")
    generate(landing, 9, 3000, D + dt.timedelta(days=1), GeneratorConfig(seed=5))
    return airflow_install(landing)


def _task_states(inst, day: str) -> dict[str, str | None]:
    """Task states of the run for `day`, read from the install's own Airflow metadata DB."""
    with sqlite3.connect(inst.root / "airflow" / "airflow.db") as db:
        rows = db.execute("SELECT ti.task_id, ti.state FROM task_instance ti JOIN dag_run dr "
                          "ON dr.dag_id = ti.dag_id AND dr.run_id = ti.run_id "
                          "WHERE dr.dag_id = 'ctr_retrain' AND dr.logical_date LIKE ?", (f"{day}%",)).fetchall()
    return dict(rows)


def test_failed_verification_rolls_back_and_keeps_the_champion(install):
    url = f"http://127.0.0.1:{install.serve_port}"
    install.dags_test(D.isoformat(), CONF)
    reg = Registry(f"sqlite:///{install.ctr_home / 'mlflow.db'}", "ctr-lightgbm")
    assert reg.champion().version == "1"
    assert httpx.get(f"{url}/readyz").json()["model_version"] == "1"

    d2 = (D + dt.timedelta(days=1)).isoformat()
    r = install.dags_test(d2, {**CONF, "force_deploy": True, "fail_verify": True}, check=False)
    log = r.stdout + r.stderr
    assert "verify failed" in log and "rolled back to 1" in log, log[-3000:]

    states = _task_states(install, d2)
    assert states["register"] == "success" and states["rollout"] == "success", states
    assert states["verify"] == "failed" and states["promote"] in ("upstream_failed", None), states
    assert reg.get("2") is not None                       # the candidate was registered ...
    assert reg.champion().version == "1"                  # ... but never became champion
    ready = httpx.get(f"{url}/readyz").json()
    assert ready["model_version"] == "1"                  # and the service serves version 1 again
    state = json.loads((install.ctr_home / "serving" / "state.json").read_text())
    assert state["version"] == "1"
    score = httpx.post(f"{url}/v1/score", json={"rows": [{"I1": 3, "C1": "05db9164"}]})
    assert score.status_code == 200 and score.json()["model_version"] == "1"
