"""LightGBM predictors of the scoring service, bit-identical to `Booster.predict` (checked at load).

* `SingleRowPredictor` calls LightGBM's `LGBM_BoosterPredictForMatSingleRowFast` with a config
  prepared once per model, instead of `Booster.predict`'s ~50 us of per-call Python set-up.
  The trees, the iteration range and the arithmetic are LightGBM's own, so the number is the same.
* `BatchPredictor` makes the one `LGBM_BoosterPredictForMat` call `Booster.predict` ends in, with
  the same arguments prepared once (one GIL round trip per batch instead of four).

`ServedModel.build` proves each against `Booster.predict` on the bundle's probe rows before the
model takes traffic; a predictor that disagrees is switched off (and logged).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ctr.features.transform import N_FEATURES

log = logging.getLogger("ctr.serving")


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
