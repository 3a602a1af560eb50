"""The scoring service: a lean ASGI app around `Booster.predict` (no DataFrame per request).

Routes (ENGINEERING.md §3): POST /v1/score, POST /invocations, GET /healthz, GET /readyz,
GET /metrics, GET /openapi.json, and POST /admin/load for the local rollout's hot swap.

Each request reads the current model reference once, so a response is always computed by
exactly one version, which it names in the body and the `X-Model-Version` header. A new bundle
is loaded and probe-checked before the reference is swapped; a bad one is refused.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ctr.bundle import Bundle, BundleError
from ctr.serving.metrics import Metrics
from ctr.serving.openapi import OPENAPI
from ctr.serving.validation import RequestError, check_row, rows_from_split

log = logging.getLogger("ctr.serving")

MAX_BODY_BYTES = int(os.environ.get("CTR_MAX_BODY_BYTES", 8 * 1024 * 1024))
MAX_ROWS = int(os.environ.get("CTR_MAX_ROWS", 10_000))
OPEN_PATHS = {"/healthz", "/readyz", "/metrics", "/openapi.json"}

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class ModelHolder:
    """The served bundle; replaced atomically by `load`."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.loaded_at = time.time()
        self.previous: Bundle | None = None
        self._lock = asyncio.Lock()

    async def load(self, path: str) -> Bundle:
        async with self._lock:
            loop = asyncio.get_running_loop()
            new = await loop.run_in_executor(None, Bundle.load, Path(path))  # probe-checked
            self.previous, self.bundle = self.bundle, new
            self.loaded_at = time.time()
            log.info("model swapped: %s -> %s (%s)", self.previous.version, new.version, path)
            return new


class ScoringApp:
    def __init__(self, bundle: Bundle, token: str = "", admin_token: str = "") -> None:
        self.holder = ModelHolder(bundle)
        self.token = token.encode()
        self.admin_token = admin_token.encode()
        self.metrics = Metrics()
        self.inflight = 0

    # ---- ASGI entry ------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        t0 = time.perf_counter()
        path = scope["path"]
        self.inflight += 1
        status = 500
        try:
            status = await self._dispatch(scope, receive, send)
        except RequestError as e:
            status = e.status
            await _json(send, e.status, e.to_json())
        except Exception:  # a bug of ours: 500, logged, never the client's fault
            log.exception("unhandled error on %s", path)
            await _json(send, 500, {"error": "internal error"})
        finally:
            self.inflight -= 1
            self.metrics.observe_request(path, status, time.perf_counter() - t0)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _dispatch(self, scope: dict[str, Any], receive: Receive, send: Send) -> int:
        path, method = scope["path"], scope["method"]
        headers = dict(scope.get("headers") or [])
        routes = {
            "/v1/score": ("POST", self._score),
            "/invocations": ("POST", self._invocations),
            "/healthz": ("GET", self._healthz),
            "/readyz": ("GET", self._readyz),
            "/metrics": ("GET", self._metrics),
            "/openapi.json": ("GET", self._openapi),
            "/admin/load": ("POST", self._admin_load),
        }
        if path not in routes:
            raise RequestError(404, f"no route {path}")
        want, handler = routes[path]
        if method != want:
            raise RequestError(405, f"{path} takes {want}, not {method}")
        if path == "/admin/load":
            self._check_admin(scope, headers)
        elif path not in OPEN_PATHS and self.token:
            self._check_token(headers)
        body = await _read_body(receive, headers) if want == "POST" else b""
        return await handler(headers, body, send)

    def _check_token(self, headers: dict[bytes, bytes]) -> None:
        auth = headers.get(b"authorization", b"")
        if not auth.startswith(b"Bearer ") or not hmac.compare_digest(auth[7:].strip(), self.token):
            raise RequestError(401, "missing or wrong bearer token")

    def _check_admin(self, scope: dict[str, Any], headers: dict[bytes, bytes]) -> None:
        if self.admin_token:
            auth = headers.get(b"authorization", b"")
            if not auth.startswith(b"Bearer ") or not hmac.compare_digest(auth[7:].strip(), self.admin_token):
                raise RequestError(401, "missing or wrong admin token")
            return
        client = (scope.get("client") or ("", 0))[0]
        if client not in ("127.0.0.1", "::1", "localhost"):
            raise RequestError(403, "admin endpoint is loopback-only when CTR_ADMIN_TOKEN is unset")

    # ---- handlers --------------------------------------------------------------------
    async def _score(self, headers: dict[bytes, bytes], body: bytes, send: Send) -> int:
        ctype = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
        bundle = self.holder.bundle  # one reference per request: no mixed versions
        if ctype == b"application/json":
            payload = _parse_json(body)
            if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list):
                raise RequestError(422, "body must be {\"rows\": [ {feature: value, ...}, ... ]}")
            rows = payload["rows"]
            _check_count(len(rows))
            probs = self._predict_rows(bundle, [check_row(i, r) for i, r in enumerate(rows)])
        elif ctype in (b"text/tab-separated-values", b"text/plain"):
            probs = self._predict_tsv(bundle, body)
        else:
            raise RequestError(415, f"unsupported content type {ctype.decode(errors='replace')!r}; "
                                    "use application/json or text/tab-separated-values")
        return await self._respond(send, bundle, {"model_version": bundle.version, "probabilities": probs})

    async def _invocations(self, headers: dict[bytes, bytes], body: bytes, send: Send) -> int:
        ctype = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            raise RequestError(415, "/invocations takes application/json (dataframe_split or dataframe_records)")
        payload = _parse_json(body)
        bundle = self.holder.bundle
        if isinstance(payload, dict) and "dataframe_split" in payload:
            rows = rows_from_split(payload["dataframe_split"])
        elif isinstance(payload, dict) and "dataframe_records" in payload:
            rows = payload["dataframe_records"]
            if not isinstance(rows, list):
                raise RequestError(422, "dataframe_records must be a list of objects")
        else:
            raise RequestError(422, "body must hold 'dataframe_split' or 'dataframe_records'")
        _check_count(len(rows))
        probs = self._predict_rows(bundle, [check_row(i, r) for i, r in enumerate(rows)])
        return await self._respond(send, bundle, {"predictions": probs, "model_version": bundle.version})

    def _predict_rows(self, bundle: Bundle, rows: list[dict[str, Any]]) -> list[float]:
        if not rows:
            return []
        p = bundle.predict_rows(rows)
        self.metrics.observe_predictions(p)
        return p.tolist()

    def _predict_tsv(self, bundle: Bundle, body: bytes) -> list[float | None]:
        from ctr.data.reader import read_text

        text = body.decode("utf-8", errors="replace")
        lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
        _check_count(lines)
        table, bad = read_text(text, require_label=False)
        if bad:
            b = bad[0]
            raise RequestError(422, f"line {b.line}: {b.reason}", row=b.line - 1)
        p = bundle.predict_table(table) if table.num_rows else np.empty(0)
        self.metrics.observe_predictions(p)
        return p.tolist()

    async def _respond(self, send: Send, bundle: Bundle, doc: dict[str, Any]) -> int:
        await _json(send, 200, doc, extra=[(b"x-model-version", bundle.version.encode())])
        return 200

    async def _healthz(self, headers: dict[bytes, bytes], body: bytes, send: Send) -> int:
        await _json(send, 200, {"status": "ok"})
        return 200

    async def _readyz(self, headers: dict[bytes, bytes], body: bytes, send: Send) -> int:
        b = self.holder.bundle
        await _json(send, 200, {"status": "ready", "model_version": b.version, "digest": b.digest,
                                "loaded_at": self.holder.loaded_at, "bundle": str(b.path)},
                    extra=[(b"x-model-version", b.version.encode())])
        return 200

    async def _metrics(self, headers: dict[bytes, bytes], body: bytes, send: Send) -> int:
        text = self.metrics.render(self.holder.bundle.version, self.inflight).encode()
        await _send(send, 200, text, b"text/plain; version=0.0.4")
        return 200

    async def _openapi(self, headers: dict[bytes, bytes], body: bytes, send: Send) -> int:
        await _json(send, 200, OPENAPI)
        return 200

    async def _admin_load(self, headers: dict[bytes, bytes], body: bytes, send: Send) -> int:
        payload = _parse_json(body)
        if not isinstance(payload, dict) or not isinstance(payload.get("bundle"), str):
            raise RequestError(422, "body must be {\"bundle\": \"/path/to/bundle\"}")
        try:
            new = await self.holder.load(payload["bundle"])
        except (BundleError, OSError) as e:
            log.error("refused bundle %s: %s", payload["bundle"], e)
            raise RequestError(409, f"bundle refused, still serving {self.holder.bundle.version}: {e}") from None
        await _json(send, 200, {"model_version": new.version, "previous": self.holder.previous.version if self.holder.previous else None})
        return 200


def _check_count(n: int) -> None:
    if n > MAX_ROWS:
        raise RequestError(413, f"{n} rows exceed the per-request limit of {MAX_ROWS}")


def _parse_json(body: bytes) -> Any:
    if not body.strip():
        raise RequestError(400, "empty body; expected JSON")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise RequestError(400, f"body is not valid JSON: {e}") from None


async def _read_body(receive: Receive, headers: dict[bytes, bytes]) -> bytes:
    declared = headers.get(b"content-length")
    if declared is not None:
        try:
            if int(declared) > MAX_BODY_BYTES:
                raise RequestError(413, f"body of {int(declared)} bytes exceeds the limit of {MAX_BODY_BYTES}")
        except ValueError:
            raise RequestError(400, "invalid Content-Length") from None
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        part = msg.get("body", b"")
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise RequestError(413, f"body exceeds the limit of {MAX_BODY_BYTES} bytes")
        chunks.append(part)
        if not msg.get("more_body"):
            break
    return b"".join(chunks)


async def _send(send: Send, status: int, body: bytes, ctype: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, doc: Any, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    await _send(send, status, orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), b"application/json", extra)


def create_app(model_dir: str | Path, token: str | None = None, admin_token: str | None = None) -> ScoringApp:
    bundle = Bundle.load(Path(model_dir))
    return ScoringApp(
        bundle,
        token=os.environ.get("CTR_SERVE_TOKEN", "") if token is None else token,
        admin_token=os.environ.get("CTR_ADMIN_TOKEN", "") if admin_token is None else admin_token,
    )


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    import uvicorn

    app = create_app(model_dir)
    log.info("serving model %s from %s on http://%s:%d", app.holder.bundle.version, model_dir, host, port)
    uvicorn.run(app, host=host, port=port, http="httptools", loop="uvloop", access_log=False,
                log_level="warning", timeout_graceful_shutdown=30)
