"""The scoring service's predictors: LightGBM's C API bit-identical to `Booster.predict`, and compiled trees.

* `SingleRowPredictor` calls LightGBM's `LGBM_BoosterPredictForMatSingleRowFast` with a config
  prepared once per model, instead of `Booster.predict`'s ~50 us of per-call Python set-up.
  The trees, the iteration range and the arithmetic are LightGBM's own, so the number is the same.
* `BatchPredictor` makes the one `LGBM_BoosterPredictForMat` call `Booster.predict` ends in, with
  the same arguments prepared once (one GIL round trip per batch instead of four).

* `CompiledPredictor` runs the trees compiled to machine code by lleaves (LLVM): ~3x less CPU than
  LightGBM per batch row. It sums the trees in blocks, so its numbers may differ from LightGBM's in
  the last bits: it serves only when within `COMPILED_TOLERANCE` (1e-12) on the check rows.
  `compile_model` compiles once per model and host CPU and caches the machine code on disk;
  `compile_in_child` does the compiling in a child process at low priority (lleaves builds the LLVM
  IR in Python, which in the service's process held the GIL for seconds per model and stalled its
  event loop) and loads the child's cache entry.

`ServedModel.build` proves each against `Booster.predict` on the bundle's probe rows before the
model takes traffic (the compiled one on a background thread, after the load); a predictor that
disagrees is switched off (and logged).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
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


# ---- the compiled predictor (lleaves: the trees compiled to machine code by LLVM) ----------------------------------
COMPILED_TOLERANCE = 1e-12  # max |compiled - Booster.predict| on the check rows (it sums the trees in another order)
# Compile options (part of the cache key). Inlining the trees' nodes makes prediction faster but the
# compile much slower; trees summed in blocks of 8 (lleaves' default is 34) took 25-50% less CPU for
# 100- and 1,000-row batches of the default model. See docs/serving.md for the measured trade-offs.
COMPILE_OPTIONS: dict[str, Any] = {"finline": False, "fblocksize": 8, "fcodemodel": "large"}
COMPILE_TIMEOUT_S = 1800  # a child compiling longer is killed (a 1,000-tree model took ~250 s on a busy core)
CACHE_KEEP = 8  # cache entries kept (most recently used): the champion, canary, shadow and a few rollbacks


class CompiledPredictor:
    """A feature matrix -> probabilities through the model's trees compiled to machine code (lleaves).

    The compiled function is called directly (one thread, the GIL released by ctypes): the service
    runs two calls at once rather than one on two threads, as with `BatchPredictor`."""

    def __init__(self, model: Any, n_features: int) -> None:
        from ctypes import POINTER, c_double

        self._model = model  # keeps the machine code (its execution engine) alive
        self._fn = model._c_entry_func
        self._ptr = POINTER(c_double)
        self._n = n_features
        if model.num_feature() != n_features or model.num_model_per_iteration() != 1:
            raise ValueError(f"compiled model has {model.num_feature()} features and "
                             f"{model.num_model_per_iteration()} outputs, expected {n_features} and 1")

    def predict(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 2 or x.shape[1] != self._n:
            raise ValueError(f"feature matrix has shape {x.shape}, expected (n, {self._n})")
        n = len(x)
        out = np.empty(n, dtype=np.float64)
        if n:
            x = np.ascontiguousarray(x, dtype=np.float64)
            self._fn(x.ctypes.data_as(self._ptr), out.ctypes.data_as(self._ptr), 0, n)
        return out


def host_cpu() -> str:
    """The host CPU's name and features as LLVM sees them (machine code compiled for one never runs on another)."""
    import llvmlite.binding as llvm

    try:
        features = llvm.get_host_cpu_features().flatten()
    except RuntimeError:  # LLVM cannot detect them on some hosts
        features = ""
    return f"{llvm.get_host_cpu_name()};{features}"


def cache_key(model_text: str) -> str:
    """`<model sha256>-<sha256 of host CPU, compiler versions and options>`: a cache entry is only ever
    read back for the same model bytes, compiled the same way for the same CPU."""
    from importlib.metadata import version

    build = f"{host_cpu()}|lleaves={version('lleaves')}|llvmlite={version('llvmlite')}|{sorted(COMPILE_OPTIONS.items())}"
    return f"{hashlib.sha256(model_text.encode()).hexdigest()}-{hashlib.sha256(build.encode()).hexdigest()[:16]}"


def compile_model(model_text: str, n_features: int, cache_dir: Path | None) -> tuple[CompiledPredictor, str]:
    """Compile `model_text` (LightGBM's text format) with lleaves, or load its machine code from `cache_dir`.

    Returns (predictor, "cache" | "compiled"). One process compiles a given key at a time (a lock
    file beside the entry); an entry is written to a temporary name and renamed, so a reader sees
    a whole file or none. ImportError when lleaves is not installed."""
    import lleaves

    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
    # the model text goes beside the cache (one writable place: a read-only image needs just that volume)
    with tempfile.TemporaryDirectory(prefix=".ctr-compile-", dir=cache_dir) as tmp:
        model_file = Path(tmp) / "model.txt"
        model_file.write_text(model_text)
        if cache_dir is None:
            m = lleaves.Model(model_file=str(model_file))
            m.compile(**COMPILE_OPTIONS)
            return CompiledPredictor(m, n_features), "compiled"
        entry = cache_dir / f"{cache_key(model_text)}.o"
        with open(entry.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process compiling the same key: wait, then read its entry
            m = lleaves.Model(model_file=str(model_file))
            if entry.exists():
                m.compile(cache=str(entry), **COMPILE_OPTIONS)
                os.utime(entry)  # recently used: kept by prune_cache
                return CompiledPredictor(m, n_features), "cache"
            part = cache_dir / f".{entry.name}.{os.getpid()}.part"
            try:
                m.compile(cache=str(part), **COMPILE_OPTIONS)  # lleaves writes the object file here
                os.replace(part, entry)
            finally:
                part.unlink(missing_ok=True)
        prune_cache(cache_dir)
        return CompiledPredictor(m, n_features), "compiled"


def prune_cache(cache_dir: Path, keep: int = CACHE_KEEP) -> list[Path]:
    """Delete all but the `keep` most recently used entries (and their lock files); returns those deleted.

    A model no longer served (an older day's) loses its entry; a rollback to it compiles it again."""
    def used(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:  # deleted meanwhile by another process's prune
            return 0.0

    gone = sorted(cache_dir.glob("*.o"), key=used, reverse=True)[keep:]
    for e in gone:
        try:
            e.unlink(missing_ok=True)
            e.with_suffix(".lock").unlink(missing_ok=True)
        except OSError as err:
            log.warning("compiled predictor cache: could not delete %s: %s", e, err)
    return gone


def compile_in_child(model_text: str, n_features: int, cache_dir: Path | None,
                     timeout: float = COMPILE_TIMEOUT_S) -> tuple[CompiledPredictor, str]:
    """`compile_model`, with the compiling done by `python -m ctr.serving.predictors` at nice 10: this process
    only loads the machine code the child wrote (~0.05 s). Without a cache directory the child writes to a
    temporary one, deleted once loaded. Returns (predictor, "cache" | "compiled")."""
    import lleaves  # noqa: F401  (missing here: ImportError before a child is spawned for nothing)

    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="ctr-compile-") as tmp:
            predictor, _ = compile_in_child(model_text, n_features, Path(tmp), timeout)
            return predictor, "compiled"
    entry = cache_dir / f"{cache_key(model_text)}.o"
    if entry.exists():
        return compile_model(model_text, n_features, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ctr-compile-", dir=cache_dir) as tmp:
        model_file = Path(tmp) / "model.txt"
        model_file.write_text(model_text)
        try:
            r = subprocess.run([sys.executable, "-m", "ctr.serving.predictors", str(model_file), str(n_features),
                                str(cache_dir)], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the compile process took over {timeout:.0f} s and was killed") from None
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"the compile process exited {r.returncode}: {tail[0][:300]}")
    if not entry.exists():
        raise RuntimeError(f"the compile process wrote no cache entry {entry.name} in {cache_dir}")
    predictor, _ = compile_model(model_text, n_features, cache_dir)
    return predictor, "compiled"


def _main(argv: list[str]) -> int:
    """python -m ctr.serving.predictors MODEL_TXT N_FEATURES CACHE_DIR: compile into the cache (compile_in_child)."""
    os.nice(10)  # below the service that asked: its requests come first
    compile_model(Path(argv[0]).read_text(), int(argv[1]), Path(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
