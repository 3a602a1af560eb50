"""The one configuration resolver of a DAG task: environment + Airflow Variables + Connections -> typed settings.

Every task calls `resolve(context)` and reads `.settings` (`Settings`), `.deploy` (`DeploySettings`),
`.databricks` (`DatabricksSettings`) or `.compute`. Each group is resolved on first use and kept
for the rest of the task (keyed by the task instance: a retry resolves afresh), so a task reads each
Variable at most once and nothing else in the package reads Variables or the environment for the DAG.

Precedence, lowest first: the field's default, `CTR_<FIELD>` in the environment, the Airflow Variable
`ctr_<field>` (`ctr_databricks_<field>` for Databricks), and for the run's choices the DAG params
(`image_builder`, `deploy_target`, `compute`; Variable `ctr_compute`, a deployment-wide switch, wins
over the param). An Azure landing zone's credentials come from the WASB connection (hooks.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import fields, replace
from functools import cached_property
from typing import Any

from ctr.settings import DatabricksSettings, DeploySettings, Settings

log = logging.getLogger("ctr.dag")

# Settings fields an Airflow Variable may set (tokens and seeds stay environment/param only)
SETTINGS_VARIABLES = ("home", "landing", "registry_uri", "mlflow_ui_url", "model_name", "serve_host", "serve_port")
DEPLOY_VARIABLES = tuple(f.name for f in fields(DeploySettings) if f.name not in ("image_builder", "deploy_target"))
COMPUTES = ("local", "databricks")


def variables(names: Iterable[str], prefix: str) -> dict[str, str]:
    """{`CTR_<NAME>`: value} of the Airflow Variables `ctr_<prefix><name>` that are set (none without a backend)."""
    out: dict[str, str] = {}
    try:
        from airflow.sdk import Variable

        for name in names:
            v = Variable.get(f"ctr_{prefix}{name}", default=None)
            if v not in (None, ""):
                out[f"CTR_{prefix.upper()}{name.upper()}"] = str(v)
    except Exception as e:  # no Variables backend reachable: environment only
        log.debug("Airflow Variables not read: %s", e)
    return out


class TaskConfig:
    """The settings of one task instance, each group resolved on first use."""

    def __init__(self, params: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> None:
        self.params = dict(params or {})
        self.env = dict(os.environ if env is None else env)

    @cached_property
    def settings(self) -> Settings:
        from ctr.airflow.hooks import azure_storage_env

        env = {**self.env, **variables(SETTINGS_VARIABLES, "")}
        values = azure_storage_env(env)
        if values:
            env.update(values)
            os.environ.update(values)  # read by ctr.data.azure_storage.storage_options in this task process
        return Settings.from_env(env)

    @cached_property
    def deploy(self) -> DeploySettings:
        d = DeploySettings.from_env({**self.env, **variables(DEPLOY_VARIABLES, "")})
        return replace(d, image_builder=str(self.params.get("image_builder") or d.image_builder),
                       deploy_target=str(self.params.get("deploy_target") or d.deploy_target))

    @cached_property
    def databricks(self) -> DatabricksSettings:
        names = [f.name for f in fields(DatabricksSettings)]
        return DatabricksSettings.from_env({**self.env, **variables(names, "databricks_")})

    @cached_property
    def compute(self) -> str:
        compute = variables(["compute"], "").get("CTR_COMPUTE") or str(self.params.get("compute", "local"))
        if compute not in COMPUTES:
            raise ValueError(f"compute={compute!r} (param or Variable ctr_compute): use local or databricks")
        return compute


_RESOLVED: dict[tuple[Any, ...], TaskConfig] = {}


def resolve(context: Mapping[str, Any]) -> TaskConfig:
    """This task instance's configuration (the same object for every call within one try of the task)."""
    ti = context.get("ti")
    key = None
    if ti is not None:
        key = tuple(getattr(ti, a, None) for a in ("dag_id", "run_id", "task_id", "map_index", "try_number"))
        if None not in key[:3] and key in _RESOLVED:
            return _RESOLVED[key]
    cfg = TaskConfig(context.get("params"))
    if key is not None and None not in key[:3]:
        _RESOLVED.clear()  # one task at a time per process: keep only the current one
        _RESOLVED[key] = cfg
    return cfg
