"""The environment of an isolated Airflow + CTR installation: this repo's DAGs and plugins, tmp homes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.conftest import REPO

BIN = Path(sys.executable).parent


def isolated_env(airflow_home: Path, ctr_home: Path, landing: Path, serve_port: int) -> dict[str, str]:
    """os.environ without AIRFLOW*/CTR_* variables, plus what points Airflow and ctr at the tmp homes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CTR_"))}
    env.update(
        AIRFLOW_HOME=str(airflow_home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(REPO / "plugins"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="True",
        CTR_HOME=str(ctr_home),
        CTR_LANDING=str(landing),
        CTR_SERVE_PORT=str(serve_port),
        CTR_IO_RETRIES="0",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env
