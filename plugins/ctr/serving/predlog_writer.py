"""The prediction log's writer process: frames from the service on stdin -> gzip JSON Lines files (see predlog.py).

Started by `PredictionLog.start()` as `python -m ctr.serving.predlog_writer ROOT ROTATE_ROWS ROTATE_S NICE [URL]`,
niced, with its own interpreter (its own GIL): the service's event loop never shares a GIL with the parsing,
compressing and writing here. Input: frames `<u32 length><pickle>` of a list of items, in the order the rows
were answered:

    (date, lines, count)                       lines the service already formatted (one-row JSON bodies)
    (ts, route, ctype, body, probs, idx, n, version, request_id)   a multi-row / TSV record: built here
    ("flush", token)                           close the open file, then acknowledge

Output on stdout, one report a line: `W <rows>` written (flushed to the open file), `D <reason> <rows>`
dropped, `C <path>` a file closed (renamed, uploaded), `A <token>` a flush done. End of input (the service
closed the pipe, stopped, or died) -> everything read is written, the open file closed and renamed, exit 0; the
same when the parent process is gone (checked every second, so a pipe end inherited by a grandchild cannot keep
this process alive).
"""

from __future__ import annotations

import datetime as dt
import gzip
import logging
import os
import pickle
import select
import signal
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("ctr.serving.predlog")

_HEAD = struct.Struct("<I")


class Writer:
    """Items -> one complete gzip member per date and batch appended to a dot-named `.tmp`, renamed at rotation."""

    def __init__(self, root: Path, rotate_rows: int, rotate_s: float, report: Callable[[str], None],
                 uploader: Callable[[Path, str], None] | None = None) -> None:
        self.root = Path(root)
        self.rotate_rows = rotate_rows
        self.rotate_s = rotate_s
        self.report = report
        self.uploader = uploader
        self._fh: Any = None
        self._tmp: Path | None = None
        self._date: str | None = None
        self._opened = 0.0
        self._rows_in_file = 0
        self._seq = 0

    def due_in(self) -> float:
        """Seconds until the open file is due for rotation by age (1 s when none is open)."""
        return 1.0 if self._fh is None else max(0.0, self.rotate_s - (time.monotonic() - self._opened))

    def tick(self) -> None:
        if self._fh is not None and (self._rows_in_file >= self.rotate_rows
                                     or time.monotonic() - self._opened >= self.rotate_s):
            self.close_file()

    def _lines(self, items: list[Any]) -> Iterator[tuple[str, bytes, int]]:
        from ctr.serving.predlog import _rows_of

        for it in items:
            if len(it) == 3:  # formatted by the service
                yield it
                continue
            ts, route, ctype, body, probs, idx, n, version, rid = it
            when = dt.datetime.fromtimestamp(ts, dt.UTC)
            iso = when.isoformat(timespec="milliseconds")
            try:
                rows = _rows_of(route, ctype, body, n, idx)  # only the picked rows are built
                buf = b"".join(orjson.dumps({"request_id": rid, "time": iso, "model_version": version,
                                             "route": route, "row_index": i, "row": row, "probability": p}) + b"\n"
                               for i, row, p in zip(idx, rows, probs, strict=True))
            except Exception as e:  # the service answered it, so this is our bug: counted and logged, never silent
                log.warning("prediction log: %d sampled rows of a %s request not logged: %s", len(probs), route,
                            str(e)[:200])
                self.report(f"D unparsable {len(probs)}")
                continue
            yield when.date().isoformat(), buf, len(probs)

    def write(self, items: list[Any]) -> None:
        by_date: dict[str, list[bytes]] = {}
        counts: dict[str, int] = {}
        for date, buf, k in self._lines(items):
            by_date.setdefault(date, []).append(buf)
            counts[date] = counts.get(date, 0) + k
        for date in sorted(by_date):
            try:
                if self._date != date:
                    self.close_file()
                if self._fh is None:
                    self._open_file(date)
                self._fh.write(gzip.compress(b"".join(by_date[date]), 1))  # one complete member per batch
                self._fh.flush()
            except Exception as e:
                log.error("prediction log: %d records for %s not written: %s", counts[date], date, e)
                self.report(f"D write_error {counts[date]}")
                continue
            self._rows_in_file += counts[date]
            self.report(f"W {counts[date]}")
            self.tick()

    def _open_file(self, date: str) -> None:
        d = self.root / f"date={date}"
        d.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
        self._tmp = d / f".part-{stamp}-{os.getpid()}-{self._seq:06d}.jsonl.gz.tmp"
        self._fh = open(self._tmp, "wb")  # noqa: SIM115 (kept open across batches; closed in close_file)
        self._date = date
        self._opened = time.monotonic()
        self._rows_in_file = 0

    def close_file(self) -> None:
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
        self.report(f"C {final}")
        if self.uploader is not None:
            try:
                self.uploader(final, f"date={date}/{final.name}")
            except Exception as e:  # the local file stays; the next monitor run reads it there
                log.error("prediction log: upload of %s failed: %s", final, e)


def frames(buf: bytearray) -> Iterator[list[Any]]:
    """The complete frames at the start of `buf` (consumed from it)."""
    at = 0
    while len(buf) - at >= _HEAD.size:
        (size,) = _HEAD.unpack_from(buf, at)
        if len(buf) - at - _HEAD.size < size:
            break
        yield pickle.loads(buf[at + _HEAD.size: at + _HEAD.size + size])
        at += _HEAD.size + size
    del buf[:at]


def main(argv: list[str] | None = None) -> int:
    root, rotate_rows, rotate_s, nice, *url = argv if argv is not None else sys.argv[1:]
    # a stop signal for the service's process group (Ctrl-C, `kill -- -PGID`, a supervisor's SIGTERM) is the
    # service's to handle: it closes the pipe when it stops, and the end of input is this process's stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        os.nice(int(nice))
    except OSError:
        pass
    parent = os.getppid()
    out: Any = sys.stdout.buffer

    def report(line: str) -> None:
        nonlocal out
        if out is None:
            return
        try:
            out.write(line.encode() + b"\n")
        except OSError:  # the service is gone: nobody to report to, the files are still finished
            out = None

    def flush() -> None:
        nonlocal out
        try:
            if out is not None:
                out.flush()
        except OSError:
            out = None

    uploader = None
    if url:
        from ctr.serving.predlog import blob_uploader

        uploader = blob_uploader(url[0])
    from ctr.serving.predlog import salvage

    salvage(Path(root))  # a dead writer's .tmp (a restart after a crash), before this one opens any
    w = Writer(Path(root), int(rotate_rows), float(rotate_s), report, uploader)
    fd = sys.stdin.fileno()
    buf = bytearray()
    eof = False
    while not eof:
        ready, _, _ = select.select([fd], [], [], min(1.0, w.due_in()))
        if ready:
            while True:  # drain what is there now: a busy service's frames become one batch
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    eof = True
                    break
                buf += chunk
                if not select.select([fd], [], [], 0)[0]:
                    break
            items: list[Any] = []
            for frame in frames(buf):
                for it in frame:
                    if len(it) == 2:  # ("flush", token)
                        w.write(items)
                        items = []
                        w.close_file()
                        report(f"A {it[1]}")
                    else:
                        items.append(it)
            w.write(items)
            flush()
        elif os.getppid() != parent:  # the service is gone and something else holds the pipe open
            break
        w.tick()
        flush()
    if buf:
        log.error("prediction log: %d bytes of a cut-off frame at the end of input dropped", len(buf))
    w.close_file()
    flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
