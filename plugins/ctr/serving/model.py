"""The served model: a probe-checked Bundle plus its verified fast paths, swapped as one object.

A request takes `holder.current` once and uses only that object, so its answer comes from exactly
one version (transform, booster and name together); a swap replaces the reference only after the
new bundle has been loaded, probe-checked and its fast paths verified.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctr.features.transform import CAT_COLUMNS, N_INT
from ctr.model.bundle import Bundle, BundleError
from ctr.serving.encoders import JsonRowsEncoder, NumpyTsvEncoder, TsvEncoder, probe_tsv
from ctr.serving.predictors import (
    COMPILED_TOLERANCE,
    BatchPredictor,
    CompiledPredictor,
    SingleRowPredictor,
    cache_key,
    compile_in_child,
    compile_model,
)
from ctr.serving.validation import check_rows

log = logging.getLogger("ctr.serving")
COMPILE_MODES = ("background", "cached", "off")  # ServedModel.build(compiled=...)


class CompiledSlot:
    """The model's compiled predictor once it is ready and verified (None until then, or for good).

    `state`: "off" (CTR_PREDICTOR=lightgbm or not asked), "compiling", "ready", "failed" (logged why)."""

    def __init__(self) -> None:
        self.predictor: CompiledPredictor | None = None
        self.state = "off"
        self.done = threading.Event()


@dataclass(frozen=True)
class ServedModel:
    bundle: Bundle
    loaded_at: float
    single: SingleRowPredictor | None
    tsv: TsvEncoder | None
    tsv_numpy: NumpyTsvEncoder | None = None
    batch: BatchPredictor | None = None
    rows: JsonRowsEncoder | None = None
    compiled: CompiledSlot = field(default_factory=CompiledSlot)

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def key(self) -> str:
        """This loaded model's identity (the batch lane's workers build and cache it under this key)."""
        return f"{self.version}/{self.bundle.digest}/{self.loaded_at!r}/{id(self)}"

    @property
    def header(self) -> bytes:
        return self.bundle.version.encode()

    @classmethod
    def load(cls, path: str | Path, compiled: str = "background") -> ServedModel:
        """Load and probe-check a bundle (BundleError if refused), then verify the fast paths."""
        return cls.build(Bundle.load(Path(path)), compiled=compiled)

    @classmethod
    def build(cls, bundle: Bundle, compiled: str = "background") -> ServedModel:
        """The served model with its verified fast paths. `compiled` (with CTR_PREDICTOR=auto): "background"
        compiles the trees on a daemon thread (or loads them from the cache) and switches to them once
        verified, LightGBM serving until then; "cached" uses a cache entry only, right here (offline
        `ctr rank`: no compile for one file); "off" never."""
        if compiled not in COMPILE_MODES:
            raise ValueError(f"compiled={compiled!r} is not one of {COMPILE_MODES}")
        if bundle.probe is None:  # Bundle.load checked it; the same bytes, never the file again
            raise BundleError(f"model bundle {bundle.path} lacks probe.json (known inputs and outputs)")
        rows: list[dict[str, Any]] = bundle.probe["rows"]
        want = bundle.predict_rows(rows)
        single = _verified_single(bundle, rows, want)
        tsv = _verified_tsv(bundle, rows, want, TsvEncoder)
        tsv_numpy = _verified_tsv(bundle, rows, want, NumpyTsvEncoder)
        batch = _verified_batch(bundle, rows, want)
        json_rows = _verified_rows(bundle, rows)
        log.info("model ready version=%s bundle=%s single_row_fast=%s tsv_fast=%s tsv_numpy=%s batch_fast=%s "
                 "json_rows_fast=%s", bundle.version, bundle.path, single is not None, tsv is not None,
                 tsv_numpy is not None, batch is not None, json_rows is not None)
        model = cls(bundle=bundle, loaded_at=time.time(), single=single, tsv=tsv, tsv_numpy=tsv_numpy, batch=batch,
                    rows=json_rows)
        _start_compiled(model, compiled)
        return model

    # ---- scoring (the numbers are the Bundle's; see predictors.py and encoders.py) ------------------------------
    def predict_rows(self, rows: list[dict[str, Any]]) -> np.ndarray:
        if len(rows) == 1 and self.single is not None:
            t = self.bundle.transform
            return np.array([self.single.predict(t.derive_row(t.row(rows[0])))])
        return self.bundle.predict_rows(rows)

    def encode_tsv(self, body: bytes) -> np.ndarray | None:
        """Raw Criteo lines -> feature matrix, or None when the general reader must decide.

        The numpy encoder takes well-formed bodies; the Arrow one a few more spellings (16-digit
        integers, `+5`, CRLF); both give the reader's values or None."""
        x = self.tsv_numpy.encode(body) if self.tsv_numpy is not None else None
        if x is None and self.tsv is not None:
            x = self.tsv.encode(body)
        return x

    def encode_rows(self, rows: list[Any]) -> np.ndarray:
        """Unchecked JSON rows -> feature matrix; RequestError naming row and field for a mistake."""
        x = self.rows.encode(rows) if self.rows is not None else None
        return self.bundle.transform.rows_matrix(check_rows(rows)) if x is None else x

    def predict_matrix(self, x: np.ndarray) -> np.ndarray:
        """Codes matrix -> probabilities, one thread per call: the service runs two calls at once rather
        than one on two threads. The derived features are added here (`FeatureTransform.derive`).
        The compiled trees once verified (within COMPILED_TOLERANCE of LightGBM), else LightGBM's."""
        compiled = self.compiled.predictor
        if compiled is not None:
            return compiled.predict(self.bundle.transform.derive(x))
        if self.batch is not None:
            return self.batch.predict(self.bundle.transform.derive(x))
        return self.bundle.predict_matrix(x, num_threads=1)


def _start_compiled(model: ServedModel, mode: str) -> None:
    """Give `model` its compiled predictor: on a daemon thread ("background") or from the cache only ("cached")."""
    from ctr.settings import Settings

    settings = Settings.from_env()
    if mode == "off" or settings.predictor == "lightgbm":
        model.compiled.done.set()
        return
    slot, cache = model.compiled, settings.predictor_cache_dir
    slot.state = "compiling"
    if mode == "cached":
        _compile_into(model, cache, cached_only=True)
        return
    threading.Thread(target=_compile_into, args=(model, cache), name="ctr-compile", daemon=True).start()


def _compile_into(model: ServedModel, cache: Path, cached_only: bool = False) -> None:
    """Compile (or load from `cache`), verify against Booster.predict, then publish on `model.compiled`."""
    slot, bundle, t0 = model.compiled, model.bundle, time.perf_counter()
    try:
        text = bundle.booster.model_to_string()
        if cached_only:
            if not (cache / f"{cache_key(text)}.o").exists():
                slot.state = "off"
                return
        try:
            cache.mkdir(parents=True, exist_ok=True)
            use_cache: Path | None = cache if os.access(cache, os.W_OK) else None
        except OSError:
            use_cache = None
        if use_cache is None:
            log.warning("compiled predictor: cache %s is not writable; compiling into a temporary folder", cache)
        if cached_only:  # the entry exists: loading it is cheap
            predictor, source = compile_model(text, bundle.transform.n_features, use_cache)
        else:  # the compiling itself in a child process: it would hold this process's GIL for seconds
            predictor, source = compile_in_child(text, bundle.transform.n_features, use_cache)
        diff = _compiled_diff(bundle, predictor)
        if not diff <= COMPILED_TOLERANCE:  # NaN fails too
            slot.state = "failed"
            if use_cache is not None:  # never read again: the next load compiles afresh
                (use_cache / f"{cache_key(text)}.o").unlink(missing_ok=True)
            log.warning("compiled predictor off for %s (version %s, %s): differs from Booster.predict by %.3g on the "
                        "check rows (limit %g); LightGBM serves", bundle.path, bundle.version, source, diff,
                        COMPILED_TOLERANCE)
            return
        slot.predictor, slot.state = predictor, "ready"
        log.info("compiled predictor ready version=%s source=%s secs=%.1f max_diff=%.3g", bundle.version, source,
                 time.perf_counter() - t0, diff)
    except ImportError as e:
        slot.state = "failed"
        log.warning("compiled predictor off for %s: %s (CTR_PREDICTOR=auto needs lleaves, see requirements.txt); "
                    "LightGBM serves", bundle.path, e)
    except Exception as e:  # the compiled path is an optimisation; LightGBM always works
        slot.state = "failed"
        log.warning("compiled predictor off for %s: compile failed: %s: %s; LightGBM serves", bundle.path,
                    type(e).__name__, e)
    finally:
        slot.done.set()


def check_matrix(bundle: Bundle) -> np.ndarray:
    """Codes rows to check a compiled predictor on: the probe rows, those rows with every other value
    missing, and with every categorical the rare/unseen code (the splits' three kinds of branch)."""
    x = bundle.transform.rows_matrix(bundle.probe["rows"] if bundle.probe else [])
    holes = x.copy()
    holes[:, ::2] = np.nan
    holes2 = x.copy()
    holes2[:, 1::2] = np.nan
    rare = x.copy()
    for j, c in enumerate(CAT_COLUMNS):
        rare[:, N_INT + j] = float(len(bundle.transform.vocab[c]))
    return np.vstack([x, holes, holes2, rare, np.full((1, x.shape[1]), np.nan)])


def _compiled_diff(bundle: Bundle, predictor: CompiledPredictor) -> float:
    x = bundle.transform.derive(check_matrix(bundle))
    return float(np.max(np.abs(predictor.predict(x) - bundle.booster.predict(x, num_threads=1))))


def _verified_single(bundle: Bundle, rows: list[dict[str, Any]], want: np.ndarray) -> SingleRowPredictor | None:
    try:
        t = bundle.transform
        single = SingleRowPredictor(bundle.booster, t.n_features)
        got = np.array([single.predict(t.derive_row(t.row(r))) for r in rows])
    except Exception as e:  # the fast path is an optimisation; the Bundle's own path always works
        log.warning("single-row fast path off for %s: %s", bundle.path, e)
        return None
    if not np.array_equal(got, want):
        log.warning("single-row fast path off for %s: differs from Booster.predict on probe rows", bundle.path)
        return None
    return single


def _verified_batch(bundle: Bundle, rows: list[dict[str, Any]], want: np.ndarray) -> BatchPredictor | None:
    try:
        batch = BatchPredictor(bundle.booster, bundle.transform.n_features)
        x = bundle.transform.rows_matrix(rows)
        got = batch.predict(bundle.transform.derive(x))
        ref = bundle.predict_matrix(x, num_threads=1)
    except Exception as e:
        log.warning("batch fast path off for %s: %s", bundle.path, e)
        return None
    if not (np.array_equal(got, ref) and np.array_equal(got, want)):
        log.warning("batch fast path off for %s: differs from Booster.predict on probe rows", bundle.path)
        return None
    return batch


def _verified_rows(bundle: Bundle, rows: list[dict[str, Any]]) -> JsonRowsEncoder | None:
    try:
        enc = JsonRowsEncoder(bundle.transform)
        got = enc.encode(rows)
        ref = bundle.transform.rows_matrix(check_rows(rows))
    except Exception as e:
        log.warning("JSON rows fast path off for %s: %s", bundle.path, e)
        return None
    if got is None or not np.array_equal(got, ref, equal_nan=True):
        log.warning("JSON rows fast path off for %s: differs from check_rows + FeatureTransform.row on probe rows",
                    bundle.path)
        return None
    return enc


def _verified_tsv(bundle: Bundle, rows: list[dict[str, Any]], want: np.ndarray,
                  kind: type[TsvEncoder] | type[NumpyTsvEncoder]) -> TsvEncoder | NumpyTsvEncoder | None:
    from ctr.data.reader import read_text

    try:
        enc = kind(bundle.transform)
        text = probe_tsv(rows)
        x = enc.encode(text)
        table, bad = read_text(text.decode(), require_label=False)
        ref = bundle.transform.transform_table(table) if not bad else None
    except Exception as e:
        log.warning("TSV fast path (%s) off for %s: %s", kind.__name__, bundle.path, e)
        return None
    if x is None or ref is None or not np.array_equal(x, ref, equal_nan=True) \
            or not np.array_equal(bundle.predict_matrix(x), want):
        log.warning("TSV fast path (%s) off for %s: differs from the reader + transform_table on probe rows",
                    kind.__name__, bundle.path)
        return None
    return enc


class LoadTimeout(BundleError):
    """A load took longer than its limit; the old model serves on."""


class ModelHolder:
    """The current model; `load` swaps it atomically after the new one passed its checks.

    A load runs on a daemon thread with a time limit: past it the load fails (the old model
    serves on, the next load may start) and the stray thread's result is discarded; it can never
    hold up shutdown. At most `max_stray` such threads may be left before loads are refused.
    """

    def __init__(self, model: ServedModel, load_timeout: float = 60.0, max_stray: int = 2) -> None:
        self.current = model
        self.previous: ServedModel | None = None
        self.load_timeout = load_timeout
        self.max_stray = max_stray
        self._stray: set[threading.Thread] = set()
        self._lock = asyncio.Lock()

    async def load(self, path: str) -> tuple[ServedModel, ServedModel]:
        """Load `path` off the event loop; returns (new, previous). Raises if refused or too slow."""
        async with self._lock:
            new = await self._fetch(path)
            old, self.current, self.previous = self.current, new, self.current
            log.info("model swapped from=%s to=%s bundle=%s", old.version, new.version, path)
            return new, old

    async def fetch(self, path: str) -> ServedModel:
        """Load and check `path` like `load`, without swapping (a canary or shadow candidate; traffic.py)."""
        async with self._lock:
            return await self._fetch(path)

    async def promote(self, new: ServedModel) -> ServedModel:
        """Make an already loaded and checked model the current one; returns the previous."""
        async with self._lock:
            old, self.current, self.previous = self.current, new, self.current
            log.info("model swapped from=%s to=%s bundle=%s (candidate promoted)", old.version, new.version,
                     new.bundle.path)
            return old

    async def _fetch(self, path: str) -> ServedModel:
        self._stray = {t for t in self._stray if t.is_alive()}
        if len(self._stray) >= self.max_stray:
            raise LoadTimeout(f"{len(self._stray)} earlier loads are still running past their time limit; "
                              "restart the service to clear them")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ServedModel] = loop.create_future()

        def done(result: ServedModel | None, error: BaseException | None) -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)  # type: ignore[arg-type]

        def work() -> None:
            try:
                result, error = ServedModel.load(path), None
            except BaseException as e:  # handed to the awaiting request, which answers 409
                result, error = None, e
            try:
                loop.call_soon_threadsafe(done, result, error)
            except RuntimeError:  # the loop has closed (shutdown): nobody is waiting
                pass

        t = threading.Thread(target=work, name="ctr-load", daemon=True)
        t.start()
        try:
            new = await asyncio.wait_for(asyncio.shield(fut), self.load_timeout)
        except TimeoutError:
            self._stray.add(t)
            raise LoadTimeout(f"loading took over {self.load_timeout:g} s (CTR_LOAD_TIMEOUT_S); abandoned") from None
        return new
