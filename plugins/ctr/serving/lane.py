"""Request scoring as plain functions, and the batch lane: worker processes for big bodies.

`encode_body` + predict + `response_body` turn one request body into its answer; the event loop runs them
for small bodies. A big body (JSON parse of a 10,000-row batch is ~40 ms and its encoding ~100 ms,
each one C call holding the GIL) would stall every other request if it ran in a thread of the
serving process, so `BatchLane` sends it to one of a few worker processes (started with `spawn`,
niced so the event loop's process wins the CPU when it needs it). Each worker builds the model from
the *same verified bytes* the service loaded (`Bundle.files`, never the disk again), keyed by the
served model's identity, so a batch answer names exactly the version that computed it.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ctr.serving.ranking import RANK_ROUTE, rank_body
from ctr.serving.validation import RequestError, check_rows, invocation_rows, parse_json, score_rows

log = logging.getLogger("ctr.serving")

JSON_TYPES = frozenset({b"application/json"})
TSV_TYPES = frozenset({b"text/tab-separated-values", b"text/plain"})
# Batches at least this big are encoded with the one-pass encoder and predicted as one matrix.
BATCH_ROWS = 256
WORKER_NICE = 10  # default niceness of the workers (CTR_BATCH_NICE): the event loop's process wins the CPU


# ---- scoring one body (event loop for small bodies, lane workers for big ones) ----------------
def score_body(model: Any, route: str, ctype: bytes, body: bytes, max_rows: int) -> tuple[np.ndarray, bytes]:
    """One request body -> (probabilities, JSON response); RequestError for a client mistake.

    For `/v1/rank`, `max_rows` is the candidate limit (CTR_RANK_MAX_CANDIDATES)."""
    if route == RANK_ROUTE:
        return rank_body(model, ctype, body, max_rows)
    kind, arr, key = encode_body(model, route, ctype, body, max_rows)
    probs = model.predict_matrix(arr) if kind == "matrix" else arr
    return probs, response_body(model, key, probs)


def encode_body(model: Any, route: str, ctype: bytes, body: bytes, max_rows: int) -> tuple[str, np.ndarray, bytes]:
    """("probs", probabilities, key) for small row sets, or ("matrix", features, key) still to predict."""
    if route == "/invocations":
        if ctype not in JSON_TYPES:
            raise RequestError(415, f"/invocations takes application/json (dataframe_split or dataframe_records), "
                                    f"not {ctype.decode(errors='replace')[:60]!r}")
        rows = invocation_rows(parse_json(body))
        _check_count(len(rows), max_rows)
        return (*_encode_rows(model, rows), b',"predictions":')
    if ctype in JSON_TYPES:
        rows = score_rows(parse_json(body))
        _check_count(len(rows), max_rows)
        return (*_encode_rows(model, rows), b',"probabilities":')
    if ctype in TSV_TYPES:
        return "matrix", _encode_tsv(model, body, max_rows), b',"probabilities":'
    raise RequestError(415, f"unsupported content type {ctype.decode(errors='replace')[:60]!r}; "
                            "use application/json or text/tab-separated-values")


def _check_count(n: int, max_rows: int) -> None:
    if n > max_rows:
        raise RequestError(413, f"{n} rows exceed the per-request limit of {max_rows}; split the batch")


def _encode_rows(model: Any, rows: list[Any]) -> tuple[str, np.ndarray]:
    """Unchecked JSON rows -> probabilities (few rows) or a feature matrix; RequestError (row, field)."""
    if len(rows) < BATCH_ROWS:
        checked = check_rows(rows)
        return "probs", (model.predict_rows(checked) if checked else np.empty(0))
    return "matrix", model.encode_rows(rows)


def _encode_tsv(model: Any, body: bytes, max_rows: int) -> np.ndarray:
    n = body.count(b"\n") + (0 if body.endswith(b"\n") else 1)
    if not body.strip(b" \r\n"):  # tabs are fields: a line of 39 tabs is a row with every value missing
        raise RequestError(400, "empty body; expected raw Criteo lines (label, I1..I13, C1..C26, tab-separated)")
    _check_count(n, max_rows)
    x = model.encode_tsv(body)
    return tsv_reference(model, body) if x is None else x


def tsv_reference(model: Any, body: bytes) -> np.ndarray:
    """The general reader (pads short lines, reads headers) and Bundle transform; names bad lines."""
    from ctr.data.reader import DataFormatError, read_text
    from ctr.schema import ALL_COLUMNS

    try:
        table, bad = read_text(body.decode("utf-8", errors="replace"), require_label=False)
    except DataFormatError as e:
        raise RequestError(422, f"TSV body: {e}") from None
    if bad:
        b = bad[0]
        field = b.reason.split(":", 1)[0]
        raise RequestError(422, f"line {b.line}: {b.reason}", row=b.line - 1,
                           field=field if field in ALL_COLUMNS else None)
    return model.bundle.transform.transform_table(table)


def response_body(model: Any, key: bytes, probs: np.ndarray) -> bytes:
    return b"".join((b'{"model_version":', orjson.dumps(model.version), key,
                     orjson.dumps(probs, option=orjson.OPT_SERIALIZE_NUMPY), b"}"))


# ---- the worker side ---------------------------------------------------------------------------
_MODELS: OrderedDict[str, Any] = OrderedDict()


class _NeedModel(Exception):
    """The worker has not built this model yet: resend the task with its files."""


def _worker_init(nice: int) -> None:
    try:
        os.nice(nice)
    except OSError:
        pass


def _install(key: str, path: str, files: dict[str, bytes]) -> Any:
    from ctr.model.bundle import Bundle
    from ctr.serving.model import ServedModel

    model = ServedModel.build(Bundle.from_files(Path(path), files, check_probe=True))
    _MODELS[key] = model
    while len(_MODELS) > 2:  # the current model and the one before it (requests still in flight)
        _MODELS.popitem(last=False)
    return model


def _work(key: str, path: str, files: dict[str, bytes] | None, route: str, ctype: bytes, body: bytes,
          max_rows: int) -> tuple[str, Any]:
    model = _MODELS.get(key)
    if model is None:
        if files is None:
            return "need-model", None
        model = _install(key, path, files)
    try:
        probs, out = score_body(model, route, ctype, body, max_rows)
    except RequestError as e:  # sent back as plain values (the exception's own pickling loses them)
        return "client-error", (e.status, str(e), e.row, e.field)
    return "ok", (probs, out)


def _ping() -> int:
    return os.getpid()


class BatchLane:
    """`workers` niced worker processes scoring big bodies; `score` is awaited on the event loop."""

    def __init__(self, workers: int, nice: int = WORKER_NICE) -> None:
        self.workers = workers
        self.nice = nice
        self._ctx = multiprocessing.get_context("spawn")
        self._pool = self._new_pool()

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(max_workers=self.workers, mp_context=self._ctx, initializer=_worker_init,
                                      initargs=(self.nice,))

    def start(self, timeout: float = 120.0) -> None:
        """Spawn every worker now (imports take seconds), not on the first big request."""
        futs = [self._pool.submit(_ping) for _ in range(self.workers * 4)]
        pids = {f.result(timeout=timeout) for f in futs}
        log.info("batch lane: %d worker processes (pids %s)", len(pids), sorted(pids))

    async def score(self, model: Any, route: str, ctype: bytes, body: bytes, max_rows: int) -> tuple[np.ndarray, bytes]:
        import asyncio

        loop = asyncio.get_running_loop()
        key = model.key
        path = str(model.bundle.path)
        try:
            status, value = await loop.run_in_executor(self._pool, _work, key, path, None, route, ctype, body, max_rows)
            if status == "need-model":
                status, value = await loop.run_in_executor(self._pool, _work, key, path, dict(model.bundle.files),
                                                           route, ctype, body, max_rows)
        except cf.process.BrokenProcessPool:
            log.error("batch lane: a worker process died; starting a new pool")
            self._pool = self._new_pool()
            raise RequestError(503, "the batch lane restarted; retry the request") from None
        if status == "client-error":
            code, msg, row, field = value
            raise RequestError(code, msg, row=row, field=field)
        return value

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
