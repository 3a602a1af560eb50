"""The DAG file imports cleanly, holds every task, and has the schedule and params the README promises."""

from __future__ import annotations

import datetime as dt

import pytest

from tests.conftest import REPO

TASKS = ["check_data", "train", "evaluate", "gate", "review", "register", "build_image", "rollout", "verify", "promote"]


@pytest.fixture(scope="module")
def dag():
    return _bag()["ctr_retrain"]


def _bag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags


DATABRICKS = ["databricks.choose_compute", "databricks.ship_to_databricks", "databricks.databricks_request",
              "databricks.train_databricks", "databricks.fetch_databricks_bundle"]


def test_tasks_present(dag):
    assert set(dag.task_ids) == set(TASKS) | set(DATABRICKS) | {"trained", "monitor"}


def test_the_compute_choice_and_databricks_tasks_are_one_group_between_check_data_and_trained(dag):
    group = dag.task_group.children["databricks"]
    assert sorted(group.children) == sorted(DATABRICKS)
    top = sorted(dag.task_group.children)  # what the grid shows at the top level
    assert top == sorted([*TASKS, "trained", "databricks", "monitor"])
    choose = dag.get_task("databricks.choose_compute")
    assert choose.upstream_task_ids == {"check_data", "monitor"}
    assert choose.downstream_task_ids == {"train", "databricks.ship_to_databricks"}
    assert dag.get_task("trained").upstream_task_ids == {"train", "databricks.fetch_databricks_bundle"}
    assert dag.get_task("databricks.fetch_databricks_bundle").upstream_task_ids == {
        "databricks.databricks_request", "databricks.train_databricks"}


def test_choose_compute_names_tasks_that_exist(dag, monkeypatch):
    from ctr.airflow.databricks import choose_compute

    monkeypatch.delenv("AIRFLOW_VAR_CTR_COMPUTE", raising=False)
    for compute in ("local", "databricks"):
        assert choose_compute({"params": {"compute": compute}}) in dag.get_task("databricks.choose_compute").downstream_task_ids


def test_order(dag):
    def downstream_closure(task_id):
        seen, todo = set(), [task_id]
        while todo:
            for t in dag.get_task(todo.pop()).downstream_task_ids:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return seen

    for before, after in zip(TASKS, TASKS[1:], strict=False):
        assert after in downstream_closure(before), f"{after} must run after {before}"


def test_schedule_and_limits(dag):
    from airflow.sdk import CronDataIntervalTimetable

    assert isinstance(dag.timetable, CronDataIntervalTimetable)
    assert dag.timetable.expression == "0 2 * * *"
    assert str(dag.timetable.timezone) == "UTC"
    assert dag.max_active_runs == 1
    assert not dag.catchup


def test_params_defaults(dag):
    p = {k: dag.params[k] for k in dag.params}
    assert p["train_days"] == 7
    assert p["compute"] == "local"
    for k in ("min_auc", "max_auc_drop", "max_logloss_rise", "max_ece", "force_deploy"):
        assert k in p


def test_io_tasks_retry_with_backoff(dag):
    t = dag.get_task("check_data")
    assert t.retry_exponential_backoff


def test_parse_time_imports_stay_light():
    import subprocess
    import sys

    code = (
        "import sys, runpy; runpy.run_path(sys.argv[1]);"
        "heavy = [m for m in ('lightgbm', 'mlflow', 'pyspark', 'pandas', 'ctr.training.trainer') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "dags" / "ctr_retrain.py")],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"the DAG file imports heavy modules at parse time: {out}"


def test_holdout_day_is_logical_date():
    from ctr.airflow.tasks import holdout_day, train_range

    class _Dag:
        dag_id = "ctr_retrain"

    ctx = {"logical_date": dt.datetime(2026, 11, 20, 2, 0, tzinfo=dt.UTC), "params": {"train_days": 7}, "dag": _Dag()}
    assert holdout_day(ctx) == dt.date(2026, 11, 20)
    assert train_range(ctx) == (dt.date(2026, 11, 13), dt.date(2026, 11, 19))


def test_plugins_folder_does_not_load_ctr_modules_as_plugins():
    """Airflow imports every .py under plugins/ by bare file name unless .airflowignore excludes it."""
    from airflow._shared.module_loading import find_path_from_directory

    files = [f for f in find_path_from_directory(str(REPO / "plugins"), ".airflowignore", "glob") if f.endswith(".py")]
    assert not [f for f in files if "/ctr/" in f], files


def test_promote_announces_the_champion_asset_that_schedules_ctr_batch_score(dag):
    from airflow.sdk import Asset

    champion = Asset(name="ctr_champion", uri="ctr://models/ctr-lightgbm/champion", group="model")
    assert dag.get_task("promote").outlets == [champion]
    assert [a.uri for a in dag.get_task("check_data").inlets] == ["ctr://landing/criteo-daily"]
    batch = _bag()["ctr_batch_score"]
    assert list(batch.timetable.asset_condition.objects) == [champion]
    assert batch.task_ids == ["champion", "score"] and batch.get_task("score").upstream_task_ids == {"champion"}


def test_the_monitor_runs_before_training_on_either_compute(dag) -> None:
    assert dag.get_task("monitor").upstream_task_ids == set()
    assert "monitor" in dag.get_task("databricks.choose_compute").upstream_task_ids
    assert "databricks.choose_compute" in dag.get_task("train").upstream_task_ids
