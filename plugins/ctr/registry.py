"""MLflow model registry: one run and one version per DAG run, lineage tags, the champion pointer.

Works against any MLflow tracking URI: the local sqlite default, an MLflow server, an Azure ML
workspace (azureml-mlflow's `azureml://` URI) or Databricks. Rules:
  * a DAG run is identified by its run key tag (`ctr.run_key` = "<dag_id>/<logical date>"): the
    evaluation creates (or finds) one MLflow run with that tag, the metrics, metrics.json and the
    report; register adds the bundle to the same run and creates the version with the same tag;
  * a re-run finds its existing run and version by that tag and the data digest
    (`ctr.data_digest`: the fingerprints of every day trained and evaluated on); nothing ever looks
    up "the latest version". A re-run after the data was corrected (another digest) gets a new run
    and a new version tagged `ctr.supersedes=<old>`, and the old version `ctr.superseded_by=<new>`;
  * creation is create-then-reconcile: if two processes raced on the same key, the lowest version
    (earliest run) wins and the others are deleted; on sqlite a file lock serialises writers;
  * the champion is the alias `champion` where the registry has aliases, and the registered
    model tag `ctr.champion_version` always (Azure ML's registry has no aliases), both read
    through `champion()`; `promote` re-reads the verified versions after every write until the
    pointer names the newest verified logical date, so concurrent backfill runs converge.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

log = logging.getLogger(__name__)

RUN_KEY_TAG = "ctr.run_key"
DATA_DIGEST_TAG = "ctr.data_digest"
SUPERSEDES_TAG = "ctr.supersedes"
SUPERSEDED_BY_TAG = "ctr.superseded_by"
LOGICAL_DATE_TAG = "ctr.logical_date"
PROMOTED_TAG = "ctr.verified"
CHAMPION_ALIAS = "champion"
CHAMPION_TAG = "ctr.champion_version"
EXPERIMENT = "ctr_retrain"
MODEL_ARTIFACT_PATH = "model"
EVALUATION_ARTIFACT_PATH = "evaluation"
TAG_MAX = 5000
PROMOTE_ROUNDS = 6


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

    @property
    def run_key(self) -> str:
        return self.tags.get(RUN_KEY_TAG, "")


def _info(mv: Any) -> VersionInfo:
    return VersionInfo(mv.name, str(mv.version), mv.source, mv.run_id, dict(mv.tags or {}))


def _quoted(value: str) -> str:
    """A filter-string literal; run keys are "<dag_id>/<date>" and never need more than this."""
    if "'" in value:
        raise ValueError(f"run key {value!r} contains a quote; dag ids and dates never should")
    return f"'{value}'"


class Registry:
    @classmethod
    def from_settings(cls, s: Any) -> Registry:
        """The installation's registry as configured in `ctr.settings.Settings` (DAG tasks and the demo)."""
        return cls(s.tracking_uri, s.model_name, artifact_root=s.artifact_root, cache_dir=s.home / "registry-cache")

    def __init__(self, tracking_uri: str, model_name: str = "ctr-lightgbm", artifact_root: Path | None = None,
                 cache_dir: Path | None = None) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self.artifact_root = artifact_root
        self.cache_dir = cache_dir or Path(tempfile.gettempdir()) / "ctr-registry-cache"
        self._lock_path: Path | None = None
        self._lock_held = False
        self._experiment_id: str | None = None
        if tracking_uri.startswith("sqlite:///"):
            self._lock_path = Path(tracking_uri.removeprefix("sqlite:///")).with_suffix(".lock")
        with self._lock():  # a fresh sqlite file is migrated by the client's store: once, not racing
            self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            if self._lock_path is not None:  # build both sqlite stores now, inside the lock
                self.client.search_registered_models(max_results=1)

    # ---- helpers -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise writers of a local sqlite registry across processes; a no-op for servers."""
        if self._lock_path is None or self._lock_held:  # servers; or already held by this object (re-entry)
            yield
            return
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            self._lock_held = True
            try:
                yield
            finally:
                self._lock_held = False
                fcntl.flock(fh, fcntl.LOCK_UN)

    def experiment_id(self) -> str:
        """The `ctr_retrain` experiment's id, created on first use (cached)."""
        if self._experiment_id is None:
            self._experiment_id = self._find_or_create_experiment()
        return self._experiment_id

    def _find_or_create_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        with self._lock():
            exp = self.client.get_experiment_by_name(EXPERIMENT)
            if exp is not None:
                return exp.experiment_id
            location = self.artifact_root.resolve().as_uri() if self.artifact_root else None
            try:
                return self.client.create_experiment(EXPERIMENT, artifact_location=location)
            except MlflowException:  # created concurrently by another process
                exp = self.client.get_experiment_by_name(EXPERIMENT)
                if exp is None:
                    raise
                return exp.experiment_id

    def _ensure_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.model_name)
        except MlflowException:
            with contextlib.suppress(MlflowException):  # lost a creation race: fine, it exists now
                self.client.create_registered_model(self.model_name, description="Criteo CTR LightGBM (ctr_retrain DAG)")

    # ---- runs --------------------------------------------------------------------------
    def find_run(self, run_key: str, data_digest: str | None = None) -> str | None:
        """The MLflow run id of a DAG run's evaluation/registration (the earliest if a race left several);
        with `data_digest`, only a run on that data counts."""
        runs = self._runs(run_key, data_digest)
        return runs[0].info.run_id if runs else None

    def _runs(self, run_key: str, data_digest: str | None = None) -> list[Any]:
        runs = list(self.client.search_runs([self.experiment_id()], f"tags.`{RUN_KEY_TAG}` = {_quoted(run_key)}"))
        if data_digest is not None:
            runs = [r for r in runs if r.data.tags.get(DATA_DIGEST_TAG) == data_digest]
        return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    def ensure_run(self, run_key: str, tags: dict[str, Any] | None = None, data_digest: str | None = None) -> str:
        """Find or create the one MLflow run of `run_key` (on `data_digest`, when given); returns its run id.

        A run on other data is never reused: its artifacts are an earlier version's source."""
        from mlflow.exceptions import MlflowException

        found = self.find_run(run_key, data_digest)
        if found:
            return found
        exp = self.experiment_id()
        keys = {RUN_KEY_TAG: run_key, **({DATA_DIGEST_TAG: data_digest} if data_digest else {})}
        with self._lock():
            found = self.find_run(run_key, data_digest)
            if found:
                return found
            run = self.client.create_run(exp, tags={**{k: _tag(v) for k, v in (tags or {}).items()}, **keys},
                                         run_name=run_key.replace("/", "_"))
            self.client.set_terminated(run.info.run_id)
        runs = self._runs(run_key, data_digest)
        for dup in runs[1:]:  # lost a race on the same key (remote registries): keep the earliest
            log.warning("registry: duplicate run %s for %s; keeping %s", dup.info.run_id, run_key, runs[0].info.run_id)
            with contextlib.suppress(MlflowException):  # the other racer may have deleted it already
                self.client.delete_run(dup.info.run_id)
        log.info("registry: run %s created for %s", runs[0].info.run_id, run_key)
        return runs[0].info.run_id

    def log_evaluation(self, run_id: str, doc: dict[str, Any], files: list[Path]) -> None:
        """Metrics, gate decision and the report files (metrics.json, report.html, PNGs) on the run."""
        from mlflow.entities import Metric, RunTag

        from ctr.validation.gate import verdict

        now = int(time.time() * 1000)
        flat: dict[str, float] = {}
        for side in ("candidate", "baseline"):
            for k, v in (doc.get(side) or {}).items():
                flat[f"{side}_{k}"] = v
        for k, v in (doc.get("auc_diff") or {}).items():
            if k != "method":
                flat[f"auc_diff_{k}"] = v
        flat["rows"] = doc["rows"]
        drift = doc.get("drift")
        if drift:  # the largest feature PSI and the score PSI; every feature's PSI is in metrics.json
            flat["drift_max_feature_psi"] = max((v for v in drift["features"].values() if v == v), default=None)
            flat["drift_score_psi"] = drift.get("score_psi")
        g = doc["gate"]
        tags = {"gate.decision": verdict(g),
                "gate.passed": g["passed"], "gate.forced": g["forced"], "gate.reasons": g["reasons"],
                "holdout_day": doc.get("day"), "champion_at_eval": doc.get("baseline_version") or "none",
                "auc_diff.method": (doc.get("auc_diff") or {}).get("method", "none")}
        with self._lock():
            self.client.log_batch(
                run_id,
                metrics=[Metric(k, float(v), now, 0) for k, v in flat.items() if v is not None],
                tags=[RunTag(k, _tag(v)) for k, v in tags.items()],
            )
            for f in files:
                self.client.log_artifact(run_id, str(f), artifact_path=EVALUATION_ARTIFACT_PATH)

    # ---- versions ----------------------------------------------------------------------
    def find(self, run_key: str, data_digest: str | None = None) -> VersionInfo | None:
        """The version registered for a run key (on `data_digest`, when given), if any (the lowest when
        a race left several)."""
        found = self.versions_tagged(RUN_KEY_TAG, run_key)
        if data_digest is not None:
            found = [v for v in found if v.tags.get(DATA_DIGEST_TAG) == data_digest]
        return found[0] if found else None

    def versions_tagged(self, tag: str, value: str) -> list[VersionInfo]:
        """Versions of this model with tag == value, lowest version first (paged; never 'latest')."""
        from mlflow.exceptions import MlflowException

        try:
            out = self.search_versions(f"name = {_quoted(self.model_name)} and tags.`{tag}` = {_quoted(value)}")
        except MlflowException as e:  # registries that cannot filter on tags: filter here
            log.info("registry: tag filter unsupported (%s); filtering %s versions locally", type(e).__name__, self.model_name)
            out = [v for v in self.search_versions(f"name = {_quoted(self.model_name)}") if v.tags.get(tag) == value]
        return sorted(out, key=lambda v: int(v.version))

    def search_versions(self, flt: str) -> list[VersionInfo]:
        """Every model version matching the MLflow search filter `flt`, all pages."""
        out: list[VersionInfo] = []
        token = None
        while True:
            page = self.client.search_model_versions(flt, page_token=token)
            out += [_info(mv) for mv in page]
            token = page.token
            if not token:
                return out

    def get(self, version: str) -> VersionInfo:
        return _info(self.client.get_model_version(self.model_name, str(version)))

    def register(self, bundle_dir: Path, run_key: str, tags: dict[str, Any], metrics: dict[str, float],
                 run_id: str | None = None, data_digest: str | None = None) -> VersionInfo:
        """Register `bundle_dir` for `run_key` in the DAG run's MLflow run, or return the version already there.

        With `data_digest` the key is (run key, data digest): the same logical date on other data (a
        corrected re-delivery) gets a new version tagged `ctr.supersedes` = the run key's newest version,
        which is tagged `ctr.superseded_by` = the new one."""
        existing = self.find(run_key, data_digest)
        if existing:
            log.info("registry: %s already has version %s for %s on data %s; reusing it", self.model_name,
                     existing.version, run_key, (data_digest or "(any)")[:19])
            return existing
        self._ensure_model()
        rid = run_id or self.ensure_run(run_key, tags, data_digest)
        keys = {RUN_KEY_TAG: run_key, **({DATA_DIGEST_TAG: data_digest} if data_digest else {})}
        with self._lock():
            existing = self.find(run_key, data_digest)
            if existing:
                return existing
            earlier = self.versions_tagged(RUN_KEY_TAG, run_key)  # on other data: the newest is superseded
            previous = earlier[-1] if earlier else None
            all_tags = {k: _tag(v) for k, v in {**tags, **keys}.items()}
            if previous is not None:
                all_tags[SUPERSEDES_TAG] = previous.version
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(rid, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None])
            self.client.log_artifacts(rid, str(bundle_dir), artifact_path=MODEL_ARTIFACT_PATH)
            source = f"{self.client.get_run(rid).info.artifact_uri}/{MODEL_ARTIFACT_PATH}"
            mv = self.client.create_model_version(self.model_name, source=source, run_id=rid, tags=all_tags,
                                                  description=f"trained by {run_key}")
        winner = self.find(run_key, data_digest)
        if winner is None:
            raise RuntimeError(f"registry {self.tracking_uri}: version {mv.version} of {self.model_name} was created "
                               f"but is not found by tag {RUN_KEY_TAG}={run_key}; does the registry store version tags?")
        if winner.version != str(mv.version):  # lost a race on the same key (remote registries)
            log.warning("registry: duplicate version %s for %s; keeping %s", mv.version, run_key, winner.version)
            from mlflow.exceptions import MlflowException

            with contextlib.suppress(MlflowException):
                self.client.delete_model_version(self.model_name, str(mv.version))
        elif previous is not None:
            with self._lock():
                self.set_tags(previous.version, {SUPERSEDED_BY_TAG: winner.version})
            log.warning("registry: version %s for %s supersedes version %s (data %s -> %s)", winner.version, run_key,
                        previous.version, (previous.tags.get(DATA_DIGEST_TAG) or "unrecorded")[:19], (data_digest or "")[:19])
        log.info("registry: %s version %s registered for %s (run %s)", self.model_name, winner.version, run_key, rid)
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
        """The champion: alias `champion` where aliases exist, else the registered-model tag."""
        from mlflow.exceptions import MlflowException

        try:
            return _info(self.client.get_model_version_by_alias(self.model_name, CHAMPION_ALIAS))
        except (MlflowException, NotImplementedError):  # no such alias, or no aliases at all (Azure ML)
            pass
        try:
            rm = self.client.get_registered_model(self.model_name)
        except MlflowException:
            return None
        v = (rm.tags or {}).get(CHAMPION_TAG)
        return self.get(v) if v else None

    def baseline_for(self, day: str) -> tuple[VersionInfo | None, str]:
        """The model a candidate holding out `day` (ISO date) is scored against, and why that one.

        The champion, unless it holds out a later day: then it trained on `day` itself (a backfill
        of an older day) and would be scored on its own training rows. In that case the newest
        verified version holding out `day` or earlier (so trained only on days before it), or none
        (the candidate then meets the absolute thresholds alone).
        """
        champ = self.champion()
        if champ is None:
            return None, "no champion yet"
        if not champ.logical_date or champ.logical_date <= day:
            return champ, f"champion v{champ.version}"
        why = f"champion v{champ.version} holds out {champ.logical_date}, after {day}, so it trained on {day}"
        older = [v for v in self.versions_tagged(PROMOTED_TAG, "true") if v.logical_date and v.logical_date <= day]
        if not older:
            return None, f"{why}; no verified version trained before {day}: absolute thresholds only"
        best = max(older, key=lambda v: (v.logical_date, int(v.version)))
        return best, f"{why}; compared with v{best.version}, the newest verified version trained before {day}"

    def promote(self, version: str) -> VersionInfo:
        """Mark `version` verified and point the champion at the newest verified logical date.

        After each write the verified set is read again; the loop ends when the pointer already
        names the best version, so whichever of several concurrent promoters writes last leaves
        the right champion (each re-reads after its own write).
        """
        best: VersionInfo | None = None
        with self._lock():
            self.set_tags(version, {PROMOTED_TAG: "true"})
            for _ in range(PROMOTE_ROUNDS):
                verified = self.versions_tagged(PROMOTED_TAG, "true")
                best = max(verified, key=lambda v: (v.logical_date, int(v.version)))
                now = self.champion()
                if now is not None and now.version == best.version and self._tag_pointer() == best.version:
                    break
                self._point(best.version)
        assert best is not None
        if best.version != str(version):
            log.warning("promote: version %s verified, but version %s (logical date %s) is newer and stays champion",
                        version, best.version, best.logical_date)
        else:
            log.info("promote: champion -> %s version %s", self.model_name, version)
        return best

    def _tag_pointer(self) -> str | None:
        return (self.client.get_registered_model(self.model_name).tags or {}).get(CHAMPION_TAG)

    def _point(self, version: str) -> None:
        from mlflow.exceptions import MlflowException

        # An MLflow server's sqlite store inserts a new tag without an upsert: two writers of the
        # same tag can collide (UNIQUE constraint); the loser writes again.
        for attempt in range(1, 6):
            try:
                self.client.set_registered_model_tag(self.model_name, CHAMPION_TAG, str(version))
                break
            except MlflowException as e:
                if attempt == 5:
                    raise
                log.info("registry: champion tag write collided (%s); retry %d", str(e).splitlines()[0][:120], attempt)
                time.sleep(0.05 * attempt)
        try:
            self.client.set_registered_model_alias(self.model_name, CHAMPION_ALIAS, str(version))
        except (MlflowException, NotImplementedError) as e:  # Azure ML: no aliases; the tag stands
            log.info("registry has no aliases (%s); champion kept as tag %s", type(e).__name__, CHAMPION_TAG)


# ---- UI links --------------------------------------------------------------------------------
_AZUREML_WS = re.compile(r"/subscriptions/([^/]+)/resourceGroups/([^/]+)/providers/Microsoft\.MachineLearningServices/"
                         r"workspaces/([^/?]+)", re.IGNORECASE)


def ui_links(tracking_uri: str, ui_base: str, experiment_id: str | None, run_id: str | None,
             model_name: str | None = None, version: str | None = None) -> dict[str, str]:
    """Browser URLs of a run and a model version: {"run": ..., "model_version": ...} (empty when unknown).

    The page layout follows the tracking URI: Databricks (`databricks...`: /ml/...), Azure ML
    (`azureml://...`: ml.azure.com with the workspace id), else the MLflow UI's hash routes under
    `ui_base` (an MLflow server's own http(s) URI is its UI).
    """
    base = (ui_base or (tracking_uri if tracking_uri.startswith(("http://", "https://")) else "")).rstrip("/")
    out = {"run": "", "model_version": ""}
    ws = _AZUREML_WS.search(tracking_uri) if tracking_uri.startswith("azureml:") else None
    if ws:
        wsid = quote(f"/subscriptions/{ws[1]}/resourcegroups/{ws[2]}/workspaces/{ws[3]}", safe="")
        studio = base or "https://ml.azure.com"
        if run_id:
            out["run"] = f"{studio}/runs/{run_id}?wsid={wsid}"
        if model_name and version:
            out["model_version"] = f"{studio}/model/{quote(model_name)}:{version}/details?wsid={wsid}"
        return out
    if not base:
        return out
    if tracking_uri.startswith("databricks"):
        if experiment_id and run_id:
            out["run"] = f"{base}/ml/experiments/{experiment_id}/runs/{run_id}"
        if model_name and version:
            out["model_version"] = f"{base}/ml/models/{quote(model_name)}/versions/{version}"
        return out
    if experiment_id and run_id:
        out["run"] = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    if model_name and version:
        out["model_version"] = f"{base}/#/models/{quote(model_name)}/versions/{version}"
    return out


def _tag(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= TAG_MAX else s[: TAG_MAX - 3] + "..."
