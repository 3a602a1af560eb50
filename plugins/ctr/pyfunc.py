"""MLflow pyfunc loader module: `mlflow.pyfunc.load_model(bundle_dir)` lands here (no pickles)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class CtrPyfuncModel:
    def __init__(self, path: str) -> None:
        from ctr.bundle import Bundle

        self.bundle = Bundle.load(Path(path))

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        import pandas as pd

        from ctr.bundle import table_from_frame

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return self.bundle.predict_table(table_from_frame(df))


def _load_pyfunc(data_path: str) -> CtrPyfuncModel:
    return CtrPyfuncModel(data_path)


def write_mlmodel(bundle_dir: Path, model_uuid: str) -> None:
    """Write `MLmodel` so the bundle directory itself is an MLflow pyfunc model.

    `model_uuid` and the creation time are fixed by the caller so that the same training
    inputs give a byte-identical bundle (and so the same image digest).
    """
    import mlflow.pyfunc
    from mlflow.models import Model
    from mlflow.utils.environment import _PythonEnv

    m = Model(model_uuid=model_uuid, utc_time_created="1970-01-01 00:00:00.000000")
    mlflow.pyfunc.add_to_model(m, loader_module="ctr.pyfunc", data=".", python_env="python_env.yaml")
    _PythonEnv.current().to_yaml(str(bundle_dir / "python_env.yaml"))
    (bundle_dir / "requirements.txt").write_text(_serving_requirements())
    m.save(str(bundle_dir / "MLmodel"))


def _serving_requirements() -> str:
    from importlib.metadata import version

    names = ["lightgbm", "numpy", "pyarrow", "pandas", "mlflow"]
    return "".join(f"{n}=={version(n)}\n" for n in names)
