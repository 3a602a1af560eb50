"""The one resolver: defaults < CTR_* environment < Airflow Variables < the run's params, once per task instance."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from ctr.airflow.config import TaskConfig, resolve
from ctr.settings import DatabricksConfigError, dag_settings


def _ti(task_id: str = "rollout", try_number: int = 1) -> SimpleNamespace:
    return SimpleNamespace(dag_id="ctr_retrain", run_id="manual__1", task_id=task_id, map_index=-1, try_number=try_number)


def test_variables_win_over_the_environment_and_params_choose_the_targets(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    monkeypatch.setenv("AIRFLOW_VAR_CTR_LANDING", str(tmp_path / "from-variable"))
    monkeypatch.setenv("AIRFLOW_VAR_CTR_ACR_REGISTRY", "ctrprod")
    monkeypatch.setenv("AIRFLOW_VAR_CTR_DATABRICKS_NUM_WORKERS", "7")
    env = {"CTR_HOME": str(tmp_path / "home"), "CTR_LANDING": str(tmp_path / "from-env"), "CTR_ACR_REGISTRY": "env",
           "CTR_AKS_NAMESPACE": "scoring", "CTR_DATABRICKS_ENGINE": "lightgbm", "CTR_IMAGE_BUILDER": "local"}
    cfg = TaskConfig({"image_builder": "acr", "deploy_target": "aks", "compute": "databricks"}, env=env)
    assert cfg.settings.landing == str(tmp_path / "from-variable") and cfg.settings.home == tmp_path / "home"
    assert (cfg.deploy.acr_registry, cfg.deploy.aks_namespace) == ("ctrprod", "scoring")
    assert (cfg.deploy.image_builder, cfg.deploy.deploy_target) == ("acr", "aks")
    assert (cfg.databricks.num_workers, cfg.databricks.engine) == (7, "lightgbm")
    assert cfg.compute == "databricks"


def test_the_compute_variable_wins_over_the_param_and_bad_values_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_VAR_CTR_COMPUTE", "local")
    assert TaskConfig({"compute": "databricks"}, env={}).compute == "local"
    monkeypatch.setenv("AIRFLOW_VAR_CTR_COMPUTE", "gpu")
    with pytest.raises(ValueError, match="compute='gpu'"):
        _ = TaskConfig({}, env={}).compute
    with pytest.raises(DatabricksConfigError, match="CTR_DATABRICKS_NUM_WORKERS='many'"):
        _ = TaskConfig({}, env={"CTR_DATABRICKS_NUM_WORKERS": "many"}).databricks
    with pytest.raises(ValueError, match="CTR_SERVE_PORT=0 is out of range"):
        _ = TaskConfig({}, env={"CTR_SERVE_PORT": "0"}).settings


def test_resolved_once_per_task_instance(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CTR_HOME", str(tmp_path / "a"))
    ctx = {"ti": _ti(), "params": {}}
    first = resolve(ctx)
    assert first.settings.home == tmp_path / "a"
    monkeypatch.setenv("CTR_HOME", str(tmp_path / "b"))
    assert resolve(ctx) is first and resolve(ctx).settings.home == tmp_path / "a"  # no re-read within the task
    retry = resolve({"ti": _ti(try_number=2), "params": {}})
    assert retry is not first and retry.settings.home == tmp_path / "b"  # a retry resolves afresh
    assert resolve({"params": {}}) is not resolve({"params": {}})  # no task instance: never cached


def test_dag_parse_time_settings_use_the_same_parser() -> None:
    assert dag_settings({}).io_retries == 3
    d = dag_settings({"CTR_IO_RETRIES": "0", "CTR_DATABRICKS_POLLING_SECONDS": "5"})
    assert (d.io_retries, d.databricks_polling_seconds) == (0, 5)
    with pytest.raises(ValueError, match="CTR_IO_RETRIES='x' is not an integer"):
        dag_settings({"CTR_IO_RETRIES": "x"})
