"""Vocabularies and the row -> feature-vector transform, shared by training and serving.

Feature vector (float64, 39 wide, in FEATURE_COLUMNS order):
  * I1..I13: the integer as a float, NaN when missing. No log transform: trees are invariant
    to monotone transforms, and the raw value keeps serving trivially exact.
  * C1..C26: an integer code. Values seen at least `min_count` times in the training range
    get codes 0..V-1 (most frequent first, ties by value, so the order is deterministic);
    rare and unseen values share the reserved code V; missing is NaN (LightGBM's native
    missing handling for categorical features).

`transform_table` (vectorised, Arrow) and `FeatureTransform.row` (one dict, pure Python)
produce bit-identical vectors; tests prove it.
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

SCHEMA_VERSION = 1
N_FEATURES = len(FEATURE_COLUMNS)
CAT_INDEX = [FEATURE_COLUMNS.index(c) for c in CAT_COLUMNS]  # positions of categorical features


class VocabCounter:
    """Exact per-column value counts, merged chunk by chunk."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {c: {} for c in CAT_COLUMNS}
        self.rows = 0
        self.missing: dict[str, int] = dict.fromkeys(CAT_COLUMNS, 0)

    def update(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        for c in CAT_COLUMNS:
            col = table.column(c)
            self.missing[c] += col.null_count
            vc = pc.value_counts(col)
            values = vc.field("values").to_pylist()
            counts = vc.field("counts").to_pylist()
            d = self.counts[c]
            for v, n in zip(values, counts, strict=True):
                if v is not None:
                    d[v] = d.get(v, 0) + n

    def vocabulary(self, min_count: int, max_vocab: int) -> dict[str, list[str]]:
        return select_vocabulary(self.counts, min_count, max_vocab)

    def notes(self, vocab: Mapping[str, list[str]]) -> list[str]:
        """Plain-language warnings about degenerate columns (all missing, all unique)."""
        notes = []
        for c in CAT_COLUMNS:
            distinct = len(self.counts[c])
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


@dataclass
class FeatureTransform:
    vocab: dict[str, list[str]]
    min_count: int = 10
    max_vocab: int = 10_000
    notes: list[str] = field(default_factory=list)
    _index: dict[str, dict[str, int]] = field(init=False, repr=False)
    _arrays: dict[str, pa.Array] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = {c: {v: i for i, v in enumerate(self.vocab[c])} for c in CAT_COLUMNS}
        self._arrays = {c: pa.array(self.vocab[c], type=pa.string()) for c in CAT_COLUMNS}

    # ---- persistence -------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "int_columns": INT_COLUMNS,
            "cat_columns": CAT_COLUMNS,
            "missing": "nan",
            "rare_code": "vocabulary size of the column",
            "min_count": self.min_count,
            "max_vocab": self.max_vocab,
            "vocab_sizes": {c: len(self.vocab[c]) for c in CAT_COLUMNS},
            "notes": self.notes,
            "vocab": self.vocab,
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: Path) -> FeatureTransform:
        d = json.loads(Path(path).read_text())
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{path}: features schema_version {d.get('schema_version')!r}, expected {SCHEMA_VERSION}")
        missing = [c for c in CAT_COLUMNS if c not in d.get("vocab", {})]
        if missing:
            raise ValueError(f"{path}: vocabulary lacks columns {missing}")
        return cls(vocab=d["vocab"], min_count=d["min_count"], max_vocab=d["max_vocab"], notes=d.get("notes", []))

    @classmethod
    def fit(cls, tables: Iterable[pa.Table], min_count: int = 10, max_vocab: int = 10_000) -> FeatureTransform:
        counter = VocabCounter()
        for t in tables:
            counter.update(t)
        vocab = counter.vocabulary(min_count, max_vocab)
        return cls(vocab=vocab, min_count=min_count, max_vocab=max_vocab, notes=counter.notes(vocab))

    # ---- transforms --------------------------------------------------------------------
    def transform_table(self, table: pa.Table) -> np.ndarray:
        """Arrow table with I/C columns -> float64 matrix (n, 39)."""
        n = table.num_rows
        out = np.empty((n, N_FEATURES), dtype=np.float64)
        for j, c in enumerate(INT_COLUMNS):
            col = table.column(c)
            out[:, j] = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
        for j, c in zip(CAT_INDEX, CAT_COLUMNS, strict=True):
            col = table.column(c)
            idx = pc.index_in(col, value_set=self._arrays[c])
            rare = float(len(self.vocab[c]))
            codes = pc.fill_null(pc.cast(idx, pa.float64()), rare).to_numpy(zero_copy_only=False)
            if col.null_count:
                codes = np.where(pc.is_null(col).to_numpy(zero_copy_only=False), np.nan, codes)
            out[:, j] = codes
        return out

    def row(self, row: Mapping[str, Any]) -> list[float]:
        """One already-validated row (absent key or None = missing) -> feature vector."""
        vec: list[float] = []
        for c in INT_COLUMNS:
            v = row.get(c)
            vec.append(math.nan if v is None else float(v))
        for c in CAT_COLUMNS:
            v = row.get(c)
            if v is None:
                vec.append(math.nan)
            else:
                idx = self._index[c]
                vec.append(float(idx.get(v.lower(), len(idx))))
        return vec
