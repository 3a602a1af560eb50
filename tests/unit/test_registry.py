"""The MLflow registry against a real local sqlite store: idempotency, lineage, champion pointer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from ctr.registry import CHAMPION_ALIAS, CHAMPION_TAG, LOGICAL_DATE_TAG, RUN_KEY_TAG, Registry, ui_links
from mlflow.exceptions import RestException


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow sqlite store with its schema migrated once (migrations take seconds)."""
    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    Registry(f"sqlite:///{db}", "ctr-test").client.search_experiments(max_results=1)
    return db


@pytest.fixture
def reg(tmp_path: Path, migrated_db: Path) -> Registry:
    shutil.copyfile(migrated_db, tmp_path / "mlflow.db")
    return Registry(f"sqlite:///{tmp_path / 'mlflow.db'}", "ctr-test", artifact_root=tmp_path / "mlartifacts",
                    cache_dir=tmp_path / "cache")


def _bundle(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "model.txt").write_text(f"tree for {name}\n")
    (d / "features.json").write_text("{}")
    return d


def _register(reg: Registry, tmp_path: Path, day: str, **kw):
    return reg.register(_bundle(tmp_path, f"b{day}"), f"ctr_retrain/{day}", {LOGICAL_DATE_TAG: day, "dag_id": "ctr_retrain",
                        "gate_reasons": ["all rules passed"]}, {"candidate_auc": 0.78}, **kw)


def test_register_is_idempotent_per_run_key_and_keeps_lineage(reg: Registry, tmp_path: Path) -> None:
    v1 = _register(reg, tmp_path, "2026-11-19")
    again = reg.register(tmp_path / "b2026-11-19", "ctr_retrain/2026-11-19", {}, {})
    assert again.version == v1.version == "1"
    v2 = _register(reg, tmp_path, "2026-11-20")
    assert v2.version == "2"
    assert reg.find("ctr_retrain/2026-11-19") == reg.get("1")
    assert reg.find("ctr_retrain/2026-11-18") is None
    tags = reg.get("1").tags
    assert tags[RUN_KEY_TAG] == "ctr_retrain/2026-11-19" and tags["dag_id"] == "ctr_retrain"
    assert json.loads(tags["gate_reasons"]) == ["all rules passed"]
    local = reg.download("2")
    assert (local / "model.txt").read_text() == "tree for b2026-11-20\n"
    assert reg.client.get_run(v1.run_id).data.metrics["candidate_auc"] == 0.78


def test_evaluation_run_is_reused_by_register(reg: Registry, tmp_path: Path) -> None:
    rid = reg.ensure_run("ctr_retrain/2026-11-20", {"dag_id": "ctr_retrain"})
    assert reg.ensure_run("ctr_retrain/2026-11-20") == rid
    metrics = tmp_path / "metrics.json"
    metrics.write_text("{}")
    doc = {"rows": 10, "candidate": {"auc": 0.7, "logloss": 0.5}, "baseline": None, "auc_diff": None, "day": "2026-11-20",
           "gate": {"passed": False, "forced": False, "reasons": ["min_auc: candidate AUC 0.6900 vs floor 0.7000"]}}
    reg.log_evaluation(rid, doc, [metrics])
    run = reg.client.get_run(rid)
    assert run.data.tags["gate.decision"] == "REJECTED" and "min_auc" in run.data.tags["gate.reasons"]
    assert run.data.metrics["candidate_auc"] == 0.7 and run.data.metrics["rows"] == 10
    assert [a.path for a in reg.client.list_artifacts(rid, "evaluation")] == ["evaluation/metrics.json"]
    v = _register(reg, tmp_path, "2026-11-20", run_id=rid)
    assert v.run_id == rid
    assert {a.path for a in reg.client.list_artifacts(rid)} == {"evaluation", "model"}


def test_champion_moves_only_forward_in_logical_date(reg: Registry, tmp_path: Path) -> None:
    assert reg.champion() is None
    v19, v20 = _register(reg, tmp_path, "2026-11-19"), _register(reg, tmp_path, "2026-11-20")
    assert reg.promote(v20.version).version == v20.version
    assert str(reg.client.get_model_version_by_alias("ctr-test", CHAMPION_ALIAS).version) == v20.version
    # a backfill of an older day verifies later: it is verified but does not take the pointer
    assert reg.promote(v19.version).version == v20.version
    assert reg.champion().version == v20.version
    assert reg.get(v19.version).tags["ctr.verified"] == "true"
    assert reg.client.get_registered_model("ctr-test").tags[CHAMPION_TAG] == v20.version


def test_a_backfilled_day_is_compared_with_a_model_that_never_saw_it(reg: Registry, tmp_path: Path) -> None:
    assert reg.baseline_for("2026-11-20") == (None, "no champion yet")
    v18, v20 = _register(reg, tmp_path, "2026-11-18"), _register(reg, tmp_path, "2026-11-20")
    reg.promote(v20.version)
    # the champion holds out the 20th (trained on days before it): fair for the 20th and later
    assert reg.baseline_for("2026-11-20")[0].version == v20.version
    assert reg.baseline_for("2026-11-21")[0].version == v20.version
    # backfilling the 19th: the champion trained on the 19th, and v18 is not verified yet
    base, why = reg.baseline_for("2026-11-19")
    assert base is None and "trained on 2026-11-19" in why and "absolute thresholds only" in why
    reg.promote(v18.version)  # verified, champion unchanged
    assert reg.champion().version == v20.version
    base, why = reg.baseline_for("2026-11-19")
    assert base.version == v18.version and f"compared with v{v18.version}" in why
    assert reg.baseline_for("2026-11-17")[0] is None


def _no_aliases(*args, **kwargs):
    # what an alias call returns from Azure ML's MLflow registry (the endpoint does not exist)
    raise RestException({"error_code": "ENDPOINT_NOT_FOUND", "message": "No API found for alias"})


def test_registry_without_aliases_uses_the_tag_pointer(reg: Registry, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(reg.client, "set_registered_model_alias", _no_aliases)
    monkeypatch.setattr(reg.client, "get_model_version_by_alias", _no_aliases)
    v19, v20 = _register(reg, tmp_path, "2026-11-19"), _register(reg, tmp_path, "2026-11-20")
    assert reg.champion() is None
    reg.promote(v19.version)
    assert reg.champion().version == v19.version
    reg.promote(v20.version)
    assert reg.champion().version == v20.version
    assert reg.client.get_registered_model("ctr-test").tags[CHAMPION_TAG] == v20.version
    monkeypatch.undo()
    assert reg.client.get_registered_model("ctr-test").aliases == {}  # really no alias was written


def test_registry_without_tag_filters_filters_locally(reg: Registry, tmp_path: Path, monkeypatch) -> None:
    v = _register(reg, tmp_path, "2026-11-20")
    real = reg.client.search_model_versions

    def no_tag_filter(flt, **kw):
        if "tags." in flt:
            raise RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "unsupported filter"})
        return real(flt, **kw)

    monkeypatch.setattr(reg.client, "search_model_versions", no_tag_filter)
    assert reg.find("ctr_retrain/2026-11-20").version == v.version
    assert reg.find("ctr_retrain/2026-11-21") is None


def test_run_keys_with_quotes_are_refused(reg: Registry) -> None:
    with pytest.raises(ValueError, match="quote"):
        reg.find("ctr'/2026-11-20")


def test_ui_links_follow_the_tracking_uri() -> None:
    assert ui_links("sqlite:///x.db", "", "1", "abc", "ctr-lightgbm", "3") == {"run": "", "model_version": ""}
    assert ui_links("http://127.0.0.1:5000", "", "1", "abc", "ctr-lightgbm", "3") == {
        "run": "http://127.0.0.1:5000/#/experiments/1/runs/abc",
        "model_version": "http://127.0.0.1:5000/#/models/ctr-lightgbm/versions/3"}
    assert ui_links("sqlite:///x.db", "http://mlflow.internal/", "1", "abc")["run"] == "http://mlflow.internal/#/experiments/1/runs/abc"
    db = ui_links("databricks", "https://adb-1.azuredatabricks.net", "9", "r1", "ctr-lightgbm", "2")
    assert db == {"run": "https://adb-1.azuredatabricks.net/ml/experiments/9/runs/r1",
                  "model_version": "https://adb-1.azuredatabricks.net/ml/models/ctr-lightgbm/versions/2"}
    az = ui_links("azureml://westeurope.api.azureml.ms/mlflow/v1.0/subscriptions/sub1/resourceGroups/rg1/providers/"
                  "Microsoft.MachineLearningServices/workspaces/ws1", "", "e", "r1", "ctr-lightgbm", "2")
    wsid = "%2Fsubscriptions%2Fsub1%2Fresourcegroups%2Frg1%2Fworkspaces%2Fws1"
    assert az == {"run": f"https://ml.azure.com/runs/r1?wsid={wsid}",
                  "model_version": f"https://ml.azure.com/model/ctr-lightgbm:2/details?wsid={wsid}"}


def test_dag_tasks_carry_the_mlflow_extra_links() -> None:
    """The evaluate/register tasks serialise their extra links (what the Airflow UI reads) with the XCom keys
    the task runner stores the URLs under; the links read the URLs the tasks push."""
    import pendulum
    from airflow.sdk import DAG
    from airflow.serialization.serialized_objects import DagSerialization
    from ctr import airflow_links
    from ctr.airflow_links import MlflowModelVersionLink, MlflowRunLink, mlflow_model_task, mlflow_run_task

    with DAG("links_probe", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
        @mlflow_run_task
        def evaluate():
            return {}

        @mlflow_model_task(retries=0)
        def register(x):
            return {}

        register(evaluate())

    tasks = {t["__var"]["task_id"]: t["__var"] for t in DagSerialization.to_dict(dag)["dag"]["tasks"]}
    assert tasks["evaluate"]["_operator_extra_links"] == {"MLflow run": "_link_MlflowRunLink"}
    assert tasks["register"]["_operator_extra_links"] == {"MLflow run": "_link_MlflowRunLink",
                                                          "MLflow model version": "_link_MlflowModelVersionLink"}

    pushed = {}

    class TI:
        def xcom_push(self, key, value):
            pushed[key] = value

    airflow_links.push_links(TI(), {"run": "http://m/#/experiments/1/runs/r", "model_version": ""})
    assert pushed == {airflow_links.RUN_URL_KEY: "http://m/#/experiments/1/runs/r"}
    looked_up = []

    def stored(ti_key, key):
        looked_up.append(key)
        return pushed.get(key, "")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(airflow_links, "_stored_url", stored)
        assert MlflowRunLink().get_link(None, ti_key=object()) == "http://m/#/experiments/1/runs/r"
        assert MlflowModelVersionLink().get_link(None, ti_key=object()) == ""
    assert looked_up == [airflow_links.RUN_URL_KEY, airflow_links.MODEL_VERSION_URL_KEY]


def test_corrected_data_gets_a_new_version_that_supersedes_the_old(reg: Registry, tmp_path: Path) -> None:
    from ctr.registry import DATA_DIGEST_TAG, SUPERSEDED_BY_TAG, SUPERSEDES_TAG

    day, key = "2026-11-20", "ctr_retrain/2026-11-20"
    rid_a = reg.ensure_run(key, data_digest="sha256:aaa")
    v1 = reg.register(_bundle(tmp_path, "a"), key, {LOGICAL_DATE_TAG: day}, {}, run_id=rid_a, data_digest="sha256:aaa")
    assert reg.ensure_run(key, data_digest="sha256:aaa") == rid_a  # same data: same run, same version
    assert reg.register(tmp_path / "a", key, {}, {}, data_digest="sha256:aaa").version == v1.version
    rid_b = reg.ensure_run(key, data_digest="sha256:bbb")
    assert rid_b != rid_a, "a run on other data is never reused: its model/ artifacts are v1's source"
    v2 = reg.register(_bundle(tmp_path, "b"), key, {LOGICAL_DATE_TAG: day}, {}, run_id=rid_b, data_digest="sha256:bbb")
    assert v2.version != v1.version
    assert v2.tags[SUPERSEDES_TAG] == v1.version and v2.tags[DATA_DIGEST_TAG] == "sha256:bbb"
    old = reg.get(v1.version)
    assert old.tags[SUPERSEDED_BY_TAG] == v2.version and SUPERSEDES_TAG not in old.tags
    assert (reg.download(v1.version) / "model.txt").read_text() == "tree for a\n"  # v1's bundle intact
    assert (reg.download(v2.version) / "model.txt").read_text() == "tree for b\n"
    again = reg.register(tmp_path / "b", key, {}, {}, data_digest="sha256:bbb")  # a third run, unchanged data
    assert again.version == v2.version
    assert len(reg._search(RUN_KEY_TAG, key)) == 2
