"""The evaluation report: ROC curves, a reliability plot, score histograms and the metrics table.

One self-contained HTML page (PNGs embedded as data URIs) plus the PNG files beside it, written
for every evaluation next to the candidate bundle and logged as MLflow run artifacts. Matplotlib
runs on the Agg canvas through `Figure` objects (no pyplot state), so it is safe in workers.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ctr.validation.metrics import reliability, roc_points

log = logging.getLogger(__name__)

CANDIDATE_COLOR = "#d62728"  # red
CHAMPION_COLOR = "#1f77b4"   # blue
REPORT_NAME = "report.html"
FIGURES = ("roc", "calibration", "scores")  # plus "psi" (feature drift) when the document has a drift section


def _series(p_candidate: np.ndarray, p_baseline: np.ndarray | None) -> list[tuple[str, np.ndarray, str]]:
    out = [("candidate", np.asarray(p_candidate, dtype=np.float64), CANDIDATE_COLOR)]
    if p_baseline is not None:
        out.append(("champion", np.asarray(p_baseline, dtype=np.float64), CHAMPION_COLOR))
    return out


def roc_figure(y: np.ndarray, p_candidate: np.ndarray, p_baseline: np.ndarray | None = None) -> Figure:
    from ctr.validation.metrics import auc

    fig = Figure(figsize=(5.5, 5), dpi=100)
    ax = fig.add_subplot()
    for name, p, color in _series(p_candidate, p_baseline):
        fpr, tpr = roc_points(y, p)
        ax.plot(fpr, tpr, color=color, lw=1.8, label=f"{name} (AUC {auc(y, p):.4f})")
    ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, ls="--", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC on the holdout day", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right")
    return fig


def calibration_figure(y: np.ndarray, p_candidate: np.ndarray, p_baseline: np.ndarray | None = None) -> Figure:
    from ctr.validation.metrics import ece

    fig = Figure(figsize=(5.5, 5), dpi=100)
    ax = fig.add_subplot()
    hi = 0.0
    for name, p, color in _series(p_candidate, p_baseline):
        r = reliability(y, p)
        ax.plot(r["mean_pred"], r["observed"], marker="o", ms=3.5, color=color, lw=1.4,
                label=f"{name} (ECE {ece(y, p):.4f})")
        hi = max(hi, *r["mean_pred"], *r["observed"]) if r["mean_pred"] else hi
    hi = min(1.0, hi * 1.05 + 1e-3)
    ax.plot([0, hi], [0, hi], color="#999999", lw=0.8, ls="--", label="perfect calibration")
    ax.set(xlabel="mean predicted click probability (equal-mass bins)", ylabel="observed click rate",
           title="Reliability", xlim=(0, hi), ylim=(0, hi))
    ax.legend(loc="upper left")
    return fig


def scores_figure(y: np.ndarray, p_candidate: np.ndarray, p_baseline: np.ndarray | None = None) -> Figure:
    fig = Figure(figsize=(9, 3.8), dpi=100)
    series = _series(p_candidate, p_baseline)
    bins = np.linspace(0, 1, 51)
    yb = np.asarray(y, dtype=bool)
    for i, (name, p, color) in enumerate(series):
        ax = fig.add_subplot(1, len(series), i + 1)
        ax.hist(p[~yb], bins=bins, color=color, alpha=0.35, label="no click")
        ax.hist(p[yb], bins=bins, color=color, alpha=0.9, histtype="step", lw=1.6, label="click")
        ax.set(title=f"{name} scores", xlabel="predicted probability", ylabel="rows", yscale="log")
        ax.legend(loc="upper right")
    fig.tight_layout()
    return fig


def psi_figure(drift: dict[str, Any], limit: float = 0.25, warn: float = 0.1,
               title: str = "Feature drift: PSI, holdout day vs training range") -> Figure:
    """One horizontal bar per feature (PSI), coloured by band, with the warning and reject lines."""
    feats = list(drift["features"])
    vals = [0.0 if v is None or math.isnan(v) else float(v) for v in drift["features"].values()]
    fig = Figure(figsize=(7, 9), dpi=100)
    ax = fig.add_subplot()
    colors = ["#c62828" if v > limit else "#ef6c00" if v > warn else "#2e7d32" for v in vals]
    ax.barh(range(len(feats)), vals, color=colors)
    ax.set_yticks(range(len(feats)), feats, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(warn, color="#ef6c00", ls="--", lw=0.9, label=f"warning {warn:g}")
    ax.axvline(limit, color="#c62828", ls="--", lw=0.9, label=f"reject {limit:g}")
    for m in drift.get("largest", [])[:3]:
        i = feats.index(m["feature"])
        ax.annotate(f"{m['feature']} {m['psi']:.3f}", (vals[i], i), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.set(xlabel="population stability index", title=title, xlim=(0, max(limit * 1.2, max(vals, default=0) * 1.25)))
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def drift_html(drift: dict[str, Any] | None, warnings: list[str] | None = None, limit: float = 0.25) -> str:
    """The drift section: the largest movers named with their PSI, the score PSI, the warnings."""
    if not drift:
        return "<h2>Feature drift</h2><p id=\"drift\">No drift check (the training range was not staged).</p>"
    movers = ", ".join(f"{html.escape(m['feature'])} PSI {m['psi']:.3f}" for m in drift.get("largest", []))
    bad = [f"{html.escape(c)} PSI {v:.3f}" for c, v in drift["features"].items() if v is not None and v > limit]
    sp = drift.get("score_psi")
    warn = "".join(f"<li>{html.escape(w)}</li>" for w in warnings or [])
    return (f'<h2>Feature drift</h2><div id="drift"><p>Against {html.escape(str(drift.get("reference", "")))}; '
            f'{drift.get("rows", 0)} rows compared.</p>'
            f"<p>Largest movers: <b>{movers}</b>.</p>"
            + (f"<p class=\"bad\">Above the limit {limit:g}: <b>{', '.join(bad)}</b>.</p>" if bad else "")
            + (f"<p>Score PSI ({html.escape(str(drift.get('score_reference', '')))} vs this day): "
               f"<b>{sp:.3f}</b>.</p>" if sp is not None else "")
            + (f"<ul id=\"warnings\">{warn}</ul>" if warn else "") + "</div>")


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.5f}"
    return html.escape(str(v))


def _metrics_table(doc: dict[str, Any]) -> str:
    cand, base = doc["candidate"], doc.get("baseline")
    rows = []
    for key, label in (("auc", "AUC"), ("logloss", "logloss"), ("ece", "ECE (20 equal-mass bins)"),
                       ("mean_pred", "mean predicted"), ("ctr", "observed click rate")):
        b = base[key] if base else None
        delta = "" if b is None else f"{cand[key] - b:+.5f}"
        rows.append(f"<tr><th>{label}</th><td>{_fmt(cand[key])}</td><td>{_fmt(b) if b is not None else '&mdash;'}</td>"
                    f"<td>{delta}</td></tr>")
    d = doc.get("auc_diff")
    diff = ("<p>No champion: first model, absolute floors only.</p>" if not d else
            f"<p>AUC difference (candidate &minus; champion): <b>{d['estimate']:+.5f}</b>, 95% CI "
            f"[{d['ci_low']:+.5f}, {d['ci_high']:+.5f}] ({html.escape(str(d['method']))}, paired on the same rows).</p>")
    return ("<table><tr><th></th><th>candidate</th><th>champion</th><th>difference</th></tr>"
            + "".join(rows) + "</table>" + diff)


def render_html(doc: dict[str, Any], pngs: dict[str, bytes], title: str) -> str:
    g = doc.get("gate") or {}
    word = ("PASSED (forced)" if g.get("forced") else "PASSED") if g.get("passed") else "REJECTED"
    color = "#2e7d32" if g.get("passed") and not g.get("forced") else ("#ef6c00" if g.get("forced") else "#c62828")
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in g.get("reasons", []))
    imgs = "".join(
        f'<figure><img id="{name}" alt="{name}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        f"</figure>" for name, data in pngs.items()
    )
    meta = {k: doc.get(k) for k in ("day", "rows", "candidate_version", "baseline_version") if k in doc}
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}figure{{display:inline-block;margin:.5em}}
.gate{{color:{color};font-weight:bold}}.bad{{color:#c62828}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{html.escape(json.dumps(meta, sort_keys=True))}</p>
<h2>Gate: <span class="gate" id="gate">{word}</span></h2><ul id="reasons">{reasons}</ul>
<h2>Metrics on the same holdout rows</h2>{_metrics_table(doc)}
{drift_html(doc.get("drift"), g.get("warnings"), (g.get("config") or {}).get("max_feature_psi", 0.25))}
<h2>Curves</h2>{imgs}
</body></html>
"""


def write_report(out_dir: Path, y: np.ndarray, p_candidate: np.ndarray, p_baseline: np.ndarray | None,
                 doc: dict[str, Any], title: str = "ctr evaluation") -> Path:
    """Write report.html (PNGs embedded) and the PNG files into `out_dir`; returns the HTML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    y = np.asarray(y, dtype=np.float64)
    figs = {"roc": roc_figure, "calibration": calibration_figure, "scores": scores_figure}
    pngs: dict[str, bytes] = {}
    for name, make in figs.items():
        pngs[name] = png_bytes(make(y, p_candidate, p_baseline))
        (out_dir / f"{name}.png").write_bytes(pngs[name])
    if doc.get("drift"):
        cfg = (doc.get("gate") or {}).get("config") or {}
        pngs["psi"] = png_bytes(psi_figure(doc["drift"], cfg.get("max_feature_psi", 0.25), cfg.get("warn_feature_psi", 0.1)))
        (out_dir / "psi.png").write_bytes(pngs["psi"])
    path = out_dir / REPORT_NAME
    path.write_text(render_html(doc, pngs, title), encoding="utf-8")
    log.info("report: %s (rows=%d champion=%s)", path, len(y), "yes" if p_baseline is not None else "none")
    return path
