"""Fast paths of the scoring service, bit-identical to the Bundle's own (checked at load).

* `SingleRowPredictor` calls LightGBM's `LGBM_BoosterPredictForMatSingleRowFast` with a config
  prepared once per model, instead of `Booster.predict`'s ~50 us of per-call Python set-up.
  The trees, the iteration range and the arithmetic are LightGBM's own, so the number is the same.
* `BatchPredictor` makes the one `LGBM_BoosterPredictForMat` call `Booster.predict` ends in, with
  the same arguments prepared once (one GIL round trip per batch instead of four).
* `TsvEncoder` turns a body of raw Criteo lines into the feature matrix with `pyarrow.csv` and
  numpy (8-hex categoricals become uint32 keys looked up in one hash index), instead of the
  general reader's per-field regexes and `index_in`'s per-call hash set. It only accepts what
  the reader accepts, with the same values; anything else (padding, headers, bad fields) returns
  None and the caller falls back to `ctr.data.reader`, which names the bad line and field.
  (batch_encode.NumpyTsvEncoder is tried first; this one takes a few more spellings.)

`ServedModel.build` proves each against `Bundle.predict_rows`/`transform_table`/`Booster.predict`
on the bundle's probe rows before the model takes traffic; a fast path that disagrees is switched
off (and logged).
"""

from __future__ import annotations

import ctypes
import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from ctr.features.transform import CAT_INDEX, N_FEATURES, FeatureTransform
from ctr.schema import ALL_COLUMNS, CAT_COLUMNS, INT_ABS_MAX, INT_COLUMNS, LABEL

log = logging.getLogger("ctr.serving")

# Two ASCII hex digits (read as one native uint16) -> their byte value; 256 marks "not hex".
_HEX_PAIR = np.full(1 << 16, 256, dtype=np.uint16)
for _hi, _a in enumerate(b"0123456789abcdef"):
    for _lo, _b in enumerate(b"0123456789abcdef"):
        for _x in {_a, bytes([_a]).upper()[0]}:
            for _y in {_b, bytes([_b]).upper()[0]}:
                _HEX_PAIR[np.frombuffer(bytes([_x, _y]), dtype=np.uint16)[0]] = _hi * 16 + _lo
_LOWER_HEX8 = re.compile(r"[0-9a-f]{8}")

_READ = pcsv.ReadOptions(column_names=ALL_COLUMNS, use_threads=False, block_size=1 << 30)
_PARSE = pcsv.ParseOptions(delimiter="\t", quote_char=False, double_quote=False, escape_char=False,
                           newlines_in_values=False, ignore_empty_lines=False)
_CONVERT = pcsv.ConvertOptions(
    column_types={LABEL: pa.string(), **{c: pa.int64() for c in INT_COLUMNS}, **{c: pa.binary(8) for c in CAT_COLUMNS}},
    null_values=[""], strings_can_be_null=True, check_utf8=False,
)
_LABELS = pa.array(["0", "1"])


class SingleRowPredictor:
    """One row -> probability through LightGBM's single-row fast C API (one thread, no copies)."""

    def __init__(self, booster: Any, n_features: int = N_FEATURES) -> None:
        from lightgbm.basic import _C_API_DTYPE_FLOAT64, _C_API_PREDICT_NORMAL, _LIB, _c_str, _safe_call

        self._lib = _LIB
        self._booster = booster  # keeps the model alive as long as the fast config
        self._handle = ctypes.c_void_p()
        _safe_call(_LIB.LGBM_BoosterPredictForMatSingleRowFastInit(
            booster._handle, ctypes.c_int(_C_API_PREDICT_NORMAL), ctypes.c_int(0),
            ctypes.c_int(booster.best_iteration),  # what Booster.predict uses by default
            ctypes.c_int(_C_API_DTYPE_FLOAT64), ctypes.c_int32(n_features), _c_str("num_threads=1"),
            ctypes.byref(self._handle)))
        self._n = n_features
        self._row = (ctypes.c_double * n_features)()
        self._out = ctypes.c_double()
        self._out_len = ctypes.c_int64()
        self._args = (self._handle, self._row, ctypes.byref(self._out_len), ctypes.byref(self._out))
        self._fn = _LIB.LGBM_BoosterPredictForMatSingleRowFast

    def predict(self, vec: Sequence[float]) -> float:
        self._row[:] = vec
        if self._fn(*self._args) != 0:
            raise RuntimeError(f"LightGBM single-row predict failed: {self._lib.LGBM_GetLastError().decode()}")
        return self._out.value

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None and handle.value:
            self._lib.LGBM_FastConfigFree(handle)


class BatchPredictor:
    """A feature matrix -> probabilities with the one C call `Booster.predict` ends in.

    `Booster.predict` makes four ctypes calls per batch (current iteration, class count, result
    size, predict), and every call gives up the GIL and has to win it back. On the service's
    predict threads, each win-back can wait a whole switch interval (5 ms) while the event loop
    parses the next request. Here the parameters are prepared once and a batch is one
    `LGBM_BoosterPredictForMat` with the same arguments `Booster.predict(x, num_threads=...)` passes
    (row-major float64, normal prediction, iterations 0..best_iteration), so the numbers are the same.
    """

    def __init__(self, booster: Any, n_features: int = N_FEATURES, num_threads: int = 1) -> None:
        from lightgbm.basic import (
            _C_API_DTYPE_FLOAT64,
            _C_API_IS_ROW_MAJOR,
            _C_API_PREDICT_NORMAL,
            _LIB,
            _c_str,
        )

        self._lib = _LIB
        self._booster = booster  # keeps the model (and its handle) alive
        self._fn = _LIB.LGBM_BoosterPredictForMat
        self._n = n_features
        self._dtype = ctypes.c_int(_C_API_DTYPE_FLOAT64)
        self._ncol = ctypes.c_int32(n_features)
        self._tail = (ctypes.c_int(_C_API_IS_ROW_MAJOR), ctypes.c_int(_C_API_PREDICT_NORMAL), ctypes.c_int(0),
                      ctypes.c_int(booster.best_iteration),  # what Booster.predict uses by default
                      _c_str(f"num_threads={num_threads}"))

    def predict(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 2 or x.shape[1] != self._n:
            raise ValueError(f"feature matrix has shape {x.shape}, expected (n, {self._n})")
        n = len(x)
        out = np.empty(n, dtype=np.float64)
        if n == 0:
            return out
        x = np.ascontiguousarray(x, dtype=np.float64)  # no copy for the encoders' output
        out_len = ctypes.c_int64()
        rc = self._fn(self._booster._handle, ctypes.c_void_p(x.ctypes.data), self._dtype, ctypes.c_int32(n),
                      self._ncol, *self._tail, ctypes.byref(out_len), ctypes.c_void_p(out.ctypes.data))
        if rc != 0:
            raise RuntimeError(f"LightGBM predict failed: {self._lib.LGBM_GetLastError().decode()}")
        if out_len.value != n:
            raise RuntimeError(f"LightGBM returned {out_len.value} predictions for {n} rows")
        return out


class TsvEncoder:
    """Raw Criteo lines (bytes) -> float64 matrix (n, 39), or None when the reader must decide.

    All 26 vocabularies live in one hash index of (column << 32 | hex value) keys, so a whole
    batch of categoricals is coded with one `get_indexer` (a C hash lookup per value).
    """

    def __init__(self, transform: FeatureTransform) -> None:
        self.index, self.codes = vocabulary_index(transform)
        self.rare = np.array([float(len(transform.vocab[c])) for c in CAT_COLUMNS])[:, None]
        self.missing = [transform._missing_code(c) for c in CAT_COLUMNS]  # NaN or V+1, the transform's mode
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
        value = _HEX_PAIR[raw]
        if n and int(value.max()) > 255:
            return None
        keys = value.astype(np.uint8).view(">u4")[:, :, 0].astype(np.uint64) | self.column_tag
        pos = self.index.get_indexer(keys.ravel()).reshape(keys.shape)
        codes = np.where(pos >= 0, self.codes[pos], self.rare)
        for j, mask in nulls:
            codes[j, mask] = self.missing[j]
        out[:, CAT_INDEX] = codes.T
        return out


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
