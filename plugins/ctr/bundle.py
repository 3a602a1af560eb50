"""The model bundle: a directory with model.txt, features.json, metadata.json, probe.json, MLmodel.

No pickles: the booster is LightGBM's text format, the transform is JSON, and MLflow loads the
bundle through `ctr.pyfunc` (a loader module), so the same directory is an MLflow model.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctr.features import FeatureTransform
from ctr.schema import CAT_COLUMNS, INT_COLUMNS

REQUIRED_FILES = ("model.txt", "features.json", "metadata.json")
PROBE_TOLERANCE = 1e-12


class BundleError(ValueError):
    """The bundle cannot be used; the message names the file and the problem."""


def bundle_digest(path: Path) -> str:
    """sha256 over the files that define predictions (model, features)."""
    h = hashlib.sha256()
    for name in ("model.txt", "features.json"):
        h.update(name.encode())
        h.update(hashlib.sha256((Path(path) / name).read_bytes()).digest())
    return h.hexdigest()


@dataclass
class Bundle:
    path: Path
    booster: Any
    transform: FeatureTransform
    metadata: dict[str, Any]
    digest: str

    @property
    def version(self) -> str:
        """The registry version when registered, else the content digest's first 12 hex digits."""
        return str(self.metadata.get("model_version") or self.digest[:12])

    @classmethod
    def load(cls, path: str | Path, *, check_probe: bool = True) -> Bundle:
        import lightgbm as lgb

        p = Path(path)
        if not p.is_dir():
            raise BundleError(f"model bundle {p} is not a directory")
        for name in REQUIRED_FILES:
            if not (p / name).is_file():
                raise BundleError(f"model bundle {p} lacks {name}")
        try:
            booster = lgb.Booster(model_file=str(p / "model.txt"))
        except Exception as e:  # LightGBM raises LightGBMError with a C++ message
            raise BundleError(f"{p / 'model.txt'} is not a LightGBM model: {e}") from None
        try:
            transform = FeatureTransform.load(p / "features.json")
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            raise BundleError(f"{p / 'features.json'} is unusable: {e}") from None
        try:
            metadata = json.loads((p / "metadata.json").read_text())
        except json.JSONDecodeError as e:
            raise BundleError(f"{p / 'metadata.json'} is not JSON: {e}") from None
        if (p / "registry.json").is_file():  # written by build_image: the registry version it serves as
            reg = json.loads((p / "registry.json").read_text())
            metadata = {**metadata, "model_version": str(reg["version"]), "model_name": reg.get("name")}
        if booster.num_feature() != len(INT_COLUMNS) + len(CAT_COLUMNS):
            raise BundleError(f"{p / 'model.txt'} expects {booster.num_feature()} features, not 39")
        b = cls(path=p, booster=booster, transform=transform, metadata=metadata, digest=bundle_digest(p))
        if check_probe:
            b.check_probe()
        return b

    # ---- prediction ------------------------------------------------------------------
    def predict_matrix(self, x: np.ndarray, num_threads: int = 0) -> np.ndarray:
        if len(x) == 0:
            return np.empty(0, dtype=np.float64)
        return self.booster.predict(x, num_threads=num_threads)

    def predict_table(self, table: pa.Table) -> np.ndarray:
        return self.predict_matrix(self.transform.transform_table(table))

    def predict_rows(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        x = np.array([self.transform.row(r) for r in rows], dtype=np.float64).reshape(len(rows), -1)
        return self.predict_matrix(x, num_threads=1)

    # ---- self-check ------------------------------------------------------------------
    def check_probe(self) -> None:
        """Known inputs must give their recorded outputs (refuses a corrupt or mismatched bundle)."""
        probe_path = self.path / "probe.json"
        if not probe_path.exists():
            raise BundleError(f"model bundle {self.path} lacks probe.json (known inputs and outputs)")
        probe = json.loads(probe_path.read_text())
        got = self.predict_rows(probe["rows"])
        want = np.asarray(probe["probabilities"], dtype=np.float64)
        if got.shape != want.shape or not np.all(np.abs(got - want) <= PROBE_TOLERANCE):
            raise BundleError(
                f"model bundle {self.path} fails its probe: predictions differ from probe.json "
                f"(max |diff| {float(np.max(np.abs(got - want))) if got.shape == want.shape else 'shape'})"
            )


def write_probe(bundle_dir: Path, rows: list[dict[str, Any]], bundle: Bundle) -> None:
    probs = bundle.predict_rows(rows)
    (bundle_dir / "probe.json").write_text(json.dumps({"rows": rows, "probabilities": probs.tolist()}) + "\n")


def table_from_records(records: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Validated row dicts (absent/None = missing) -> Arrow table with I/C columns."""
    cols: dict[str, pa.Array] = {}
    for c in INT_COLUMNS:
        cols[c] = pa.array([r.get(c) for r in records], type=pa.float64())
    for c in CAT_COLUMNS:
        cols[c] = pc.utf8_lower(pa.array([r.get(c) for r in records], type=pa.string()))
    return pa.table(cols)


def table_from_frame(df: Any) -> pa.Table:
    """pandas DataFrame (MLflow pyfunc input) -> Arrow table with I/C columns; NaN = missing."""
    n = len(df)
    cols: dict[str, pa.Array] = {}
    for c in INT_COLUMNS:
        if c in df.columns:
            v = np.asarray(df[c].to_numpy(dtype=np.float64, na_value=np.nan), dtype=np.float64)
            cols[c] = pa.array(v, type=pa.float64(), from_pandas=True)
        else:
            cols[c] = pa.nulls(n, pa.float64())
    for c in CAT_COLUMNS:
        if c in df.columns:
            vals = [None if (v is None or (isinstance(v, float) and math.isnan(v))) else str(v) for v in df[c]]
            cols[c] = pc.utf8_lower(pa.array(vals, type=pa.string()))
        else:
            cols[c] = pa.nulls(n, pa.string())
    return pa.table(cols)
