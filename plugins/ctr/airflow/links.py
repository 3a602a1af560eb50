"""Airflow operator extra links from the evaluate/register tasks to MLflow (run and model version pages).

Airflow 3 computes a task's extra links on the worker when the task finishes (the task runner's
`finalize` calls each link's `get_link` and stores the URL in XCom under `link.xcom_key`); the UI
then shows the stored URL as a button on the task instance. The task itself pushes the URLs
(`ctr.airflow.tasks.evaluate`/`register`, XCom keys below); the links read them back.

TaskFlow tasks get links through a subclass of the `@task` operator with `operator_extra_links`:
`@mlflow_run_task` (evaluate: "MLflow run") and `@mlflow_model_task` (register: "MLflow run" and
"MLflow model version"). Both behave exactly like `@task` otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from airflow.providers.standard.decorators.python import _PythonDecoratedOperator
from airflow.sdk import BaseOperatorLink
from airflow.sdk.bases.decorator import task_decorator_factory

RUN_URL_KEY = "mlflow_run_url"
MODEL_VERSION_URL_KEY = "mlflow_model_version_url"


def _stored_url(ti_key: Any, key: str) -> str:
    from airflow.sdk.execution_time.xcom import XCom

    return XCom.get_value(ti_key=ti_key, key=key) or ""


class MlflowRunLink(BaseOperatorLink):
    """The MLflow run of this DAG run (metrics, report.html, metrics.json, and after register the bundle)."""

    name = "MLflow run"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return _stored_url(ti_key, RUN_URL_KEY)


class MlflowModelVersionLink(BaseOperatorLink):
    """The registered model version of this DAG run (lineage tags, gate decision)."""

    name = "MLflow model version"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return _stored_url(ti_key, MODEL_VERSION_URL_KEY)


class MlflowRunTaskOperator(_PythonDecoratedOperator):
    operator_extra_links = (MlflowRunLink(),)


class MlflowModelTaskOperator(_PythonDecoratedOperator):
    operator_extra_links = (MlflowRunLink(), MlflowModelVersionLink())


def mlflow_run_task(python_callable: Callable | None = None, **kwargs: Any) -> Any:
    """`@task` with an "MLflow run" extra link (the task pushes XCom `mlflow_run_url`)."""
    return task_decorator_factory(python_callable=python_callable, decorated_operator_class=MlflowRunTaskOperator, **kwargs)


def mlflow_model_task(python_callable: Callable | None = None, **kwargs: Any) -> Any:
    """`@task` with "MLflow run" and "MLflow model version" extra links."""
    return task_decorator_factory(python_callable=python_callable, decorated_operator_class=MlflowModelTaskOperator, **kwargs)


def push_links(ti: Any, urls: dict[str, str]) -> None:
    """Push {"run": url, "model_version": url} for the links to pick up (empty URLs are skipped)."""
    for name, key in (("run", RUN_URL_KEY), ("model_version", MODEL_VERSION_URL_KEY)):
        if urls.get(name):
            ti.xcom_push(key=key, value=urls[name])
