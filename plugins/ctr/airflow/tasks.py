"""What each task of the `ctr_retrain` DAG does: task context in, a small JSON-able dict (the XCom) out.

Configuration comes from `ctr.airflow.config.resolve(context)`, once per task; image builders and
rollout targets from `ctr.deployment.factory`, so no task asks which one it drives. Each task is
idempotent for a DAG run: it finds its own earlier result (staged day, bundle with the same
training spec, registry version by run key, image by content digest, rollout already serving).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from ctr.airflow.config import resolve
from ctr.settings import Settings

log = logging.getLogger("ctr.dag")



# ---- context helpers ---------------------------------------------------------------------
def settings(context: dict[str, Any]) -> Settings:
    """This task's `Settings` (environment + Variables + the landing zone's connection; see config.py)."""
    return resolve(context).settings


def holdout_day(context: dict[str, Any]) -> dt.date:
    """The run with logical date D (UTC) holds out day D.

    A scheduled run for the interval [D 02:00, D+1 02:00) has logical date D 02:00, and
    `airflow dags test ctr_retrain D` / backfills / triggers with a logical date name D directly.
    A run triggered without a logical date falls back to its data interval's start.
    """
    start = context.get("logical_date") or context["data_interval_start"]
    start = start.in_timezone("UTC") if hasattr(start, "in_timezone") else start.astimezone(dt.UTC)
    return dt.date(start.year, start.month, start.day)


def run_key(context: dict[str, Any]) -> str:
    return f"{context['dag'].dag_id}/{holdout_day(context).isoformat()}"


def run_dir(context: dict[str, Any], s: Settings) -> Path:
    d = s.runs_dir / context["dag"].dag_id / holdout_day(context).isoformat()
    d.mkdir(parents=True, exist_ok=True)
    return d


def train_range(context: dict[str, Any]) -> tuple[dt.date, dt.date]:
    d = holdout_day(context)
    n = int(context["params"].get("train_days", 7))
    if n < 1:
        raise ValueError(f"param train_days={n} must be at least 1")
    return d - dt.timedelta(days=n), d - dt.timedelta(days=1)


# ---- tasks -------------------------------------------------------------------------------
def check_data(context: dict[str, Any]) -> dict[str, Any]:
    """Validate and stage every day the run needs (training range + holdout day); the holdout day's
    feature PSI against the training range goes into the XCom (`drift`, `warnings`) and the log."""
    from ctr.data.checks import CheckConfig, drift_check, problems, trailing_history
    from ctr.data.landing import DayReport, daterange, stage_day
    from ctr.monitoring.drift import MAX_PSI, WARN_PSI

    s = settings(context)
    p = context["params"]
    cfg = CheckConfig(max_bad_fraction=float(p.get("max_bad_fraction", 0.001)))
    start, _ = train_range(context)
    day = holdout_day(context)
    reports: dict[str, DayReport] = {}
    failures: list[str] = []
    for d in daterange(start, day):
        rep = stage_day(s.landing_root, s.staging_dir, s.home / "quarantine", d)
        reports[d.isoformat()] = rep
        history = trailing_history(s.staging_dir, d, reports, cfg)  # this run's days or earlier runs' reports
        failures += problems(rep, history, cfg)
        log.info("day=%s rows=%d ok=%d bad=%d quarantined=%s", d, rep.rows_in, rep.rows_ok, rep.rows_quarantined, rep.quarantine)
    summary = {k: {"rows_in": r.rows_in, "rows_ok": r.rows_ok, "rows_quarantined": r.rows_quarantined,
                   "click_rate": round(r.click_rate, 6), "quarantine": r.quarantine, "fingerprint": r.digest}
               for k, r in reports.items()}
    if failures:  # bad data does not get better by retrying
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException("check_data failed: " + "; ".join(failures))
    # feature drift of the holdout day vs the training range: logged and returned, the gate decides
    drift, warnings = drift_check(s.staging_dir, daterange(start, day - dt.timedelta(days=1)), day,
                                  warn_psi=float(p.get("warn_feature_psi", WARN_PSI)),
                                  max_psi=float(p.get("max_feature_psi", MAX_PSI)))
    log.info("check_data: day=%s drift vs %s: largest feature PSI %s", day, drift["reference"],
             ", ".join(f"{m['feature']} {m['psi']:.3f}" for m in drift["largest"]))
    for w in warnings:
        log.warning("check_data: %s", w)
    return {"days": summary, "rows_ok": sum(r.rows_ok for r in reports.values()), "drift": drift,
            "warnings": warnings}


def monitor(context: dict[str, Any]) -> dict[str, Any]:
    """Day D's prediction log vs the serving model's training range and holdout scores (`ctr monitor --day D`).

    Never fails the run (a drifting world is exactly when retraining must go on): drift, or a monitor
    that could not run, is logged, sent to the notifier (`monitor_drift`) and returned in the XCom."""
    from ctr.airflow import notify
    from ctr.monitoring.monitor import MonitorConfig, monitor_day

    s = settings(context)
    day = holdout_day(context)
    p = context["params"]
    cfg = MonitorConfig(max_feature_psi=float(p.get("max_feature_psi", 0.25)),
                        max_score_psi=float(p.get("max_score_psi", 0.25)))
    try:
        doc = monitor_day(day, s.prediction_log_url or s.predictions_dir, run_dir(context, s) / "monitor",
                          registry=_registry(s), cfg=cfg)  # the Blob copy when the service uploads one
    except Exception as e:
        log.exception("monitor: day=%s could not run", day)
        notify.send(context, "monitor_drift", f"ctr: monitor for {day} could not run: {e}", error=str(e)[:500])
        return {"status": "error", "error": str(e)[:500], "alerts": []}
    log.info("monitor: day=%s status=%s (%s) monitor.json at %s", day, doc["status"],
             doc.get("reason") or f"{doc.get('rows', 0)} logged rows, versions {sorted(doc['versions'])}",
             doc["outputs"]["json"])
    for a in doc["alerts"]:
        log.warning("monitor: %s", a)
    if doc["alerts"]:
        notify.send(context, "monitor_drift", f"ctr: the live model drifted on {day}: " + "; ".join(doc["alerts"]),
                    alerts=doc["alerts"], monitor=doc["outputs"]["json"])
    return {"status": doc["status"], "alerts": doc["alerts"], "reason": doc.get("reason"),
            "rows": doc.get("rows", 0), "monitor_json": doc["outputs"]["json"], "monitor_html": doc["outputs"]["html"]}


def train_spec(context: dict[str, Any], s: Settings) -> dict[str, Any]:
    from ctr.data.landing import daterange, staged_fingerprints

    p = context["params"]
    start, end = train_range(context)
    return {"from": start.isoformat(), "to": end.isoformat(), "seed": int(p.get("seed", s.seed)),
            "sample_fraction": float(p.get("sample_fraction", 1.0)), "params": p.get("lgb_params") or {},
            "num_threads": s.num_threads,
            # the staged copies (training days + holdout) this bundle is for: corrected data retrains
            "data_fingerprints": staged_fingerprints(s.staging_dir, daterange(start, holdout_day(context)))}


def train_local(context: dict[str, Any]) -> dict[str, Any]:
    """Run the training job (`python -m ctr.training.job`) in a subprocess (the same arguments the Spark job takes)."""
    s = settings(context)
    out = run_dir(context, s) / "candidate"
    spec = train_spec(context, s)
    spec_path = run_dir(context, s) / "train_spec.json"
    if (out / "probe.json").exists() and spec_path.exists() and json.loads(spec_path.read_text()) == spec:
        log.info("train: bundle for this run and spec already at %s; reusing it", out)
        return {"bundle": str(out), "reused": True}
    day = holdout_day(context).isoformat()
    lineage = {"dag_id": context["dag"].dag_id, "run_id": context["run_id"], "holdout_day": day,
               "holdout_fingerprint": {day: spec["data_fingerprints"].get(day)}}
    cmd = [sys.executable, "-m", "ctr.training.job", "--staging", str(s.staging_dir),
           "--from", spec["from"], "--to", spec["to"], "--out", str(out), "--seed", str(spec["seed"]),
           "--num-threads", str(spec["num_threads"]), "--sample-fraction", str(spec["sample_fraction"]),
           "--params", json.dumps(spec["params"]), "--metadata", json.dumps(lineage)]
    log.info("train: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:  # stream progress (rows read, trees built) into the task log
        log.info("job: %s", line.rstrip())
        tail = (tail + [line.rstrip()])[-5:]
    if proc.wait() != 0:
        raise RuntimeError(f"training job failed (exit {proc.returncode}): {' | '.join(tail)}")
    spec_path.write_text(json.dumps(spec, sort_keys=True) + "\n")
    return {"bundle": str(out), "reused": False}


def _registry(s: Settings):
    from ctr.registry import Registry

    return Registry.from_settings(s)


def run_fingerprints(context: dict[str, Any], s: Settings, bundle: Path) -> dict[str, str]:
    """{day: fingerprint digest} of every day the candidate was trained on (as its metadata.json records
    them; the staged copies when it records none) and of the holdout day as staged now."""
    from ctr.data.landing import daterange, staged_fingerprints

    start, end = train_range(context)
    day = holdout_day(context)
    staged = staged_fingerprints(s.staging_dir, daterange(start, day))
    meta = json.loads((bundle / "metadata.json").read_text())
    trained = meta.get("data_fingerprints") or {k: v for k, v in staged.items() if k != day.isoformat()}
    return {**trained, **({day.isoformat(): staged[day.isoformat()]} if day.isoformat() in staged else {})}


def evaluate(context: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
    """Score candidate and champion freshly on the same holdout rows; write metrics.json and the report
    next to the bundle, log both to the DAG run's MLflow run, push the "MLflow run" link."""
    from ctr.airflow.links import push_links
    from ctr.data.landing import data_digest, daterange
    from ctr.registry import ui_links
    from ctr.validation.holdout import evaluate_day

    s = settings(context)
    fingerprints = run_fingerprints(context, s, Path(trained["bundle"]))
    reg = _registry(s)
    out = run_dir(context, s)
    day = holdout_day(context)
    champ, why = reg.baseline_for(day.isoformat())  # the champion, unless it trained on this day (backfills)
    log.info("evaluate: baseline for %s: %s", day, why)
    baseline = reg.download(champ.version) if champ else None
    start, end = train_range(context)
    doc = evaluate_day(s.staging_dir, day, Path(trained["bundle"]), baseline, gate_params=context["params"],
                       train_days=daterange(start, end),
                       report_dir=out / "report", title=f"{run_key(context)}: candidate vs champion "
                       f"{'v' + champ.version if champ else '(none)'} on {day.isoformat()}")
    doc["baseline_version"] = champ.version if champ else None
    doc["baseline_reason"] = why
    if run_fingerprints(context, s, Path(trained["bundle"])) != fingerprints:
        raise RuntimeError(f"holdout day={day} was re-staged while evaluate read it; re-run evaluate")
    doc["data_fingerprints"] = fingerprints
    doc["data_digest"] = data_digest(fingerprints)
    path = out / "metrics.json"
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    report = Path(doc["report"])
    rid = reg.ensure_run(run_key(context), {"dag_id": context["dag"].dag_id, "run_id": context["run_id"],
                                            "ctr.logical_date": day.isoformat()}, data_digest=doc["data_digest"])
    extra = [Path(doc["drift_reference"])] if doc.get("drift_reference") else []
    reg.log_evaluation(rid, doc, [path, report, *sorted(report.parent.glob("*.png")), *extra])
    links = ui_links(s.tracking_uri, s.mlflow_ui_url, reg.experiment_id(), rid)
    push_links(context["ti"], links)
    c, b = doc["candidate"], doc["baseline"]
    log.info("evaluate: candidate AUC %.4f logloss %.4f ECE %.4f | champion %s | metrics at %s", c["auc"], c["logloss"],
             c["ece"], f"v{champ.version} AUC {b['auc']:.4f} logloss {b['logloss']:.4f}" if champ else "none", path)
    log.info("evaluate: report at %s (MLflow run %s, artifacts evaluation/report.html)%s", report, rid,
             f" {links['run']}" if links["run"] else "")
    return {"metrics_path": str(path), "candidate_auc": c["auc"], "champion_auc": b["auc"] if b else None,
            "champion_version": champ.version if champ else None, "gate": doc["gate"], "bundle": trained["bundle"],
            "report": str(report), "mlflow_run_id": rid, "mlflow_run_url": links["run"] or None,
            "drift_largest": (doc.get("drift") or {}).get("largest", [])}


def gate(context: dict[str, Any], evaluated: dict[str, Any]) -> bool:
    """Pass, reject (deploy tasks skipped), or hand a borderline candidate to `review` (ctr.airflow.review)."""
    from ctr.airflow import review

    g = evaluated["gate"]
    doc = json.loads(Path(evaluated["metrics_path"]).read_text())
    why = review.borderline(g, doc, context["params"])
    verdict = "PASSED (forced)" if g["forced"] else ("PASSED" if g["passed"] else "REJECTED")
    log.info("gate: %s%s", verdict, f"; borderline, a person decides in task review: {why}" if why else "")
    for r in g["reasons"]:
        (log.info if g["passed"] else log.warning)("gate: %s", r)
    for w in g.get("warnings", []):
        log.warning("gate: warning: %s", w)
    req = review.request(holdout_day(context).isoformat(), doc, evaluated, why, context["params"]) if why else None
    context["ti"].xcom_push(key="decision", value={"passed": g["passed"], "forced": g["forced"], "reasons": g["reasons"],
                                                   "warnings": g.get("warnings", []), "drifted": g.get("drifted", []),
                                                   "review": req})
    if why:
        return True
    if not g["passed"]:
        from ctr.airflow import notify

        notify.send(context, "gate_rejected", f"ctr: candidate for {holdout_day(context)} REJECTED by the gate; "
                    "champion unchanged: " + "; ".join(g["reasons"]), reasons=g["reasons"],
                    candidate_auc=evaluated.get("candidate_auc"), champion_version=evaluated.get("champion_version"))
    return bool(g["passed"])


def register(context: dict[str, Any], evaluated: dict[str, Any]) -> dict[str, Any]:
    """Register the candidate in the DAG run's MLflow run with lineage tags (or find the version already there)."""
    from ctr.airflow.links import push_links
    from ctr.model.bundle import bundle_digest, code_version
    from ctr.registry import ui_links
    from ctr.validation.gate import verdict

    s = settings(context)
    doc = json.loads(Path(evaluated["metrics_path"]).read_text())
    bundle = Path(evaluated["bundle"])
    start, end = train_range(context)
    interval_start, interval_end = context.get("data_interval_start"), context.get("data_interval_end")
    tags = {
        "dag_id": context["dag"].dag_id, "run_id": context["run_id"],
        "ctr.logical_date": holdout_day(context).isoformat(),
        "data_interval": f"{start.isoformat()}..{end.isoformat()}", "holdout_day": holdout_day(context).isoformat(),
        "airflow_data_interval": f"{interval_start.isoformat() if interval_start else ''}..{interval_end.isoformat() if interval_end else ''}",
        "metrics": {k: doc["candidate"][k] for k in ("auc", "logloss", "ece", "mean_pred", "ctr")}, "rows": doc["rows"],
        "auc_diff": doc["auc_diff"], "champion_at_eval": doc.get("baseline_version") or "none",
        "gate_decision": verdict(doc["gate"]), "gate_passed": doc["gate"]["passed"], "gate_forced": doc["gate"]["forced"],
        "gate_reasons": doc["gate"]["reasons"], "gate_config": doc["gate"].get("config"),
        "code_version": code_version(), "bundle_digest": bundle_digest(bundle),
        "data_fingerprints": doc.get("data_fingerprints") or {}, "landing_root": s.landing_root,
    }
    from ctr.airflow.review import REVIEW_TASK_ID, review_tags

    reviewed = review_tags(context["ti"].xcom_pull(task_ids=REVIEW_TASK_ID))  # who approved a borderline candidate
    metrics = {f"candidate_{k}": doc["candidate"][k] for k in ("auc", "logloss", "ece", "mean_pred")}
    reg = _registry(s)
    v = reg.register(bundle, run_key(context), tags, metrics, run_id=evaluated.get("mlflow_run_id"),
                     data_digest=doc.get("data_digest"))
    if reviewed:  # also on a version found again (a re-run after the approval)
        reg.set_tags(v.version, reviewed)
        log.info("register: version %s approved by %s: %s", v.version, reviewed["ctr.review_by"],
                 reviewed["ctr.review_comment"] or "(no comment)")
    links = ui_links(s.tracking_uri, s.mlflow_ui_url, reg.experiment_id(), v.run_id, s.model_name, v.version)
    push_links(context["ti"], links)
    if doc["gate"]["forced"]:
        log.warning("register: version %s registered under force_deploy despite: %s", v.version, doc["gate"]["reasons"])
    log.info("register: %s version %s for %s%s", s.model_name, v.version, run_key(context),
             f" {links['model_version']}" if links["model_version"] else "")
    if v.tags.get("ctr.supersedes"):
        log.warning("register: version %s supersedes version %s of %s: the data changed since (digest %s)", v.version,
                    v.tags["ctr.supersedes"], run_key(context), str(doc.get("data_digest"))[:19])
    return {"version": v.version, "bundle": str(bundle), "model_name": s.model_name, "supersedes": v.tags.get("ctr.supersedes"),
            "mlflow_model_version_url": links["model_version"] or None}


# ---- build / roll out / verify / promote (which builder and target: DeploySettings, via the factory) ----------
def _rollout(context: dict[str, Any]):
    from ctr.airflow.hooks import CloudAccess
    from ctr.deployment import factory
    from ctr.deployment.rollout.progressive import Strategy

    cfg = resolve(context)  # the strategy (rolling | canary | shadow) and its bake and limits: the run's params
    return factory.rollout(cfg.settings, cfg.deploy, CloudAccess(cfg.deploy), Strategy.from_params(context["params"]))


def build_image(context: dict[str, Any], registered: dict[str, Any]) -> dict[str, Any]:
    from ctr.airflow.hooks import CloudAccess
    from ctr.deployment import factory
    from ctr.deployment.image import build_context

    cfg = resolve(context)
    s = cfg.settings
    ctx = build_context(Path(registered["bundle"]), registered["version"], s.model_name, s.images_dir)
    log.info("build_image: context %s tag %s (builder %s)", ctx.path, ctx.tag, cfg.deploy.image_builder)
    builder = factory.image_builder(cfg.deploy, CloudAccess(cfg.deploy))
    try:
        return builder.build(ctx)
    finally:
        builder.close()


def rollout(context: dict[str, Any], image: dict[str, Any]) -> dict[str, Any]:
    from ctr.deployment.rollout.base import Release

    release = Release(str(image["version"]), Path(image["path"]) / "model", image.get("image"))
    target = _rollout(context)
    res = target.deploy(release)
    return {**res.to_json(), "bundle": str(release.bundle), "image": release.image, "target": target.target}


def verify(context: dict[str, Any], rolled: dict[str, Any]) -> dict[str, Any]:
    """Check the live endpoint; on failure roll back and fail the task (promote is then skipped)."""
    import pyarrow as pa

    from ctr.data.landing import read_staged
    from ctr.deployment.rollout.base import Release, RolloutResult

    s = settings(context)
    target = _rollout(context)
    release = Release(str(rolled["version"]), Path(rolled["bundle"]), rolled.get("image"))
    n = int(context["params"].get("verify_rows", 100))
    head: list[pa.Table] = []
    for t in read_staged(s.staging_dir, holdout_day(context)):  # the first n rows, not the whole day
        head.append(t.slice(0, n - sum(h.num_rows for h in head)))
        if sum(h.num_rows for h in head) >= n:
            break
    rows = pa.concat_tables(head)
    try:
        if context["params"].get("fail_verify"):  # operator drill: prove the rollback path end to end
            raise RuntimeError("fail_verify=true: verification forced to fail")
        return target.verify(release, rows, token=s.serve_token)
    except Exception as e:
        log.error("verify failed: %s; rolling back (champion pointer unchanged)", e)
        back = target.rollback(release, RolloutResult.from_json(rolled))
        outcome = ("stopped the service (no previous version)" if back is None else
                   f"rolled back to {back.version}" if back.changed else f"left version {back.version} serving (deployed since)")
        log.error("%s", outcome)
        from ctr.airflow import notify

        notify.send(context, "rollback", f"ctr: version {rolled.get('version')} failed verification ({e}); {outcome}",
                    failed_version=rolled.get("version"),
                    restored_version=back.version if back else None, error=str(e)[:500])
        raise


def promote(context: dict[str, Any], verified: dict[str, Any]) -> dict[str, Any]:
    """Move the champion pointer; the asset event on `CHAMPION` (ctr.airflow.assets) says who is champion now."""
    from ctr.airflow.assets import CHAMPION, champion_extra

    s = settings(context)
    reg = _registry(s)
    champ = reg.promote(verified["version"])
    built = context["ti"].xcom_pull(task_ids="build_image") or {}
    image = built.get("image") or built.get("tag")
    if champ.version == str(verified["version"]) and image:
        reg.set_tags(champ.version, {"ctr.image": image})  # the image a later event names while this stays champion
    extra = champion_extra(champ, verified["version"], image, s.model_name)
    context["outlet_events"][CHAMPION].extra = extra
    log.info("promote: asset event %s %s", CHAMPION.uri, json.dumps(extra, sort_keys=True))
    return {"champion": champ.version, "url": verified["url"], "asset_extra": extra}

