"""Population stability index (PSI) per feature and of the score: the one drift code of the gate and the monitor.

A `Reference` holds the bins of the training range and its counts in them:
  * I1..I13: edges at the training deciles (duplicates dropped, so a column that is mostly 0
    gets fewer bins), one bin per interval plus one for missing;
  * C1..C26: the vocabulary's `CAT_TOP` most frequent values, one bin each, plus "rare" (every
    other value, seen or unseen) and "missing".
`Profile` counts any stream of rows (a staged day, the prediction log's rows) in those bins;
`psi(reference, profile)` compares the two. The score's reference is binned at its own deciles.

PSI = sum over bins of (a - e) * ln(a / e), with a, e the bins' shares floored at `PSI_FLOOR`
(an empty bin would be infinite). Rule of thumb, and the gate's defaults: < 0.1 stable,
0.1..0.25 a warning, > 0.25 a shift.

The reference is computed from a deterministic stride sample of the training range (at most
`max_rows` rows, default 200,000), so it costs one bounded read whatever the range's size.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctr.schema import CAT_COLUMNS, FEATURE_COLUMNS, INT_COLUMNS

CAT_TOP = 20
INT_QUANTILES = tuple(round(0.1 * i, 1) for i in range(1, 10))
PSI_FLOOR = 1e-4
REFERENCE_MAX_ROWS = 200_000
REFERENCE_FORMAT = 1
REFERENCE_FILE = "drift_reference.json"  # beside report.html; MLflow artifact evaluation/drift_reference.json
WARN_PSI = 0.1
MAX_PSI = 0.25


def psi_counts(expected: Sequence[float], actual: Sequence[float]) -> float:
    """PSI of two count vectors over the same bins (NaN when either side has no rows)."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape:
        raise ValueError(f"PSI needs the same bins on both sides, got {e.shape[0]} and {a.shape[0]}")
    if e.sum() <= 0 or a.sum() <= 0:
        return math.nan
    pe = np.maximum(e / e.sum(), PSI_FLOOR)
    pa_ = np.maximum(a / a.sum(), PSI_FLOOR)
    return float(np.sum((pa_ - pe) * np.log(pa_ / pe)))


def int_bins(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of each integer value (NaN = missing -> the last bin, len(edges) + 1)."""
    idx = np.searchsorted(edges, values, side="left")  # v <= edges[0] -> 0, v > edges[-1] -> len(edges)
    idx[np.isnan(values)] = len(edges) + 1
    return idx


def _int_values(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)


def _cat_counts(col: pa.ChunkedArray | pa.Array, top: pa.Array) -> np.ndarray:
    """Counts per top value, then rare, then missing."""
    k = len(top)
    idx = pc.fill_null(pc.index_in(col, value_set=top), k).to_numpy(zero_copy_only=False)
    out = np.bincount(idx, minlength=k + 2).astype(np.int64)
    nulls = col.null_count
    out[k] -= nulls
    out[k + 1] = nulls
    return out


@dataclass
class Profile:
    """Counts of rows in a reference's bins, per feature (and of scores, when given)."""

    counts: dict[str, np.ndarray]
    score: np.ndarray | None = None
    rows: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "counts": {c: v.tolist() for c, v in self.counts.items()},
                "score": None if self.score is None else self.score.tolist()}


@dataclass
class Reference:
    """Bins and counts of the training range (and optionally of a score distribution)."""

    int_edges: dict[str, list[float]]
    cat_top: dict[str, list[str]]
    counts: dict[str, list[int]]
    rows: int
    source: str = ""
    score_edges: list[float] | None = None
    score_counts: list[int] | None = None
    score_source: str = ""
    _top_arrays: dict[str, pa.Array] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._top_arrays = {c: pa.array(self.cat_top[c], type=pa.string()) for c in CAT_COLUMNS}

    # ---- counting ---------------------------------------------------------------------------
    def empty_profile(self) -> Profile:
        sizes = {**{c: len(self.int_edges[c]) + 2 for c in INT_COLUMNS}, **{c: len(self.cat_top[c]) + 2 for c in CAT_COLUMNS}}
        return Profile({c: np.zeros(sizes[c], dtype=np.int64) for c in FEATURE_COLUMNS},
                       None if self.score_edges is None else np.zeros(len(self.score_edges) + 1, dtype=np.int64))

    def add_table(self, prof: Profile, table: pa.Table) -> Profile:
        """Add the rows of `table` (the staged schema, or any table with the feature columns) to `prof`."""
        prof.rows += table.num_rows
        for c in INT_COLUMNS:
            edges = np.asarray(self.int_edges[c], dtype=np.float64)
            prof.counts[c] += np.bincount(int_bins(_int_values(table.column(c)), edges), minlength=len(edges) + 2)
        for c in CAT_COLUMNS:
            col = table.column(c)
            if col.type != pa.string():
                col = pc.cast(col, pa.string())
            prof.counts[c] += _cat_counts(col, self._top_arrays[c])
        return prof

    def add_scores(self, prof: Profile, scores: np.ndarray) -> Profile:
        if self.score_edges is None or prof.score is None:
            raise ValueError("this reference has no score distribution")
        prof.score += np.bincount(np.searchsorted(np.asarray(self.score_edges), np.asarray(scores, dtype=np.float64),
                                                  side="left"), minlength=len(self.score_edges) + 1)
        return prof

    def profile(self, tables: Iterable[pa.Table]) -> Profile:
        prof = self.empty_profile()
        for t in tables:
            self.add_table(prof, t)
        return prof

    # ---- comparing --------------------------------------------------------------------------
    def feature_psi(self, prof: Profile) -> dict[str, float]:
        """PSI per feature, FEATURE_COLUMNS order."""
        return {c: round(psi_counts(self.counts[c], prof.counts[c]), 6) for c in FEATURE_COLUMNS}

    def score_psi(self, prof: Profile) -> float:
        if self.score_counts is None or prof.score is None:
            return math.nan
        return round(psi_counts(self.score_counts, prof.score), 6)

    def with_scores(self, scores: np.ndarray, source: str) -> Reference:
        """This reference plus a score distribution binned at the scores' deciles."""
        s = np.asarray(scores, dtype=np.float64)
        edges = np.unique(np.quantile(s, INT_QUANTILES)) if len(s) else np.array([], dtype=np.float64)
        self.score_edges = edges.tolist()
        self.score_counts = np.bincount(np.searchsorted(edges, s, side="left"), minlength=len(edges) + 1).tolist()
        self.score_source = source
        return self

    # ---- persistence ------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"format": REFERENCE_FORMAT, "rows": self.rows, "source": self.source, "int_edges": self.int_edges,
                "cat_top": self.cat_top, "counts": self.counts, "score_edges": self.score_edges,
                "score_counts": self.score_counts, "score_source": self.score_source}

    @classmethod
    def from_json(cls, d: Any, source: str = "drift reference") -> Reference:
        if not isinstance(d, dict) or d.get("format") != REFERENCE_FORMAT:
            raise ValueError(f"{source}: not a drift reference of format {REFERENCE_FORMAT}")
        missing = [c for c in FEATURE_COLUMNS if c not in d.get("counts", {})]
        if missing:
            raise ValueError(f"{source}: no counts for {', '.join(missing[:5])}")
        return cls(int_edges=d["int_edges"], cat_top=d["cat_top"], counts=d["counts"], rows=d["rows"],
                   source=d.get("source", ""), score_edges=d.get("score_edges"), score_counts=d.get("score_counts"),
                   score_source=d.get("score_source", ""))


def _stride_sample(tables: Iterable[pa.Table], stride: int) -> Iterable[pa.Table]:
    pos = 0
    for t in tables:
        n = t.num_rows
        first = (-pos) % stride
        if first < n:
            yield t.take(pa.array(np.arange(first, n, stride)))
        pos += n


def build_reference(tables: Iterable[pa.Table], top_values: Mapping[str, Sequence[str]] | None = None,
                    source: str = "") -> Reference:
    """A reference from the given rows (already sampled): decile edges of the integers, and per
    categorical the first `CAT_TOP` of `top_values` (the vocabulary, most frequent first) or, without
    it, the sample's own most frequent values by the vocabulary rule."""
    from ctr.features.transform import select_vocabulary

    tables = [t.select(FEATURE_COLUMNS) for t in tables]
    rows = sum(t.num_rows for t in tables)
    if rows == 0:
        raise ValueError(f"no rows to build a drift reference from ({source or 'empty input'})")
    full = pa.concat_tables(tables)
    edges: dict[str, list[float]] = {}
    for c in INT_COLUMNS:
        v = _int_values(full.column(c))
        v = v[~np.isnan(v)]
        edges[c] = np.unique(np.quantile(v, INT_QUANTILES)).tolist() if len(v) else []
    if top_values is None:
        counts = {}
        for c in CAT_COLUMNS:
            vc = pc.value_counts(full.column(c).drop_null())
            counts[c] = dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True))
        top_values = select_vocabulary(counts, 1, CAT_TOP)
    top = {c: list(top_values.get(c, []))[:CAT_TOP] for c in CAT_COLUMNS}
    ref = Reference(int_edges=edges, cat_top=top, counts={}, rows=rows, source=source)
    prof = ref.profile([full])
    ref.counts = {c: v.tolist() for c, v in prof.counts.items()}
    return ref


def reference_from_staging(staging: Path, days: Sequence[dt.date], top_values: Mapping[str, Sequence[str]] | None = None,
                           max_rows: int = REFERENCE_MAX_ROWS) -> Reference:
    """The training range's reference from its staged days: every k-th row (k from the staged row
    counts, so at most `max_rows` rows), deterministic."""
    from ctr.data.landing import load_report, read_staged

    total = 0
    for d in days:
        rep = load_report(staging, d)
        total += rep.rows_ok if rep is not None else 0

    def tables() -> Iterable[pa.Table]:
        for d in days:
            yield from read_staged(staging, d, columns=FEATURE_COLUMNS)

    return reference_from_rows(tables(), total, days, top_values, max_rows)


def reference_from_rows(tables: Iterable[pa.Table], total: int, days: Sequence[dt.date],
                        top_values: Mapping[str, Sequence[str]] | None = None,
                        max_rows: int = REFERENCE_MAX_ROWS) -> Reference:
    """The training range's reference from its `total` valid rows in landing-zone order (day, file,
    line): every k-th row, k = ceil(total / max_rows). `reference_from_staging` reads them from the
    staged days; the Spark job passes the rows it collected on the driver, so both get the same bins."""
    stride = max(1, math.ceil(total / max_rows)) if total else 1
    label = f"{days[0].isoformat()}..{days[-1].isoformat()}" if days else "no days"
    return build_reference(_stride_sample(tables, stride), top_values,
                           source=f"training range {label}, every {stride} row(s) of {total}")


def merge_profiles(ref: Reference, profiles: Iterable[Mapping[str, Any]]) -> Profile:
    """One profile from partial ones in `Profile.to_json` form (e.g. one per Spark partition): counts summed."""
    prof = ref.empty_profile()
    for p in profiles:
        prof.rows += int(p["rows"])
        for c in FEATURE_COLUMNS:
            part = np.asarray(p["counts"][c], dtype=np.int64)
            if part.shape != prof.counts[c].shape:
                raise ValueError(f"partial profile of {c}: {part.shape[0]} bins, the reference has {prof.counts[c].shape[0]}")
            prof.counts[c] += part
    return prof


def drift_summary(psi: Mapping[str, float], score_psi: float | None = None, *, reference: str = "",
                  rows: int = 0, score_reference: str = "", top: int = 5) -> dict[str, Any]:
    """The drift section of metrics.json / monitor.json: PSI per feature, the largest movers, the score PSI."""
    finite = [(c, v) for c, v in psi.items() if not math.isnan(v)]
    movers = sorted(finite, key=lambda t: (-t[1], t[0]))[:top]
    return {"features": dict(psi), "largest": [{"feature": c, "psi": v} for c, v in movers],
            "score_psi": None if score_psi is None or math.isnan(score_psi) else score_psi,
            "reference": reference, "score_reference": score_reference, "rows": rows}


def over(psi: Mapping[str, float], limit: float) -> list[tuple[str, float]]:
    """Features whose PSI exceeds `limit`, largest first (ties by name)."""
    return sorted(((c, v) for c, v in psi.items() if not math.isnan(v) and v > limit), key=lambda t: (-t[1], t[0]))


def warned(psi: Mapping[str, float], warn: float, limit: float) -> list[tuple[str, float]]:
    """Features in the warning band: PSI above `warn` but not above `limit`, largest first."""
    return [(c, v) for c, v in over(psi, warn) if v <= limit]


def describe(items: Sequence[tuple[str, float]]) -> str:
    return ", ".join(f"{c} PSI {v:.3f}" for c, v in items)
