"""The Airflow-facing half of training on Databricks: hook, operator, and the small tasks around it.

DAG shape: the TaskGroup `databricks` holds the compute choice and the four Databricks tasks:
    databricks.choose_compute -> databricks.ship_to_databricks -> .databricks_request -> .train_databricks
                              -> train (compute = local)            .fetch_databricks_bundle -> trained (join)
`train_databricks` is the provider's DatabricksSubmitRunOperator (idempotency token, run-page link,
on_kill cancel, crash-safe reconnect), deferrable when the deployment runs a triggerer.

Imported by the DAG file at parse time: keep module-level imports to Airflow and the provider.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from airflow.providers.databricks.exceptions import DatabricksApiError
from airflow.providers.databricks.hooks.databricks import DatabricksHook
from airflow.providers.databricks.operators.databricks import DatabricksSubmitRunOperator

log = logging.getLogger("ctr.dag.databricks")

GROUP_ID = "databricks"  # the DAG's TaskGroup holding choose_compute and the four tasks below
TRAIN_TASK_ID = f"{GROUP_ID}.train_databricks"
TOKEN_TASK_NAME = "train_databricks"  # in the idempotency token: unchanged since the tasks moved into the group
WORKSPACE_IMPORT = ("POST", "2.0/workspace/import")
WORKSPACE_MKDIRS = ("POST", "2.0/workspace/mkdirs")
WORKSPACE_GET_STATUS = ("GET", "2.0/workspace/get-status")


# ---- hook -------------------------------------------------------------------------------------
class CtrDatabricksHook(DatabricksHook):
    """The provider's hook plus the Workspace calls that ship the job file and the wheel."""

    def workspace_exists(self, path: str) -> bool:
        try:
            self._do_api_call(WORKSPACE_GET_STATUS, {"path": path})
            return True
        except DatabricksApiError as e:
            if e.http_status_code == 404:
                return False
            raise

    def workspace_mkdirs(self, path: str) -> None:
        self._do_api_call(WORKSPACE_MKDIRS, {"path": path})

    def workspace_import(self, path: str, content: bytes, *, overwrite: bool = True) -> None:
        """Import a file (format AUTO: a .py without the notebook header and a .whl stay files)."""
        self._do_api_call(WORKSPACE_IMPORT, {"path": path, "format": "AUTO", "overwrite": overwrite,
                                             "content": base64.b64encode(content).decode("ascii")})


# ---- operator ---------------------------------------------------------------------------------
class CtrDatabricksSubmitRunOperator(DatabricksSubmitRunOperator):
    """DatabricksSubmitRunOperator deciding deferrable mode at run time (setting ctr_databricks_deferrable:
    auto = Airflow's [operators] default_deferrable, which deployments with a triggerer turn on)."""

    def execute(self, context: Any):
        self.deferrable = resolve_deferrable(databricks_settings(context).deferrable, self.deferrable)
        log.info("train_databricks: deferrable=%s polling=%ss", self.deferrable, self.polling_period_seconds)
        return super().execute(context)


def resolve_deferrable(setting: str, default: bool) -> bool:
    v = str(setting).strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    if v in ("", "auto"):
        return bool(default)
    raise ValueError(f"ctr_databricks_deferrable={setting!r}: use auto, true or false")


# ---- configuration -------------------------------------------------------------------------------
def databricks_settings(context: dict[str, Any]):
    """This task's DatabricksSettings (CTR_DATABRICKS_* environment, Variables ctr_databricks_<field>; config.py)."""
    from ctr.airflow.config import resolve

    return resolve(context).databricks


def choose_compute(context: dict[str, Any]) -> str:
    """Branch: Variable ctr_compute (a deployment-wide switch) wins over the run's param `compute`."""
    from ctr.airflow.config import resolve

    compute = resolve(context).compute
    log.info("compute=%s", compute)
    return "train" if compute == "local" else f"{GROUP_ID}.ship_to_databricks"


# ---- tasks -----------------------------------------------------------------------------------------
def ship(context: dict[str, Any]) -> dict[str, Any]:
    """Build (or take) the ctr wheel and import it with the job script under a content-addressed workspace dir."""
    from ctr.training.databricks import JOB_SCRIPT, artifact_digest, artifact_paths, build_wheel

    s = databricks_settings(context)
    hook = CtrDatabricksHook(s.conn_id)
    with tempfile.TemporaryDirectory(prefix="ctr-ship-") as tmp:
        wheel = build_wheel(Path(tmp), s)
        digest = artifact_digest(wheel)
        paths = artifact_paths(s.workspace_dir, wheel.name, digest)
        if hook.workspace_exists(paths["wheel"]) and hook.workspace_exists(paths["python_file"]):
            log.info("ship: %s already holds this code (sha %s); not re-importing", paths["dir"], digest[:16])
        else:
            hook.workspace_mkdirs(paths["dir"])
            hook.workspace_import(paths["python_file"], JOB_SCRIPT)
            hook.workspace_import(paths["wheel"], wheel.read_bytes())
            log.info("ship: imported %s (%d bytes) and %s", paths["wheel"], wheel.stat().st_size, paths["python_file"])
    return {"python_file": paths["python_file"], "wheel": paths["wheel"], "digest": digest}


def output_prefix(context: dict[str, Any], s) -> str:
    from ctr.airflow.tasks import holdout_day
    from ctr.training.databricks import DatabricksConfigError

    if not s.output:
        raise DatabricksConfigError("CTR_DATABRICKS_OUTPUT (Variable ctr_databricks_output) is not set: an abfss:// "
                                    "prefix the cluster can write, e.g. abfss://models@acct.dfs.core.windows.net/ctr/runs")
    return f"{s.output.rstrip('/')}/{context['dag'].dag_id}/{holdout_day(context).isoformat()}"


def request(context: dict[str, Any], shipped: dict[str, Any]) -> dict[str, Any]:
    """The runs/submit JSON for this DAG run (fed to the operator's templated `json` through XCom)."""
    from ctr.airflow.tasks import holdout_day, settings, train_spec
    from ctr.training.databricks import TrainRequest, idempotency_token, submit_payload

    s = databricks_settings(context)
    p = context["params"]
    spec = train_spec(context, settings(context))
    dag_id, run_id = context["dag"].dag_id, context["run_id"]
    # A failed run keeps its token's run forever; dag_run.conf {"databricks_attempt": n} asks for a new one.
    attempt = int((getattr(context.get("dag_run"), "conf", None) or {}).get("databricks_attempt", 0))
    token = idempotency_token(dag_id, run_id if not attempt else f"{run_id}#{attempt}", TOKEN_TASK_NAME)
    gate_keys = ("min_auc", "max_auc_drop", "max_logloss_rise", "max_ece", "force_deploy")
    req = TrainRequest(start=spec["from"], end=spec["to"], holdout=holdout_day(context).isoformat(),
                       out=output_prefix(context, s), seed=spec["seed"], params=spec["params"],
                       sample_fraction=spec["sample_fraction"], max_bad_fraction=float(p.get("max_bad_fraction", 0.001)),
                       gate_params={k: p[k] for k in gate_keys if k in p},
                       metadata={"dag_id": dag_id, "run_id": run_id, "holdout_day": holdout_day(context).isoformat()})
    payload = submit_payload(req, s, python_file=shipped["python_file"], wheel=shipped["wheel"], token=token,
                             run_name=f"ctr_retrain {holdout_day(context).isoformat()}")
    log.info("databricks_request: token=%s cluster=%s x%d %s out=%s", token, s.node_type_id, s.num_workers,
             s.spark_version, req.out)
    return payload


def _copy_tree(src: str, dst: Path) -> None:
    """Copy a local folder or an abfss:// prefix (adlfs, credentials from CTR_AZURE_*) to `dst`."""
    if dst.exists():
        shutil.rmtree(dst)
    if "://" in src and not src.startswith("file://"):
        import fsspec

        from ctr.data.azure_storage import storage_options

        protocol = src.split("://", 1)[0]
        fs = fsspec.filesystem(protocol, **storage_options(protocol))
        fs.get(src.rstrip("/") + "/", str(dst), recursive=True)
        return
    shutil.copytree(Path(src.removeprefix("file://")), dst)


def fetch(context: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """Bring the job's bundle (and its cluster-side metrics) into this run's folder for evaluate."""
    from ctr.airflow.tasks import run_dir, settings
    from ctr.model.bundle import Bundle

    out = payload["spark_python_task"]["parameters"][payload["spark_python_task"]["parameters"].index("--out") + 1]
    local = run_dir(context, settings(context)) / "candidate"
    _copy_tree(f"{out}/model", local)
    b = Bundle.load(local)  # refuses a bundle that fails its own probe
    ti = context["ti"]
    run_id = ti.xcom_pull(task_ids=TRAIN_TASK_ID, key="run_id")
    url = ti.xcom_pull(task_ids=TRAIN_TASK_ID, key="run_page_url")
    cluster_metrics = None
    try:
        _copy_tree(out, run_dir(context, settings(context)) / "databricks")
        m = json.loads((run_dir(context, settings(context)) / "databricks" / "metrics.json").read_text())
        cluster_metrics = {"auc": m["candidate"]["auc"], "logloss": m["candidate"]["logloss"], "gate": m["gate"]["passed"]}
    except (OSError, KeyError, json.JSONDecodeError) as e:
        log.warning("fetch: no cluster-side metrics.json under %s: %s", out, e)
    log.info("fetch: bundle %s (version %s) from Databricks run %s %s; cluster metrics %s", local, b.version, run_id,
             url, cluster_metrics)
    return {"bundle": str(local), "databricks_run_id": run_id, "run_page_url": url, "cluster_metrics": cluster_metrics}


def join(local: dict[str, Any] | None, remote: dict[str, Any] | None) -> dict[str, Any]:
    """What evaluate gets, whichever path trained: {"bundle": <local bundle dir>, ...}."""
    chosen = local or remote
    if not chosen or "bundle" not in chosen:
        raise RuntimeError("neither train nor fetch_databricks_bundle produced a bundle; see the upstream task logs")
    return chosen
