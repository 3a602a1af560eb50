"""Day-level data checks run by `check_data`: bad fraction, volume and click rate vs recent history; feature drift (PSI)."""

from __future__ import annotations

import datetime as dt
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctr.data.landing import DayReport, load_report
from ctr.monitoring.drift import MAX_PSI, WARN_PSI


@dataclass(frozen=True)
class CheckConfig:
    max_bad_fraction: float = 0.001
    min_rows_ratio: float = 0.5          # rows must be >= this x the trailing 7-day median
    click_rate_band: tuple[float, float] = (0.5, 2.0)  # click rate within this x the trailing median
    history_days: int = 7


def problems(report: DayReport, history: list[DayReport], cfg: CheckConfig) -> list[str]:
    """Every failed check for one day, each naming the day and the numbers; [] when it passes."""
    d = f"day={report.day}"
    out = []
    if report.rows_ok == 0:
        out.append(f"{d}: 0 valid rows of {report.rows_in} read from {', '.join(report.files)}")
        return out
    if report.bad_fraction > cfg.max_bad_fraction:
        out.append(
            f"{d}: {report.rows_quarantined} of {report.rows_in} lines malformed "
            f"({report.bad_fraction:.4%} > max_bad_fraction {cfg.max_bad_fraction:.4%}); see {report.quarantine}"
        )
    hist = [h for h in history if h.rows_ok > 0][-cfg.history_days:]
    if hist:
        med_rows = statistics.median(h.rows_ok for h in hist)
        if report.rows_ok < cfg.min_rows_ratio * med_rows:
            out.append(f"{d}: {report.rows_ok} valid rows < {cfg.min_rows_ratio:g} x trailing median {med_rows:.0f} "
                       f"({len(hist)} days); is the export incomplete?")
        med_ctr = statistics.median(h.click_rate for h in hist)
        lo, hi = cfg.click_rate_band
        if med_ctr > 0 and not (lo * med_ctr <= report.click_rate <= hi * med_ctr):
            out.append(f"{d}: click rate {report.click_rate:.4f} outside [{lo:g}x, {hi:g}x] of trailing median {med_ctr:.4f}")
    return out


def trailing_history(
    staging_root: Path, day: dt.date, known: dict[str, DayReport], cfg: CheckConfig
) -> list[DayReport]:
    """Reports of the `history_days` days before `day`, oldest first: from `known` (this run) or from
    earlier runs' staged `_report.json`; days never staged are simply absent."""
    out = []
    for i in range(cfg.history_days, 0, -1):
        d = day - dt.timedelta(days=i)
        rep = known.get(d.isoformat()) or load_report(staging_root, d)
        if rep is not None:
            out.append(rep)
    return out


def drift_check(staging_root: Path, train_days: list[dt.date], day: dt.date, warn_psi: float = WARN_PSI,
                max_psi: float = MAX_PSI) -> tuple[dict[str, Any], list[str]]:
    """PSI per feature of the staged `day` against the staged training range `train_days`
    (`ctr.monitoring.drift`, bins from the range itself: its deciles, and its most frequent values by
    the vocabulary rule, as the model's vocabulary is not known yet), as the drift section of
    metrics.json has it, and a warning per level naming the features from `warn_psi` up.

    Information at check time, never a failure: `evaluate` recomputes the PSI with the candidate's
    vocabulary and the gate's `max_feature_psi` decides."""
    from ctr.data.landing import read_staged
    from ctr.monitoring.drift import describe, drift_summary, over, reference_from_staging, warned
    from ctr.schema import FEATURE_COLUMNS

    ref = reference_from_staging(staging_root, train_days)
    prof = ref.profile(read_staged(staging_root, day, columns=FEATURE_COLUMNS))
    drift = drift_summary(ref.feature_psi(prof), reference=ref.source, rows=prof.rows)
    high = over(drift["features"], max_psi)
    mid = warned(drift["features"], warn_psi, max_psi)
    d = f"day={day}"
    out = []
    if high:
        out.append(f"{d}: feature drift vs {ref.source}: {describe(high)} above max_feature_psi {max_psi:g} "
                   "(the gate rejects such a day unless evaluate's PSI, on the candidate's vocabulary, is lower)")
    if mid:
        out.append(f"{d}: feature drift vs {ref.source}: {describe(mid)} (warning from {warn_psi:g})")
    return drift, out
