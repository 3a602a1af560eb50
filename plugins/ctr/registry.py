"""MLflow model registry: one version per DAG run, lineage tags, the champion pointer.

Works against any MLflow tracking URI: the local sqlite default, an Azure ML workspace
(azureml-mlflow's `azureml://` URI) or Databricks. Rules:
  * a version is found by its run key tag (`ctr.run_key` = "<dag_id>/<logical date>"), so a
    re-run returns its existing version; nothing ever looks up "the latest version";
  * registration is create-then-reconcile: if two processes raced on the same key, the lowest
    version wins and the others are deleted;
  * the champion is the alias `champion` where the registry has aliases, and the registered
    model tag `ctr.champion_version` always (Azure ML's registry has no aliases), read through
    one function; promotion picks the newest logical date among verified versions, under a
    lock when the registry is local, so concurrent backfill runs converge on one champion.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_KEY_TAG = "ctr.run_key"
LOGICAL_DATE_TAG = "ctr.logical_date"
PROMOTED_TAG = "ctr.verified"
CHAMPION_ALIAS = "champion"
CHAMPION_TAG = "ctr.champion_version"
EXPERIMENT = "ctr_retrain"
TAG_MAX = 5000


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    source: str
    run_id: str | None
    tags: dict[str, str]

    @property
    def logical_date(self) -> str:
        return self.tags.get(LOGICAL_DATE_TAG, "")


def _info(mv: Any) -> VersionInfo:
    return VersionInfo(mv.name, str(mv.version), mv.source, mv.run_id, dict(mv.tags or {}))


class Registry:
    def __init__(self, tracking_uri: str, model_name: str = "ctr-lightgbm", artifact_root: Path | None = None,
                 cache_dir: Path | None = None) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self.artifact_root = artifact_root
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.cache_dir = cache_dir or Path(tempfile.gettempdir()) / "ctr-registry-cache"
        self._lock_path = None
        if tracking_uri.startswith("sqlite:///"):
            self._lock_path = Path(tracking_uri.removeprefix("sqlite:///")).with_suffix(".lock")

    # ---- helpers -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        if self._lock_path is None:
            yield
            return
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is not None:
            return exp.experiment_id
        location = self.artifact_root.resolve().as_uri() if self.artifact_root else None
        try:
            return self.client.create_experiment(EXPERIMENT, artifact_location=location)
        except MlflowException:  # created concurrently
            exp = self.client.get_experiment_by_name(EXPERIMENT)
            assert exp is not None
            return exp.experiment_id

    def _ensure_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.model_name)
        except MlflowException:
            with contextlib.suppress(MlflowException):
                self.client.create_registered_model(self.model_name, description="Criteo CTR LightGBM (ctr_retrain DAG)")

    # ---- versions ----------------------------------------------------------------------
    def find(self, run_key: str) -> VersionInfo | None:
        """The version registered for a run key, if any (the lowest when a race left several)."""
        found = self._search(f"tags.`{RUN_KEY_TAG}` = '{run_key}'")
        return found[0] if found else None

    def _search(self, tag_filter: str) -> list[VersionInfo]:
        flt = f"name = '{self.model_name}' and {tag_filter}"
        out = [_info(mv) for mv in self.client.search_model_versions(flt)]
        return sorted(out, key=lambda v: int(v.version))

    def get(self, version: str) -> VersionInfo:
        return _info(self.client.get_model_version(self.model_name, str(version)))

    def register(self, bundle_dir: Path, run_key: str, tags: dict[str, Any], metrics: dict[str, float]) -> VersionInfo:
        """Register `bundle_dir` for `run_key`, or return the version already registered for it."""
        existing = self.find(run_key)
        if existing:
            log.info("registry: %s already has version %s for %s; reusing it", self.model_name, existing.version, run_key)
            return existing
        self._ensure_model()
        all_tags = {k: _tag(v) for k, v in {**tags, RUN_KEY_TAG: run_key}.items()}
        with self._lock():
            existing = self.find(run_key)
            if existing:
                return existing
            run = self.client.create_run(self._experiment_id(), tags={RUN_KEY_TAG: run_key}, run_name=run_key.replace("/", "_"))
            rid = run.info.run_id
            for k, v in metrics.items():
                if v is not None:
                    self.client.log_metric(rid, k, float(v))
            self.client.log_artifacts(rid, str(bundle_dir), artifact_path="model")
            self.client.set_terminated(rid)
            mv = self.client.create_model_version(
                self.model_name, source=f"{run.info.artifact_uri}/model", run_id=rid, tags=all_tags,
                description=f"trained by {run_key}",
            )
        winner = self.find(run_key)
        assert winner is not None
        if winner.version != str(mv.version):  # lost a race on the same key (remote registries)
            log.warning("registry: duplicate version %s for %s; keeping %s", mv.version, run_key, winner.version)
            self.client.delete_model_version(self.model_name, str(mv.version))
        log.info("registry: %s version %s registered for %s", self.model_name, winner.version, run_key)
        return winner

    def set_tags(self, version: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(self.model_name, str(version), k, _tag(v))

    def download(self, version: str) -> Path:
        """A local copy of a version's bundle (cached by version)."""
        import mlflow.artifacts

        info = self.get(version)
        dest = self.cache_dir / self.model_name / str(version)
        if (dest / "model.txt").exists():
            return dest
        tmp = Path(tempfile.mkdtemp(prefix="ctr-dl-"))
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=info.source, dst_path=str(tmp), tracking_uri=self.tracking_uri)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                shutil.rmtree(dest)
            shutil.move(local, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    # ---- champion ----------------------------------------------------------------------
    def champion(self) -> VersionInfo | None:
        from mlflow.exceptions import MlflowException

        try:
            return _info(self.client.get_model_version_by_alias(self.model_name, CHAMPION_ALIAS))
        except MlflowException:
            pass
        except NotImplementedError:
            pass
        try:
            rm = self.client.get_registered_model(self.model_name)
        except MlflowException:
            return None
        v = (rm.tags or {}).get(CHAMPION_TAG)
        return self.get(v) if v else None

    def promote(self, version: str) -> VersionInfo:
        """Mark `version` verified and point the champion at the newest verified logical date."""
        with self._lock():
            self.set_tags(version, {PROMOTED_TAG: "true"})
            for _ in range(3):
                verified = self._search(f"tags.`{PROMOTED_TAG}` = 'true'")
                best = max(verified, key=lambda v: (v.logical_date, int(v.version)))
                self._point(best.version)
                now = self.champion()
                if now is not None and now.version == best.version:
                    break
        if best.version != str(version):
            log.warning("promote: version %s verified, but version %s (logical date %s) is newer and stays champion",
                        version, best.version, best.logical_date)
        else:
            log.info("promote: champion -> %s version %s", self.model_name, version)
        return best

    def _point(self, version: str) -> None:
        from mlflow.exceptions import MlflowException

        self.client.set_registered_model_tag(self.model_name, CHAMPION_TAG, str(version))
        try:
            self.client.set_registered_model_alias(self.model_name, CHAMPION_ALIAS, str(version))
        except (MlflowException, NotImplementedError) as e:  # Azure ML: no aliases; the tag stands
            log.info("registry has no aliases (%s); champion kept as tag %s", type(e).__name__, CHAMPION_TAG)


def _tag(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= TAG_MAX else s[: TAG_MAX - 3] + "..."
