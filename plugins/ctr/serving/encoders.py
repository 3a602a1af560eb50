"""Raw request bodies -> feature matrix for the scoring service, bit-identical to the reader + transform.

* `NumpyTsvEncoder.encode(body)` (the batch path's first choice) reads the body's bytes in place: one
  scan finds the 40 separators of every line, each field is then loaded as one unaligned 8-byte word
  (a strided uint64 view of the body), categoricals are decoded with the 16-bit `HEX_PAIR` table and
  integers with the 8-digits-at-once SWAR parse (Lemire / simdjson), all vectorised over the whole
  batch. There is no per-line or per-field Python, no Arrow table and no string column. It accepts
  only a strict subset of what `ctr.data.reader` accepts, and gives exactly its values: LF line ends,
  exactly 40 fields per line, label empty/0/1, integers `-?[0-9]{1,15}` (so |v| < 2^53 and the float
  is exact) or empty, categoricals 8 hex digits or empty. Anything else (CR, short or blank lines,
  headers, `1.0`, `+5`, spaces, 16+ digits, bad hex, non-ASCII) returns None.
* `TsvEncoder` (the second choice, a few more spellings) turns the body into the matrix with
  `pyarrow.csv` and numpy (8-hex categoricals become uint32 keys looked up in one hash index),
  instead of the general reader's per-field regexes and `index_in`'s per-call hash set. Anything
  the reader would not accept the same way (padding, headers, bad fields) returns None and the
  caller falls back to `ctr.data.reader`, which names the bad line and field.
* `JsonRowsEncoder` checks and encodes JSON rows in one pass (large JSON batches).

Tests prove bit-identity with the reader + `FeatureTransform.transform_table` on random bodies, and
`ServedModel.build` checks each encoder on the bundle's probe rows before the model takes traffic.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from itertools import chain, compress
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from ctr.features.transform import CAT_INDEX, N_FEATURES, FeatureTransform
from ctr.schema import ALL_COLUMNS, CAT_COLUMNS, INT_ABS_MAX, INT_COLUMNS, LABEL, N_FIELDS

# Two ASCII hex digits (read as one native uint16) -> their byte value; 256 marks "not hex".
HEX_PAIR = np.full(1 << 16, 256, dtype=np.uint16)
for _hi, _a in enumerate(b"0123456789abcdef"):
    for _lo, _b in enumerate(b"0123456789abcdef"):
        for _x in {_a, bytes([_a]).upper()[0]}:
            for _y in {_b, bytes([_b]).upper()[0]}:
                HEX_PAIR[np.frombuffer(bytes([_x, _y]), dtype=np.uint16)[0]] = _hi * 16 + _lo
_LOWER_HEX8 = re.compile(r"[0-9a-f]{8}")
_COLUMN_TAG = np.arange(len(CAT_COLUMNS), dtype=np.uint64) << np.uint64(32)  # vocabulary_index's key layout
_INT_OR_NONE = frozenset({int, type(None)})
_LABEL_VALUES = frozenset({0, 1, None})
_NULL_AS_EMPTY = {None: ""}

_READ = pcsv.ReadOptions(column_names=ALL_COLUMNS, use_threads=False, block_size=1 << 30)
_PARSE = pcsv.ParseOptions(delimiter="\t", quote_char=False, double_quote=False, escape_char=False,
                           newlines_in_values=False, ignore_empty_lines=False)
_CONVERT = pcsv.ConvertOptions(
    column_types={LABEL: pa.string(), **{c: pa.int64() for c in INT_COLUMNS}, **{c: pa.binary(8) for c in CAT_COLUMNS}},
    null_values=[""], strings_can_be_null=True, check_utf8=False,
)
_LABELS = pa.array(["0", "1"])

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
        self.index, self.offset, self.rare = code_lookup(transform)
        self.missing = np.array([transform.missing_code(c) for c in CAT_COLUMNS])  # NaN or V+1
        self.column_tag = np.arange(len(CAT_COLUMNS), dtype=np.uint64) << np.uint64(32)

    def encode(self, body: bytes) -> np.ndarray | None:
        # One function on purpose (~65 lines): a single sequence of whole-batch numpy passes over the same
        # views of the body; split up, the intermediate arrays would have to be handed around or rebuilt.
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
        pairs = HEX_PAIR[w.view(np.uint16)]  # (n, 26*4): byte values, 256 where not hex
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
        self.template = [math.nan] * _N_INT + [transform.missing_code(c) for c in CAT_COLUMNS]
        self.position = {k: (-1 if kind == 2 else j) for k, (kind, j, _, _) in self.plan.items()}  # label: -1
        try:  # the uint64-keyed vocabulary lookup of `encode_columns` (plain 8-hex vocabularies only)
            self.lookup: tuple[Any, np.ndarray, np.ndarray] | None = code_lookup(transform)
        except ValueError:
            self.lookup = None

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

    def encode_columns(self, base: np.ndarray, rows: list[dict[str, Any]]) -> np.ndarray | None:
        """Rows (dicts) -> codes matrix (n, 39), every row starting as `base`; None for the checked path.

        Made for many rows that each set a few fields over a shared vector (a ranking's candidates
        over its context's): every row's fields are taken in one pass (`chain` over keys and over
        values: no per-field or per-row Python) and each value is written into its cell; a field a
        row lacks keeps `base`'s value, and so does a null (the caller sends a null meant to clear a
        `base` value elsewhere).

        * categoricals: all joined into one tab-separated ASCII buffer, checked to be 8 hex digits
          each (either case), turned into uint64 keys two digits at a time through `HEX_PAIR` (as
          `NumpyTsvEncoder` does) and coded with one hash lookup (`code_lookup`): in the vocabulary
          -> its code, else the rare code;
        * integers: one `set(map(type, ...))` check (int or null), one float64 array;
        * anything else (an unknown field, a float, a bool, a non-string categorical, an empty
          string, bad hex, an integer at or beyond 2^53, a label other than 0/1/null) returns None."""
        if self.lookup is None:
            return None
        x = np.empty((len(rows), len(base)), dtype=np.float64)
        x[:] = base
        keys = list(chain.from_iterable(rows))
        if not keys:
            return x
        vals = list(chain.from_iterable(map(dict.values, rows)))
        first = list(rows[0])
        try:  # feature index; -1 for the label
            if len(keys) == len(first) * len(rows) and keys == first * len(rows):
                # every row sets the same fields in the same order (a ranking's candidates usually do):
                # one row's positions, repeated, instead of a lookup per field of every row
                col = np.tile(np.fromiter(map(self.position.get, first), dtype=np.intp, count=len(first)), len(rows))
                row = np.repeat(np.arange(len(rows)), len(first))
            else:
                col = np.fromiter(map(self.position.get, keys), dtype=np.intp, count=len(keys))
                row = np.repeat(np.arange(len(rows)), list(map(len, rows)))
        except TypeError:
            return None  # an unknown field (None)
        cat = col >= _N_INT
        if cat.all():
            cat_vals, cat_col, cat_row = vals, col, row
        else:
            keep = cat.tolist()
            cat_vals = list(compress(vals, keep))
            cat_col, cat_row = col[cat], row[cat]
            other = ~cat
            other_vals = list(compress(vals, other.tolist()))
            if not set(map(type, other_vals)) <= _INT_OR_NONE:
                return None
            other_col, other_row = col[other], row[other]
            label = other_col < 0
            if label.any():
                if not _LABEL_VALUES.issuperset(compress(other_vals, label.tolist())):
                    return None  # label: 0, 1 or null, ignored
                other_vals = list(compress(other_vals, (~label).tolist()))
                other_col, other_row = other_col[~label], other_row[~label]
            if other_vals:
                try:
                    v = np.array(other_vals, dtype=np.float64)  # null -> NaN
                except OverflowError:
                    return None
                null = np.isnan(v)
                if not np.all(np.abs(v) < INT_ABS_MAX, where=~null):
                    return None  # at 2^53 and beyond the float may have rounded: the checked path decides
                x[other_row, other_col] = np.where(null, base[other_col], v)
        if cat_vals:
            codes = self._cat_codes(base, cat_vals, cat_col)
            if codes is None:
                return None
            x[cat_row, cat_col] = codes
        return x

    def _cat_codes(self, base: np.ndarray, vals: list[Any], col: np.ndarray) -> np.ndarray | None:
        """Codes of categorical values (feature index `col`); a null -> base's code; None if one is not plain.

        The values are joined into one tab-separated ASCII buffer and decoded like a TSV body's
        categoricals: each field one 8-byte load, two hex digits at a time through `HEX_PAIR`, then
        one hash lookup of all the keys."""
        assert self.lookup is not None
        index, offset, rare = self.lookup
        n_null = 0
        try:
            try:
                text = "\t".join(vals)
            except TypeError:  # a null (or not a string): a null is an empty field
                n_null = vals.count(None)
                text = "\t".join(map(_NULL_AS_EMPTY.get, vals, vals))
            buf = text.encode("ascii") + b"\t" + _PAD
        except (TypeError, UnicodeEncodeError):
            return None  # not a string (or unhashable), or not ASCII: not 8 hex digits
        raw = np.frombuffer(buf, dtype=np.uint8)
        sep = np.flatnonzero(raw[:len(buf) - len(_PAD)] == 9)
        if len(sep) != len(vals):
            return None  # a tab inside a value
        start = np.empty_like(sep)
        start[0] = 0
        start[1:] = sep[:-1] + 1
        length = sep - start
        null = length == 0
        if int(np.count_nonzero(null)) != n_null or not np.all(null | (length == 8)):
            return None  # an empty string sent as a value, or not 8 characters
        w = _words(buf)[start]
        if n_null:
            w = np.where(null, _ASCII_ZEROS, w)  # the word of an empty field holds the next fields' bytes
        pairs = HEX_PAIR[w.view(np.uint16)]  # 4 per value: byte values, 256 where not hex
        if int(pairs.max()) > 255:
            return None
        c = col - _N_INT
        keys = pairs.astype(np.uint8).view(">u4").astype(np.uint64) | _COLUMN_TAG[c]
        pos = index.get_indexer(keys)
        codes = np.where(pos >= 0, pos - offset[c], rare[c])
        return np.where(null, base[col], codes) if n_null else codes


class TsvEncoder:
    """Raw Criteo lines (bytes) -> float64 matrix (n, 39), or None when the reader must decide.

    All 26 vocabularies live in one hash index of (column << 32 | hex value) keys, so a whole
    batch of categoricals is coded with one `get_indexer` (a C hash lookup per value).
    """

    def __init__(self, transform: FeatureTransform) -> None:
        self.index, self.codes = vocabulary_index(transform)
        self.rare = np.array([float(len(transform.vocab[c])) for c in CAT_COLUMNS])[:, None]
        self.missing = [transform.missing_code(c) for c in CAT_COLUMNS]  # NaN or V+1, the transform's mode
        self.column_tag = (np.arange(len(CAT_COLUMNS), dtype=np.uint64) << np.uint64(32))[:, None]

    def encode(self, body: bytes) -> np.ndarray | None:
        # Arrow trims spaces around integers, splits on a lone CR and reads a blank line as a row
        # of nulls; the reader does none of these.
        if b" " in body or (b"\r" in body and body.count(b"\r") != body.count(b"\r\n")) \
                or body.startswith((b"\n", b"\r\n")) or b"\n\n" in body or b"\n\r\n" in body:
            return None
        try:
            table = pcsv.read_csv(pa.py_buffer(body), read_options=_READ, parse_options=_PARSE,
                                  convert_options=_CONVERT)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return None
        label = table.column(LABEL)
        if label.null_count != len(label) and not pc.all(pc.or_kleene(pc.is_null(label), pc.is_in(label, _LABELS))).as_py():
            return None
        n = table.num_rows
        out = np.empty((n, N_FEATURES), dtype=np.float64)
        for j, c in enumerate(INT_COLUMNS):
            # int64 -> float64 (NaN for null), the conversion transform_table's cast does
            out[:, j] = _single_chunk(table.column(c)).to_numpy(zero_copy_only=False)
        if n and not np.all(np.abs(out[:, : len(INT_COLUMNS)]) < INT_ABS_MAX, where=~np.isnan(out[:, : len(INT_COLUMNS)])):
            return None  # at or beyond 2^53 the float may have rounded: let the reader judge exactly
        raw = np.empty((len(CAT_COLUMNS), n, 4), dtype=np.uint16)  # 8 hex digits = 4 digit pairs
        nulls = []
        for j, c in enumerate(CAT_COLUMNS):
            arr = _single_chunk(table.column(c))
            raw[j] = np.frombuffer(arr.buffers()[1], dtype=np.uint16, count=4 * n, offset=8 * arr.offset).reshape(n, 4)
            if arr.null_count:
                mask = arr.is_null().to_numpy(zero_copy_only=False)
                raw[j, mask] = 0x3030  # "00": null slots hold zero bytes, not hex
                nulls.append((j, mask))
        value = HEX_PAIR[raw]
        if n and int(value.max()) > 255:
            return None
        keys = value.astype(np.uint8).view(">u4")[:, :, 0].astype(np.uint64) | self.column_tag
        pos = self.index.get_indexer(keys.ravel()).reshape(keys.shape)
        codes = np.where(pos >= 0, self.codes[pos], self.rare)
        for j, mask in nulls:
            codes[j, mask] = self.missing[j]
        out[:, CAT_INDEX] = codes.T
        return out


def code_lookup(transform: FeatureTransform) -> tuple[Any, np.ndarray, np.ndarray]:
    """`vocabulary_index` with each column's offset in it and its rare code: the code of a key found
    at position `pos` of column `c` is `pos - offset[c]`; a key not found gets `rare[c]`."""
    index, codes = vocabulary_index(transform)
    sizes = [len(transform.vocab[c]) for c in CAT_COLUMNS]
    # the index holds the vocabularies one after the other, each in code order: code = pos - offset
    offset = np.cumsum([0, *sizes[:-1]]).astype(np.int64)
    if not np.array_equal(codes, np.arange(len(codes)) - np.repeat(offset, sizes)):
        raise ValueError("vocabulary index is not in code order")
    return index, offset, np.array(sizes, dtype=np.float64)


def vocabulary_index(transform: FeatureTransform) -> tuple[Any, np.ndarray]:
    """All 26 vocabularies as one hash index of (column << 32 | hex value) keys, and each key's code."""
    import pandas as pd

    keys, codes = [], []
    for j, c in enumerate(CAT_COLUMNS):
        vocab = transform.vocab[c]
        if any(not _LOWER_HEX8.fullmatch(v) for v in vocab) or len(set(vocab)) != len(vocab):
            raise ValueError(f"{c}: vocabulary is not unique lower-case 8-hex values")
        keys.append(np.array([int(v, 16) for v in vocab], dtype=np.uint64) | np.uint64(j << 32))
        codes.append(np.arange(len(vocab), dtype=np.float64))  # code = position in the vocabulary
    return pd.Index(np.concatenate(keys), dtype=np.uint64), np.concatenate(codes)


def _single_chunk(col: pa.ChunkedArray) -> pa.Array:
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def probe_tsv(rows: Sequence[dict[str, Any]]) -> bytes:
    """Probe rows (dicts) as raw Criteo lines with an empty label, for checking the TSV path."""
    lines = []
    for r in rows:
        fields = [""] + ["" if r.get(c) is None else str(int(r[c])) for c in INT_COLUMNS]
        fields += ["" if r.get(c) is None else str(r[c]) for c in CAT_COLUMNS]
        lines.append("\t".join(fields))
    return ("\n".join(lines) + "\n").encode()
