"""Typed settings of the pipeline and the one parser that fills them from `CTR_*` environment variables.

`Settings` (paths, registry, service), `DeploySettings` (image builder and rollout target, ACR/AKS
names), `DatabricksSettings` (the Spark job's cluster), `SparkSettings` (a local or standalone Spark
session) and `SynapseMLSettings` (its network setup) are frozen dataclasses; `from_env` reads
`CTR_<FIELD>` (`CTR_DATABRICKS_`, `CTR_SPARK_`, `CTR_SYNAPSEML_<FIELD>` for those) through `parse_env`, the only environment
parser. Outside Airflow (`ctr` CLI, scoring image, Spark job) the environment is all there is; in a
DAG task `ctr.airflow.config` layers Airflow Variables and Connections on top, once per task. Secrets
are only ever read from the environment or a Connection, never logged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

PREDICTORS = ("auto", "lightgbm")  # CTR_PREDICTOR (ctr.serving.predictors)


def default_home(env: Mapping[str, str] | None = None) -> Path:
    """`CTR_HOME` from the environment (the Makefile exports the repo's `state/`), else `~/.ctr`."""
    raw = (os.environ if env is None else env).get("CTR_HOME", "")
    return Path(raw).expanduser().resolve() if raw else Path.home() / ".ctr"


def parse_env(cls: type[T], env: Mapping[str, str] | None = None, prefix: str = "CTR_",
              error: type[Exception] = ValueError) -> T:
    """An instance of dataclass `cls` from `<prefix><FIELD>` variables (unset or empty: the default).

    int fields must parse as integers, float fields as numbers, and Path fields are expanded and resolved; a bad value raises
    `error` naming the variable.
    """
    env = os.environ if env is None else env
    kw: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        name = f"{prefix}{f.name.upper()}"
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        if f.type in ("int", int):
            try:
                kw[f.name] = int(raw)
            except ValueError:
                raise error(f"{name}={raw!r} is not an integer") from None
        elif f.type in ("float", float):
            try:
                kw[f.name] = float(raw)
            except ValueError:
                raise error(f"{name}={raw!r} is not a number") from None
        elif f.type in ("Path", Path):
            kw[f.name] = Path(raw).expanduser().resolve()
        else:
            kw[f.name] = raw
    return cls(**kw)


_INT_RANGES = (("serve_port", 1, 65535), ("num_threads", 1, 1024), ("prediction_log_queue", 1, 10_000_000),
               ("prediction_log_rotate_rows", 1, 100_000_000), ("prediction_log_rotate_s", 1, 86_400))


@dataclass(frozen=True)
class Settings:
    """Where the pipeline keeps its state, which registry and landing zone it uses, how it serves."""

    home: Path = field(default_factory=default_home)
    # landing zone root: a local folder or an fsspec URL (abfs://container/prefix, az://...)
    landing: str = ""
    registry_uri: str = ""           # MLflow tracking/registry URI; default sqlite under home
    mlflow_ui_url: str = ""          # MLflow UI base for Airflow links; default: registry_uri when http(s)
    model_name: str = "ctr-lightgbm"
    serve_host: str = "127.0.0.1"
    serve_port: int = 8765
    serve_token: str = field(default="", repr=False)  # bearer token for the scoring API (secret)
    admin_token: str = field(default="", repr=False)  # token for the local service's swap endpoint
    seed: int = 42
    num_threads: int = 2
    # the scoring service's prediction log (ctr.serving.predlog): share of rows recorded, its sampling
    # seed, queue bound, and when a file is closed (rows, seconds)
    prediction_log_rate: float = 0.01
    prediction_log_seed: int = 0
    prediction_log_queue: int = 10_000
    prediction_log_rotate_rows: int = 100_000
    prediction_log_rotate_s: int = 60
    prediction_log_url: str = ""    # also upload closed files here: az://container/prefix (Blob; CTR_AZURE_* credentials)
    # the service's tree predictor (ctr.serving.predictors): "auto" compiles the model with lleaves off the
    # load path and switches to it once verified (LightGBM serves until then); "lightgbm" never compiles.
    # Compiled machine code is cached per model and CPU under predictor_cache (default home/cache/predictors).
    predictor: str = "auto"
    predictor_cache: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        s = parse_env(cls, env)
        for name, lo, hi in _INT_RANGES:
            v = getattr(s, name)
            if not lo <= v <= hi:
                raise ValueError(f"CTR_{name.upper()}={v} is out of range; it must be between {lo} and {hi}")
        if not 0.0 <= s.prediction_log_rate <= 1.0:  # NaN fails too
            raise ValueError(f"CTR_PREDICTION_LOG_RATE={s.prediction_log_rate} is out of range; it must be between 0 and 1 "
                             "(0 = off, 1.0 = every row)")
        if s.predictor not in PREDICTORS:
            raise ValueError(f"CTR_PREDICTOR={s.predictor!r} is not one of {', '.join(PREDICTORS)}")
        return s

    # Derived locations, all under `home` unless configured otherwise.
    @property
    def landing_root(self) -> str:
        return self.landing or str(self.home / "landing")

    @property
    def tracking_uri(self) -> str:
        return self.registry_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        return self.home / "mlartifacts"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def staging_dir(self) -> Path:
        return self.home / "staging"

    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    @property
    def serving_dir(self) -> Path:
        return self.home / "serving"

    @property
    def predictor_cache_dir(self) -> Path:
        """Compiled predictors' machine code, one file per (model sha256, host CPU)."""
        return Path(self.predictor_cache).expanduser().resolve() if self.predictor_cache else self.home / "cache" / "predictors"

    @property
    def predictions_dir(self) -> Path:
        """The prediction log's root: date=YYYY-MM-DD/part-*.jsonl.gz."""
        return self.home / "predictions"

    @property
    def serve_url(self) -> str:
        return f"http://{self.serve_host}:{self.serve_port}"


@dataclass(frozen=True)
class DeploySettings:
    """Which image builder and rollout target a run uses, and the Azure names they need (names, never secrets).

    `image_builder` / `deploy_target` are the DAG run's params; the rest are `CTR_<FIELD>`, overridden
    in Airflow by Variables `ctr_<field>`.
    """

    image_builder: str = "local"            # local | acr
    deploy_target: str = "local"            # local | aks
    azure_conn_id: str = "azure_default"    # Airflow Azure connection (service principal or managed identity)
    azure_subscription_id: str = ""         # when the connection has no extra subscriptionId
    acr_registry: str = ""
    acr_resource_group: str = ""
    aks_namespace: str = "ctr"
    aks_url: str = ""                       # how verify reaches the service (default: in-cluster DNS)
    aks_metrics_url: str = ""               # canary bake: every pod's /metrics summed (default: aks_url/metrics)
    kube_conn_id: str = ""                  # a cncf-kubernetes connection (wins over aks_cluster)
    aks_cluster: str = ""
    aks_resource_group: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DeploySettings:
        return parse_env(cls, env)


class DatabricksConfigError(ValueError):
    """A Databricks setting is missing or inconsistent; the message names the setting and the fix."""


@dataclass(frozen=True)
class DatabricksSettings:
    """`CTR_DATABRICKS_*` environment (in Airflow, Variables `ctr_databricks_*` on top)."""

    conn_id: str = "databricks_default"
    workspace_dir: str = "/Workspace/Shared/ctr"       # where the job file and wheel are imported
    landing: str = ""                                   # abfss:// landing zone as the cluster sees it
    output: str = ""                                    # abfss:// prefix for run outputs
    spark_version: str = "16.4.x-scala2.12"             # LTS, Spark 3.5.2 / Scala 2.12: SynapseML 1.1.3's line
    node_type_id: str = "Standard_D8ds_v5"
    num_workers: int = 4
    executor_cores: int = 8                             # cores of node_type_id (numThreads = this - 1)
    policy_id: str = ""
    engine: str = "synapseml"
    timeout_seconds: int = 4 * 3600
    polling_seconds: int = 30
    deferrable: str = "auto"                            # auto | true | false
    storage_account: str = ""                           # for the OAuth (managed identity) Spark conf
    spark_conf: str = ""                                # extra "k=v;k=v" cluster Spark conf
    single_user: str = ""                               # data_security_mode SINGLE_USER owner (UC)
    wheel: str = ""                                     # a built ctr wheel to ship; default: built from source_dir
    source_dir: str = ""                                # project root holding pyproject.toml and plugins/ctr

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DatabricksSettings:
        return parse_env(cls, env, prefix="CTR_DATABRICKS_", error=DatabricksConfigError)


class SparkConfigError(ValueError):
    """A `CTR_SPARK_*` / `CTR_SYNAPSEML_*` setting does not parse; the message names the variable."""


@dataclass(frozen=True)
class SparkSettings:
    """`CTR_SPARK_*`: the Spark session of `ctr train --engine spark|synapseml` outside Databricks (whose
    cluster is `DatabricksSettings`)."""

    master: str = "local[2]"     # local[N] or a standalone spark://host:7077
    driver_memory: str = "2g"    # local masters only
    conf: str = ""               # extra session conf, "k=v;k=v"
    jars_dir: str = ""           # the jars `make jars` fetched; "" = <venv>/share/ctr/jars

    def __post_init__(self) -> None:
        self.conf_pairs()  # a malformed CTR_SPARK_CONF fails when the settings are read, not deep in Spark

    def conf_pairs(self) -> dict[str, str]:
        """CTR_SPARK_CONF as {key: value}; an entry without `=` or with an empty key is an error naming it."""
        out: dict[str, str] = {}
        for entry in self.conf.split(";"):
            if not entry.strip():
                continue
            key, eq, value = entry.partition("=")
            if not eq or not key.strip():
                raise SparkConfigError(f"CTR_SPARK_CONF entry {entry.strip()!r} is not k=v (entries are separated by ';')")
            out[key.strip()] = value.strip()
        return out

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SparkSettings:
        return parse_env(cls, env, prefix="CTR_SPARK_", error=SparkConfigError)


@dataclass(frozen=True)
class SynapseMLSettings:
    """`CTR_SYNAPSEML_*`: SynapseML's LightGBM network setup."""

    timeout: float = 120.0   # seconds for LightGBM's network setup and each barrier sync
    listen_port: int = 0     # LightGBM's listen port base; 0 = a free base per job (single host) or 12400

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise SparkConfigError(f"CTR_SYNAPSEML_TIMEOUT={self.timeout!r} must be > 0 seconds")
        if not 0 <= self.listen_port <= 65535:
            raise SparkConfigError(f"CTR_SYNAPSEML_LISTEN_PORT={self.listen_port!r} is not a port (0 = per job)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SynapseMLSettings:
        return parse_env(cls, env, prefix="CTR_SYNAPSEML_", error=SparkConfigError)


@dataclass(frozen=True)
class DagSettings:
    """What the DAG file reads at parse time (`CTR_IO_RETRIES`: 0 for drills and tests)."""

    io_retries: int = 3
    databricks_polling_seconds: int = 30
    deadline_hours: float = 6.0  # DeadlineAlert: hours after a run is queued (a scheduled run: its interval's end)


def dag_settings(env: Mapping[str, str] | None = None) -> DagSettings:
    """The DAG file's parse-time settings from the environment (the one parser; no Airflow calls at parse time)."""
    return parse_env(DagSettings, env)
