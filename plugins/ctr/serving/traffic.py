"""Champion and candidate side by side: canary routing by request id, shadow scoring, drills, per-model metrics.

With no candidate loaded every request goes to the champion (today's behaviour). `POST /admin/candidate`
loads a second bundle (the same load + probe checks and time limit as `/admin/load`, without the swap)
as either

- a **canary**: `canary_percent` of requests are answered by it. The choice is a pure function of the
  request id (`X-Request-Id`, or one the service makes up and returns), `routes_to_candidate`, so a
  retry with the same id lands on the same model and a client can compute the router's choice; or
- a **shadow**: every scoring request is scored by it too, after the champion's answer has been sent
  (off the request's path: queued, and scored in batches while no scoring request is in flight, `_flush`);
  only the champion's scores are returned. `GET /admin/traffic` reports the
  comparison of the two score distributions (`compare`) and the shadow's latency and errors.

`POST /admin/promote` makes the candidate the champion, `POST /admin/drop` removes it. A `drill`
({"latency_ms", "error_rate"}) makes the candidate slow or failing on purpose, so the rollback can be
rehearsed. Every scoring request is counted in `ctr_model_requests_total{version, role, status}` and
`ctr_model_request_seconds{version, role}` (role: champion | canary | shadow), which the rollout's
verify step scrapes to compare candidate and champion over its bake window.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from prometheus_client import Counter, Histogram

from ctr.serving.lane import JSON_TYPES, TSV_TYPES, encode_body, score_body
from ctr.serving.metrics import LATENCY_BUCKETS
from ctr.serving.model import ModelHolder, ServedModel
from ctr.serving.ranking import RANK_ROUTE
from ctr.serving.validation import RequestError, invocation_rows, parse_json, score_rows

log = logging.getLogger("ctr.serving")

BUCKETS = 10_000                      # canary_percent has a resolution of 0.01 points
MAX_REQUEST_ID = 128
SHADOW_MAX_ROWS = 1_000_000           # scores kept for the comparison; beyond, the comparison stops growing
SHADOW_MAX_PENDING = 256              # shadow scorings waiting; beyond, a request is not shadowed (counted)
SHADOW_BATCH_SECONDS = 0.005          # queued shadow scorings are scored together this long after the first ...
SHADOW_IDLE_POLL = 0.001              # ... once no scoring request is in flight (checked this often) ...
SHADOW_MAX_DEFER = 0.05               # ... or this long after the first at the latest
SHADOW_BATCH_REQUESTS = 16            # at most this many per predict call (then the loop has its turn)
CHAMPION, CANARY, SHADOW = "champion", "canary", "shadow"
PSI_BINS = 10
PSI_FLOOR = 1e-4                      # an empty bin counts as this share (PSI is infinite otherwise)


def bucket(request_id: bytes) -> int:
    """The request id's bucket in [0, BUCKETS): blake2b, so the same id always gets the same bucket."""
    return int.from_bytes(hashlib.blake2b(request_id, digest_size=8, person=b"ctr-canary").digest(), "big") % BUCKETS


def routes_to_candidate(request_id: bytes | str, canary_percent: float) -> bool:
    """Whether a canary at `canary_percent` answers the request with this id (the router's choice)."""
    rid = request_id.encode() if isinstance(request_id, str) else request_id
    return bucket(rid) < round(canary_percent * BUCKETS / 100)


def _drill_hit(request_id: bytes, rate: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(request_id, digest_size=8, person=b"ctr-drill").digest(), "big") % BUCKETS
    return h < round(rate * BUCKETS)


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = PSI_BINS) -> float:
    """Population stability index of `actual` against `expected`, on `expected`'s deciles (ties merged)."""
    if len(expected) == 0 or len(actual) == 0:
        return 0.0
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)[1:-1]))
    e = np.bincount(np.searchsorted(edges, expected, side="right"), minlength=len(edges) + 1) / len(expected)
    a = np.bincount(np.searchsorted(edges, actual, side="right"), minlength=len(edges) + 1) / len(actual)
    e, a = np.maximum(e, PSI_FLOOR), np.maximum(a, PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def compare(champion: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """The shadow comparison of two models' scores of the same rows (what `GET /admin/traffic` reports)."""
    champion, candidate = np.asarray(champion, dtype=float), np.asarray(candidate, dtype=float)
    if champion.shape != candidate.shape:
        raise ValueError(f"compare: {len(champion)} champion scores vs {len(candidate)} candidate scores")
    if len(champion) == 0:
        return {"rows": 0, "champion_mean": None, "candidate_mean": None, "mean_shift": None, "psi": None,
                "max_abs_diff": None}
    cm, dm = float(champion.mean()), float(candidate.mean())
    return {"rows": int(len(champion)), "champion_mean": cm, "candidate_mean": dm, "mean_shift": dm - cm,
            "psi": psi(champion, candidate), "max_abs_diff": float(np.max(np.abs(candidate - champion)))}


def _p99_ms(xs: list[float]) -> float | None:
    return round(float(np.percentile(np.asarray(xs), 99)) * 1000, 3) if xs else None


@dataclass(frozen=True)
class Drill:
    """Failure injected in the candidate only: `latency_ms` added to each of its requests, and the share
    `error_rate` of them (by request id) answered with a 500 (canary) or counted as failed (shadow)."""

    latency_ms: float = 0.0
    error_rate: float = 0.0

    @classmethod
    def parse(cls, doc: Any) -> Drill:
        if doc is None:
            return cls()
        if not isinstance(doc, dict) or set(doc) - {"latency_ms", "error_rate"}:
            raise RequestError(422, 'drill must be {"latency_ms": >= 0, "error_rate": 0..1}', field="drill")
        lat, err = doc.get("latency_ms", 0), doc.get("error_rate", 0)
        if isinstance(lat, bool) or not isinstance(lat, (int, float)) or not 0 <= lat <= 60_000:
            raise RequestError(422, f"drill.latency_ms={lat!r} must be a number of milliseconds in 0..60000",
                               field="drill.latency_ms")
        if isinstance(err, bool) or not isinstance(err, (int, float)) or not 0 <= err <= 1:
            raise RequestError(422, f"drill.error_rate={err!r} must be a number in 0..1", field="drill.error_rate")
        return cls(float(lat), float(err))

    @property
    def active(self) -> bool:
        return self.latency_ms > 0 or self.error_rate > 0


@dataclass
class ShadowStats:
    """Both models' scores of the same requests, the shadow's scoring time and its errors."""

    champion: list[np.ndarray] = field(default_factory=list)
    candidate: list[np.ndarray] = field(default_factory=list)
    rows: int = 0
    requests: int = 0
    errors: int = 0
    skipped: int = 0
    batches: int = 0                                              # the batched shadow's predict calls
    last_error: str | None = None
    seconds: list[float] = field(default_factory=list)            # the shadow's scoring time per request
    champion_seconds: list[float] = field(default_factory=list)   # the champion's request time, same window

    def add(self, champ: np.ndarray, cand: np.ndarray, seconds: float) -> None:
        self.requests += 1
        if len(self.seconds) < SHADOW_MAX_ROWS:
            self.seconds.append(seconds)
        if len(champ) != len(cand):
            self.error(f"candidate returned {len(cand)} scores for {len(champ)} rows")
            return
        if self.rows + len(champ) <= SHADOW_MAX_ROWS:
            self.champion.append(np.asarray(champ, dtype=float).copy())
            self.candidate.append(np.asarray(cand, dtype=float).copy())
            self.rows += len(champ)

    def error(self, message: str) -> None:
        self.errors += 1
        self.last_error = message[:300]

    def summary(self) -> dict[str, Any]:
        champ = np.concatenate(self.champion) if self.champion else np.empty(0)
        cand = np.concatenate(self.candidate) if self.candidate else np.empty(0)
        return {**compare(champ, cand), "requests": self.requests, "errors": self.errors, "skipped": self.skipped,
                "batches": self.batches, "last_error": self.last_error, "candidate_p99_ms": _p99_ms(self.seconds),
                "champion_p99_ms": _p99_ms(self.champion_seconds)}


@dataclass
class Candidate:
    model: ServedModel
    mode: str                 # canary | shadow
    canary_percent: float
    drill: Drill
    since: float
    shadow: ShadowStats | None = None

    def to_json(self) -> dict[str, Any]:
        return {"model_version": self.model.version, "bundle": str(self.model.bundle.path), "mode": self.mode,
                "canary_percent": self.canary_percent if self.mode == CANARY else None,
                "drill": {"latency_ms": self.drill.latency_ms, "error_rate": self.drill.error_rate},
                "since": self.since}


class Traffic:
    """Which model answers a request, the shadow beside it, and the admin routes that manage the candidate."""

    def __init__(self, holder: ModelHolder, lane: Any, lane_bytes: int, lane_tsv_bytes: int) -> None:
        self.holder = holder
        self.lane = lane
        self.lane_bytes, self.lane_tsv_bytes = lane_bytes, lane_tsv_bytes  # bigger bodies: shadowed on the lane
        self.on_promote: Any = None  # set by the app: the served-model metrics follow a promotion
        self.candidate: Candidate | None = None
        self._boot = os.urandom(4).hex()
        self._seq = 0
        self._pending: set[asyncio.Task] = set()  # big bodies' shadow scorings on the batch lane
        self._queue: deque[tuple] = deque()            # small bodies waiting for `_flush`
        self._flush_by: float | None = None            # a flush is scheduled; it runs by then at the latest
        self._active = 0                               # scoring requests between `pick` and `observe`
        self._shadow_seq = 0
        self._requests: Counter | None = None
        self._latency: Histogram | None = None
        self._children: dict[tuple[str, str, int], Any] = {}
        self._hist: dict[tuple[str, str], Any] = {}

    def bind(self, registry: Any) -> None:
        """Register the per-model metrics in the service's registry (None: the multiprocess default)."""
        self._requests = Counter("ctr_model_requests", "Scoring requests by model version, role and status.",
                                 ["version", "role", "status"], registry=registry)
        self._latency = Histogram("ctr_model_request_seconds", "Scoring request latency by model version and role.",
                                  ["version", "role"], buckets=LATENCY_BUCKETS, registry=registry)

    def admin_routes(self) -> dict[str, tuple[str, Any]]:
        return {"/admin/candidate": ("POST", self._load), "/admin/promote": ("POST", self._promote),
                "/admin/drop": ("POST", self._drop), "/admin/traffic": ("GET", self._status)}

    # ---- the request path ------------------------------------------------------------------
    def request_id(self, scope: dict[str, Any], headers: dict[bytes, bytes]) -> bytes:
        rid = headers.get(b"x-request-id")
        if rid is None:
            self._seq += 1
            rid = f"{self._boot}-{self._seq}".encode()
        elif not 0 < len(rid) <= MAX_REQUEST_ID or not all(33 <= c < 127 for c in rid):
            raise RequestError(400, f"X-Request-Id must be 1..{MAX_REQUEST_ID} visible ASCII characters "
                                    "(no spaces)", field="X-Request-Id")
        scope["ctr.request_id"] = rid
        return rid

    async def pick(self, scope: dict[str, Any], headers: dict[bytes, bytes]) -> ServedModel:
        """The model that answers this request: the canary for its share of request ids, else the champion."""
        rid = self.request_id(scope, headers)
        cand = self.candidate
        if cand is not None and cand.mode == CANARY and routes_to_candidate(rid, cand.canary_percent):
            scope["ctr.model"] = (cand.model.version, CANARY)
            self._active += 1
            if cand.drill.latency_ms:
                await asyncio.sleep(cand.drill.latency_ms / 1000)
            if cand.drill.error_rate and _drill_hit(rid, cand.drill.error_rate):
                raise RequestError(500, f"drill: error injected in candidate version {cand.model.version}")
            return cand.model
        model = self.holder.current
        scope["ctr.model"] = (model.version, CHAMPION)
        self._active += 1
        return model

    def headers(self, scope: dict[str, Any]) -> list[tuple[bytes, bytes]]:
        return [(b"x-request-id", scope["ctr.request_id"])]

    def observe(self, scope: dict[str, Any], status: int, seconds: float) -> None:
        """At the end of every request: the per-model metrics of a scoring request (others are not counted)."""
        picked = scope.get("ctr.model")
        if picked is None:
            return
        self._active = max(0, self._active - 1)
        self._record(picked, status, seconds)
        cand = self.candidate
        if cand is not None and cand.shadow is not None and picked[1] == CHAMPION \
                and len(cand.shadow.champion_seconds) < SHADOW_MAX_ROWS:
            cand.shadow.champion_seconds.append(seconds)

    def _record(self, picked: tuple[str, str], status: int, seconds: float) -> None:
        if self._requests is None:
            return
        version, role = picked
        key = (version, role, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._requests.labels(version, role, str(status))
        child.inc()
        hist = self._hist.get(picked)
        if hist is None:
            hist = self._hist[picked] = self._latency.labels(version, role)
        hist.observe(seconds)

    def after(self, route: str, ctype: bytes, body: bytes, limit: int, probs: np.ndarray) -> None:
        """After the champion's answer is sent: queue the same body for the shadow, off the request's path.

        Bodies below the lane's threshold are queued; `_flush` scores what has accumulated as one matrix,
        on the event loop while no scoring request is in flight. Bigger ones are scored on the batch lane."""
        cand = self.candidate
        if cand is None or cand.shadow is None:
            return
        if len(body) >= (self.lane_tsv_bytes if ctype in TSV_TYPES else self.lane_bytes):
            if len(self._pending) >= SHADOW_MAX_PENDING:
                cand.shadow.skipped += 1
                return
            t = asyncio.get_running_loop().create_task(self._shadow(cand, route, ctype, body, limit, probs))
            self._pending.add(t)
            t.add_done_callback(self._pending.discard)
            return
        if len(self._queue) >= SHADOW_MAX_PENDING:
            cand.shadow.skipped += 1
            return
        self._queue.append((cand, route, ctype, body, limit, probs))
        if self._flush_by is None:
            self._flush_by = time.perf_counter() + SHADOW_MAX_DEFER
            asyncio.get_running_loop().call_later(SHADOW_BATCH_SECONDS, self._flush)

    def _flush(self) -> None:
        """Score the queued bodies together, when no scoring request is in flight (or at the latest
        SHADOW_MAX_DEFER after the first was queued, or when the queue is half full)."""
        loop = asyncio.get_running_loop()
        if self._active > 0 and time.perf_counter() < self._flush_by and len(self._queue) < SHADOW_MAX_PENDING // 2:
            loop.call_later(SHADOW_IDLE_POLL, self._flush)
            return
        items = [self._queue.popleft() for _ in range(min(len(self._queue), SHADOW_BATCH_REQUESTS))]
        if self._queue:                    # the rest after the loop has had its turn
            self._flush_by = time.perf_counter() + SHADOW_MAX_DEFER
            loop.call_soon(self._flush)
        else:
            self._flush_by = None
        try:
            self._shadow_batch(items)
        except Exception as e:  # our bug, never the client's: the whole batch counts as failed
            log.exception("shadow batch failed")
            for c, *_ in items:
                if c.shadow is not None:
                    self._shadow_failed(c, e, 0.0)

    def _shadow_batch(self, items: list[tuple]) -> None:
        """Score queued bodies with their candidate: each body parsed and encoded alone (its own errors),
        one predict for all. A request's `seconds` is its own encoding time plus its batch's predict time
        (plus a drill's latency): what scoring it cost the candidate, not how long it queued."""
        cand = self.candidate
        ok: list[tuple] = []
        for item in items:
            c, route, ctype, body, limit, probs = item
            if c is not cand or c.shadow is None:
                continue  # dropped or promoted meanwhile: nothing to compare any more
            t0 = time.perf_counter()
            try:
                if c.drill.error_rate:
                    self._shadow_seq += 1
                    if _drill_hit(f"shadow-{self._shadow_seq}".encode(), c.drill.error_rate):
                        raise RuntimeError(f"drill: error injected in candidate version {c.model.version}")
                if route == RANK_ROUTE:  # a ranking's candidates are scored singly (few requests, own parser)
                    got, _ = score_body(c.model, route, ctype, body, limit)
                    x = None
                else:
                    x, got = _shadow_matrix(c.model, route, ctype, body, limit), None
            except Exception as e:  # the candidate's failure is data for the comparison, never the client's problem
                self._shadow_failed(c, e, time.perf_counter() - t0 + c.drill.latency_ms / 1000)
                continue
            ok.append((c, probs, x, got, time.perf_counter() - t0))
        if not ok:
            return
        xs = [x for _, _, x, _, _ in ok if x is not None and len(x)]
        t0 = time.perf_counter()
        try:
            scored = cand.model.predict_matrix(np.concatenate(xs)) if xs else np.empty(0)
        except Exception as e:
            for c, *_ in ok:
                self._shadow_failed(c, e, time.perf_counter() - t0)
            return
        predict_s = time.perf_counter() - t0  # a latency drill is added to the figure (nobody waits for a shadow)
        at = 0
        for c, probs, x, got, enc_s in ok:
            if got is None:
                got = scored[at:at + len(x)]
                at += len(x)
            seconds = enc_s + predict_s + c.drill.latency_ms / 1000
            c.shadow.add(probs, got, seconds)
            self._count(c, 200, seconds)
        cand.shadow.batches += 1

    def _shadow_failed(self, cand: Candidate, e: BaseException, seconds: float) -> None:
        stats = cand.shadow
        assert stats is not None
        stats.requests += 1
        stats.seconds.append(seconds)
        stats.error(f"{type(e).__name__}: {e}")
        self._count(cand, 500, seconds)

    async def _shadow(self, cand: Candidate, route: str, ctype: bytes, body: bytes, limit: int,
                      probs: np.ndarray) -> None:
        """A big body's shadow scoring, on the batch lane."""
        stats = cand.shadow
        assert stats is not None
        t0 = time.perf_counter()
        try:
            if cand.drill.latency_ms:
                await asyncio.sleep(cand.drill.latency_ms / 1000)
            if cand.drill.error_rate:
                self._shadow_seq += 1
                if _drill_hit(f"shadow-{self._shadow_seq}".encode(), cand.drill.error_rate):
                    raise RuntimeError(f"drill: error injected in candidate version {cand.model.version}")
            got, _ = await self.lane.score(cand.model, route, ctype, body, limit)
        except Exception as e:  # the candidate's failure is data for the comparison, never the client's problem
            self._shadow_failed(cand, e, time.perf_counter() - t0)
            return
        seconds = time.perf_counter() - t0
        stats.add(probs, got, seconds)
        self._count(cand, 200, seconds)

    def _count(self, cand: Candidate, status: int, seconds: float) -> None:
        self._record((cand.model.version, SHADOW), status, seconds)

    # ---- admin -------------------------------------------------------------------------------
    async def _load(self, scope: dict[str, Any], headers: dict[bytes, bytes], body: bytes, send: Any) -> int:
        """{"bundle", "mode": canary|shadow, "canary_percent", "drill"}; without "bundle", re-weights the
        loaded candidate (canary_percent, drill)."""
        doc = parse_json(body)
        if not isinstance(doc, dict) or set(doc) - {"bundle", "mode", "canary_percent", "drill"}:
            raise RequestError(422, 'body must be {"bundle": path, "mode": "canary"|"shadow", "canary_percent": '
                                    '0..100, "drill": {...}} (bundle omitted: re-weight the loaded candidate)')
        mode = doc.get("mode", CANARY if self.candidate is None else self.candidate.mode)
        if mode not in (CANARY, SHADOW):
            raise RequestError(422, f"mode={mode!r} must be 'canary' or 'shadow'", field="mode")
        pct = doc.get("canary_percent", 0 if mode == SHADOW else None)
        if pct is None and self.candidate is not None:
            pct = self.candidate.canary_percent
        if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 <= pct <= 100:
            raise RequestError(422, f"canary_percent={pct!r} must be a number in 0..100", field="canary_percent")
        drill = Drill.parse(doc.get("drill"))
        path = doc.get("bundle")
        if path is None:
            if self.candidate is None:
                raise RequestError(409, "no candidate loaded; send a bundle", field="bundle")
            self.candidate.canary_percent, self.candidate.drill = float(pct), drill
            log.info("candidate re-weighted version=%s mode=%s canary_percent=%s", self.candidate.model.version,
                     self.candidate.mode, pct)
            await _send_json(send, 200, self.candidate.to_json())
            return 200
        if not isinstance(path, str) or not path:
            raise RequestError(422, "bundle must be a non-empty path", field="bundle")
        try:
            model = await self.holder.fetch(path)
        except Exception as e:  # any failure to load or verify refuses the candidate; nothing changes
            log.error("candidate refused bundle=%s reason=%s", path, e)
            raise RequestError(409, f"candidate bundle {path} refused: {e}") from None
        self.candidate = Candidate(model, mode, float(pct), drill, time.time(),
                                   ShadowStats() if mode == SHADOW else None)
        log.info("candidate loaded version=%s mode=%s canary_percent=%s drill=%s bundle=%s", model.version, mode,
                 pct, drill, path)
        await _send_json(send, 200, {**self.candidate.to_json(), "champion": self.holder.current.version})
        return 200

    async def _promote(self, scope: dict[str, Any], headers: dict[bytes, bytes], body: bytes, send: Any) -> int:
        cand = self.candidate
        if cand is None:
            raise RequestError(409, "no candidate loaded to promote")
        old = await self.holder.promote(cand.model)
        self.candidate = None
        if self.on_promote is not None:
            self.on_promote(cand.model)
        await _send_json(send, 200, {"model_version": cand.model.version, "previous": old.version},
                         [(b"x-model-version", cand.model.header)])
        return 200

    async def _drop(self, scope: dict[str, Any], headers: dict[bytes, bytes], body: bytes, send: Any) -> int:
        cand, self.candidate = self.candidate, None
        if cand is not None:
            log.warning("candidate dropped version=%s mode=%s", cand.model.version, cand.mode)
        await _send_json(send, 200, {"dropped": cand.model.version if cand else None,
                                     "model_version": self.holder.current.version})
        return 200

    async def _status(self, scope: dict[str, Any], headers: dict[bytes, bytes], body: bytes, send: Any) -> int:
        await _send_json(send, 200, self.status())
        return 200

    def status(self) -> dict[str, Any]:
        cand = self.candidate
        return {"champion": self.holder.current.version, "candidate": cand.to_json() if cand else None,
                "shadow": cand.shadow.summary() if cand and cand.shadow else None,
                "pending_shadow": len(self._pending) + len(self._queue)}


def _shadow_matrix(model: ServedModel, route: str, ctype: bytes, body: bytes, limit: int) -> np.ndarray:
    """A /v1/score or /invocations body -> the candidate's feature matrix (not yet predicted)."""
    if ctype in JSON_TYPES:
        rows = invocation_rows(parse_json(body)) if route == "/invocations" else score_rows(parse_json(body))
        if len(rows) > limit:
            raise RequestError(413, f"{len(rows)} rows exceed the per-request limit of {limit}")
        return model.encode_rows(rows) if rows else np.empty((0, 0))
    return encode_body(model, route, ctype, body, limit)[1]


async def _send_json(send: Any, status: int, doc: Any, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = orjson.dumps(doc)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
