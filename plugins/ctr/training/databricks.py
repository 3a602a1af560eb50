"""Databricks submission, pure parts: settings, cluster spec, libraries, idempotency token, artifacts.

No Airflow import (ctr.airflow.databricks is the Airflow-facing half). Everything here builds the
documented Jobs API 2.1/2.2 `runs/submit` payload or the files it points at:

  * the job script (`JOB_SCRIPT`, which runs `ctr.training.spark_entry` from the wheel) and the `ctr`
    wheel (`CTR_DATABRICKS_WHEEL`, else built from `CTR_DATABRICKS_SOURCE_DIR`, else from this
    package's own files) go to Workspace files under
    `<workspace_dir>/<content sha>/...` (Workspace `import` API, through the provider's hook): one
    JSON API the provider's connection already authenticates, paths a running job never sees
    change (content-addressed), and no DBFS root (disabled for libraries on recent runtimes);
  * SynapseML's LightGBM comes from Maven Central as a task-level library, the same pair the
    local Spark runs (Spark 3.5 / Scala 2.12 runtime, synapseml-lightgbm_2.12 1.1.3 with
    lightgbmlib 3.3.500; ctr.training.synapseml says why); autoscaling is off (fixed `num_workers`),
    as SynapseML's LightGBM needs a stable set of executors;
  * outputs go to an `abfss://` prefix the cluster reaches with its managed identity / service
    principal configured in the cluster's Spark conf (secrets referenced, never inlined).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from ctr.settings import DatabricksConfigError, DatabricksSettings

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the installed ctr package (not a repository layout)
JOB_SCRIPT = b'''"""ctr Spark training job (a spark_python_task): runs ctr.training.spark_entry from the shipped wheel."""
import sys

from ctr.training.spark_entry import main

sys.exit(main())
'''
# A wheel built from the package's own files: the package data patterns of the project's pyproject.toml.
WHEEL_PYPROJECT = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "ctr"
version = "{version}"
requires-python = ">=3.11"

[tool.setuptools.packages.find]
where = ["src"]
include = ["ctr*"]

[tool.setuptools.package-data]
ctr = ["**/*.txt", "**/*.yaml", "**/*.j2", "**/*.json", "**/Dockerfile"]
"""
MAX_TOKEN = 64


# ---- idempotency ---------------------------------------------------------------------------
def idempotency_token(dag_id: str, run_id: str, task_id: str) -> str:
    """Same for every try of one task in one DAG run (no try number), <= 64 chars as the API requires.

    Readable prefix plus a hash of the full triple, so long run ids cannot collide after truncation.
    """
    digest = hashlib.sha256(f"{dag_id}\x1f{run_id}\x1f{task_id}".encode()).hexdigest()[:40]
    prefix = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{dag_id}.{task_id}")[: MAX_TOKEN - len(digest) - 1]
    return f"{prefix}-{digest}"


# ---- cluster and libraries -------------------------------------------------------------------
def spark_major(spark_version: str) -> int:
    """Spark major version of a Databricks runtime key (15.4.x-scala2.12 -> 3, 17.3.x-scala2.13 -> 4)."""
    m = re.match(r"^(\d+)\.", spark_version)
    if not m:
        raise DatabricksConfigError(f"spark_version {spark_version!r} is not a Databricks runtime key like 15.4.x-scala2.12")
    return 4 if int(m.group(1)) >= 17 else 3


def synapseml_libraries(spark_version: str) -> list[dict[str, Any]]:
    """Task-level Maven libraries for the synapseml engine, from Maven Central (no `repo`): SynapseML's
    LightGBM for Spark 3.5 / Scala 2.12 with lightgbmlib swapped for the version the job needs.

    SynapseML publishes no Spark 4 / Scala 2.13 build on Maven Central, so other runtimes are refused."""
    from ctr.training.synapseml import LIGHTGBM_COORDINATES, LIGHTGBMLIB_COORDINATES, SCALA_BINARY, SPARK_LINE

    if spark_major(spark_version) != 3 or f"scala{SCALA_BINARY}" not in spark_version:
        raise DatabricksConfigError(
            f"spark_version {spark_version!r}: the synapseml engine runs on Spark {SPARK_LINE} / Scala {SCALA_BINARY} "
            f"runtimes (e.g. 16.4.x-scala{SCALA_BINARY}, 15.4.x-scala{SCALA_BINARY}), the line {LIGHTGBM_COORDINATES} "
            "is built for; set CTR_DATABRICKS_SPARK_VERSION to one of them or CTR_DATABRICKS_ENGINE=lightgbm")
    lightgbmlib = LIGHTGBMLIB_COORDINATES.rsplit(":", 1)[0]
    return [{"maven": {"coordinates": LIGHTGBM_COORDINATES, "exclusions": [lightgbmlib]}},
            {"maven": {"coordinates": LIGHTGBMLIB_COORDINATES}}]


def _pinned(dist: str) -> str:
    try:
        return f"{dist}=={importlib_metadata.version(dist)}"
    except importlib_metadata.PackageNotFoundError:
        return dist


def libraries(wheel_path: str, s: DatabricksSettings) -> list[dict[str, Any]]:
    """Task-level libraries (not inside new_cluster): the ctr wheel, LightGBM as pinned here, SynapseML."""
    libs: list[dict[str, Any]] = [{"whl": wheel_path}, {"pypi": {"package": _pinned("lightgbm")}}]
    if s.engine == "synapseml":
        libs += synapseml_libraries(s.spark_version)
    return libs


def new_cluster(s: DatabricksSettings) -> dict[str, Any]:
    """A job cluster: fixed size (no autoscale: SynapseML), Arrow on, storage via managed identity."""
    spark_major(s.spark_version)
    conf: dict[str, str] = {
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.shuffle.partitions": str(max(8, s.num_workers * s.executor_cores * 2)),
        # SynapseML: one LightGBM task per executor core set; barrier mode needs all slots at once
        "spark.task.cpus": "1",
        "spark.dynamicAllocation.enabled": "false",
    }
    if s.storage_account:
        acct = f"{s.storage_account}.dfs.core.windows.net"
        conf.update({
            f"fs.azure.account.auth.type.{acct}": "OAuth",
            f"fs.azure.account.oauth.provider.type.{acct}": "org.apache.hadoop.fs.azurebfs.oauth2.MsiTokenProvider",
        })
    for kv in filter(None, (x.strip() for x in s.spark_conf.split(";"))):
        k, sep, v = kv.partition("=")
        if not sep:
            raise DatabricksConfigError(f"CTR_DATABRICKS_SPARK_CONF entry {kv!r} is not key=value")
        conf[k.strip()] = v.strip()
    cluster: dict[str, Any] = {
        "spark_version": s.spark_version,
        "node_type_id": s.node_type_id,
        "num_workers": int(s.num_workers),
        "spark_conf": conf,
        "spark_env_vars": {"PYSPARK_PYTHON": "/databricks/python3/bin/python3"},
        "custom_tags": {"app": "ctr", "stage": "train"},
    }
    if s.policy_id:
        cluster["policy_id"] = s.policy_id
        cluster["apply_policy_default_values"] = True
    if s.single_user:
        cluster["data_security_mode"] = "SINGLE_USER"
        cluster["single_user_name"] = s.single_user
    if "autoscale" in cluster:  # defensive: never send both
        raise DatabricksConfigError("autoscale must stay off for SynapseML")
    return cluster


@dataclass(frozen=True)
class TrainRequest:
    """What the DAG run asks the job to do."""

    start: str
    end: str
    holdout: str
    out: str
    seed: int = 42
    params: dict[str, Any] = field(default_factory=dict)
    sample_fraction: float = 1.0
    max_bad_fraction: float = 0.001
    gate_params: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


def job_parameters(req: TrainRequest, s: DatabricksSettings) -> list[str]:
    import json

    if not s.landing:
        raise DatabricksConfigError("CTR_DATABRICKS_LANDING (Variable ctr_databricks_landing) is not set: the "
                                    "landing zone as the cluster sees it, e.g. abfss://landing@acct.dfs.core.windows.net/criteo")
    return ["--data", s.landing, "--from", req.start, "--to", req.end, "--holdout", req.holdout, "--out", req.out,
            "--engine", s.engine, "--seed", str(req.seed), "--executor-cores", str(s.executor_cores),
            "--sample-fraction", str(req.sample_fraction), "--max-bad-fraction", str(req.max_bad_fraction),
            "--params", json.dumps(req.params, sort_keys=True), "--gate-params", json.dumps(req.gate_params, sort_keys=True),
            "--metadata", json.dumps(req.metadata, sort_keys=True)]


def submit_payload(req: TrainRequest, s: DatabricksSettings, *, python_file: str, wheel: str, token: str,
                   run_name: str) -> dict[str, Any]:
    """The runs/submit body (single-task form: spark_python_task + new_cluster + task-level libraries)."""
    if len(token) > MAX_TOKEN:
        raise DatabricksConfigError(f"idempotency_token is {len(token)} chars; the Jobs API allows {MAX_TOKEN}")
    return {
        "run_name": run_name,
        "idempotency_token": token,
        "timeout_seconds": int(s.timeout_seconds),
        "new_cluster": new_cluster(s),
        "libraries": libraries(wheel, s),
        "spark_python_task": {"python_file": python_file, "parameters": job_parameters(req, s)},
    }


# ---- artifacts ----------------------------------------------------------------------------------
def file_sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _existing(path: str, setting: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DatabricksConfigError(f"{setting}={path!r} does not exist")
    return p


def wheel_source(s: DatabricksSettings | None = None) -> Path:
    """The `ctr` package folder the wheel is built from: `CTR_DATABRICKS_SOURCE_DIR`, else this package itself."""
    root = _existing(s.source_dir, "CTR_DATABRICKS_SOURCE_DIR") if s is not None and s.source_dir else PACKAGE_DIR
    if not (root / "__init__.py").is_file() or not (root / "training" / "spark_entry.py").is_file():
        raise DatabricksConfigError(f"CTR_DATABRICKS_SOURCE_DIR={str(root)!r} is not a ctr package folder "
                                    "(it needs __init__.py and training/spark_entry.py)")
    return root


def build_wheel(out_dir: Path, s: DatabricksSettings | None = None) -> Path:
    """The ctr wheel to ship, in `out_dir`: `CTR_DATABRICKS_WHEEL` as given, else `pip wheel --no-deps` of the
    package folder (`wheel_source`) with a generated pyproject (pure Python)."""
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    if s is not None and s.wheel:
        given = _existing(s.wheel, "CTR_DATABRICKS_WHEEL")
        if given.suffix != ".whl" or not zipfile.is_zipfile(given):
            raise DatabricksConfigError(f"CTR_DATABRICKS_WHEEL={s.wheel!r} is not a wheel (.whl zip)")
        target = out_dir / given.name
        shutil.copy2(given, target)
        return target
    root = wheel_source(s)
    m = re.search(r'^__version__ = "([^"]+)"', (root / "__init__.py").read_text(), re.M)
    with tempfile.TemporaryDirectory(prefix="ctr-wheel-") as build:
        # build from a clean copy: a build/ dir next to the sources can carry stale modules into the wheel
        src = Path(build) / "src"
        shutil.copytree(root, src / "src" / "ctr", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        (src / "pyproject.toml").write_text(WHEEL_PYPROJECT.format(version=m.group(1) if m else "0"))
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                               "-w", build, str(src)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the ctr wheel from {root} failed: {proc.stderr.strip()[-500:]}")
        wheels = sorted(Path(build).glob("ctr-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip wheel produced no ctr-*.whl under {build}")
        target = out_dir / wheels[0].name
        target.write_bytes(wheels[0].read_bytes())
    return target


def artifact_digest(wheel: Path) -> str:
    """sha256 over the job script and the wheel's members (names and contents, not zip timestamps):
    the workspace folder's content address, so an unchanged package ships nothing new."""
    h = hashlib.sha256(JOB_SCRIPT)
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            h.update(name.encode() + b"\0")
            h.update(hashlib.sha256(z.read(name)).digest())
    return h.hexdigest()


def artifact_paths(workspace_dir: str, wheel_name: str, digest: str) -> dict[str, str]:
    """Content-addressed workspace paths of the job file and the wheel."""
    base = f"{workspace_dir.rstrip('/')}/{digest[:16]}"
    return {"python_file": f"{base}/train_spark.py", "wheel": f"{base}/{wheel_name}", "dir": base}
