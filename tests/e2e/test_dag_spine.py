"""The spine, end to end: three `airflow dags test` runs of ctr_retrain on tiny generated data.

run 1 (day D): no champion yet -> gate on absolute floors -> version 1 registered, deployed, verified, champion
run 2 (day D+1, trained on a 2% slice): rejected against the champion; deploy tasks skipped; v1 still serves
run 3 (day D again): re-run of run 1's logical date -> no new registry version
"""

from __future__ import annotations

import datetime as dt
import json

import httpx
import pytest
from ctr.data.generate import GeneratorConfig, generate
from ctr.registry import Registry

pytestmark = pytest.mark.e2e

D = dt.date(2026, 11, 20)
CONF = {"min_auc": 0.6}  # tiny data: a lower absolute floor; the relative rules keep their defaults


@pytest.fixture(scope="module")
def install(airflow_install, tmp_path_factory):
    landing = tmp_path_factory.mktemp("spine-landing")
    generate(landing, 9, 4000, D + dt.timedelta(days=1), GeneratorConfig(seed=11))
    return airflow_install(landing)


def _registry(inst) -> Registry:
    return Registry(f"sqlite:///{inst.ctr_home / 'mlflow.db'}", "ctr-lightgbm")


def _versions(inst) -> list[str]:
    return sorted(str(v.version) for v in _registry(inst).client.search_model_versions("name = 'ctr-lightgbm'"))


def test_three_runs(install):
    url = f"http://127.0.0.1:{install.serve_port}"

    install.dags_test(D.isoformat(), CONF)
    m1 = install.metrics(D.isoformat())
    assert m1["baseline"] is None and m1["gate"]["passed"], m1["gate"]
    assert _versions(install) == ["1"]
    reg = _registry(install)
    assert reg.champion().version == "1"
    v1 = reg.get("1")
    assert v1.tags["ctr.logical_date"] == D.isoformat()
    assert v1.tags["data_interval"] == f"{D - dt.timedelta(days=7)}..{D - dt.timedelta(days=1)}"
    ready = httpx.get(f"{url}/readyz").json()
    assert ready["model_version"] == "1"
    r = httpx.post(f"{url}/v1/score", json={"rows": [{"I1": 3, "C1": "05db9164"}]})
    assert r.status_code == 200 and 0.0 < r.json()["probabilities"][0] < 1.0

    d2 = (D + dt.timedelta(days=1)).isoformat()
    install.dags_test(d2, {**CONF, "sample_fraction": 0.02})
    m2 = install.metrics(d2)
    assert m2["baseline_version"] == "1"
    assert not m2["gate"]["passed"], m2["gate"]
    assert any(reason.startswith(("max_auc_drop", "max_logloss_rise")) for reason in m2["gate"]["reasons"])
    assert m2["auc_diff"]["ci_high"] < 0  # significantly worse, not noise
    assert _versions(install) == ["1"], "a rejected candidate must not be registered"
    assert _registry(install).champion().version == "1"
    assert httpx.get(f"{url}/readyz").json()["model_version"] == "1"
    states = _json_out(install.airflow("tasks", "states-for-dag-run", "ctr_retrain", _last_run_id(install, d2), "-o", "json").stdout)
    by_task = {t["task_id"]: t["state"] for t in states}
    assert by_task["gate"] == "success" and by_task["evaluate"] == "success"
    assert {by_task[t] for t in ("register", "build_image", "rollout", "verify", "promote")} == {"skipped"}, by_task

    install.dags_test(D.isoformat(), CONF)
    assert _versions(install) == ["1"], "re-running a logical date must not create a new version"
    assert _registry(install).champion().version == "1"
    assert httpx.get(f"{url}/readyz").json()["model_version"] == "1"


def _json_out(stdout: str):
    """The JSON document in a CLI's stdout (Airflow prints log lines before it)."""
    line = next(ln for ln in reversed(stdout.splitlines()) if ln.startswith(("[", "{")))
    return json.loads(line)


def _last_run_id(inst, day: str) -> str:
    runs = _json_out(inst.airflow("dags", "list-runs", "ctr_retrain", "-o", "json").stdout)
    mine = [r for r in runs if (r.get("logical_date") or "").startswith(day)]
    assert mine, runs
    return mine[0]["run_id"]
