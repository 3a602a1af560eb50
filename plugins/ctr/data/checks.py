"""Day-level data checks run by `check_data`: bad fraction, volume and click rate vs recent history."""

from __future__ import annotations

import datetime as dt
import statistics
from dataclasses import dataclass
from pathlib import Path

from ctr.data.landing import DayReport, load_report


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
