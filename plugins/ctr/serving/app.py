"""The scoring service: a lean ASGI app (no framework, no DataFrame per request).

Routes (ENGINEERING.md §3): POST /v1/score (JSON rows, or raw Criteo TSV lines), POST /v1/rank (a
user's candidate items, top k; ranking.py), POST /invocations (MLflow dataframe_split / dataframe_records), GET /healthz, GET /readyz, GET /metrics,
GET /openapi.json, and POST /admin/load, the local rollout's hot swap.

Every response that carries predictions names the version that computed them (body and
`X-Model-Version`); see model.py for why a response can never mix versions. Client mistakes are
4xx JSON errors naming row and field (validation.py); a 5xx is always our bug and is logged.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from ctr.serving.auth import check_admin, check_token
from ctr.serving.lane import BATCH_ROWS, TSV_TYPES, BatchLane, encode_body, response_body
from ctr.serving.metrics import CONTENT_TYPE as METRICS_TYPE
from ctr.serving.metrics import Metrics, multiprocess_dir
from ctr.serving.model import ModelHolder, ServedModel
from ctr.serving.openapi import OPENAPI
from ctr.serving.predlog import PredictionLog, prediction_log_from
from ctr.serving.ranking import (
    DEFAULT_MAX_CANDIDATES,
    RANK_ROUTE,
    answer_body,
    check_content_type,
    predict,
    prepare,
)
from ctr.serving.traffic import Traffic
from ctr.serving.validation import RequestError, parse_json
from ctr.settings import Settings

log = logging.getLogger("ctr.serving")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_ROWS = 10_000
DEFAULT_BODY_TIMEOUT_S = 30
DEFAULT_LOAD_TIMEOUT_S = 60
DEFAULT_LANE_BYTES = 64 * 1024     # JSON bodies this big are parsed, encoded and predicted on the batch lane
DEFAULT_LANE_TSV_BYTES = 512 * 1024  # TSV bodies this big too (TSV encodes ~25x faster per byte than JSON)
DEFAULT_BATCH_WORKERS = 2          # batch lane worker processes
DEFAULT_BATCH_NICE = 10           # the lane workers' niceness: the serving process wins the CPU
DEFAULT_LANE_QUEUE = 16            # batch requests waiting for the lane beyond this get a 503
DEFAULT_MAX_HEADER_BYTES = 32 * 1024  # request line + headers, per request (431 beyond)
DEFAULT_MAX_HEADERS = 100
RANK_THREAD_ROWS = 32  # rankings of this many candidates are predicted on a predict thread (the loop parses on)
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Handler = Callable[[dict[str, Any], dict[bytes, bytes], bytes, Send], Awaitable[int]]


class ScoringApp:
    """The ASGI app. Small requests are answered on the event loop; a body of `lane_bytes` or more
    is parsed, encoded, predicted and serialised on the batch lane (`batch_workers` niced worker
    processes, lane.py), so big batches never hold the serving process's GIL or its event loop.
    At most `lane_queue` batch requests wait for the lane; more get a 503 with Retry-After."""

    def __init__(self, model: ServedModel, token: str = "", admin_token: str = "",
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_rows: int = DEFAULT_MAX_ROWS,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT_S, load_timeout: float = DEFAULT_LOAD_TIMEOUT_S,
                 lane_bytes: int = DEFAULT_LANE_BYTES, batch_workers: int = DEFAULT_BATCH_WORKERS,
                 lane_queue: int = DEFAULT_LANE_QUEUE, batch_nice: int = DEFAULT_BATCH_NICE,
                 lane_tsv_bytes: int = DEFAULT_LANE_TSV_BYTES,
                 max_candidates: int = DEFAULT_MAX_CANDIDATES, prediction_log: PredictionLog | None = None) -> None:
        self.holder = ModelHolder(model, load_timeout=load_timeout)
        self.token = token.encode()
        self.admin_token = admin_token.encode()
        self.max_body_bytes = max_body_bytes
        self.max_rows = max_rows
        self.max_candidates = max_candidates
        self.body_timeout = body_timeout  # a client that stops sending mid-body gets a 408, not a hung slot
        self.lane_bytes = lane_bytes
        self.lane_queue = lane_queue
        self.lane_waiting = 0
        self.inflight = 0
        self.lane = BatchLane(batch_workers, nice=batch_nice)
        self.lane_tsv_bytes = lane_tsv_bytes
        self._threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ctr-predict")
        self.traffic = Traffic(self.holder, self.lane, lane_bytes, lane_tsv_bytes)  # canary / shadow (traffic.py)
        self._routes: dict[str, tuple[str, Handler]] = {
            "/v1/score": ("POST", self._score),
            RANK_ROUTE: ("POST", self._rank),
            "/invocations": ("POST", self._invocations),
            "/healthz": ("GET", self._healthz),
            "/readyz": ("GET", self._readyz),
            "/metrics": ("GET", self._metrics),
            "/openapi.json": ("GET", self._openapi),
            "/admin/load": ("POST", self._admin_load),
            **self.traffic.admin_routes(),
        }
        # route labels: the router's paths only; the in-flight gauge reads self.inflight (one process)
        self.metrics = Metrics(self._routes, multiprocess_dir(), inflight=lambda: self.inflight)
        self._inflight_gauge = self.metrics.inflight_gauge  # None unless multiprocess mode
        self.metrics.set_model(model.version, model.loaded_at)
        self.traffic.bind(self.metrics.registry)
        self.traffic.on_promote = lambda m: self.metrics.set_model(m.version, m.loaded_at)
        self.predlog = prediction_log or PredictionLog(Path("."), rate=0.0)  # off unless create_app gives one
        self.predlog.bind_metrics(self.metrics)

    # ---- ASGI entry ------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(receive, send)
            return
        t0 = time.perf_counter()
        path = scope["path"]
        self.inflight += 1
        if self._inflight_gauge is not None:
            self._inflight_gauge.inc()
        status = 500
        try:
            status = await self._dispatch(scope, receive, send)
        except RequestError as e:
            status = e.status
            await _error(send, e, self._routes.get(path))
        except Exception:  # our bug, never the client's: logged with the traceback, answered 500
            log.exception("unhandled error path=%s", path)
            await _safe_send_json(send, 500, {"error": "internal error; see the service log"})
        finally:
            self.inflight -= 1
            if self._inflight_gauge is not None:
                self._inflight_gauge.dec()
            self.metrics.observe_request(path, status, time.perf_counter() - t0)
            self.traffic.observe(scope, status, time.perf_counter() - t0)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                self.lane.shutdown()
                self._threads.shutdown(wait=True)
                self.predlog.close()
                self.metrics.close()
                log.info("scoring service stopped model_version=%s", self.holder.current.version)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _dispatch(self, scope: dict[str, Any], receive: Receive, send: Send) -> int:
        path = scope["path"]
        route = self._routes.get(path)
        if route is None:
            raise RequestError(404, f"no route {path[:100]!r}; see /openapi.json")
        want, handler = route
        if scope["method"] != want:
            raise RequestError(405, f"{path} takes {want}, not {scope['method'][:10]}")
        headers = dict(scope["headers"])
        if b"upgrade" in headers:  # no WebSocket/h2c here: plain HTTP/1.1 (uvicorn runs with ws="none")
            raise RequestError(400, f"Upgrade: {headers[b'upgrade'].decode(errors='replace')[:40]!r} is not "
                                    "supported; this service speaks plain HTTP/1.1 (no WebSocket)")
        if path.startswith("/admin/"):
            check_admin(scope, headers, self.admin_token)
        elif self.token and path not in OPEN_PATHS:
            check_token(headers, self.token)
        body = b""
        if want == "POST":
            try:
                async with asyncio.timeout(self.body_timeout):
                    body = await self._read_body(receive, headers)
            except TimeoutError:
                raise RequestError(408, f"request body not received within {self.body_timeout:g} s") from None
        return await handler(scope, headers, body, send)

    async def _read_body(self, receive: Receive, headers: dict[bytes, bytes]) -> bytes:
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestError(400, "Content-Length is not a number")
            if int(declared) > self.max_body_bytes:
                raise RequestError(413, f"body of {int(declared)} bytes exceeds the limit of {self.max_body_bytes}")
        msg = await receive()
        body = msg.get("body", b"")
        if not msg.get("more_body"):
            if len(body) > self.max_body_bytes:
                raise RequestError(413, f"body exceeds the limit of {self.max_body_bytes} bytes")
            return body
        chunks, size = [body], len(body)
        while msg.get("more_body"):
            msg = await receive()
            if msg["type"] == "http.disconnect":
                break
            part = msg.get("body", b"")
            size += len(part)
            if size > self.max_body_bytes:
                raise RequestError(413, f"body exceeds the limit of {self.max_body_bytes} bytes")
            chunks.append(part)
        return b"".join(chunks)

    # ---- scoring ---------------------------------------------------------------------
    async def _score(self, scope: dict[str, Any], headers: dict[bytes, bytes], body: bytes, send: Send) -> int:
        return await self._scored(send, "/v1/score", body, _content_type(headers), scope, headers)

    async def _invocations(self, scope: dict[str, Any], headers: dict[bytes, bytes], body: bytes, send: Send) -> int:
        return await self._scored(send, "/invocations", body, _content_type(headers), scope, headers)

    async def _scored(self, send: Send, route: str, body: bytes, ctype: bytes, scope: dict[str, Any],
                      headers: dict[bytes, bytes]) -> int:
        model = await self.traffic.pick(scope, headers)  # one reference per request: champion, or the canary (traffic.py)
        if len(body) < (self.lane_tsv_bytes if ctype in TSV_TYPES else self.lane_bytes):
            # on the event loop: parse + encode (cheap at this size); a matrix of >= BATCH_ROWS rows
            # is predicted on a predict thread (LightGBM releases the GIL)
            kind, arr, key = encode_body(model, route, ctype, body, self.max_rows)
            if kind == "probs":
                probs = arr
            elif len(arr) < BATCH_ROWS:
                probs = model.predict_matrix(arr)
            else:
                probs = await asyncio.get_running_loop().run_in_executor(self._threads, model.predict_matrix, arr)
            out = response_body(model, key, probs)
        else:
            probs, out = await self._on_lane(model, route, ctype, body, self.max_rows)
        self.metrics.observe_predictions(probs, model.version)
        self.predlog.log(route, ctype, body, probs, model.version, scope.get("ctr.request_id"))
        await _send(send, 200, out, b"application/json", [(b"x-model-version", model.header), *self.traffic.headers(scope)])
        self.traffic.after(route, ctype, body, self.max_rows, probs)  # a shadow scores it too, after the answer
        return 200

    async def _rank(self, scope: dict[str, Any], headers: dict[bytes, bytes], body: bytes, send: Send) -> int:
        """A user's candidates -> the top k (ranking.py). Small bodies are parsed and encoded on the loop,
        their matrix predicted on a predict thread; big ones go to the batch lane like /v1/score's."""
        model = await self.traffic.pick(scope, headers)  # one reference per request: champion, or the canary
        ctype = _content_type(headers)
        check_content_type(ctype)
        if len(body) < self.lane_bytes:
            req = prepare(model, parse_json(body), self.max_candidates)
            if len(req.x) < RANK_THREAD_ROWS:
                probs = predict(model, req.x)
            else:
                probs = await asyncio.get_running_loop().run_in_executor(self._threads, predict, model, req.x)
            out = answer_body(model, req, probs)
        else:
            probs, out = await self._on_lane(model, RANK_ROUTE, ctype, body, self.max_candidates)
        self.metrics.observe_predictions(probs, model.version)
        self.predlog.log(RANK_ROUTE, ctype, body, probs, model.version, scope.get("ctr.request_id"))
        await _send(send, 200, out, b"application/json", [(b"x-model-version", model.header), *self.traffic.headers(scope)])
        self.traffic.after(RANK_ROUTE, ctype, body, self.max_candidates, probs)
        return 200

    async def _on_lane(self, model: ServedModel, route: str, ctype: bytes, body: bytes,
                       limit: int) -> tuple[Any, bytes]:
        if self.lane_waiting >= self.lane_queue:
            raise RequestError(503, f"{self.lane_waiting} large requests already wait for the batch lane; "
                                    "retry shortly")
        self.lane_waiting += 1
        try:
            return await self.lane.score(model, route, ctype, body, limit)
        finally:
            self.lane_waiting -= 1

    # ---- health, metrics, docs -------------------------------------------------------
    async def _healthz(self, scope: dict[str, Any], headers: dict[bytes, bytes], body: bytes, send: Send) -> int:
        await _send_json(send, 200, {"status": "ok"})
        return 200

    async def _readyz(self, scope: dict[str, Any], headers: dict[bytes, bytes], body: bytes, send: Send) -> int:
        m = self.holder.current
        doc = {"status": "ready", "model_version": m.version, "digest": m.bundle.digest, "bundle": str(m.bundle.path),
               "loaded_at": m.loaded_at,
               "loaded_at_iso": dt.datetime.fromtimestamp(m.loaded_at, dt.UTC).isoformat(timespec="seconds"),
               "fast_paths": {"single_row": m.single is not None, "tsv": m.tsv is not None,
                              "tsv_numpy": m.tsv_numpy is not None, "batch": m.batch is not None,
                              "json_rows": m.rows is not None},
               "compiled_predictor": m.compiled.state}  # off | compiling | ready | failed (CTR_PREDICTOR, predictors.py)
        await _send_json(send, 200, doc, [(b"x-model-version", m.header)])
        return 200

    async def _metrics(self, scope: dict[str, Any], headers: dict[bytes, bytes], body: bytes, send: Send) -> int:
        await _send(send, 200, self.metrics.render(), METRICS_TYPE)
        return 200

    async def _openapi(self, scope: dict[str, Any], headers: dict[bytes, bytes], body: bytes, send: Send) -> int:
        await _send_json(send, 200, OPENAPI)
        return 200

    # ---- hot swap (the local rollout's contract) -------------------------------------
    async def _admin_load(self, scope: dict[str, Any], headers: dict[bytes, bytes], body: bytes, send: Send) -> int:
        payload = parse_json(body)
        if not isinstance(payload, dict) or not isinstance(payload.get("bundle"), str) or not payload["bundle"]:
            raise RequestError(422, 'body must be {"bundle": "/path/to/bundle"}', field="bundle")
        path = payload["bundle"]
        try:
            new, old = await self.holder.load(path)
        except Exception as e:  # any failure to load or verify refuses the bundle; the old one keeps serving
            current = self.holder.current.version
            log.error("bundle refused bundle=%s still_serving=%s reason=%s", path, current, e)
            raise RequestError(409, f"bundle {path} refused, still serving {current}: {e}") from None
        self.metrics.set_model(new.version, new.loaded_at)
        await _send_json(send, 200, {"model_version": new.version, "previous": old.version},
                         [(b"x-model-version", new.header)])
        return 200


# ---- helpers ---------------------------------------------------------------------------
def _content_type(headers: dict[bytes, bytes]) -> bytes:
    raw = headers.get(b"content-type")
    return b"application/json" if raw is None else raw.split(b";", 1)[0].strip().lower()


async def _send(send: Send, status: int, body: bytes, ctype: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send: Send, status: int, doc: Any, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    await _send(send, status, orjson.dumps(doc), b"application/json", extra)


async def _safe_send_json(send: Send, status: int, doc: Any, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    try:
        await _send_json(send, status, doc, extra)
    except Exception as e:  # response already started or client gone: nothing more to say
        log.debug("could not send error response status=%d: %s", status, e)


async def _error(send: Send, e: RequestError, route: tuple[str, Handler] | None) -> None:
    extra = []
    if e.status == 401:
        extra.append((b"www-authenticate", b'Bearer realm="ctr"'))
    elif e.status == 405 and route is not None:
        extra.append((b"allow", route[0].encode()))
    elif e.status == 503:
        extra.append((b"retry-after", b"1"))
    elif e.status == 400 and str(e).startswith("Upgrade:"):
        extra.append((b"connection", b"close"))  # the parser stopped at the upgrade: nothing more to read
    await _safe_send_json(send, e.status, e.to_json(), extra)


def create_app(model_dir: str | Path, token: str | None = None, admin_token: str | None = None) -> ScoringApp:
    """The app for a bundle directory; tokens default to CTR_SERVE_TOKEN / CTR_ADMIN_TOKEN.

    Every limit is read and checked before the model loads: a bad value is a ValueError naming
    the variable (the service does not start), never a service that answers 413 to everything."""
    limits = service_limits()
    multiprocess_dir()  # PROMETHEUS_MULTIPROC_DIR, when set, must be a directory (checked before the load too)
    predlog = prediction_log_from(Settings.from_env())  # CTR_PREDICTION_LOG_* checked before the load too
    return ScoringApp(
        ServedModel.load(model_dir),
        token=os.environ.get("CTR_SERVE_TOKEN", "") if token is None else token,
        admin_token=os.environ.get("CTR_ADMIN_TOKEN", "") if admin_token is None else admin_token,
        max_body_bytes=limits["CTR_MAX_BODY_BYTES"], max_rows=limits["CTR_MAX_ROWS"],
        body_timeout=limits["CTR_BODY_TIMEOUT_S"], load_timeout=limits["CTR_LOAD_TIMEOUT_S"],
        lane_bytes=limits["CTR_BATCH_LANE_BYTES"], batch_workers=limits["CTR_BATCH_WORKERS"],
        lane_queue=limits["CTR_BATCH_QUEUE"], batch_nice=limits["CTR_BATCH_NICE"],
        lane_tsv_bytes=limits["CTR_BATCH_LANE_TSV_BYTES"], max_candidates=limits["CTR_RANK_MAX_CANDIDATES"],
        prediction_log=predlog,
    )


# variable -> (default, smallest allowed, largest allowed)
LIMITS: dict[str, tuple[int, int, int]] = {
    "CTR_MAX_BODY_BYTES": (DEFAULT_MAX_BODY_BYTES, 1, 1 << 31),
    "CTR_MAX_ROWS": (DEFAULT_MAX_ROWS, 1, 10_000_000),
    "CTR_RANK_MAX_CANDIDATES": (DEFAULT_MAX_CANDIDATES, 1, 1_000_000),
    "CTR_BODY_TIMEOUT_S": (DEFAULT_BODY_TIMEOUT_S, 1, 3600),
    "CTR_LOAD_TIMEOUT_S": (DEFAULT_LOAD_TIMEOUT_S, 1, 3600),
    "CTR_BATCH_LANE_BYTES": (DEFAULT_LANE_BYTES, 1, 1 << 31),
    "CTR_BATCH_LANE_TSV_BYTES": (DEFAULT_LANE_TSV_BYTES, 1, 1 << 31),
    "CTR_BATCH_WORKERS": (DEFAULT_BATCH_WORKERS, 1, 64),
    "CTR_BATCH_QUEUE": (DEFAULT_LANE_QUEUE, 1, 10_000),
    "CTR_BATCH_NICE": (DEFAULT_BATCH_NICE, 0, 19),
    "CTR_MAX_HEADER_BYTES": (DEFAULT_MAX_HEADER_BYTES, 1024, 1 << 20),
    "CTR_MAX_HEADERS": (DEFAULT_MAX_HEADERS, 8, 10_000),
}


def service_limits(env: dict[str, str] | None = None) -> dict[str, int]:
    """Every CTR_* limit of the service, checked (ValueError naming the variable and its range)."""
    env = dict(os.environ if env is None else env)
    return {name: _env_int(env, name, *spec) for name, spec in LIMITS.items()}


def service_limit(name: str, env: dict[str, str] | None = None) -> int:
    """One CTR_* limit, checked like service_limits (`ctr rank` reads CTR_RANK_MAX_CANDIDATES so)."""
    return _env_int(dict(os.environ if env is None else env), name, *LIMITS[name])


def _env_int(env: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw[:40]!r} is not an integer") from None
    if not lo <= v <= hi:
        raise ValueError(f"{name}={v} is out of range; it must be between {lo} and {hi}")
    return v


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Run the service until SIGTERM/SIGINT; in-flight requests are drained (up to 30 s)."""
    import gc

    import uvicorn

    from ctr.serving.guard import guarded_protocol

    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port} is out of range; it must be between 1 and 65535")
    limits = service_limits()
    app = create_app(model_dir)
    app.lane.start()
    app.predlog.start()
    gc.collect()
    gc.freeze()  # the loaded model is long-lived: keep it out of the collector's way (steadier p99)
    log.info("serving model_version=%s bundle=%s url=http://%s:%d auth=%s",
             app.holder.current.version, model_dir, host, port, "on" if app.token else "off")
    protocol = guarded_protocol(limits["CTR_MAX_HEADER_BYTES"], limits["CTR_MAX_HEADERS"], app.metrics)
    uvicorn.run(app, host=host, port=port, http=protocol, ws="none", loop="uvloop", lifespan="on", access_log=False,
                server_header=False, log_level="warning", timeout_graceful_shutdown=30)
