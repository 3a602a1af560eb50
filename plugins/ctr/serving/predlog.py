"""The prediction log: a sampled share of scored rows, written off the request path to gzip JSON Lines.

The request path calls `PredictionLog.log(route, ctype, body, probs, version, request_id)` once per
answered batch. It only decides which rows are sampled (a seeded `numpy` generator, one draw per row in
the order rows are scored, so the number of rows logged for N scored rows is a fixed function of the
seed and N) and puts one tuple holding the request body (a reference, no copy) on a bounded queue (a
`deque` with a length check: no lock on the request path);
when the queue is full the sampled rows are dropped and counted (`ctr_prediction_log_dropped_total`
by reason), never silently. The writer thread turns each sampled row into one JSON object a line,
as readers (`read_log`, so `ctr monitor`) see it

    {"request_id", "time", "model_version", "route", "row_index", "row", "probability"}

(`request_id` is the service's X-Request-Id of the request; `row` is the request's row as sent: a JSON
object, or the raw Criteo line of a TSV body under {"tsv": ...}; for /v1/rank the context merged with
the candidate, its id as "item_id"). On disk, a one-row JSON request (the common single-row call) is
stored without parsing it: the line holds its validated body verbatim under "body" instead of "row"
(newlines turned into spaces), built by bytes formatting on the request path itself (about 4 us: cheaper for the event loop
than the GIL hand-offs of a writer thread doing it), and `read_log` derives "row" from it with the
same rules. Multi-row and TSV requests are queued as tuples and parsed by the writer into "row". So
for a single-row request the writer only joins, compresses and writes, the JSON parsing happens when
the monitor reads the log, and files written before (all "row") read the same.

Each drained batch is appended to the open file as one complete gzip member (zlib compresses with the
GIL released), flushed. Files live under
`<root>/date=YYYY-MM-DD/` (the record's UTC date); the open file is a dot-named `.tmp` that readers
skip, renamed to `part-<UTC stamp>-<pid>-<seq>.jsonl.gz` when it reaches `rotate_rows` rows, is
`rotate_s` seconds old, the date changes, or the service stops. So a reader never sees a half-written
file. A crash (SIGKILL) leaves the `.tmp` holding every flushed member: the next start of any
service on the same root salvages the complete members of a dead process's `.tmp` into a final file,
so a crash loses at most what was still queued (plus a member cut mid-write).

JSON Lines rather than Parquet: records are appended a few at a time from a thread, the raw rows
have free-form shapes (JSON objects, raw TSV lines, raw bodies) and gzip members make every flushed
batch recoverable after a crash; Parquet needs a footer written at close, so a crash loses the whole file.
"""

from __future__ import annotations

import datetime as dt
import gzip
import itertools
import json
import logging
import os
import re
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

log = logging.getLogger("ctr.serving.predlog")

DEFAULT_RATE = 0.01
DEFAULT_QUEUE = 10_000
DEFAULT_ROTATE_ROWS = 100_000
DEFAULT_ROTATE_S = 60
DROP_REASONS = ("queue_full", "unparsable", "write_error")
BATCH_WAIT_S = 0.05  # the writer drains the queue this often
GIL_SLICE_S = 0.0005  # the writer hands the GIL to the event loop after this much record building
_NEWLINES = bytes.maketrans(b"\r\n", b"  ")  # raw CR/LF in a valid JSON body are whitespace (strings escape them)
_JSON_ROUTES = frozenset({"/invocations", "/v1/rank"})
_TMP = re.compile(r"\.part-(?P<stamp>[0-9T]+)-(?P<pid>\d+)-(?P<seq>\d+)\.jsonl\.gz\.tmp")
_STOP = object()
_LINE = object()  # a record the request path already formatted: (_LINE, date, line)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # at start nothing of ours is open: a .tmp with our pid is a reused pid's leftover
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
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
        rows = []
        for c in payload["candidates"]:
            row = {**ctx, **{k: v for k, v in c.items() if k != "id"}}
            if "id" in c:
                row["item_id"] = c["id"]
            rows.append(row)
        return rows
    return score_rows(payload)


def _nan_none(v: Any) -> Any:
    return None if v.__class__ is float and v != v else v


def _picked_payload_rows(route: str, payload: Any, idx: list[int], n: int) -> list[Any]:
    """Rows `idx` of a parsed (already answered, so valid) JSON request, each exactly as `_payload_rows` gives
    it, without building the others: at rate 0.01 a 100-candidate /v1/rank request has about one picked row,
    and merging every candidate with the context cost the service ~30% of its /v1/rank throughput."""
    if route == "/v1/rank":
        ctx = payload.get("context") or {}
        cands = payload["candidates"]
        _count(len(cands), n)
        rows = []
        for i in idx:
            c = cands[i]
            row = {**ctx, **{k: v for k, v in c.items() if k != "id"}}
            if "id" in c:
                row["item_id"] = c["id"]
            rows.append(row)
        return rows
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
    """Sampled rows of the service's answers -> rotating gzip JSON Lines files (see the module doc).

    `dropped(reason, n)` and `written(n)` are the metrics hooks (prometheus counters in the service).
    """

    def __init__(self, root: Path, rate: float = DEFAULT_RATE, seed: int = 0, queue_size: int = DEFAULT_QUEUE,
                 rotate_rows: int = DEFAULT_ROTATE_ROWS, rotate_s: float = DEFAULT_ROTATE_S,
                 dropped: Callable[[str, int], None] | None = None, written: Callable[[int], None] | None = None,
                 uploader: Callable[[Path, str], None] | None = None) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"CTR_PREDICTION_LOG_RATE={rate} must be between 0 and 1")
        self.root = Path(root)
        self.rate = float(rate)
        self.seed = seed
        self.rotate_rows = rotate_rows
        self.rotate_s = rotate_s
        self._rng = np.random.default_rng(seed)
        self._q: deque = deque()  # append/popleft are atomic: no lock, no condition on the request path
        self._max = queue_size
        self._wake = threading.Event()
        self._dropped = dropped or (lambda reason, n: None)
        self._written = written or (lambda n: None)
        self._uploader = uploader
        self.sampled = 0        # rows the sampling chose (logged + dropped)
        self.scored = 0         # rows seen
        self.drops: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.rows_written = 0
        self.files: list[Path] = []
        self._fh: Any = None
        self._tmp: Path | None = None
        self._date: str | None = None
        self._opened = 0.0
        self._rows_in_file = 0
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._boot = uuid.uuid4().hex[:12].encode()  # request ids made up for callers that give none: <boot>-<seq>
        self._ids = itertools.count(1)  # next() is atomic: both the loop and the writer take ids
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
        if len(self._q) >= self._max:
            self._drop("queue_full", k)
            return
        ts = time.time()
        if n == 1 and (route in _JSON_ROUTES or ctype == b"application/json"):
            # a one-row JSON body: formatting its line here (~4 us) costs the event loop less than the GIL
            # hand-offs of a writer thread doing it (the writer then only joins, compresses and writes)
            line = self._raw_line(ts, route, body, float(probs[0]), version, request_id)
            if line is not None:
                self._q.append((_LINE, *line))
                return
        self._q.append((ts, route, ctype, body, probs if picked is None else probs[picked], picked, n, version,
                        request_id))

    def _raw_line(self, ts: float, route: str, body: bytes, prob: float, version: str,
                  rid: bytes | None) -> tuple[str, bytes] | None:
        """(date, JSON line) of a one-row JSON request, its body embedded as sent (no parse), or None."""
        raw = _raw_json(body)
        if raw is None:
            return None
        date, second, ms = self._second(ts)
        if rid is None:
            rid = b"%s-%d" % (self._boot, next(self._ids))
        qv = self._versions.get(version)
        if qv is None:
            qv = self._versions[version] = orjson.dumps(version)
        return date, (b'{"request_id":%s,"time":"%s.%03d+00:00","model_version":%s,"route":"%s",'
                      b'"row_index":0,"body":%s,"probability":%a}\n'
                      % (_quoted(rid), second, ms, qv, route.encode(), raw, prob))

    def _drop(self, reason: str, n: int) -> None:
        self.drops[reason] += n
        self._dropped(reason, n)

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> PredictionLog:
        if not self.enabled or self._thread is not None:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        self.salvage()
        self._thread = threading.Thread(target=self._run, name="ctr-predlog", daemon=True)
        self._thread.start()
        log.info("prediction log on: rate=%g seed=%d root=%s", self.rate, self.seed, self.root)
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, close (rename) the open file, stop the thread."""
        if self._thread is None:
            return
        self._q.append(_STOP)
        self._wake.set()
        self._thread.join(timeout)
        self._thread = None

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until the queue is written and close the open file (tests, shutdown)."""
        done = threading.Event()
        self._q.append(done)
        self._wake.set()
        done.wait(timeout)

    def salvage(self) -> list[Path]:
        """Turn dead processes' `.tmp` files into final files holding their complete gzip members."""
        out = []
        for tmp in sorted(self.root.glob("date=*/.part-*.jsonl.gz.tmp")):
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

    # ---- the writer thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # a bug here must not leave a silent dead writer: say so loudly
            log.exception("prediction log writer stopped; further records are dropped (queue_full)")
            self._close_file()

    def _loop(self) -> None:
        while True:
            # wake every BATCH_WAIT_S (or at once for flush/stop): a batch gathers in the meantime, so a busy
            # service writes a few large gzip members a second, not one per request
            self._wake.wait(BATCH_WAIT_S)
            self._wake.clear()
            batch = []
            while self._q and len(batch) < 5000:
                batch.append(self._q.popleft())
            if not batch:
                if self._fh is not None and time.monotonic() - self._opened >= self.rotate_s:
                    self._close_file()
                continue
            stop = False
            events = []
            records = []
            for it in batch:
                if it is _STOP:
                    stop = True
                elif isinstance(it, threading.Event):
                    events.append(it)
                else:
                    records.append(it)
            if records:
                self._write(records)
            if events or stop:
                self._close_file()
                for e in events:
                    e.set()
            if stop:
                return
            if self._fh is not None and (self._rows_in_file >= self.rotate_rows
                                         or time.monotonic() - self._opened >= self.rotate_s):
                self._close_file()

    def _second(self, ts: float) -> tuple[str, bytes, int]:
        sec = int(ts)
        hit = self._seconds.get(sec)
        if hit is None:
            if len(self._seconds) > 4:
                self._seconds.clear()
            when = dt.datetime.fromtimestamp(sec, dt.UTC)
            hit = self._seconds[sec] = (when.date().isoformat(), when.strftime("%Y-%m-%dT%H:%M:%S").encode())
        return hit[0], hit[1], int((ts - sec) * 1000)

    def _lines(self, records: list[tuple]) -> Iterator[tuple[str, bytes, int]]:
        """(date, JSON lines, rows) per record. Lines the request path formatted (one-row JSON bodies,
        `_raw_line`) pass through; other records are parsed here. Every GIL_SLICE_S of that parsing the
        GIL goes back to the event loop."""
        slice_end = time.perf_counter() + GIL_SLICE_S
        for rec in records:
            if rec[0] is _LINE:  # formatted on the request path
                yield rec[1], rec[2], 1
                continue
            ts, route, ctype, body, probs, picked, n, version, rid = rec
            if time.perf_counter() > slice_end:
                time.sleep(0)  # the event loop never waits a switch interval (5 ms) for the writer
                slice_end = time.perf_counter() + GIL_SLICE_S
            date, second, ms = self._second(ts)
            if rid is None:
                rid = b"%s-%d" % (self._boot, next(self._ids))
            try:
                idx = list(range(n)) if picked is None else picked.tolist()
                rows = _rows_of(route, ctype, body, n, idx)  # only the picked rows are built
                iso = f"{second.decode()}.{ms:03d}+00:00"
                rid_s = rid.decode("ascii", "replace")
                buf = b"".join(orjson.dumps({"request_id": rid_s, "time": iso, "model_version": version,
                                             "route": route, "row_index": i, "row": row, "probability": p}) + b"\n"
                               for i, row, p in zip(idx, rows, probs.tolist(), strict=True))
            except Exception as e:  # the service answered it, so this is our bug: counted and logged, never silent
                log.warning("prediction log: %d sampled rows of a %s request not logged: %s", len(probs), route,
                            str(e)[:200])
                self._drop("unparsable", len(probs))
                continue
            yield date, buf, len(probs)

    def _write(self, records: list[tuple]) -> None:
        by_date: dict[str, list[bytes]] = {}
        counts: dict[str, int] = {}
        for date, buf, k in self._lines(records):
            by_date.setdefault(date, []).append(buf)
            counts[date] = counts.get(date, 0) + k
        for date in sorted(by_date):
            try:
                if self._date != date:
                    self._close_file()
                if self._fh is None:
                    self._open_file(date)
                self._fh.write(gzip.compress(b"".join(by_date[date]), 1))  # one complete member per batch
                self._fh.flush()
            except Exception as e:
                log.error("prediction log: %d records for %s not written: %s", counts[date], date, e)
                self._drop("write_error", counts[date])
                continue
            self._rows_in_file += counts[date]
            self.rows_written += counts[date]
            self._written(counts[date])

    def _open_file(self, date: str) -> None:
        d = self.root / f"date={date}"
        d.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
        self._tmp = d / f".part-{stamp}-{os.getpid()}-{self._seq:06d}.jsonl.gz.tmp"
        self._fh = open(self._tmp, "wb")  # noqa: SIM115 (kept open across batches; closed in _close_file)
        self._date = date
        self._opened = time.monotonic()
        self._rows_in_file = 0

    def _close_file(self) -> None:
        if self._fh is None or self._tmp is None:
            return
        fh, tmp = self._fh, self._tmp
        self._fh = self._tmp = None
        date = self._date
        self._date = None
        try:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            final = tmp.with_name(tmp.name[1:-len(".tmp")])
            os.replace(tmp, final)
        except Exception as e:
            log.error("prediction log: could not close %s: %s (the next start salvages it)", tmp, e)
            return
        self.files.append(final)
        if self._uploader is not None:
            try:
                self._uploader(final, f"date={date}/{final.name}")
            except Exception as e:  # the local file stays; the next monitor run reads it there
                log.error("prediction log: upload of %s failed: %s", final, e)


def _blob(url: str, env: dict[str, str] | None = None) -> tuple[Any, str, str]:
    """(fsspec filesystem, protocol, container/prefix) of an `az://` / `abfs://` URL, with the landing zone's
    credentials (CTR_AZURE_*)."""
    import fsspec

    from ctr.data.azure_storage import is_azure_url, storage_options

    if not is_azure_url(url):
        raise ValueError(f"CTR_PREDICTION_LOG_URL={url[:100]!r} is not an az:// or abfs:// URL")
    protocol, rest = url.split("://", 1)
    return fsspec.filesystem(protocol, **storage_options(protocol, env)), protocol, rest.rstrip("/")


def blob_uploader(url: str, env: dict[str, str] | None = None) -> Callable[[Path, str], None]:
    """Upload closed files to `url` (`az://container/prefix`, `abfs://...`) as `<prefix>/date=D/<name>`, through
    fsspec/adlfs with the landing zone's credentials (CTR_AZURE_*).
    Blob has no rename, and needs none: one `put_file` commits the blob whole (a reader sees no blob or all
    of it). The local file stays; a failed upload is logged, not retried. `read_log(url, day)` reads them back."""
    fs, protocol, base = _blob(url, env)

    def upload(local: Path, key: str) -> None:
        fs.put_file(str(local), f"{base}/{key}")
        log.info("prediction log: uploaded %s to %s://%s/%s", local.name, protocol, base, key)

    return upload


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
