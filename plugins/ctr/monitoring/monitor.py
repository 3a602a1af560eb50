"""`ctr monitor --day D`: the live model watched. Its prediction log vs its training range and holdout scores.

Reads day D's closed prediction-log files (`CTR_HOME/predictions/date=D/part-*.jsonl.gz`, or their Blob copy
under CTR_PREDICTION_LOG_URL when that is set: the service's disk is not the monitor's), groups the
records by model version and, per version, compares
  * the live rows' feature distributions with that version's training range (training/serving skew),
  * the live probabilities with that version's scores on its holdout day,
with `ctr.monitoring.drift`, binned exactly as the gate bins them: the reference is the version's
evaluation artifact `evaluation/drift_reference.json` (written by `evaluate`), fetched from its MLflow
run (or given as a file). It writes `monitor.json` and `monitor.html` (PSI bar chart, live vs holdout
score shares), logs both as artifacts `monitoring/<D>/` of that version's run, and says which
thresholds were crossed. No log for the day (a new deployment, logging off) is status
"nothing to monitor", not a failure.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ctr.monitoring.drift import MAX_PSI, REFERENCE_FILE, Reference, describe, drift_summary, over

log = logging.getLogger("ctr.monitor")

MONITOR_FILE = "monitor.json"
MONITOR_HTML = "monitor.html"
ARTIFACT_PATH = "monitoring"
NOTHING = "nothing to monitor"
MIN_ROWS = 100  # fewer live rows than this: PSIs are reported, no alert (sampling noise dominates)


@dataclass(frozen=True)
class MonitorConfig:
    max_feature_psi: float = MAX_PSI
    max_score_psi: float = MAX_PSI
    min_rows: int = MIN_ROWS


def rows_table(records: list[dict[str, Any]]) -> tuple[pa.Table, int]:
    """The logged rows as a table of the feature columns, and how many rows could not be read."""
    from ctr.data.reader import read_text
    from ctr.model.bundle import table_from_records
    from ctr.schema import FEATURE_COLUMNS

    tsv = [r["row"]["tsv"] for r in records if isinstance(r.get("row"), dict) and "tsv" in r["row"]]
    objs = [r["row"] for r in records if isinstance(r.get("row"), dict) and "tsv" not in r["row"]]
    parts, bad = [], 0
    if objs:
        parts.append(table_from_records(objs).select(FEATURE_COLUMNS))
    if tsv:
        lines = "\n".join(tsv) + "\n"
        with_label = sum(1 for ln in tsv if ln.count("\t") == 39)
        t, badrows = read_text(lines, require_label=with_label == len(tsv))
        bad += len(badrows)
        parts.append(t.select(FEATURE_COLUMNS).cast(pa.schema([(c, pa.float64() if c.startswith("I") else pa.string())
                                                              for c in FEATURE_COLUMNS])))
    bad += len(records) - len(tsv) - len(objs)
    if not parts:
        return pa.table({}), bad
    return pa.concat_tables(parts), bad


def compare_version(ref: Reference, records: list[dict[str, Any]], cfg: MonitorConfig) -> dict[str, Any]:
    """PSI of the live rows and scores of one model version against its reference; the alerts it raises."""
    table, bad = rows_table(records)
    prof = ref.add_table(ref.empty_profile(), table) if table.num_rows else ref.empty_profile()
    scores = np.array([float(r["probability"]) for r in records], dtype=np.float64)
    if ref.score_edges is not None:
        ref.add_scores(prof, scores)
    drift = drift_summary(ref.feature_psi(prof), ref.score_psi(prof), reference=ref.source, rows=prof.rows,
                          score_reference=ref.score_source)
    alerts: list[str] = []
    feats = over(drift["features"], cfg.max_feature_psi)
    if feats:
        alerts.append(f"training/serving skew: {describe(feats)} (limit {cfg.max_feature_psi:g})")
    sp = drift["score_psi"]
    if sp is not None and sp > cfg.max_score_psi:
        alerts.append(f"live scores vs {ref.score_source}: PSI {sp:.3f} (limit {cfg.max_score_psi:g}); "
                      f"live mean {scores.mean():.4f}")
    quiet = prof.rows < cfg.min_rows
    return {"rows": len(records), "rows_unreadable": bad, "mean_probability": float(scores.mean()) if len(scores) else None,
            "drift": drift, "alerts": [] if quiet else alerts, "suppressed": alerts if quiet else [],
            "note": f"{prof.rows} live rows < min_rows {cfg.min_rows}: PSIs reported, no alert" if quiet else "",
            "score_shares": _shares(prof.score, ref.score_counts), "score_edges": ref.score_edges}


def _shares(live: np.ndarray | None, ref: list[int] | None) -> dict[str, list[float]] | None:
    if live is None or ref is None or sum(ref) == 0:
        return None
    n = max(int(live.sum()), 1)
    return {"live": (live / n).round(6).tolist(), "reference": (np.asarray(ref) / sum(ref)).round(6).tolist()}


def reference_from_registry(registry: Any, version: str, dest: Path) -> tuple[Reference, str | None]:
    """Version `version`'s drift reference from its MLflow run (evaluation/drift_reference.json), and the run id."""
    import mlflow.artifacts

    try:
        info = registry.get(version)
    except Exception as e:  # a bundle served outside the registry is named by its digest, not a version number
        raise LookupError(f"model version {version!r} is not a version of {registry.model_name} in the registry: "
                          f"{str(e)[:200]}") from None
    if not info.run_id:
        raise LookupError(f"model version {version} has no MLflow run to read {REFERENCE_FILE} from")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(run_id=info.run_id, artifact_path=f"evaluation/{REFERENCE_FILE}",
                                                    dst_path=str(dest), tracking_uri=registry.tracking_uri)
    except Exception as e:
        raise LookupError(f"model version {version} (run {info.run_id}) has no evaluation/{REFERENCE_FILE} "
                          f"(evaluated before drift references existed?): {str(e)[:200]}") from None
    return Reference.from_json(json.loads(Path(local).read_text()), f"run {info.run_id} {REFERENCE_FILE}"), info.run_id


def monitor_day(day: dt.date, predictions: Path | str, out_dir: Path, *, registry: Any = None,
                reference: Path | None = None, cfg: MonitorConfig | None = None) -> dict[str, Any]:
    """Monitor day `day`'s prediction log under `predictions`; writes monitor.json and monitor.html into `out_dir`.

    `predictions`: the log's folder, or its Blob copy (`az://container/prefix`, CTR_PREDICTION_LOG_URL).
    Status: "ok", "drift" (an alert), "no reference" (no version's reference found) or NOTHING (no log).
    With `registry`, each version's reference comes from its MLflow run and the outputs are logged
    there; `reference` (a drift_reference.json) overrides that for every version.
    """
    from ctr.serving.predlog import day_location, log_files, read_log

    cfg = cfg or MonitorConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"day": day.isoformat(), "log": day_location(predictions, day),
                           "config": cfg.__dict__, "versions": {}, "alerts": []}
    files = log_files(predictions, day)
    if not files:
        doc.update(status=NOTHING, reason=f"no prediction log for {day.isoformat()} under {doc['log']} (a new "
                   "deployment, or CTR_PREDICTION_LOG_RATE=0)", files=0)
        _write(out_dir, doc)
        log.info("monitor: day=%s: %s", day, doc["reason"])
        return doc
    by_version: dict[str, list[dict[str, Any]]] = {}
    for rec in read_log(predictions, day):
        by_version.setdefault(str(rec.get("model_version")), []).append(rec)
    doc["files"] = len(files)
    doc["rows"] = sum(len(v) for v in by_version.values())
    doc["routes"] = dict(Counter(r.get("route") for v in by_version.values() for r in v))
    runs: dict[str, str] = {}
    for version, records in sorted(by_version.items(), key=lambda kv: -len(kv[1])):
        try:
            if reference is not None:
                ref = Reference.from_json(json.loads(Path(reference).read_text()), str(reference))
            elif registry is not None:
                ref, run_id = reference_from_registry(registry, version, out_dir / "references" / version)
                if run_id:
                    runs[version] = run_id
            else:
                raise LookupError("no registry and no --reference given")
        except (LookupError, ValueError, OSError) as e:
            doc["versions"][version] = {"rows": len(records), "status": "no reference", "reason": str(e)}
            log.warning("monitor: version %s (%d rows): no reference: %s", version, len(records), e)
            continue
        res = compare_version(ref, records, cfg)
        res["status"] = "drift" if res["alerts"] else "ok"
        doc["versions"][version] = res
        doc["alerts"] += [f"version {version}: {a}" for a in res["alerts"]]
        log.info("monitor: day=%s version=%s rows=%d largest feature PSI %s; score PSI %s; %s", day, version,
                 len(records), ", ".join(f"{m['feature']} {m['psi']:.3f}" for m in res["drift"]["largest"][:3]),
                 res["drift"]["score_psi"], "; ".join(res["alerts"]) or "no alert")
    compared = [v for v in doc["versions"].values() if v.get("status") in ("ok", "drift")]
    doc["status"] = "drift" if doc["alerts"] else ("ok" if compared else "no reference")
    paths = _write(out_dir, doc)
    if registry is not None:
        for version, run_id in runs.items():
            try:
                for p in paths:
                    registry.client.log_artifact(run_id, str(p), artifact_path=f"{ARTIFACT_PATH}/{day.isoformat()}")
                doc["versions"][version]["mlflow_run_id"] = run_id
            except Exception as e:  # the local files stay; the result is still the result
                log.error("monitor: could not log artifacts to run %s of version %s: %s", run_id, version, e)
    return doc


def _write(out_dir: Path, doc: dict[str, Any]) -> list[Path]:
    jp = out_dir / MONITOR_FILE
    jp.write_text(json.dumps(doc, indent=1, sort_keys=True, default=_num) + "\n")
    hp = out_dir / MONITOR_HTML
    hp.write_text(render_html(doc), encoding="utf-8")
    doc["outputs"] = {"json": str(jp), "html": str(hp)}
    return [jp, hp]


def _num(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


def _score_figure(res: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure

    sh = res["score_shares"]
    fig = Figure(figsize=(7, 3.5), dpi=100)
    ax = fig.add_subplot()
    x = np.arange(len(sh["live"]))
    ax.bar(x - 0.2, sh["reference"], width=0.4, color="#1f77b4", label="holdout scores (reference)")
    ax.bar(x + 0.2, sh["live"], width=0.4, color="#d62728", label="live scores")
    edges = res.get("score_edges") or []
    ax.set_xticks(x, [f"≤{e:.3f}" for e in edges] + ["above"], rotation=45, fontsize=7)
    ax.set(ylabel="share of rows", title="Live vs holdout score distribution (holdout deciles)")
    ax.legend()
    fig.tight_layout()
    return fig


def render_html(doc: dict[str, Any]) -> str:
    from ctr.validation.report import drift_html, png_bytes, psi_figure

    parts = []
    for version, res in doc.get("versions", {}).items():
        parts.append(f"<h2>Model version {html.escape(version)}: {html.escape(res.get('status', ''))}</h2>")
        if "drift" not in res:
            parts.append(f"<p>{html.escape(res.get('reason', ''))}</p>")
            continue
        lim = doc["config"]["max_feature_psi"]
        parts.append(drift_html(res["drift"], res["alerts"] + res["suppressed"], lim))
        if res.get("note"):
            parts.append(f"<p>{html.escape(res['note'])}</p>")
        figs = [psi_figure(res["drift"], lim, 0.1, title="Training/serving skew: PSI, live rows vs training range")]
        if res.get("score_shares"):
            figs.append(_score_figure(res))
        for f in figs:
            parts.append(f'<figure><img alt="plot" src="data:image/png;base64,{base64.b64encode(png_bytes(f)).decode()}">'
                         "</figure>")
    alerts = "".join(f"<li>{html.escape(a)}</li>" for a in doc.get("alerts", []))
    status = html.escape(doc.get("status", ""))
    reason = f"<p>{html.escape(doc['reason'])}</p>" if doc.get("reason") else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ctr monitor {html.escape(doc['day'])}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1100px}}.bad{{color:#c62828}}figure{{display:inline-block}}</style>
</head><body><h1>ctr monitor, {html.escape(doc['day'])}: <span id="status">{status}</span></h1>{reason}
<p>{doc.get('rows', 0)} logged rows in {doc.get('files', 0)} file(s) under {html.escape(doc['log'])}</p>
<ul id="alerts">{alerts}</ul>{''.join(parts)}</body></html>
"""
