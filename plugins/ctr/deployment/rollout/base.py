"""The one rollout interface: `Release` in, `RolloutResult` out, and the verification every target shares.

A target (local.LocalRollout, aks.AksRollout) is a `Rollout`: `deploy(release)`, `verify(release, rows)`,
`rollback(failed, deployed)` and `current()`, the same signatures everywhere, so the tasks never ask
which target they drive; `ctr.deployment.factory.rollout` picks one from the settings.
"""

from __future__ import annotations

import csv
import logging
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx
import pyarrow as pa

from ctr.data.tsv import to_tsv_bytes
from ctr.schema import ALL_COLUMNS, FEATURE_COLUMNS

log = logging.getLogger(__name__)

VERIFY_TOLERANCE = 1e-9


class RolloutError(RuntimeError):
    """A rollout, verification or rollback failed; the message names the target and the cause."""


@dataclass(frozen=True)
class Release:
    """One model version as a target receives it: the served bundle and, once pushed, its image."""

    version: str
    bundle: Path               # the bundle exactly as the image holds it (the build context's model/)
    image: str | None = None   # the pushed image reference (None: built locally or not at all)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "bundle": str(self.bundle), "image": self.image}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Release:
        return cls(str(d["version"]), Path(d["bundle"]), d.get("image"))


@dataclass(frozen=True)
class RolloutResult:
    url: str
    version: str
    previous_version: str | None
    previous_ref: str | None     # previous bundle path (local) or image (AKS)
    changed: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RolloutResult:
        return cls(str(d["url"]), str(d["version"]), d.get("previous_version"), d.get("previous_ref"),
                   bool(d.get("changed", True)))


@runtime_checkable
class Rollout(Protocol):
    """A place the scoring service runs (the local process, an AKS Deployment)."""

    target: str
    url: str

    def deploy(self, release: Release) -> RolloutResult:
        """Make `release` the served version (idempotent: already serving it is `changed=False`)."""
        ...

    def verify(self, release: Release, rows: pa.Table, token: str = "") -> dict[str, Any]:
        """Check the live endpoint serves `release` and scores `rows` as `ctr score` does (RolloutError if not)."""
        ...

    def rollback(self, failed: Release, deployed: RolloutResult | None = None) -> RolloutResult | None:
        """Undo `deployed` (what `deploy(failed)` returned): put the version before it back, if `failed` is
        still what is served. None when there was nothing to go back to."""
        ...

    def current(self) -> dict[str, Any] | None:
        """What the target serves now ({"version", ...}), or None when nothing runs."""
        ...


def verify_endpoint(url: str, version: str, bundle_dir: Path, rows: pa.Table, token: str = "") -> dict[str, Any]:
    """The live endpoint must report `version` and reproduce `ctr score` on `rows` within 1e-9."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    ready = httpx.get(f"{url}/readyz", timeout=10).json()
    if str(ready.get("model_version")) != str(version):
        raise RolloutError(f"verify: {url}/readyz reports version {ready.get('model_version')!r}, expected {version!r}")
    records = [{k: v for k, v in r.items() if v is not None and k in FEATURE_COLUMNS} for r in rows.to_pylist()]
    r = httpx.post(f"{url}/v1/score", json={"rows": records}, headers=headers, timeout=30)
    if r.status_code != 200:
        raise RolloutError(f"verify: {url}/v1/score answered HTTP {r.status_code}: {r.text[:300]}")
    live = r.json()
    if str(live.get("model_version")) != str(version):
        raise RolloutError(f"verify: scores came from version {live.get('model_version')!r}, expected {version!r}")
    offline = _ctr_score(bundle_dir, rows)
    diffs = [abs(a - b) for a, b in zip(live["probabilities"], offline, strict=True)]
    worst = max(diffs) if diffs else 0.0
    if len(live["probabilities"]) != len(offline) or worst > VERIFY_TOLERANCE:
        raise RolloutError(f"verify: live scores differ from `ctr score` by up to {worst:.3g} (> {VERIFY_TOLERANCE})")
    log.info("verify: %s serves version %s; %d rows match `ctr score` (max |diff| %.3g)", url, version, len(diffs), worst)
    return {"url": url, "version": str(version), "rows": len(diffs), "max_abs_diff": worst}


def _ctr_score(bundle_dir: Path, rows: pa.Table) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="ctr-verify-") as d:
        src, out = Path(d) / "rows.tsv", Path(d) / "scores.csv"
        src.write_bytes(to_tsv_bytes(rows.select(ALL_COLUMNS)))
        subprocess.run([sys.executable, "-m", "ctr.cli", "score", "--model", str(bundle_dir), "--input", str(src),
                        "--output", str(out)], check=True, capture_output=True, text=True)
        with open(out) as fh:
            return [float(r["probability"]) for r in csv.DictReader(fh)]
