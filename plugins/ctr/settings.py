"""Configuration resolved once from `CTR_*` environment variables into a typed object.

The DAG layers Airflow Variables/params on top (see ctr.airflow_tasks); everything else reads
`Settings.from_env()`. Secrets are only ever read from the environment, never logged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


def _default_home() -> Path:
    if (_REPO_ROOT / "dags").is_dir() and (_REPO_ROOT / "plugins").is_dir():
        return _REPO_ROOT / "state"
    return Path.home() / ".ctr"


_INT_RANGES = (("serve_port", 1, 65535), ("num_threads", 1, 1024))


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=_default_home)
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

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        kw: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"CTR_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            if f.name == "home":
                kw[f.name] = Path(raw).expanduser().resolve()
            elif f.type in ("int", int):
                try:
                    kw[f.name] = int(raw)
                except ValueError:
                    raise ValueError(f"CTR_{f.name.upper()}={raw!r} is not an integer") from None
            else:
                kw[f.name] = raw
        s = cls(**kw)  # type: ignore[arg-type]
        for name, lo, hi in _INT_RANGES:
            v = getattr(s, name)
            if not lo <= v <= hi:
                raise ValueError(f"CTR_{name.upper()}={v} is out of range; it must be between {lo} and {hi}")
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
    def images_dir(self) -> Path:
        return self.home / "images"

    @property
    def serving_dir(self) -> Path:
        return self.home / "serving"

    @property
    def serve_url(self) -> str:
        return f"http://{self.serve_host}:{self.serve_port}"
