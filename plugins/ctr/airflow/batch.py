"""What the `ctr_batch_score` DAG's tasks do: the champion from the triggering asset event, then `ctr score` of a folder.

The run scores every request file (`*.tsv[.gz]`, `*.csv[.gz]`, `*.txt[.gz]`; names starting with `.` or `_`
are skipped) in `requests` (param; default `$CTR_HOME/batch/requests`) with the champion version the
event names, one `ctr score` subprocess per file, into `<output>/<version>/` (param output; default
`$CTR_HOME/batch/scores`): `<file stem>.scores.csv` per input (row, probability, reason) next to
`manifest.json` (version, AUC, logical date, image, the event's source run, and per file its sha256,
rows scored and rows rejected). The folder is written aside and renamed into place, so a reader sees a
whole result or none; the same version over the same inputs is not scored twice.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("ctr.dag")


def champion(context: dict[str, Any]) -> dict[str, Any]:
    """The champion this run scores with: the triggering `ctr://models/<name>/champion` event's extra, checked."""
    from airflow.sdk.exceptions import AirflowFailException

    from ctr.airflow.assets import champion_from_events

    try:
        extra = champion_from_events(context.get("triggering_asset_events") or {})
    except ValueError as e:  # a malformed or absent event does not get better by retrying
        raise AirflowFailException(f"ctr_batch_score: {e}") from e
    log.info("champion: %s version %s (AUC %s, logical date %s, image %s) from %s/%s", extra.get("model_name"),
             extra["version"], extra["auc"], extra["logical_date"], extra["image"], extra["source_dag_id"],
             extra["source_run_id"])
    return extra


def request_files(folder: Path) -> list[Path]:
    from ctr.data.landing import DATA_SUFFIXES

    if not folder.is_dir():
        raise FileNotFoundError(f"ctr_batch_score: request folder {folder} does not exist (param requests)")
    files = sorted(f for f in folder.iterdir()
                   if f.is_file() and f.name.endswith(DATA_SUFFIXES) and not f.name.startswith((".", "_")))
    if not files:
        raise FileNotFoundError(f"ctr_batch_score: no request files ({', '.join(DATA_SUFFIXES)}) under {folder}")
    return files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stem(name: str) -> str:
    for suffix in (".gz", ".tsv", ".csv", ".txt"):
        name = name.removesuffix(suffix)
    return name


def score(context: dict[str, Any], champ: dict[str, Any]) -> dict[str, Any]:
    """Score the request folder with the champion's bundle through `ctr score`; write outputs and manifest.json."""
    from ctr.airflow.tasks import _registry, settings

    s = settings(context)
    p = context["params"]
    requests = Path(p.get("requests") or s.home / "batch" / "requests")
    out_root = Path(p.get("output") or s.home / "batch" / "scores")
    version = str(champ["version"])
    files = request_files(requests)
    inputs = [{"input": str(f), "sha256": _sha256(f), "bytes": f.stat().st_size} for f in files]
    final = out_root / version
    manifest_path = final / "manifest.json"
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if [(f["input"], f["sha256"]) for f in old["files"]] == [(f["input"], f["sha256"]) for f in inputs]:
            log.info("score: version %s already scored these %d request file(s) into %s; reusing it", version,
                     len(files), final)
            return {"version": version, "output": str(final), "manifest": str(manifest_path), "reused": True}
    bundle = _registry(s).download(version)
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = out_root / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for f in inputs:
            out = tmp / f"{_stem(Path(f['input']).name)}.scores.csv"
            cmd = [sys.executable, "-m", "ctr.cli", "score", "--model", str(bundle), "--input", f["input"], "--output", str(out)]
            log.info("score: %s", " ".join(cmd))
            r = subprocess.run(cmd, capture_output=True, text=True)
            for line in r.stderr.strip().splitlines()[-5:]:
                log.info("ctr score: %s", line)
            if r.returncode != 0:
                raise RuntimeError(f"ctr score of {f['input']} with version {version} failed (exit {r.returncode}): "
                                   f"{r.stderr.strip().splitlines()[-1:] or ['no output']}")
            rows = rejected = 0
            with open(out, newline="") as fh:
                for rec in csv.DictReader(fh):  # row, probability, reason (empty probability: rejected)
                    rows += 1
                    rejected += not rec["probability"]
            f.update(output=out.name, rows=rows, rows_scored=rows - rejected, rows_rejected=rejected)
        manifest = {"model_name": champ.get("model_name"), "version": version, "auc": champ["auc"],
                    "logical_date": champ["logical_date"], "image": champ["image"],
                    "source": {"dag_id": champ.get("source_dag_id"), "run_id": champ.get("source_run_id"),
                               "event_timestamp": champ.get("event_timestamp")},
                    "scored_by": {"dag_id": context["dag"].dag_id, "run_id": context["run_id"]},
                    "scored_at": dt.datetime.now(dt.UTC).isoformat(), "requests": str(requests), "files": inputs}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    total = sum(f["rows_scored"] for f in inputs)
    log.info("score: version %s scored %d rows of %d file(s) into %s (manifest %s)", version, total, len(inputs), final,
             manifest_path)
    return {"version": version, "output": str(final), "manifest": str(manifest_path), "rows_scored": total,
            "reused": False}
