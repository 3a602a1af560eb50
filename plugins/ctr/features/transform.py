"""Vocabularies and the row -> feature-vector transform, shared by training and serving.

Feature vector (float64, 39 wide, in FEATURE_COLUMNS order):
  * I1..I13: the integer as a float, NaN when missing. No log transform: trees are invariant
    to monotone transforms, and the raw value keeps serving trivially exact.
  * C1..C26: an integer code. Values seen at least `min_count` times in the training range
    get codes 0..V-1 (most frequent first, ties by value, so the order is deterministic);
    rare and unseen values share the reserved code V; missing is NaN (LightGBM's native
    missing handling for categorical features) by default, or its own code V+1 with
    `missing="code"` (recorded in features.json; docs/training.md has the measurement).

`transform_table` (vectorised, Arrow) and `FeatureTransform.row` (one dict, pure Python)
produce bit-identical vectors; tests prove it.

Derived features (the model's input past the 39 codes): with `code_stats` (per column and code,
the training rows and clicks: codes 0..V-1, rare V, missing V+1, integers), `derive` appends per
categorical column its training count and its smoothed click rate
`(clicks + smoothing * prior) / (rows + smoothing)`. They are lookups from the codes, applied in one
place after encoding (`derive` on a matrix, one gather; `derive_row` on a vector), so every encoder
of codes gets them the same way. Training applies out-of-fold tables instead (`oof_tables`: a row's
own fold never counts towards its statistic); serving applies the stored full tables.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctr.schema import CAT_COLUMNS, FEATURE_COLUMNS, INT_COLUMNS

SCHEMA_VERSION = 2                 # 2: optional code_stats (derived features); 1 still loads
READABLE_SCHEMA_VERSIONS = (1, 2)
DERIVED_KINDS = ("count", "target")  # the derived blocks, in feature order
DEFAULT_DERIVED: tuple[str, ...] = ("count", "target")
DEFAULT_SMOOTHING = 20.0
N_FEATURES = len(FEATURE_COLUMNS)
CAT_INDEX = [FEATURE_COLUMNS.index(c) for c in CAT_COLUMNS]  # positions of categorical features
N_INT = len(INT_COLUMNS)
assert CAT_INDEX == list(range(N_INT, N_FEATURES))  # derive() reads the codes as one slice


class VocabCounter:
    """Exact per-column value counts, merged chunk by chunk in Arrow (no per-value Python work).

    Partial counts are compacted every `compact_every` chunks, so memory stays bounded by the
    number of distinct values, not the number of rows. The attributes `rows`, `missing` and
    `counts` (per column a mapping value -> count whose len() is the number of distinct values)
    are the interface the Spark job fills in from its own aggregation.
    """

    def __init__(self, compact_every: int = 8) -> None:
        self.rows = 0
        self.missing: dict[str, int] = dict.fromkeys(CAT_COLUMNS, 0)
        self._compact_every = compact_every
        self._parts: dict[str, list[pa.Table]] = {c: [] for c in CAT_COLUMNS}
        self._explicit: dict[str, Mapping[str, int]] | None = None

    def update(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        for c in CAT_COLUMNS:
            col = table.column(c)
            self.missing[c] += col.null_count
            vc = pc.value_counts(col)
            part = pa.Table.from_arrays([vc.field("values"), vc.field("counts")], names=["v", "n"])
            self._parts[c].append(part.filter(pc.is_valid(part.column("v"))))
            if len(self._parts[c]) >= self._compact_every:
                self._parts[c] = [self._merged(c)]

    def _merged(self, c: str) -> pa.Table:
        parts = self._parts[c]
        if not parts:
            return pa.table({"v": pa.array([], pa.string()), "n": pa.array([], pa.int64())})
        if len(parts) == 1:
            return parts[0]
        t = pa.concat_tables(parts).group_by("v").aggregate([("n", "sum")])
        return t.select(["v", "n_sum"]).rename_columns(["v", "n"])

    def distinct(self, c: str) -> int:
        if self._explicit is not None:
            return len(self._explicit[c])
        self._parts[c] = [self._merged(c)]
        return self._parts[c][0].num_rows

    def counts_at_least(self, c: str, min_count: int) -> dict[str, int]:
        """value -> count for the values seen at least `min_count` times (the only candidates)."""
        if self._explicit is not None:
            return {v: n for v, n in self._explicit[c].items() if n >= min_count}
        t = self._merged(c)
        self._parts[c] = [t]
        t = t.filter(pc.greater_equal(t.column("n"), min_count))
        return dict(zip(t.column("v").to_pylist(), t.column("n").to_pylist(), strict=True))

    @property
    def counts(self) -> Mapping[str, Mapping[str, int]]:
        if self._explicit is not None:
            return self._explicit
        return {c: self.counts_at_least(c, 1) for c in CAT_COLUMNS}

    @counts.setter
    def counts(self, value: Mapping[str, Mapping[str, int]]) -> None:
        self._explicit = dict(value)

    def vocabulary(self, min_count: int, max_vocab: int) -> dict[str, list[str]]:
        return select_vocabulary({c: self.counts_at_least(c, min_count) for c in CAT_COLUMNS}, min_count, max_vocab)

    def notes(self, vocab: Mapping[str, list[str]]) -> list[str]:
        """Plain-language warnings about degenerate columns (all missing, all unique)."""
        notes = []
        for c in CAT_COLUMNS:
            distinct = self.distinct(c)
            if self.rows and self.missing[c] == self.rows:
                notes.append(f"{c}: entirely missing in the training range; it carries no signal")
            elif distinct and distinct == self.rows - self.missing[c] and not vocab[c]:
                notes.append(f"{c}: every value is unique ({distinct}); all map to the rare code")
        return notes


def select_vocabulary(counts: Mapping[str, Mapping[str, int]], min_count: int, max_vocab: int) -> dict[str, list[str]]:
    """The vocabulary rule, shared by the local path and the Spark job: per column, values seen at
    least `min_count` times, most frequent first, ties broken by value, at most `max_vocab`."""
    out = {}
    for c in CAT_COLUMNS:
        kept = [(n, v) for v, n in counts.get(c, {}).items() if n >= min_count]
        kept.sort(key=lambda t: (-t[0], t[1]))
        out[c] = [v for _, v in kept[:max_vocab]]
    return out


MISSING_MODES = ("nan", "code")


@dataclass
class FeatureTransform:
    """Vocabularies plus the settings of the transform; saved as features.json.

    `missing="nan"`: a missing categorical is NaN (LightGBM sends it with the non-listed
    categories). `missing="code"`: it gets its own code V+1, so a split can group it with
    either side. Rare/unseen values always get code V.
    """

    vocab: dict[str, list[str]]
    min_count: int = 10
    max_vocab: int = 10_000
    notes: list[str] = field(default_factory=list)
    missing: str = "nan"
    # per column, per code slot (0..V-1, rare V, missing V+1): training rows and clicks; None = no derived features
    code_stats: dict[str, dict[str, list[int]]] | None = None
    derived: tuple[str, ...] = ()
    smoothing: float = DEFAULT_SMOOTHING
    _index: dict[str, dict[str, int]] = field(init=False, repr=False)
    _arrays: dict[str, pa.Array] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.missing not in MISSING_MODES:
            raise ValueError(f"missing={self.missing!r} is not one of {', '.join(MISSING_MODES)}")
        self.derived = tuple(self.derived)
        if any(k not in DERIVED_KINDS for k in self.derived) or len(set(self.derived)) != len(self.derived):
            raise ValueError(f"derived={list(self.derived)!r}: each must be one of {', '.join(DERIVED_KINDS)}, once")
        if self.derived and self.code_stats is None:
            raise ValueError(f"derived features {list(self.derived)} need code_stats")
        if not (math.isfinite(self.smoothing) and self.smoothing > 0):
            raise ValueError(f"smoothing={self.smoothing!r} must be a positive number")
        self._init_derived()
        self._index = {c: {v: i for i, v in enumerate(self.vocab[c])} for c in CAT_COLUMNS}
        self._arrays = {c: pa.array(self.vocab[c], type=pa.string()) for c in CAT_COLUMNS}
        # per categorical column: (index, rare code, missing code) for the single-row path
        self._cat_plan = [(self._index[c], float(len(self.vocab[c])), self.missing_code(c)) for c in CAT_COLUMNS]

    def missing_code(self, c: str) -> float:
        """The code of a missing value in categorical column `c`: NaN, or V+1 in "code" mode."""
        return math.nan if self.missing == "nan" else float(len(self.vocab[c]) + 1)

    @property
    def vocab_sizes(self) -> dict[str, int]:
        return {c: len(self.vocab[c]) for c in CAT_COLUMNS}

    # ---- derived features (lookups from the codes) -------------------------------------
    def _init_derived(self) -> None:
        sizes = np.array([len(self.vocab[c]) + 2 for c in CAT_COLUMNS], dtype=np.intp)  # slots 0..V+1
        self._slot_offset = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.intp)
        self._missing_slot = (sizes - 1).astype(np.float64)  # V+1: where NaN (missing) codes look up
        self._missing_slots = [int(v) for v in sizes - 1]
        self._table = np.empty(0)
        self._row_tables: list[list[float]] = []
        if not self.derived:
            return
        assert self.code_stats is not None
        for part in ("rows", "clicks"):
            got = self.code_stats.get(part)
            if not isinstance(got, dict):
                raise ValueError(f"code_stats lacks {part!r}")
            for c, size in zip(CAT_COLUMNS, sizes, strict=True):
                if len(got.get(c, ())) != size:
                    raise ValueError(f"code_stats {part} of {c} has {len(got.get(c, ()))} slots, expected {size} "
                                     "(vocabulary size + rare + missing)")
        rows = self._stat_array("rows")
        clicks = self._stat_array("clicks")
        self._table = self.tables(rows, clicks)
        # the single-row path: per block, per column, the column's slots as a Python list
        self._row_tables = [self._table[b, o:o + n].tolist() for b in range(len(self.derived))
                            for o, n in zip(self._slot_offset, sizes, strict=True)]

    def _stat_array(self, part: str) -> np.ndarray:
        assert self.code_stats is not None
        return np.concatenate([np.asarray(self.code_stats[part][c], dtype=np.int64) for c in CAT_COLUMNS])

    def tables(self, rows: np.ndarray, clicks: np.ndarray, prior: float | None = None) -> np.ndarray:
        """(len(derived), slots) float64 lookup tables from flat per-slot rows and clicks.

        `prior` defaults to the click rate of the stored statistics, so out-of-fold tables shrink
        towards the same prior as the served one."""
        if prior is None:
            prior = self.prior
        out = np.empty((len(self.derived), len(rows)), dtype=np.float64)
        for b, kind in enumerate(self.derived):
            if kind == "count":
                out[b] = rows.astype(np.float64)
            else:
                out[b] = (clicks + self.smoothing * prior) / (rows + self.smoothing)
        return out

    @property
    def prior(self) -> float:
        """The click rate of the training rows the statistics count (0.0 without statistics)."""
        if self.code_stats is None:
            return 0.0
        c0 = CAT_COLUMNS[0]  # every row is in exactly one slot of every column
        n = sum(self.code_stats["rows"][c0])
        return sum(self.code_stats["clicks"][c0]) / n if n else 0.0

    @property
    def n_features(self) -> int:
        """Width of the model's input: the 39 codes plus 26 per derived block."""
        return N_FEATURES + len(self.derived) * len(CAT_COLUMNS)

    @property
    def feature_names(self) -> list[str]:
        return FEATURE_COLUMNS + [f"{c}_{kind}" for kind in self.derived for c in CAT_COLUMNS]

    def slots(self, x: np.ndarray) -> np.ndarray:
        """Codes matrix (n, 39) -> flat table slot of every categorical (n, 26): NaN -> the missing slot."""
        codes = x[:, N_INT:N_FEATURES]  # a view: the categoricals follow the integers (CAT_INDEX)
        nan = np.isnan(codes)
        if nan.any():
            codes = np.where(nan, self._missing_slot, codes)
        return codes.astype(np.intp) + self._slot_offset

    def derive(self, x: np.ndarray, tables: np.ndarray | None = None, folds: np.ndarray | None = None) -> np.ndarray:
        """Codes matrix (n, 39) -> the model's input (n, n_features): the codes, then the derived lookups.

        Without derived features it returns `x` itself. `tables` (and per-row `folds`, indexing its first
        axis) replace the stored tables: training's out-of-fold statistics (`oof_tables`)."""
        if not self.derived:
            return x
        if x.ndim != 2 or x.shape[1] != N_FEATURES:
            raise ValueError(f"codes matrix has shape {x.shape}, expected (n, {N_FEATURES})")
        n, k = len(x), len(CAT_COLUMNS)
        out = np.empty((n, self.n_features), dtype=np.float64)
        out[:, :N_FEATURES] = x
        slots = self.slots(x)
        for b in range(len(self.derived)):
            if tables is None:
                table = self._table[b]
                out[:, N_FEATURES + b * k:N_FEATURES + (b + 1) * k] = table[slots]
            else:
                assert folds is not None
                out[:, N_FEATURES + b * k:N_FEATURES + (b + 1) * k] = tables[folds[:, None], b, slots]
        return out

    def derive_row(self, vec: list[float]) -> list[float]:
        """One codes vector (39) -> the model's input; bit-identical to `derive` (pure Python)."""
        if not self.derived:
            return vec
        slot = [m if v != v else int(v) for v, m in zip(vec[N_INT:], self._missing_slots, strict=True)]
        return vec + list(map(list.__getitem__, self._row_tables, slot * len(self.derived)))

    def count_slots(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows and clicks per flat slot of a codes matrix and its labels (int64; add them up per fold)."""
        total = int(self._slot_offset[-1] + self._missing_slot[-1] + 1)
        slots = self.slots(x).ravel()
        yy = np.repeat(np.asarray(y, dtype=np.int64), len(CAT_COLUMNS))
        rows = np.bincount(slots, minlength=total).astype(np.int64)
        clicks = np.bincount(slots[yy == 1], minlength=total).astype(np.int64)
        return rows, clicks

    def with_stats(self, rows: np.ndarray, clicks: np.ndarray, derived: tuple[str, ...] = DEFAULT_DERIVED,
                   smoothing: float = DEFAULT_SMOOTHING) -> FeatureTransform:
        """This transform with derived features from flat per-slot rows and clicks (`count_slots`)."""
        stats: dict[str, dict[str, list[int]]] = {"rows": {}, "clicks": {}}
        for j, c in enumerate(CAT_COLUMNS):
            o, n = int(self._slot_offset[j]), len(self.vocab[c]) + 2
            stats["rows"][c] = [int(v) for v in rows[o:o + n]]
            stats["clicks"][c] = [int(v) for v in clicks[o:o + n]]
        return FeatureTransform(vocab=self.vocab, min_count=self.min_count, max_vocab=self.max_vocab, notes=self.notes,
                                missing=self.missing, code_stats=stats, derived=derived, smoothing=smoothing)

    def without_stats(self) -> FeatureTransform:
        """The codes-only transform (the vocabulary and settings, no derived features)."""
        return FeatureTransform(vocab=self.vocab, min_count=self.min_count, max_vocab=self.max_vocab, notes=self.notes,
                                missing=self.missing)

    def oof_tables(self, fold_rows: np.ndarray, fold_clicks: np.ndarray) -> np.ndarray:
        """(folds, len(derived), slots) tables: fold f's statistics count every fold but f (the counts
        count every row: they use no label). `fold_rows`/`fold_clicks` are (folds, slots)."""
        total_rows, total_clicks = fold_rows.sum(axis=0), fold_clicks.sum(axis=0)
        out = np.empty((len(fold_rows), len(self.derived), len(total_rows)), dtype=np.float64)
        for f in range(len(fold_rows)):
            out[f] = self.tables(total_rows - fold_rows[f], total_clicks - fold_clicks[f])
            for b, kind in enumerate(self.derived):
                if kind == "count":
                    out[f, b] = total_rows.astype(np.float64)
        return out

    # ---- persistence -------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.derived:
            extra = {"derived": list(self.derived), "smoothing": self.smoothing, "code_stats": self.code_stats}
        return {
            **extra,
            "schema_version": SCHEMA_VERSION if self.derived else 1,
            "int_columns": INT_COLUMNS,
            "cat_columns": CAT_COLUMNS,
            "missing": self.missing,
            "rare_code": "vocabulary size of the column",
            "min_count": self.min_count,
            "max_vocab": self.max_vocab,
            "vocab_sizes": self.vocab_sizes,
            "notes": self.notes,
            "vocab": self.vocab,
        }

    def save(self, path: Path) -> None:
        """Deterministic bytes: sorted keys, no whitespace, vocabularies in their rule's order."""
        path.write_text(json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: Path) -> FeatureTransform:
        return cls.from_json(json.loads(Path(path).read_text()), str(path))

    @classmethod
    def from_json(cls, d: Any, source: str = "features.json") -> FeatureTransform:
        """The transform from its parsed JSON document (ValueError naming `source` if unusable)."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: not a JSON object")
        if d.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
            raise ValueError(f"{source}: features schema_version {d.get('schema_version')!r}, expected one of "
                             f"{list(READABLE_SCHEMA_VERSIONS)}")
        missing = [c for c in CAT_COLUMNS if c not in d.get("vocab", {})]
        if missing:
            raise ValueError(f"{source}: vocabulary lacks columns {missing}")
        return cls(vocab=d["vocab"], min_count=d["min_count"], max_vocab=d["max_vocab"], notes=d.get("notes", []),
                   missing=d.get("missing", "nan"), code_stats=d.get("code_stats"), derived=tuple(d.get("derived", ())),
                   smoothing=float(d.get("smoothing", DEFAULT_SMOOTHING)))

    @classmethod
    def fit(cls, tables: Iterable[pa.Table], min_count: int = 10, max_vocab: int = 10_000,
            missing: str = "nan") -> FeatureTransform:
        counter = VocabCounter()
        for t in tables:
            counter.update(t)
        return cls.from_counter(counter, min_count, max_vocab, missing)

    @classmethod
    def from_counter(cls, counter: VocabCounter, min_count: int = 10, max_vocab: int = 10_000,
                     missing: str = "nan") -> FeatureTransform:
        vocab = counter.vocabulary(min_count, max_vocab)
        return cls(vocab=vocab, min_count=min_count, max_vocab=max_vocab, notes=counter.notes(vocab), missing=missing)

    # ---- transforms --------------------------------------------------------------------
    def transform_table(self, table: pa.Table, out: np.ndarray | None = None) -> np.ndarray:
        """Arrow table with I/C columns -> float64 matrix (n, 39); fills `out` when given."""
        n = table.num_rows
        if out is None:
            out = np.empty((n, N_FEATURES), dtype=np.float64)
        elif out.shape != (n, N_FEATURES):
            raise ValueError(f"output matrix has shape {out.shape}, expected {(n, N_FEATURES)}")
        for j, c in enumerate(INT_COLUMNS):
            col = table.column(c)
            out[:, j] = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
        for j, c in zip(CAT_INDEX, CAT_COLUMNS, strict=True):
            col = table.column(c)
            idx = pc.index_in(col, value_set=self._arrays[c])
            rare = float(len(self.vocab[c]))
            codes = pc.fill_null(pc.cast(idx, pa.float64()), rare).to_numpy(zero_copy_only=False)
            if col.null_count:
                codes = np.where(pc.is_null(col).to_numpy(zero_copy_only=False), self.missing_code(c), codes)
            out[:, j] = codes
        return out

    def row(self, row: Mapping[str, Any]) -> list[float]:
        """One already-validated row (absent key or None = missing) -> feature vector.

        The single-row fast path (no Arrow, no numpy); bit-identical to `transform_table`."""
        get = row.get
        vec = [math.nan if (v := get(c)) is None else float(v) for c in INT_COLUMNS]
        for c, (idx, rare, miss) in zip(CAT_COLUMNS, self._cat_plan, strict=True):
            v = get(c)
            vec.append(miss if v is None else float(idx.get(v.lower(), rare)))
        return vec

    def rows_matrix(self, rows: Iterable[Mapping[str, Any]]) -> np.ndarray:
        """Several validated rows -> float64 matrix (n, 39) through the single-row path."""
        x = np.array([self.row(r) for r in rows], dtype=np.float64)
        return x.reshape(-1, N_FEATURES)
