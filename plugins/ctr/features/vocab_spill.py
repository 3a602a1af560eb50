"""Exact categorical value counts in bounded memory: sorted runs spilled to disk, merged by key range.

At full Criteo scale several columns hold millions of distinct values (C3: about 10 million), so
keeping every (value, count) pair in RAM grows with the data. This counter keeps RAM bounded by
its buffer size instead, and stays exact:

  * Staged categorical values are canonical 8-hex-digit strings (`ctr.data.reader` validates and
    lower-cases them), so each is a uint32 key; lexical order of the strings = numeric order.
  * Per chunk and column: the keys are counted in Arrow (hash `value_counts`) and appended to the
    column's buffer. When a buffer holds more than `buffer_entries` pairs it is compacted (sort,
    sum equal keys); a compacted buffer still over half the limit is appended to the column's
    spill files as one sorted run (keys uint32 + counts int64, 12 bytes a pair).
  * At the end every run is cut into 256 key ranges (the positions were found by binary search
    when the run was written); ranges are merged in groups of at most `buffer_entries` pairs
    (read, sort, sum), and only values seen at least `min_count` times stay in memory.

Memory: per column at most `buffer_entries` + one chunk's distinct values in the buffer, plus one
merge group at a time, whatever the number of rows. Disk: at most 12 bytes per (chunk, distinct
value) pair. `vocabulary()` still applies the one rule, `ctr.features.transform.select_vocabulary`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctr.data.spill_dir import SpillDir
from ctr.features.transform import VocabCounter, select_vocabulary
from ctr.schema import CAT_COLUMNS

log = logging.getLogger(__name__)

DEFAULT_BUFFER_ENTRIES = 1 << 18   # pairs per column before a compaction (about 3 MiB)
RANGES = 256                       # key ranges per run (top 8 bits of the key)
_EDGES = (np.arange(1, RANGES, dtype=np.uint64) << np.uint64(24)).astype(np.uint32)
_NIBBLE = np.full(256, 255, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16, dtype=np.uint8)


class NotCanonicalHex(ValueError):
    """A categorical value is not 8 lower-case hex digits (the staged form)."""


def hex_keys(col: pa.Array | pa.ChunkedArray, column: str = "?") -> np.ndarray:
    """uint32 keys of the non-null values of a column of canonical 8-hex-digit strings, in order."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.type != pa.string():
        arr = pc.cast(arr, pa.string())
    arr = pc.drop_null(arr)
    n = len(arr)
    if n == 0:
        return np.empty(0, dtype=np.uint32)
    bufs = arr.buffers()
    off = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4)
    if int(off[-1]) - int(off[0]) != 8 * n or np.any(np.diff(off) != 8):
        raise NotCanonicalHex(f"{column}: values must be 8 lower-case hex digits (staged form); "
                              "count free-form strings with ctr.features.transform.VocabCounter")
    nib = _NIBBLE[np.frombuffer(bufs[2], dtype=np.uint8)[off[0]: off[-1]]]
    if nib.max() > 15:
        raise NotCanonicalHex(f"{column}: values must be 8 lower-case hex digits (staged form); "
                              "count free-form strings with ctr.features.transform.VocabCounter")
    nib = nib.reshape(n, 8)
    be = (nib[:, 0::2] << 4) | nib[:, 1::2]  # (n, 4) bytes, most significant first
    return np.ascontiguousarray(be).view(">u4").ravel().astype(np.uint32)


def key_strings(keys: np.ndarray) -> list[str]:
    return [format(k, "08x") for k in keys.tolist()]


def reduce_sorted(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct keys, summed counts)."""
    if len(keys) == 0:
        return keys.astype(np.uint32), counts.astype(np.int64)
    order = np.argsort(keys, kind="stable")
    k, n = keys[order], counts[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    return k[starts], np.add.reduceat(n, starts).astype(np.int64)


@dataclass
class _Run:
    offset: int                 # first pair of the run in the column's spill files
    bounds: np.ndarray          # RANGES + 1 positions inside the run, one per key range


@dataclass
class _Column:
    keys: list[np.ndarray] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)
    entries: int = 0
    runs: list[_Run] = field(default_factory=list)
    spilled: int = 0            # pairs written so far
    merged: tuple[int, np.ndarray, np.ndarray, int] | None = None  # (min_count, keys, counts, distinct)


class SpillingVocabCounter(VocabCounter):
    """`VocabCounter`'s interface (rows, missing, distinct, counts_at_least, vocabulary, notes) with
    exact counts in bounded memory. Use as a context manager, or call `close()`, to remove the spill."""

    def __init__(self, spill_dir: Path | None = None, buffer_entries: int = DEFAULT_BUFFER_ENTRIES) -> None:
        super().__init__()
        if buffer_entries < 1024:
            raise ValueError(f"buffer_entries={buffer_entries} is too small; use at least 1024")
        self.buffer_entries = buffer_entries
        self._spill = SpillDir(spill_dir, prefix="ctr-vocab-")
        self.dir = self._spill.path
        self._cols = {c: _Column() for c in CAT_COLUMNS}

    def close(self) -> None:
        self._spill.close()

    def __enter__(self) -> SpillingVocabCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def spilled_pairs(self) -> dict[str, int]:
        return {c: s.spilled for c, s in self._cols.items() if s.spilled}

    # ---- counting ------------------------------------------------------------------------
    def update(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        for c in CAT_COLUMNS:
            col = table.column(c)
            self.missing[c] += col.null_count
            keys = hex_keys(col, c)
            if len(keys) == 0:
                continue
            vc = pc.value_counts(pa.array(keys))
            s = self._cols[c]
            s.merged = None
            s.keys.append(vc.field("values").to_numpy())
            s.counts.append(vc.field("counts").to_numpy().astype(np.int64))
            s.entries += len(vc)
            if s.entries > self.buffer_entries:
                self._compact(c, spill_over=self.buffer_entries // 2)

    def _compact(self, c: str, spill_over: int) -> None:
        s = self._cols[c]
        k, n = reduce_sorted(np.concatenate(s.keys), np.concatenate(s.counts)) if s.keys else \
            (np.empty(0, np.uint32), np.empty(0, np.int64))
        if len(k) > spill_over:
            bounds = np.concatenate([[0], np.searchsorted(k, _EDGES), [len(k)]]).astype(np.int64)
            with open(self.dir / f"{c}.keys", "ab") as fk, open(self.dir / f"{c}.counts", "ab") as fn:
                k.astype(np.uint32).tofile(fk)
                n.astype(np.int64).tofile(fn)
            s.runs.append(_Run(s.spilled, bounds))
            s.spilled += len(k)
            s.keys, s.counts, s.entries = [], [], 0
        else:
            s.keys, s.counts, s.entries = [k], [n], len(k)

    # ---- merging -------------------------------------------------------------------------
    def _merge(self, c: str, min_count: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(keys, counts) of values seen at least `min_count` times, sorted by key; distinct values."""
        s = self._cols[c]
        if s.merged is not None and s.merged[0] <= min_count:
            _, k, n, distinct = s.merged
            keep = n >= min_count
            return k[keep], n[keep], distinct
        self._compact(c, spill_over=0 if s.runs else self.buffer_entries)
        if not s.runs:  # everything fits in the buffer
            k, n = (s.keys[0], s.counts[0]) if s.keys else (np.empty(0, np.uint32), np.empty(0, np.int64))
            keep = n >= min_count
            s.merged = (min_count, k[keep], n[keep], len(k))
            return k[keep], n[keep], len(k)
        sizes = np.sum([np.diff(r.bounds) for r in s.runs], axis=0)  # pairs per key range, all runs
        kept_k, kept_n, distinct = [], [], 0
        with open(self.dir / f"{c}.keys", "rb") as fk, open(self.dir / f"{c}.counts", "rb") as fn:
            lo = 0
            while lo < RANGES:
                hi, total = lo + 1, int(sizes[lo])
                while hi < RANGES and total + int(sizes[hi]) <= self.buffer_entries:
                    total += int(sizes[hi])
                    hi += 1
                ks, ns = [], []
                for r in s.runs:
                    a, b = int(r.bounds[lo]), int(r.bounds[hi])
                    if b > a:
                        fk.seek((r.offset + a) * 4)
                        ks.append(np.fromfile(fk, dtype=np.uint32, count=b - a))
                        fn.seek((r.offset + a) * 8)
                        ns.append(np.fromfile(fn, dtype=np.int64, count=b - a))
                if ks:
                    k, n = reduce_sorted(np.concatenate(ks), np.concatenate(ns))
                    distinct += len(k)
                    keep = n >= min_count
                    kept_k.append(k[keep])
                    kept_n.append(n[keep])
                lo = hi
        k = np.concatenate(kept_k) if kept_k else np.empty(0, np.uint32)
        n = np.concatenate(kept_n) if kept_n else np.empty(0, np.int64)
        s.merged = (min_count, k, n, distinct)
        return k, n, distinct

    def distinct(self, c: str) -> int:
        if self._explicit is not None:
            return len(self._explicit[c])
        merged = self._cols[c].merged  # reuse the last merge; else merge keeping nothing in memory
        return self._merge(c, merged[0] if merged else np.iinfo(np.int64).max)[2]

    def counts_at_least(self, c: str, min_count: int) -> dict[str, int]:
        if self._explicit is not None:
            return super().counts_at_least(c, min_count)
        k, n, _ = self._merge(c, min_count)
        return dict(zip(key_strings(k), n.tolist(), strict=True))

    def vocabulary(self, min_count: int, max_vocab: int) -> dict[str, list[str]]:
        """`select_vocabulary` on each column's top `max_vocab` candidates (count descending, value
        ascending: for 8-hex-digit strings value order = key order), which is what the rule keeps."""
        if self._explicit is not None:
            return super().vocabulary(min_count, max_vocab)
        top: dict[str, Mapping[str, int]] = {}
        for c in CAT_COLUMNS:
            k, n, _ = self._merge(c, min_count)
            order = np.lexsort((k, -n))[:max_vocab]
            top[c] = dict(zip(key_strings(k[order]), n[order].tolist(), strict=True))
        return select_vocabulary(top, min_count, max_vocab)
