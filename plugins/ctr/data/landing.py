"""The landing zone (`day=YYYY-MM-DD/*.tsv[.gz]`), validation per day and Parquet staging.

Roots are local folders or fsspec URLs (`abfs://container/prefix`, `az://...`); credentials for
Azure come from `ctr.data.azure_storage.storage_options` (see there). Each validated day is staged
as `staging/day=D/part-*.parquet` plus `staging/day=D/_report.json`; later stages and re-runs
read the staged Parquet instead of re-parsing text, as long as the day's landing files are the ones
it was staged from: `_report.json` records the day's fingerprint (landing root; per file name, size,
modification time and, on Azure, ETag), and `stage_day` re-stages when the landing zone no longer
matches it. `staging/day=D` is a symlink to one immutable copy under `staging/.staged/`; a re-stage
writes a new copy and swaps the link in one rename, so a reader sees the old copy or the new one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ctr.data.reader import BadRow, Chunk, DataFormatError, iter_chunks
from ctr.schema import ARROW_SCHEMA

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".tsv", ".tsv.gz", ".txt", ".txt.gz", ".csv", ".csv.gz")


class LandingZoneError(RuntimeError):
    """A day cannot be used: absent, empty, or failing its checks. The message says which and why."""


@dataclass(frozen=True)
class FileStamp:
    """What identifies one landing file without reading it: name in its day folder, size, modification
    time (integer milliseconds since the epoch, as Hadoop's FileStatus gives it) and the ETag where the
    store has one (Azure Blob/ADLS)."""

    name: str
    size: int
    mtime_ms: int
    etag: str | None = None

    def describe(self) -> str:
        when = dt.datetime.fromtimestamp(self.mtime_ms / 1000, dt.UTC).isoformat(timespec="milliseconds")
        return f"{self.size} bytes, modified {when}" + (f", ETag {self.etag}" if self.etag else "")


@dataclass(frozen=True)
class DayFingerprint:
    """Where a day came from: the landing root and the stamps of its data files (sorted by name).

    `digest` covers the files' names, sizes and modification times, not the root's spelling and not
    the ETag: the Spark job lists the same files through Hadoop (`abfss://...`, no ETag) and must get
    the same digest. The root and ETags are still compared by `differences` (a change re-stages)."""

    root: str
    files: tuple[FileStamp, ...]

    @property
    def digest(self) -> str:
        return files_digest(self.files)

    def to_json(self) -> dict[str, Any]:
        return {"root": self.root, "digest": self.digest, "files": [asdict(f) for f in self.files]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DayFingerprint:
        return cls(d["root"], tuple(FileStamp(**f) for f in d["files"]))

    def differences(self, new: DayFingerprint) -> list[str]:
        """Why `new` is not this fingerprint, one phrase per difference ([] when they match)."""
        out = [] if new.root == self.root else [f"landing root changed from {self.root} to {new.root}"]
        old_by, new_by = {f.name: f for f in self.files}, {f.name: f for f in new.files}
        out += [f"{n} added" for n in sorted(new_by.keys() - old_by.keys())]
        out += [f"{n} removed" for n in sorted(old_by.keys() - new_by.keys())]
        out += [f"{n} changed ({old_by[n].describe()} -> {new_by[n].describe()})"
                for n in sorted(old_by.keys() & new_by.keys()) if old_by[n] != new_by[n]]
        return out


def files_digest(files: tuple[FileStamp, ...] | list[FileStamp]) -> str:
    """sha256 over "name<TAB>size<TAB>mtime_ms" lines sorted by name: the day's fingerprint digest."""
    lines = sorted(f"{f.name}\t{int(f.size)}\t{int(f.mtime_ms)}\n" for f in files)
    return "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest()


def data_digest(fingerprints: dict[str, str]) -> str:
    """One digest over several days' fingerprint digests ({day: digest}): what a model was trained and
    evaluated on. The registry finds a logical date's version by it."""
    lines = sorted(f"{day}\t{d}\n" for day, d in fingerprints.items())
    return "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest()


@dataclass
class DayReport:
    day: str
    files: list[str]
    rows_in: int = 0
    rows_ok: int = 0
    rows_quarantined: int = 0
    clicks: int = 0
    quarantine: str | None = None
    staged: str | None = None
    reasons: dict[str, int] = field(default_factory=dict)
    fingerprint: dict[str, Any] | None = None  # DayFingerprint.to_json() of the files staged

    @property
    def digest(self) -> str | None:
        """The fingerprint digest of the landing files this day was staged from (None: staged before fingerprints)."""
        return DayFingerprint.from_json(self.fingerprint).digest if self.fingerprint else None

    @property
    def bad_fraction(self) -> float:
        return self.rows_quarantined / self.rows_in if self.rows_in else 0.0

    @property
    def click_rate(self) -> float:
        return self.clicks / self.rows_ok if self.rows_ok else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["bad_fraction"] = self.bad_fraction
        d["click_rate"] = self.click_rate
        return d


def _fs(root: str):
    import fsspec

    from ctr.data.azure_storage import storage_options

    if "://" in root and not root.startswith("file://"):
        protocol = root.split("://", 1)[0]
        fs = fsspec.filesystem(protocol, **storage_options(protocol))
        fs.invalidate_cache()  # instances are cached per process; a day may have landed since
        return fs, root
    return fsspec.filesystem("file"), str(Path(root.removeprefix("file://")).resolve())


def day_dir(root: str, day: dt.date) -> str:
    return f"{root.rstrip('/')}/day={day.isoformat()}"


def list_days(root: str) -> list[dt.date]:
    fs, base = _fs(root)
    _check_container(fs, root, base)
    days = []
    try:
        entries = fs.ls(base, detail=False)
    except FileNotFoundError:
        return []
    for e in entries:
        name = str(e).rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("day="):
            try:
                days.append(dt.date.fromisoformat(name[4:]))
            except ValueError:
                continue
    return sorted(days)


def _check_container(fs, root: str, base: str) -> None:
    """An Azure root whose endpoint does not answer (within CTR_AZURE_CONNECT_TIMEOUT_S) or whose container is
    absent fails with the endpoint or container, the account and the fix named."""
    from ctr.data.azure_storage import StorageUnreachable, check_reachable, is_azure_url, storage_options

    if not is_azure_url(root):
        return
    try:
        check_reachable(storage_options(root.split("://", 1)[0]))
    except StorageUnreachable as e:
        raise LandingZoneError(f"landing zone {root}: {e}") from e
    container = base.split("://", 1)[-1].split("/", 1)[0].split("@", 1)[0]
    if not fs.exists(container):
        account = getattr(fs, "account_name", None) or getattr(getattr(fs, "service_client", None), "account_name", "?")
        raise LandingZoneError(
            f"landing zone {root}: container {container!r} does not exist in storage account {account!r}; "
            "create it or fix CTR_LANDING / the connection's account"
        )


def list_day_files(root: str, day: dt.date) -> list[str]:
    """Data files of one day, sorted; fails with the path it looked at when there are none."""
    return _list_day(root, day)[0]


def fingerprint_day(root: str, day: dt.date) -> DayFingerprint:
    """The day's fingerprint as the landing zone holds it now (one listing, no file read)."""
    return _list_day(root, day)[1]


def _canonical_root(root: str, base: str) -> str:
    return root.rstrip("/") if "://" in root and not root.startswith("file://") else base


def _stamp_of(fs, entry: dict[str, Any]) -> FileStamp:
    name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        mtime_ms = os.stat(entry["name"]).st_mtime_ns // 1_000_000  # exact, as Java's File.lastModified
    elif entry.get("last_modified") is not None:  # adlfs: the blob's Last-Modified (a datetime)
        lm = entry["last_modified"]
        mtime_ms = int(lm.timestamp() * 1000) if isinstance(lm, dt.datetime) else int(float(lm) * 1000)
    else:
        mtime_ms = int(float(entry.get("mtime") or 0) * 1000)
    return FileStamp(name, int(entry.get("size") or 0), mtime_ms, entry.get("etag"))


def _list_day(root: str, day: dt.date) -> tuple[list[str], DayFingerprint]:
    fs, base = _fs(root)
    _check_container(fs, root, base)
    path = day_dir(base, day)
    try:
        entries = sorted(fs.ls(path, detail=True), key=lambda e: str(e["name"]))
    except FileNotFoundError:
        entries = []
    entries = [e for e in entries if e.get("type", "file") == "file" and str(e["name"]).endswith(DATA_SUFFIXES)
               and not str(e["name"]).rsplit("/", 1)[-1].startswith((".", "_"))]
    shown = day_dir(root, day)
    if not entries:
        raise LandingZoneError(
            f"landing zone day={day.isoformat()} has 0 files under {shown}; is the export late?"
        )
    stamps = tuple(sorted((_stamp_of(fs, e) for e in entries), key=lambda f: f.name))
    if sum(f.size for f in stamps) == 0:
        raise LandingZoneError(f"landing zone day={day.isoformat()} has only empty files under {shown}")
    protocol = root.split("://", 1)[0] + "://" if "://" in root and not root.startswith("file://") else ""
    files = [str(e["name"]) for e in entries]
    return ([f if "://" in f or not protocol else protocol + f for f in files],
            DayFingerprint(_canonical_root(root, base), stamps))


COMPLETION_MARKER = "_SUCCESS"  # what an exporter writes into day=D/ after the day's last data file


def day_incomplete(root: str, day: dt.date, marker: str = COMPLETION_MARKER) -> str | None:
    """Why the day is not complete yet (None when it is), by the landing zone's completion rule `marker`:

    a file name (`_SUCCESS`: the exporter writes it after the day's last part), `parts:N` (at least N
    data files), or "" (any non-empty data file). The reason is the message `check_data` fails with when
    the wait runs out (`landing zone day=D has 0 files under ...; is the export late?`). An unreachable
    landing zone or a missing container raises (retried as an I/O error); it is no reason to wait.
    """
    fs, base = _fs(root)
    _check_container(fs, root, base)  # an unreachable zone or a missing container raises: no late day
    try:
        files, _ = _list_day(root, day)
    except LandingZoneError as e:  # absent or empty day
        return str(e)
    shown = day_dir(root, day)
    if marker.startswith("parts:"):
        want = int(marker.removeprefix("parts:"))
        if len(files) < want:
            return f"landing zone day={day.isoformat()} has {len(files)} of {want} data files under {shown}; is the export late?"
        return None
    if marker:
        if not fs.exists(f"{day_dir(base, day)}/{marker}"):
            return (f"landing zone day={day.isoformat()} has {len(files)} data file(s) but no {marker} marker under "
                    f"{shown}; is the export late? (a landing zone without markers: completion_marker='')")
    return None


def _restat(path: str) -> FileStamp | None:
    """The stamp of one landing file now (None when it is gone), bypassing any listing cache."""
    fs, _ = _fs(path)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    return _stamp_of(fs, info)


def _write_quarantine(fh, file: str, bad: list[BadRow]) -> None:
    for b in bad:
        text = b.text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
        fh.write(f"{file}\t{b.line}\t{b.reason}\t{text}\n")


STAGED_DIR = ".staged"  # under the staging root: one immutable folder per staged copy of a day


@contextlib.contextmanager
def _day_lock(staging_root: Path, day: dt.date) -> Iterator[None]:
    """One stager per day across processes (the second re-checks the fingerprint and usually reuses)."""
    d = staging_root / STAGED_DIR
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"day={day.isoformat()}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def stage_day(
    landing_root: str,
    staging_root: Path,
    quarantine_root: Path,
    day: dt.date,
    *,
    force: bool = False,
) -> DayReport:
    """Validate one day and stage its good rows as Parquet; bad lines go to quarantine.

    Idempotent per fingerprint: a staged day whose recorded fingerprint equals what the landing zone
    holds now is returned as is; otherwise (a file added, removed or rewritten, another landing root,
    or no fingerprint recorded) it is staged again, the reason logged, and the copy replaced in one
    rename. A file that changes while it is read fails the day; the previous copy stays.
    """
    staging_root = Path(staging_root)
    files, fp = _list_day(landing_root, day)
    with _day_lock(staging_root, day):
        rep = load_report(staging_root, day)
        if rep is not None and not force:
            recorded = DayFingerprint.from_json(rep.fingerprint) if rep.fingerprint else None
            why = recorded.differences(fp) if recorded else ["no fingerprint recorded (staged before fingerprints)"]
            if not why:
                log.info("day=%s already staged at %s from the same %d file(s) of %s (fingerprint %s, rows=%d ok=%d "
                         "bad=%d); reusing it", day, staging_root / f"day={day.isoformat()}", len(fp.files), fp.root,
                         fp.digest[:19], rep.rows_in, rep.rows_ok, rep.rows_quarantined)
                return rep
            log.warning("day=%s re-staged: %s", day, "; ".join(why))
        return _stage(landing_root, files, fp, staging_root, Path(quarantine_root), day)


def _stage(landing_root: str, files: list[str], fp: DayFingerprint, staging_root: Path, quarantine_root: Path,
           day: dt.date) -> DayReport:
    out_dir = staging_root / f"day={day.isoformat()}"
    versions = staging_root / STAGED_DIR
    _remove_leftovers(staging_root, day)
    work = Path(tempfile.mkdtemp(prefix=f"day={day.isoformat()}.", dir=versions))
    quarantine_root.mkdir(parents=True, exist_ok=True)
    q_path = quarantine_root / f"day={day.isoformat()}.tsv"
    q_tmp = quarantine_root / f".day={day.isoformat()}.tsv.{uuid.uuid4().hex[:8]}.tmp"
    rep = DayReport(day=day.isoformat(), files=files, fingerprint=fp.to_json())
    t0 = time.monotonic()
    try:
        with open(q_tmp, "w", encoding="utf-8") as qf:
            qf.write("file\tline\treason\traw\n")
            for i, (f, stamp) in enumerate(zip(files, fp.files, strict=True)):
                writer = pq.ParquetWriter(work / f"part-{i:05d}.parquet", ARROW_SCHEMA, compression="zstd")
                try:
                    for chunk in _chunks_naming_file(f, day):
                        writer.write_table(chunk.table)
                        rep.rows_in += chunk.rows_in
                        rep.rows_ok += chunk.table.num_rows
                        rep.rows_quarantined += len(chunk.bad)
                        rep.clicks += int(pa.compute.sum(chunk.table.column("label")).as_py() or 0)
                        for b in chunk.bad:
                            key = b.reason.split(":", 1)[0]
                            rep.reasons[key] = rep.reasons.get(key, 0) + 1
                        _write_quarantine(qf, f, chunk.bad)
                        log.info("day=%s file=%s rows_read=%d bad=%d", day, stamp.name, rep.rows_in, rep.rows_quarantined)
                finally:
                    writer.close()
                _check_unchanged(f, stamp, day)
        now = _list_day(landing_root, day)[1]
        if now != fp:  # a part added (or removed) while the others were read
            raise LandingZoneError(
                f"landing zone day={day.isoformat()} changed while it was being staged ({'; '.join(fp.differences(now))}); "
                "is the export still being written? Nothing was staged for this day (any earlier staged copy is "
                "untouched); re-run once the export is complete")
        if rep.rows_in != rep.rows_ok + rep.rows_quarantined:  # the reader's contract; never lose a row
            raise LandingZoneError(f"day={day.isoformat()}: rows_in {rep.rows_in} != rows_ok {rep.rows_ok} + "
                                   f"rows_quarantined {rep.rows_quarantined}; this is a bug in ctr.data.reader")
        rep.quarantine = str(q_path) if rep.rows_quarantined else None
        rep.staged = str(out_dir)
        (work / "_report.json").write_text(json.dumps(rep.to_json(), indent=1, sort_keys=True) + "\n")
        _swap_in(out_dir, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        q_tmp.unlink(missing_ok=True)
        raise
    if rep.rows_quarantined:
        os.replace(q_tmp, q_path)
    else:
        q_tmp.unlink()
        q_path.unlink(missing_ok=True)  # an earlier copy's bad lines are not this copy's
    log.info(
        "day=%s rows=%d ok=%d bad=%d quarantined=%s click_rate=%.4f fingerprint=%s secs=%.1f",
        day, rep.rows_in, rep.rows_ok, rep.rows_quarantined, rep.quarantine, rep.click_rate, fp.digest[:19],
        time.monotonic() - t0,
    )
    return rep


def _check_unchanged(path: str, listed: FileStamp, day: dt.date) -> None:
    """Fail the day when a file read to its end no longer has the size/mtime/ETag it was listed with."""
    now = _restat(path)
    if now == listed:
        return
    what = "was removed" if now is None else f"changed from {listed.describe()} to {now.describe()}"
    raise LandingZoneError(
        f"landing zone day={day.isoformat()} file {path} {what} while it was being staged; is the export still "
        "being written? Nothing was staged for this day (any earlier staged copy is untouched); re-run once the "
        "export is complete"
    )


def _swap_in(out_dir: Path, new: Path) -> None:
    """Point `out_dir` (a symlink) at the copy `new` in one rename, then remove the copy it replaced.

    Readers open every part of a copy before reading (`read_staged`), so removing the old copy does not
    cut short a read in progress. A real folder left by an older version is moved aside first (once)."""
    link = out_dir.parent / f".{out_dir.name}.link-{uuid.uuid4().hex[:8]}"
    os.symlink(os.path.relpath(new, out_dir.parent), link)
    old: Path | None = None
    if out_dir.is_symlink():
        old = out_dir.resolve()
    elif out_dir.exists():
        old = new.parent / f"{out_dir.name}.legacy-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    os.replace(link, out_dir)
    if old is not None and old != new.resolve():
        shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(staging_root: Path, day: dt.date) -> None:
    """Copies of this day no link points at (a killed stager's, or pre-fingerprint temp folders)."""
    out_dir = staging_root / f"day={day.isoformat()}"
    current = out_dir.resolve() if out_dir.is_symlink() else None
    for p in (staging_root / STAGED_DIR).glob(f"day={day.isoformat()}.*"):
        if p.is_dir() and p.resolve() != current:
            shutil.rmtree(p, ignore_errors=True)
    shutil.rmtree(staging_root / f".tmp-day={day.isoformat()}", ignore_errors=True)
    for p in staging_root.glob(f".day={day.isoformat()}.link-*"):
        p.unlink(missing_ok=True)


def _chunks_naming_file(path: str, day: dt.date) -> Iterator[Chunk]:
    try:
        yield from iter_chunks(path)
    except (DataFormatError, OSError) as e:
        raise LandingZoneError(f"landing zone day={day.isoformat()} file {path}: {e}") from e


def load_report(staging_root: Path, day: dt.date) -> DayReport | None:
    """The `_report.json` of a staged day, or None when the day is not staged."""
    path = staging_root / f"day={day.isoformat()}" / "_report.json"
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    known = {f.name for f in fields(DayReport)}
    return DayReport(**{k: v for k, v in d.items() if k in known})


def staged_fingerprints(staging_root: Path, days: list[dt.date]) -> dict[str, str]:
    """{day: fingerprint digest} of the staged days that record one (days staged without a report,
    or before fingerprints existed, are left out)."""
    out = {}
    for d in days:
        rep = load_report(staging_root, d)
        if rep is not None and rep.digest:
            out[d.isoformat()] = rep.digest
    return out


READ_BATCH_ROWS = 262_144


def read_staged(staging_root: Path, day: dt.date, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Yield the staged Parquet of one day in bounded batches, in file order.

    Whole row groups (stage_day writes one per reader block, about 70k rows) are grouped up to
    READ_BATCH_ROWS rows; a larger row group is sliced. Reading by row group keeps the reader's
    memory flat: `ParquetFile.iter_batches` over a whole file held more the longer the file was
    (peak RSS 505 MiB at 1M rows, 600 MiB at 3M; by row group 217 and 215)."""
    d = staging_root / f"day={day.isoformat()}"
    opened = _open_staged(d, day)
    try:
        yield from _read_opened(opened, columns)
    finally:
        for pf in opened:
            pf.close()


def _open_staged(d: Path, day: dt.date) -> list[pq.ParquetFile]:
    """Every part of the copy `d` points at, opened now: a re-stage swapping in a new copy (and removing
    this one) cannot cut a started read short or mix two copies. Retried when the copy is swapped out
    between resolving and opening."""
    for attempt in range(3):
        parts = sorted(d.resolve().glob("part-*.parquet"))
        if not parts:
            raise LandingZoneError(f"day={day.isoformat()} is not staged under {d}; run check_data for it first")
        opened: list[pq.ParquetFile] = []
        try:
            for p in parts:
                opened.append(pq.ParquetFile(p))
            return opened
        except FileNotFoundError:
            for pf in opened:
                pf.close()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _read_opened(opened: list[pq.ParquetFile], columns: list[str] | None) -> Iterator[pa.Table]:
    for pf in opened:
        group: list[int] = []
        rows = 0
        for i in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if group and rows + n > READ_BATCH_ROWS:
                yield pf.read_row_groups(group, columns=columns)
                group, rows = [], 0
            if n > READ_BATCH_ROWS:
                for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[i], columns=columns):
                    yield pa.Table.from_batches([batch])
                continue
            group.append(i)
            rows += n
        if group:
            yield pf.read_row_groups(group, columns=columns)


def daterange(start: dt.date, end: dt.date) -> list[dt.date]:
    """Inclusive list of days from start to end."""
    return [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
