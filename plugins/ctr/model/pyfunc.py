"""MLflow pyfunc loader module: `mlflow.pyfunc.load_model(bundle_dir)` lands here (no pickles)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class CtrPyfuncModel:
    def __init__(self, path: str) -> None:
        from ctr.model.bundle import Bundle

        self.bundle = Bundle.load(Path(path))

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        import pandas as pd

        from ctr.model.bundle import table_from_frame

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return self.bundle.predict_table(table_from_frame(df))


def _load_pyfunc(data_path: str) -> CtrPyfuncModel:
    return CtrPyfuncModel(data_path)


def write_mlmodel(bundle_dir: Path, model_uuid: str) -> None:
    """Write `MLmodel` so the bundle directory itself is an MLflow pyfunc model.

    Written as the YAML MLflow's `Model.save` produces for `pyfunc.add_to_model(loader_module=...)`,
    without importing mlflow (seconds of start-up in every training). `model_uuid` and the creation
    time are fixed by the caller so that the same training inputs give a byte-identical bundle
    (and so the same image digest). The parity test loads it with `mlflow.pyfunc.load_model`.
    """
    import platform

    mlmodel = (
        "flavors:\n"
        "  python_function:\n"
        "    data: .\n"
        "    env:\n"
        "      virtualenv: python_env.yaml\n"
        "    loader_module: ctr.model.pyfunc\n"
        f"    python_version: {platform.python_version()}\n"
        f"mlflow_version: {_version('mlflow')}\n"
        "model_id: null\n"
        f"model_uuid: {model_uuid}\n"
        "prompts: null\n"
        "utc_time_created: '1970-01-01 00:00:00.000000'\n"
    )
    python_env = (
        f"python: {platform.python_version()}\n"
        "build_dependencies:\n"
        + "".join(f"- {n}=={_version(n)}\n" for n in ("pip", "setuptools", "wheel") if _version(n))
        + "dependencies:\n- -r requirements.txt\n"
    )
    (bundle_dir / "python_env.yaml").write_text(python_env)
    (bundle_dir / "requirements.txt").write_text(_serving_requirements())
    (bundle_dir / "MLmodel").write_text(mlmodel)


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _serving_requirements() -> str:
    from importlib.metadata import version

    names = ["lightgbm", "numpy", "pyarrow", "pandas", "mlflow"]
    return "".join(f"{n}=={version(n)}\n" for n in names)
