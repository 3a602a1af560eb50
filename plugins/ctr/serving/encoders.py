"""Raw Criteo TSV batches -> feature matrix in a handful of numpy passes (the service's batch path).

`NumpyTsvEncoder.encode(body)` reads the body's bytes in place: one scan finds the 40 separators of
every line, each field is then loaded as one unaligned 8-byte word (a strided uint64 view of the
body), categoricals are decoded with the 16-bit hex-pair table of fast.py and integers with the
8-digits-at-once SWAR parse (Lemire / simdjson), all vectorised over the whole batch. There is no
per-line or per-field Python, no Arrow table and no string column.

It accepts only a strict subset of what `ctr.data.reader` accepts, and gives exactly its values:
LF line ends, exactly 40 fields per line, label empty/0/1, integers `-?[0-9]{1,15}` (so |v| < 2^53
and the float is exact) or empty, categoricals 8 hex digits or empty. Anything else (CR, short or
blank lines, headers, `1.0`, `+5`, spaces, 16+ digits, bad hex, non-ASCII) returns None and the
caller falls back to fast.TsvEncoder, then to the reader, which names the bad line and field.
Tests prove bit-identity with the reader + `FeatureTransform.transform_table` on random bodies.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ctr.features.transform import N_FEATURES, FeatureTransform
from ctr.schema import CAT_COLUMNS, INT_ABS_MAX, INT_COLUMNS, LABEL, N_FIELDS
from ctr.serving.predictors import _HEX_PAIR, vocabulary_index

_N_INT = len(INT_COLUMNS)
_FIRST_CAT = 1 + _N_INT
_SEPARATORS = np.array([9] * (N_FIELDS - 1) + [10], dtype=np.uint8)  # a line: 39 tabs, then LF
_HEX_CHARS = frozenset("0123456789abcdefABCDEF")
_PAD = b"\0" * 8  # so the 8-byte load of a field that ends the body stays inside the buffer

_ASCII_ZEROS = np.uint64(0x3030303030303030)
_HIGH_NIBBLES = np.uint64(0xF0F0F0F0F0F0F0F0)
_SIXES = np.uint64(0x0606060606060606)
_MASK = np.uint64(0x000000FF000000FF)
_MUL1 = np.uint64(100 + (1000000 << 32))
_MUL2 = np.uint64(1 + (10000 << 32))
_TEN = np.uint64(10)
_8, _16, _32 = np.uint64(8), np.uint64(16), np.uint64(32)
_E8 = np.uint64(10**8)
# _FILL[k]: ASCII '0' in the low 8-k bytes (the leading zeros of a k-digit number right-aligned)
_FILL = np.array([0x3030303030303030 >> (8 * k) if k < 8 else 0 for k in range(9)], dtype=np.uint64)
MAX_DIGITS = 15  # 10^15 - 1 < 2^53: every accepted integer is exact as float64


def _words(buf: bytes) -> np.ndarray:
    """Every byte offset of `buf` as the start of a little-endian uint64 (read-only, no copy)."""
    return np.ndarray(shape=(len(buf) - 7,), dtype="<u8", buffer=buf, offset=0, strides=(1,))


def _digits(words: np.ndarray, start: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Value of the `length` (0..8) ASCII digits at `start`, and whether they all are digits."""
    keep = np.maximum(length, 1).astype(np.uint64)
    x = (words[start] << ((np.uint64(8) - keep) * _8)) | _FILL[length]  # right-aligned, '0'-filled
    ok = ((x & _HIGH_NIBBLES) == _ASCII_ZEROS) & (((x + _SIXES) & _HIGH_NIBBLES) == _ASCII_ZEROS)
    x = x - _ASCII_ZEROS
    x = x * _TEN + (x >> _8)
    x = ((x & _MASK) * _MUL1 + ((x >> _16) & _MASK) * _MUL2) >> _32
    return np.where(length == 0, np.uint64(0), x), ok | (length == 0)


class NumpyTsvEncoder:
    """Raw Criteo lines (bytes) -> float64 matrix (n, 39) equal to reader + transform_table, or None."""

    def __init__(self, transform: FeatureTransform) -> None:
        self.index, codes = vocabulary_index(transform)
        sizes = [len(transform.vocab[c]) for c in CAT_COLUMNS]
        # the index holds the vocabularies one after the other, each in code order: code = pos - offset
        self.offset = np.cumsum([0, *sizes[:-1]]).astype(np.int64)
        if not np.array_equal(codes, np.arange(len(codes)) - np.repeat(self.offset, sizes)):
            raise ValueError("vocabulary index is not in code order")
        self.rare = np.array(sizes, dtype=np.float64)
        self.missing = np.array([transform._missing_code(c) for c in CAT_COLUMNS])  # NaN or V+1
        self.column_tag = np.arange(len(CAT_COLUMNS), dtype=np.uint64) << np.uint64(32)

    def encode(self, body: bytes) -> np.ndarray | None:
        if not body or b"\r" in body:
            return None
        size = len(body) + (body[-1] != 10)
        buf = body + _PAD if body[-1] == 10 else body + b"\n" + _PAD
        raw = np.frombuffer(buf, dtype=np.uint8)
        sep = np.flatnonzero(raw[:size] < 11)  # tabs, LFs (and any other control byte)
        n, extra = divmod(len(sep), N_FIELDS)
        if extra or not n:
            return None
        sep = sep.reshape(n, N_FIELDS)
        if not np.array_equal(raw[sep], np.broadcast_to(_SEPARATORS, sep.shape)):
            return None  # every line: 39 tabs then LF, no other control byte
        start = np.empty_like(sep)
        start.ravel()[0] = 0
        start.ravel()[1:] = sep.ravel()[:-1] + 1
        length = sep - start

        first = raw[start[:, :_FIRST_CAT]]  # first byte of label and integers (the separator if empty)
        lab_len, lab = length[:, 0], first[:, 0]
        if lab_len.max() > 1 or not np.all((lab == 48) | (lab == 49) | (lab_len == 0)):
            return None

        words = _words(buf)
        out = np.empty((n, N_FEATURES), dtype=np.float64)

        # integers: optional '-', 1..15 digits, as one or two 8-digit SWAR parses
        ilen = length[:, 1:_FIRST_CAT]
        neg = first[:, 1:] == 45
        dstart = start[:, 1:_FIRST_CAT] + neg
        dlen = ilen - neg
        empty = ilen == 0
        if not np.all(empty | ((dlen >= 1) & (dlen <= MAX_DIGITS))):
            return None
        if dlen.max() > 8:
            lo_len = np.minimum(dlen, 8)
            hi_len = dlen - lo_len
            lo, ok = _digits(words, dstart + hi_len, lo_len)
            hi, hi_ok = _digits(words, dstart, hi_len)
            value = hi * _E8 + lo
            ok &= hi_ok
        else:
            value, ok = _digits(words, dstart, dlen)
        if not np.all(ok):
            return None
        value = value.astype(np.int64)
        value = np.where(neg, -value, value).astype(np.float64)  # negated as an integer: "-0" is 0.0
        out[:, :_N_INT] = np.where(empty, np.nan, value)

        # categoricals: 8 hex digits (either case) -> uint32 -> vocabulary code
        clen = length[:, _FIRST_CAT:]
        null = clen == 0
        if not np.all(null | (clen == 8)):
            return None
        w = words[start[:, _FIRST_CAT:]]
        any_null = bool(null.any())
        if any_null:
            w = np.where(null, _ASCII_ZEROS, w)  # the word of an empty field holds the next fields' bytes
        pairs = _HEX_PAIR[w.view(np.uint16)]  # (n, 26*4): byte values, 256 where not hex
        if int(pairs.max()) > 255:
            return None
        keys = pairs.astype(np.uint8).view(">u4").astype(np.uint64) | self.column_tag
        pos = self.index.get_indexer(keys.ravel()).reshape(keys.shape)
        codes = np.where(pos >= 0, pos - self.offset, self.rare)
        out[:, _FIRST_CAT - 1:] = np.where(null, self.missing, codes) if any_null else codes
        return out


class JsonRowsEncoder:
    """Parsed JSON rows (dicts) -> float64 matrix (n, 39) in one pass, or None for the checked path.

    `validation.check_rows` followed by `FeatureTransform.row` walks every row twice and builds a
    dict per row; this walks each row once, taking only the plain spellings (int within +/-2^53 or
    null for I*, 8 hex digits or null for C*, 0/1/null label) and writing the same float the
    transform writes. Anything else returns None: the caller then runs `check_rows`, which names
    the row and field of a mistake (or accepts a spelling this skips, such as 3.0), and the
    transform. Tests prove equality with `rows_matrix(check_rows(rows))`.
    """

    def __init__(self, transform: FeatureTransform) -> None:
        self.plan: dict[str, tuple[int, int, dict[str, int] | None, float]] = {}
        for j, c in enumerate(INT_COLUMNS):
            self.plan[c] = (0, j, None, 0.0)
        for j, c in enumerate(CAT_COLUMNS):
            index = {v: i for i, v in enumerate(transform.vocab[c])}
            self.plan[c] = (1, _N_INT + j, index, float(len(transform.vocab[c])))
        self.plan[LABEL] = (2, 0, None, 0.0)
        self.template = [math.nan] * _N_INT + [transform._missing_code(c) for c in CAT_COLUMNS]

    def encode(self, rows: list[Any]) -> np.ndarray | None:
        plan, template, hexdigits, limit = self.plan, self.template, _HEX_CHARS, INT_ABS_MAX
        vecs = []
        for r in rows:
            if type(r) is not dict:
                return None
            vec = template.copy()
            for k, v in r.items():
                p = plan.get(k)
                if p is None or v is None:
                    if p is None:
                        return None
                    continue
                kind, j, index, rare = p
                if kind == 0:
                    if type(v) is not int or not -limit <= v <= limit:
                        return None
                    vec[j] = float(v)
                elif kind == 1:
                    if type(v) is not str or len(v) != 8 or not hexdigits.issuperset(v):
                        return None
                    vec[j] = float(index.get(v.lower(), rare))  # type: ignore[union-attr]
                elif type(v) is not int or v not in (0, 1):
                    return None
            vecs.append(vec)
        return np.array(vecs, dtype=np.float64).reshape(len(vecs), N_FEATURES)
