"""A candidate that fails verification is rolled back end to end on the local default; canary and shadow in DAG runs.

run 1 (day D): version 1 deployed (rolling), verified, champion.
run 2 (day D+1, force_deploy, rollout_strategy=shadow + rollout_drill=errors): version 2 registered and
loaded as a shadow beside version 1; half its shadow scorings fail, so verify's bake breaches
max_candidate_errors -> the shadow is dropped, the verify task fails, promote does not run, and the
champion pointer stays on version 1.
run 3 (day D+2, force_deploy, rollout_strategy=canary): version 3 answers 50% of the requests while it
bakes, is within the limits, promoted to 100% and becomes champion.
(`fail_verify`, the rolling strategy's forced failure, is rehearsed in test_live_airflow.py.)
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
BAKE = {"bake_seconds": 2, "bake_requests": 100}  # short bakes: verify's own ~100 requests/s are the traffic


@pytest.fixture(scope="module")
def install(airflow_install, tmp_path_factory):
    landing = tmp_path_factory.mktemp("rollback-landing")
    generate(landing, 10, 3000, D + dt.timedelta(days=2), GeneratorConfig(seed=5))
    return airflow_install(landing)


def _task_states(inst, day: str) -> dict[str, str | None]:
    """Task states of the run for `day`, read from the install's own Airflow metadata DB."""
    with sqlite3.connect(inst.root / "airflow" / "airflow.db") as db:
        rows = db.execute("SELECT ti.task_id, ti.state FROM task_instance ti JOIN dag_run dr "
                          "ON dr.dag_id = ti.dag_id AND dr.run_id = ti.run_id "
                          "WHERE dr.dag_id = 'ctr_retrain' AND dr.logical_date LIKE ?", (f"{day}%",)).fetchall()
    return dict(rows)


def test_failed_verification_rolls_back_and_keeps_the_champion_then_a_canary_promotes(install):
    url = f"http://127.0.0.1:{install.serve_port}"
    install.dags_test(D.isoformat(), CONF)
    reg = Registry(f"sqlite:///{install.ctr_home / 'mlflow.db'}", "ctr-lightgbm")
    assert reg.champion().version == "1"
    assert httpx.get(f"{url}/readyz").json()["model_version"] == "1"

    d2 = (D + dt.timedelta(days=1)).isoformat()
    r = install.dags_test(d2, {**CONF, **BAKE, "force_deploy": True, "rollout_strategy": "shadow",
                               "rollout_drill": "errors"}, check=False)
    log = r.stdout + r.stderr
    assert "runs version 2 as a shadow beside version 1 (drill {'error_rate': 0.5})" in log, log[-3000:]
    assert "verify failed: shadow of version 2 breached max_candidate_errors=0" in log, log[-3000:]
    assert "rolled back to 1" in log, log[-3000:]

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

    d3 = (D + dt.timedelta(days=2)).isoformat()
    r = install.dags_test(d3, {**CONF, **BAKE, "force_deploy": True, "rollout_strategy": "canary", "canary_percent": 50})
    log = r.stdout + r.stderr
    assert "runs version 3 as a canary beside version 1 at 50%" in log, log[-3000:]
    assert "canary of version 3 within limits" in log and "promoted to 100%" in log, log[-3000:]
    states = _task_states(install, d3)
    assert states["verify"] == "success" and states["promote"] == "success", states
    assert reg.champion().version == "3"
    ready = httpx.get(f"{url}/readyz").json()
    assert ready["model_version"] == "3"
    traffic = httpx.get(f"{url}/admin/traffic").json()
    assert traffic["champion"] == "3" and traffic["candidate"] is None  # the canary became the champion
