"""The prediction log: a sampled share of scored rows, written off the request path (by a child process) to gzip JSON Lines.

The request path calls `PredictionLog.log(route, ctype, body, probs, version, request_id)` once per
answered batch. It decides which rows are sampled (a seeded `numpy` generator, one draw per row in
the order rows are scored, so the number of rows logged for N scored rows is a fixed function of the
seed and N) and holds them in a bounded list (`queue_size` requests not yet handed over; beyond it the
sampled rows are dropped and counted, `ctr_prediction_log_dropped_total{reason="queue_full"}`, never
silently). Records, as readers (`read_log`, so `ctr monitor`) see them, one JSON object a line:

    {"request_id", "time", "model_version", "route", "row_index", "row", "probability"}

(`request_id` is the service's X-Request-Id of the request; `row` is the request's row as sent: a JSON
object, or the raw Criteo line of a TSV body under {"tsv": ...}; for /v1/rank the context merged with
the candidate, its id as "item_id"). On disk, a one-row JSON request (the common single-row call) is
stored without parsing it: its line, formatted by bytes formatting on the request path (about 4 us),
holds the validated body verbatim under "body" instead of "row" (newlines turned into spaces), and
`read_log` derives "row" from it with the same rules. A multi-row or TSV request is held as a tuple (a
reference to its body, the picked positions and their probabilities); only its picked rows are ever built
(at rate 0.01 a 100-candidate /v1/rank request has about one), by the writer process.

The writer is a child process (`ctr.serving.predlog_writer`, niced like the batch lane's workers), so the
service has no writer thread: nothing of the log's parsing, gzip or disk work competes for the event loop's
GIL. Every BATCH_WAIT_S (a timer on the running event loop; at once without one) the loop joins the held
lines, pickles the batch into one length-prefixed frame and makes one non-blocking write to the child's
stdin (a 1 MiB pipe); what the pipe does not take stays held and counts against `queue_size`, so a slow
or stuck writer means drops (`queue_full`), never a blocked loop. The child reports `written` and
`dropped` (unparsable, write_error) counts and closed files back on its stdout, read non-blocking at
each tick, and the service counts them in /metrics (`bind_metrics`). A writer that dies is noticed at the
next tick (its stdout ends or the pipe breaks): the rows handed to it and not reported written are
counted `writer_lost` (its restart's salvage may still recover those it had flushed), and a new writer
starts a second later. The service stopping (or dying) closes the pipe: the child writes everything it
read, renames its file and exits; it also exits when its parent is gone.

Each batch the child reads is appended to the open file as one complete gzip member per date, flushed.
Files live under `<root>/date=YYYY-MM-DD/` (the record's UTC date); the open file is a dot-named `.tmp`
(named with the writer's pid) that readers skip, renamed to `part-<UTC stamp>-<pid>-<seq>.jsonl.gz` when it
reaches `rotate_rows` rows, is `rotate_s` seconds old, the date changes, or the input ends. So a reader
never sees a half-written file. A crash of the writer (SIGKILL) leaves the `.tmp` holding every flushed
member: the next writer on the same root (a restart, or any service's start) salvages the complete members
of a dead process's `.tmp` into a final file, so a crash loses at most what was still held or in the
pipe (plus a member cut mid-write).

JSON Lines rather than Parquet: records are appended a few at a time, the raw rows have free-form shapes
(JSON objects, raw TSV lines, raw bodies) and gzip members make every flushed batch recoverable after a
crash; Parquet needs a footer written at close, so a crash loses the whole file.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import gzip
import itertools
import json
import logging
import os
import pickle
import re
import select
import subprocess
import sys
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ctr.serving.predlog_writer import _HEAD
from ctr.serving.validation import _is_nan

log = logging.getLogger("ctr.serving.predlog")

DEFAULT_RATE = 0.01
DEFAULT_QUEUE = 10_000
DEFAULT_ROTATE_ROWS = 100_000
DEFAULT_ROTATE_S = 60
DROP_REASONS = ("queue_full", "unparsable", "write_error", "writer_lost")
BATCH_WAIT_S = 0.05  # the event loop hands what it holds to the writer process this often
WRITER_NICE = 10  # the writer process's niceness, as the batch lane's workers (lane.WORKER_NICE)
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_BYTES = 1 << 20  # the pipe's capacity (Linux's default maximum for unprivileged processes)
_NEWLINES = bytes.maketrans(b"\r\n", b"  ")  # raw CR/LF in a valid JSON body are whitespace (strings escape them)
_JSON_ROUTES = frozenset({"/invocations", "/v1/rank"})
_TMP = re.compile(r"\.part-(?P<stamp>[0-9T]+)-(?P<pid>\d+)-(?P<seq>\d+)\.jsonl\.gz\.tmp")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # at start nothing of ours is open: a .tmp with our pid is a reused pid's leftover
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (a dead writer whose parent died too, not reaped yet) is dead: its .tmp is salvaged
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def complete_members(data: bytes) -> tuple[bytes, bool]:
    """The decompressed content of the complete gzip members at the start of `data`, and whether all were complete."""
    out: list[bytes] = []
    while data:
        d = zlib.decompressobj(wbits=31)
        try:
            chunk = d.decompress(data)
        except zlib.error:
            return b"".join(out), False
        if not d.eof:
            return b"".join(out), False
        out.append(chunk)
        data = d.unused_data
    return b"".join(out), True


def _payload_rows(route: str, payload: Any) -> list[Any]:
    """A parsed JSON request's rows as sent, in scoring order (what the probabilities belong to)."""
    from ctr.serving.validation import invocation_rows, score_rows

    if route == "/invocations":
        return invocation_rows(payload)
    if route == "/v1/rank":
        ctx = payload.get("context") or {}
        return [_rank_row(ctx, c) for c in payload["candidates"]]
    return score_rows(payload)


def _rank_row(ctx: dict[str, Any], cand: dict[str, Any]) -> dict[str, Any]:
    """A /v1/rank candidate's row as logged: the context merged with the candidate, its id as "item_id"."""
    row = {**ctx, **{k: v for k, v in cand.items() if k != "id"}}
    if "id" in cand:
        row["item_id"] = cand["id"]
    return row


def _nan_none(v: Any) -> Any:
    return None if _is_nan(v) else v  # invocation_rows' rule: NaN = missing


def _picked_payload_rows(route: str, payload: Any, idx: list[int], n: int) -> list[Any]:
    """Rows `idx` of a parsed (already answered, so valid) JSON request, each exactly as `_payload_rows` gives
    it, without building the others: at rate 0.01 a 100-candidate /v1/rank request has about one picked row,
    and merging every candidate with the context cost the service ~30% of its /v1/rank throughput."""
    if route == "/v1/rank":
        ctx = payload.get("context") or {}
        cands = payload["candidates"]
        _count(len(cands), n)
        return [_rank_row(ctx, cands[i]) for i in idx]
    if route == "/invocations" and isinstance(payload, dict) and "dataframe_split" in payload:
        split = payload["dataframe_split"]
        cols, data = split["columns"], split["data"]
        _count(len(data), n)
        return [{c: _nan_none(v) for c, v in zip(cols, data[i], strict=True)} for i in idx]
    if route == "/invocations" and isinstance(payload, dict) and "dataframe_records" in payload:
        recs = payload["dataframe_records"]
        _count(len(recs), n)
        return [{k: _nan_none(v) for k, v in r.items()} if isinstance(r, dict) else r for r in (recs[i] for i in idx)]
    rows = _payload_rows(route, payload)  # /v1/score: the body's own list, nothing built
    _count(len(rows), n)
    return [rows[i] for i in idx]


def _count(got: int, n: int) -> None:
    if got != n:
        raise ValueError(f"{got} rows parsed for {n} probabilities")


def _rows_of(route: str, ctype: bytes, body: bytes, n: int, idx: list[int]) -> list[Any]:
    """The request's rows `idx` (positions in scoring order: what the probabilities belong to) as sent."""
    from ctr.serving.validation import parse_json

    if route in _JSON_ROUTES or ctype == b"application/json":
        return _picked_payload_rows(route, parse_json(body), idx, n)
    lines = [ln for ln in body.decode("utf-8", errors="replace").splitlines() if ln.strip(" \r")]
    _count(len(lines[-n:]), n)
    lines = lines[-n:]  # a header line, if any, is the first
    return [{"tsv": lines[i]} for i in idx]


def _raw_json(body: bytes) -> bytes | None:
    """An answered one-row JSON body as it can stand in a JSON line (one line, no parse), or None (then parse it)."""
    b = body.strip()
    if b[:1] != b"{" or b[-1:] != b"}":
        return None
    return b.translate(_NEWLINES) if b"\n" in b or b"\r" in b else b


def _quoted(s: bytes) -> bytes:
    """A visible-ASCII id as a JSON string."""
    return b'"' + s + b'"' if b'"' not in s and b"\\" not in s else orjson.dumps(s.decode("ascii", "replace"))


class PredictionLog:
    """Sampled rows of the service's answers -> rotating gzip JSON Lines files, written by a child process
    (see the module doc). `dropped(reason, n)` and `written(n)` are the metrics hooks (prometheus counters in
    the service)."""

    def __init__(self, root: Path, rate: float = DEFAULT_RATE, seed: int = 0, queue_size: int = DEFAULT_QUEUE,
                 rotate_rows: int = DEFAULT_ROTATE_ROWS, rotate_s: float = DEFAULT_ROTATE_S,
                 dropped: Callable[[str, int], None] | None = None, written: Callable[[int], None] | None = None,
                 uploader: BlobUploader | None = None, nice: int = WRITER_NICE) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"CTR_PREDICTION_LOG_RATE={rate} must be between 0 and 1")
        if uploader is not None and not isinstance(uploader, BlobUploader):
            raise TypeError("uploader must be blob_uploader(url): the writer process rebuilds it from its URL")
        self.root = Path(root)
        self.rate = float(rate)
        self.seed = seed
        self.rotate_rows = rotate_rows
        self.rotate_s = rotate_s
        self.nice = nice
        self._rng = np.random.default_rng(seed)
        self._max = queue_size
        self._dropped = dropped or (lambda reason, n: None)
        self._written = written or (lambda n: None)
        self._uploader = uploader
        self.sampled = 0        # rows the sampling chose (logged + dropped)
        self.scored = 0         # rows seen
        self.drops: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.rows_written = 0
        self.files: list[Path] = []
        # rows of the service not yet handed to the writer: items (in answer order) + frames partly in the pipe
        self._items: list[Any] = []
        self._run: list[bytes] | None = None  # the last item's lines, while it is a run of one date's lines
        self._run_date: str | None = None
        self._held = 0                        # requests in _items and _pending: the bound (queue_size)
        self._pending = bytearray()           # framed bytes the pipe did not take yet
        self._frames: deque[tuple[int, int, int]] = deque()  # (end offset in the stream, requests, rows) unsent
        self._sent = 0                        # bytes of the stream taken by the pipe
        self._stream = 0                      # bytes of the stream framed
        self._inflight = 0                    # rows handed to the writer, not yet reported written or dropped
        self._proc: subprocess.Popen | None = None
        self._reports = b""
        self._acks: set[int] = set()
        self._tokens = itertools.count(1)
        self._scheduled = False
        self._started = False
        self._closing = False
        self._respawn_at = 0.0
        self._boot = uuid.uuid4().hex[:12].encode()  # request ids made up for callers that give none: <boot>-<seq>
        self._ids = itertools.count(1)
        self._versions: dict[str, bytes] = {}   # model version -> its JSON string
        self._seconds: dict[int, tuple[str, bytes]] = {}  # whole UTC second -> (date, ISO prefix)

    def bind_metrics(self, metrics: Any) -> None:
        """Count drops and writes in the service's /metrics (ctr.serving.metrics.Metrics)."""
        children = {r: metrics.log_dropped.labels(r) for r in DROP_REASONS}
        self._dropped = lambda reason, n: children[reason].inc(n)
        self._written = metrics.log_written.inc

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    # ---- the request path ---------------------------------------------------------------------
    def log(self, route: str, ctype: bytes, body: bytes, probs: np.ndarray, version: str,
            request_id: bytes | None = None) -> None:
        """Sample rows of one answered batch (`body`: the request's, already validated and answered);
        never blocks, never raises. Called from the event loop's thread only (the draws' order is the
        answers' order). `request_id`: the service's X-Request-Id (one is made up when None)."""
        n = len(probs)
        if self.rate <= 0 or n == 0:
            return
        self.scored += n
        if self.rate >= 1.0:
            picked = None
            k = n
        else:
            hit = self._rng.random(n) < self.rate
            k = int(hit.sum())
            if k == 0:
                return
            picked = np.flatnonzero(hit)
        self.sampled += k
        if self._held >= self._max:
            self._drop("queue_full", k)
            return
        ts = time.time()
        if request_id is None:
            request_id = b"%s-%d" % (self._boot, next(self._ids))
        self._held += 1
        if n == 1 and (route in _JSON_ROUTES or ctype == b"application/json"):
            # a one-row JSON body: its line is formatted here (~4 us) and joined with the other lines of its date
            line = self._raw_line(ts, route, body, float(probs[0]), version, request_id)
            if line is not None:
                date, text = line
                if self._run is not None and self._run_date == date:
                    self._run.append(text)
                else:
                    self._run, self._run_date = [text], date
                    self._items.append((date, self._run))
                self._soon()
                return
        self._run = None
        self._items.append((ts, route, ctype, body, (probs if picked is None else probs[picked]).tolist(),
                            list(range(n)) if picked is None else picked.tolist(), n, version,
                            request_id.decode("ascii", "replace")))
        self._soon()

    def _raw_line(self, ts: float, route: str, body: bytes, prob: float, version: str,
                  rid: bytes) -> tuple[str, bytes] | None:
        """(date, JSON line) of a one-row JSON request, its body embedded as sent (no parse), or None."""
        raw = _raw_json(body)
        if raw is None:
            return None
        date, second, ms = self._second(ts)
        qv = self._versions.get(version)
        if qv is None:
            qv = self._versions[version] = orjson.dumps(version)
        return date, (b'{"request_id":%s,"time":"%s.%03d+00:00","model_version":%s,"route":"%s",'
                      b'"row_index":0,"body":%s,"probability":%a}\n'
                      % (_quoted(rid), second, ms, qv, route.encode(), raw, prob))

    def _second(self, ts: float) -> tuple[str, bytes, int]:
        sec = int(ts)
        hit = self._seconds.get(sec)
        if hit is None:
            if len(self._seconds) > 4:
                self._seconds.clear()
            when = dt.datetime.fromtimestamp(sec, dt.UTC)
            hit = self._seconds[sec] = (when.date().isoformat(), when.strftime("%Y-%m-%dT%H:%M:%S").encode())
        return hit[0], hit[1], int((ts - sec) * 1000)

    def _drop(self, reason: str, n: int) -> None:
        if n:
            self.drops[reason] += n
            self._dropped(reason, n)

    def _soon(self) -> None:
        """Hand over within BATCH_WAIT_S: a timer on the running event loop, or at once without one (tests)."""
        if self._scheduled or not self._started:
            return  # before start() rows wait (bounded by queue_size); start() hands them over
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._handover()
            return
        self._scheduled = True
        loop.call_later(BATCH_WAIT_S, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        self._handover()
        if self._started and not self._closing and (self._items or self._pending or self._inflight):
            self._scheduled = True  # until the writer has reported every row handed over
            loop.call_later(BATCH_WAIT_S, self._tick, loop)

    # ---- handing over: one non-blocking pipe write per tick -------------------------------------
    def _handover(self) -> None:
        self._read_reports()
        if self._proc is None:
            if not self._started or self._closing or time.monotonic() < self._respawn_at:
                return  # not started (or between restarts): rows wait, bounded by queue_size
            self._spawn()
        if self._items:
            items = [(it[0], b"".join(it[1]), len(it[1])) if type(it[1]) is list else it for it in self._items]
            rows = sum(it[2] if len(it) == 3 else len(it[5]) if len(it) == 9 else 0 for it in items)
            entries = self._held - sum(f[1] for f in self._frames)
            self._items, self._run = [], None
            payload = pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)
            self._pending += _HEAD.pack(len(payload))
            self._pending += payload
            self._stream += _HEAD.size + len(payload)
            self._frames.append((self._stream, entries, rows))
        if self._pending:
            self._send()

    def _send(self, block_s: float = 0.0) -> None:
        """Write what the pipe takes now (or wait up to `block_s` for it to take everything: flush, close)."""
        assert self._proc is not None and self._proc.stdin is not None
        fd = self._proc.stdin.fileno()
        end = time.monotonic() + block_s
        while self._pending:
            try:
                n = os.write(fd, self._pending)
            except BlockingIOError:
                if time.monotonic() >= end:
                    return  # the pipe is full: the rows stay held (and count against queue_size)
                select.select([], [fd], [], max(0.0, end - time.monotonic()))
                continue
            except OSError:  # BrokenPipeError: the writer died
                self._lost()
                return
            del self._pending[:n]
            self._sent += n
            while self._frames and self._frames[0][0] <= self._sent:
                _, entries, rows = self._frames.popleft()
                self._held -= entries
                self._inflight += rows

    def _read_reports(self, block_until: int | None = None, timeout: float = 10.0) -> None:
        """Count what the writer reported (non-blocking; or until flush `block_until` is acknowledged)."""
        if self._proc is None or self._proc.stdout is None:
            return
        fd = self._proc.stdout.fileno()
        end = time.monotonic() + timeout
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                chunk = None
            if chunk == b"":  # the writer exited
                self._parse_reports()
                self._lost()
                return
            if chunk:
                self._reports += chunk
                self._parse_reports()
                continue
            if block_until is None or block_until in self._acks or time.monotonic() > end:
                return
            select.select([fd], [], [], max(0.0, end - time.monotonic()))

    def _parse_reports(self) -> None:
        *lines, self._reports = self._reports.split(b"\n")
        for ln in lines:
            kind, _, rest = ln.partition(b" ")
            if kind == b"W":
                n = int(rest)
                self._inflight -= n
                self.rows_written += n
                self._written(n)
            elif kind == b"D":
                reason, n = rest.split()
                self._inflight -= int(n)
                self._drop(reason.decode(), int(n))
            elif kind == b"C":
                self.files.append(Path(rest.decode()))
            elif kind == b"A":
                self._acks.add(int(rest))

    def _lost(self) -> None:
        """The writer process is gone: rows handed to it and not reported written are counted lost (a restart's
        salvage may still recover those it had flushed); a new writer starts within a second."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        code = proc.poll() if proc.poll() is not None else proc.wait(1)
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self._reports = b""  # a dead writer's cut-off report line
        self._pending.clear()  # a frame partly in the dead pipe cannot be resumed: its rows are lost too
        lost = self._inflight + sum(f[2] for f in self._frames)
        self._held -= sum(f[1] for f in self._frames)
        self._frames.clear()
        self._inflight = 0
        self._drop("writer_lost", lost)
        if not self._closing:
            log.error("prediction log writer (pid %d) exited with %s; %d records lost; restarting it", proc.pid,
                      code, lost)
            self._respawn_at = time.monotonic() + 1.0

    # ---- lifecycle ------------------------------------------------------------------------------
    def _spawn(self) -> None:
        """Start a writer process (it first salvages dead processes' `.tmp` files, off the event loop)."""
        args = [sys.executable, "-m", "ctr.serving.predlog_writer", str(self.root), str(self.rotate_rows),
                str(self.rotate_s), str(self.nice)]
        env = dict(os.environ)
        if self._uploader is not None:
            args.append(self._uploader.url)
            env.update(self._uploader.env or {})
        # its own process group: a stop signal for the service's group (Ctrl-C, `kill -- -PGID`) is the service's to
        # handle; the writer stops at the end of its input, after the service closed the pipe (or died)
        self._proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0,
                                      process_group=0)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        for f in (self._proc.stdin, self._proc.stdout):
            os.set_blocking(f.fileno(), False)
        try:
            fcntl.fcntl(self._proc.stdin.fileno(), F_SETPIPE_SZ, PIPE_BYTES)  # room for ~1 s of rate-1.0 lines
        except OSError:
            pass
        self._stream = self._sent = 0

    def start(self) -> PredictionLog:
        if not self.enabled or self._proc is not None:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        self._closing = False
        self._started = True
        self._spawn()
        log.info("prediction log on: rate=%g seed=%d root=%s writer pid=%d", self.rate, self.seed, self.root,
                 self._proc.pid if self._proc else -1)
        if self._items:
            self._handover()
        return self

    def flush(self, timeout: float = 10.0) -> None:
        """Hand everything over, wait until it is written and the open file closed (tests, shutdown)."""
        if self._proc is None and self._started and not self._closing:
            self._spawn()  # the writer died (restart pending): a flush does not wait for the timer
        if self._proc is None:
            return
        token = next(self._tokens)
        self._run = None
        self._items.append(("flush", token))
        self._handover()
        if self._proc is not None and self._pending:
            self._send(block_s=timeout)
        self._read_reports(block_until=token, timeout=timeout)
        self._acks.discard(token)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is held, close (rename) the open file, stop the writer process."""
        if self._proc is not None:
            self._handover()
        if self._proc is not None and self._pending:
            self._send(block_s=timeout)
        self._closing = True
        proc = self._proc
        if proc is not None:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.close()  # end of input: the writer writes everything, renames its file and exits
            end = time.monotonic() + timeout
            fd = proc.stdout.fileno()
            while select.select([fd], [], [], max(0.0, end - time.monotonic()))[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self._reports += chunk
                self._parse_reports()
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("prediction log writer (pid %d) did not stop in %gs; killed (the next start salvages)",
                          proc.pid, timeout)
                proc.kill()
            self._lost()  # whatever it did not report written is counted (0 after a clean stop)
        # rows never handed over (no writer running: not started, or between restarts) are counted, not lost silently
        self._drop("writer_lost", sum(len(it[1]) if type(it[1]) is list else len(it[5]) if len(it) == 9 else 0
                                      for it in self._items))
        self._items, self._run, self._held = [], None, 0

    def salvage(self) -> list[Path]:
        """Turn dead processes' `.tmp` files into final files holding their complete gzip members."""
        return salvage(self.root)


def salvage(root: Path) -> list[Path]:
    """Turn dead processes' `.tmp` files under `root` into final files holding their complete gzip members."""
    out = []
    for tmp in sorted(Path(root).glob("date=*/.part-*.jsonl.gz.tmp")):
        m = _TMP.fullmatch(tmp.name)
        if m is None or _alive(int(m["pid"])):
            continue
        content, whole = complete_members(tmp.read_bytes())
        final = tmp.parent / f"part-{m['stamp']}-{m['pid']}-{m['seq']}.jsonl.gz"
        if content:
            part = tmp.with_name(tmp.name + ".salvage")
            part.write_bytes(gzip.compress(content, 1))
            os.replace(part, final)
            out.append(final)
        tmp.unlink()
        log.warning("prediction log: salvaged %d records of a stopped process from %s into %s%s",
                    content.count(b"\n"), tmp.name, final.name if content else "(nothing)",
                    "" if whole else "; its last member was cut off")
    return out


class BlobUploader:
    """Upload closed files to `url` (`az://container/prefix`, `abfs://...`) as `<prefix>/date=D/<name>`, through
    fsspec/adlfs with the landing zone's credentials (CTR_AZURE_*). A URL and an environment, so the writer
    process can rebuild it.
    Blob has no rename, and needs none: one `put_file` commits the blob whole (a reader sees no blob or all
    of it). The local file stays; a failed upload is logged, not retried. `read_log(url, day)` reads them back."""

    def __init__(self, url: str, env: dict[str, str] | None = None) -> None:
        self.url, self.env = url, env
        self._fs, self._protocol, self._base = _blob(url, env)  # a bad URL is refused here, in the service

    def __call__(self, local: Path, key: str) -> None:
        self._fs.put_file(str(local), f"{self._base}/{key}")
        log.info("prediction log: uploaded %s to %s://%s/%s", local.name, self._protocol, self._base, key)


def _blob(url: str, env: dict[str, str] | None = None) -> tuple[Any, str, str]:
    """(fsspec filesystem, protocol, container/prefix) of an `az://` / `abfs://` URL, with the landing zone's
    credentials (CTR_AZURE_*)."""
    import fsspec

    from ctr.data.azure_storage import is_azure_url, storage_options

    if not is_azure_url(url):
        raise ValueError(f"CTR_PREDICTION_LOG_URL={url[:100]!r} is not an az:// or abfs:// URL")
    protocol, rest = url.split("://", 1)
    return fsspec.filesystem(protocol, **storage_options(protocol, env)), protocol, rest.rstrip("/")


def blob_uploader(url: str, env: dict[str, str] | None = None) -> BlobUploader:
    """The uploader of closed files to `url` (`az://container/prefix`, `abfs://...`): see BlobUploader."""
    return BlobUploader(url, env)


def prediction_log_from(settings: Any) -> PredictionLog:
    """The service's log from `Settings` (CTR_PREDICTION_LOG_RATE, _SEED, _QUEUE, _ROTATE_ROWS, _ROTATE_S, _URL; CTR_HOME)."""
    uploader = blob_uploader(settings.prediction_log_url) if settings.prediction_log_url and \
        settings.prediction_log_rate > 0 else None
    return PredictionLog(settings.predictions_dir, rate=settings.prediction_log_rate, seed=settings.prediction_log_seed,
                         queue_size=settings.prediction_log_queue, rotate_rows=settings.prediction_log_rotate_rows,
                         rotate_s=settings.prediction_log_rotate_s, uploader=uploader)


def read_log(root: Path | str, day: dt.date) -> Iterator[dict[str, Any]]:
    """Every record of `day`'s closed files under `root` (a folder, or the Blob copy's `az://container/prefix`),
    in file-name order (readers never open a `.tmp`), each with its "row": a stored raw "body" (one-row JSON
    requests) is parsed into it here. A record whose row cannot be derived gets "row": None and
    "row_error"; a line that is not JSON is skipped with a warning."""
    for f in log_files(root, day):
        bad = 0
        with _open_gz(f) as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    rec = _record(line)
                except ValueError:
                    bad += 1
                    continue
                yield rec
        if bad:
            log.warning("prediction log: %d line(s) of %s are not JSON; skipped", bad, f)


def _open_gz(f: Path | str) -> Any:
    if isinstance(f, Path):
        return gzip.open(f, "rb")
    import fsspec

    from ctr.data.azure_storage import storage_options

    return fsspec.open(f, "rb", compression="gzip", **storage_options(f.split("://", 1)[0]))


def is_url(root: Path | str) -> bool:
    return isinstance(root, str) and "://" in root


def day_location(root: Path | str, day: dt.date) -> str:
    """Where `day`'s files are: `<root>/date=D` (a folder or a Blob URL)."""
    return f"{str(root).rstrip('/')}/date={day.isoformat()}" if is_url(root) else str(Path(root) / f"date={day.isoformat()}")


def _record(line: bytes) -> dict[str, Any]:
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:  # a raw body may hold NaN/Infinity (accepted by the service): the stdlib reads them
        rec = json.loads(line.decode("utf-8"), parse_constant=float)
    if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    if "body" in rec:
        body = rec.pop("body")
        try:
            rows = _payload_rows(str(rec.get("route")), body)
            rec["row"] = rows[int(rec.get("row_index", 0))]
        except Exception as e:  # noqa: BLE001 (whatever the body, the record is still read and counted)
            rec["row"] = None
            rec["row_error"] = f"row not derivable from the stored body: {str(e)[:200]}"
    return rec


def log_files(root: Path | str, day: dt.date) -> list[Any]:
    """`day`'s closed files: Paths under a folder, or `az://...` URLs of the Blob copy (a fresh listing)."""
    if is_url(root):
        fs, protocol, base = _blob(str(root))
        fs.invalidate_cache()
        return sorted(f"{protocol}://{p}" for p in fs.glob(f"{base}/date={day.isoformat()}/part-*.jsonl.gz"))
    return sorted((Path(root) / f"date={day.isoformat()}").glob("part-*.jsonl.gz"))
