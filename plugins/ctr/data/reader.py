"""Streaming reader for Criteo click logs: raw TSV (plain or .gz), Kaggle CSV and header CSV.

Every input line ends up in exactly one place: a good row in an Arrow chunk (with its line
number) or a `BadRow` with its line number and a reason. Nothing is dropped silently.

The variant is detected from the first line:
  * raw Criteo: no header, tab-separated `label, I1..I13, C1..C26`; lines that dropped
    trailing empty fields are padded;
  * header CSV/TSV: first line `label,I1,...,C26` (DeepCTR sample; integers may be `260.0`);
  * Kaggle CSV: first line `Id,Label,I1,...` (the `Id` column is ignored).

How a block (`chunk_bytes` of whole lines) is parsed:
  * fast path: `pyarrow.csv` splits the block into string columns (quoting off, empty = null);
    lines with the wrong field count go to its `invalid_row_handler` with their line number
    and are re-parsed by the slow path (which pads short lines);
  * slow path (`parse_lines`): Arrow `split_pattern` per line; used for those lines and for
    whole blocks pyarrow cannot take (invalid UTF-8, lone carriage returns);
  * both paths end in the same column validation (`_validate`): integers by `cast` with a
    regex fallback, hex by a byte lookup table in numpy. Only bad lines touch Python.
"""

from __future__ import annotations

import io
import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from ctr.schema import ALL_COLUMNS, ARROW_SCHEMA, CAT_COLUMNS, INT_ABS_MAX, INT_COLUMNS, LABEL

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024
PARSE_WORKERS = 2

_INT_RE = r"^-?[0-9]{1,18}(\.0*)?$"
_HEX_BYTES = np.zeros(256, dtype=bool)
_HEX_BYTES[np.frombuffer(b"0123456789abcdefABCDEF", dtype=np.uint8)] = True
_UPPER_HEX = np.zeros(256, dtype=bool)
_UPPER_HEX[np.frombuffer(b"ABCDEF", dtype=np.uint8)] = True
_NULL_STR = pa.scalar(None, pa.string())


class DataFormatError(ValueError):
    """The input as a whole cannot be read (unknown header, unreadable file)."""


@dataclass(frozen=True)
class BadRow:
    line: int      # 1-based physical line number in its file
    reason: str
    text: str


@dataclass
class Chunk:
    table: pa.Table                      # good rows, schema ARROW_SCHEMA
    lines: np.ndarray                    # 1-based line number of each good row
    bad: list[BadRow] = field(default_factory=list)

    @property
    def rows_in(self) -> int:
        return self.table.num_rows + len(self.bad)


@dataclass(frozen=True)
class Layout:
    """Where each canonical column sits in a line of this file."""

    sep: str
    n_fields: int
    positions: dict[str, int]   # canonical column -> field index
    has_header: bool
    name: str

    @property
    def has_label(self) -> bool:
        return LABEL in self.positions


def detect_layout(first_line: str) -> Layout:
    """Decide the variant from the first line of a file."""
    line = first_line.rstrip("\r\n")
    sep = "\t" if "\t" in line else ","
    fields_ = line.split(sep)
    lowered = [f.strip().strip('"').lower() for f in fields_]
    if lowered and lowered[0] in ("label", "id") or "i1" in lowered:
        wanted = {c.lower(): c for c in ALL_COLUMNS}
        positions = {wanted[name]: i for i, name in enumerate(lowered) if name in wanted}
        missing = [c for c in ALL_COLUMNS[1:] if c not in positions]
        if missing:
            raise DataFormatError(
                f"header names {len(fields_)} columns but lacks {', '.join(missing[:5])}"
                f"{'...' if len(missing) > 5 else ''}; expected label,I1..I13,C1..C26"
            )
        name = "kaggle-csv" if lowered[0] == "id" else ("header-csv" if sep == "," else "header-tsv")
        return Layout(sep, len(fields_), positions, True, name)
    if sep == "," and len(fields_) > 1:
        raise DataFormatError(
            "comma-separated input without a header; expected a header line 'label,I1,...,C26'"
        )
    return Layout("\t", len(ALL_COLUMNS), {c: i for i, c in enumerate(ALL_COLUMNS)}, False, "raw-tsv")


def open_binary(path: str) -> BinaryIO:
    """Open a local path or fsspec URL for reading bytes, decompressing `.gz` transparently."""
    if "://" in path and not path.startswith("file://"):
        import fsspec

        from ctr.data.azure_storage import storage_options

        protocol = path.split("://", 1)[0]
        return fsspec.open(path, "rb", compression="infer", **storage_options(protocol)).open()
    local = path.removeprefix("file://")
    try:
        if local.endswith(".gz"):
            return pa.input_stream(local, compression="gzip")  # type: ignore[return-value]
        return open(local, "rb")  # noqa: SIM115
    except (FileNotFoundError, pa.ArrowIOError) as e:
        raise FileNotFoundError(f"cannot open {local}: {e}; check the path") from None


def iter_chunks(
    source: str | BinaryIO,
    *,
    require_label: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    workers: int = PARSE_WORKERS,
) -> Iterator[Chunk]:
    """Yield parsed chunks of a file, each holding whole lines, in file order.

    Blocks are read (and decompressed) here and parsed on `workers` threads (pyarrow and numpy
    release the GIL); at most `workers + 1` blocks are in memory at once.
    """
    f = open_binary(source) if isinstance(source, str) else source
    try:
        if workers <= 1:
            for data, layout, first in _iter_blocks(f, require_label, chunk_bytes):
                yield parse_block(data, layout, first_line_no=first, require_label=require_label)
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            inflight: deque[Future[Chunk]] = deque()
            try:
                for data, layout, first in _iter_blocks(f, require_label, chunk_bytes):
                    inflight.append(pool.submit(parse_block, data, layout, first_line_no=first,
                                                require_label=require_label))
                    if len(inflight) > workers:
                        yield inflight.popleft().result()
                while inflight:
                    yield inflight.popleft().result()
            finally:
                for fut in inflight:
                    fut.cancel()
    finally:
        if isinstance(source, str):
            f.close()


def _iter_blocks(f: BinaryIO, require_label: bool, chunk_bytes: int) -> Iterator[tuple[bytes, Layout, int]]:
    """(block of whole lines, layout, 1-based number of its first line), in file order."""
    layout: Layout | None = None
    rest = b""
    line_no = 0  # lines consumed so far
    eof = False
    while not eof:
        block = f.read(chunk_bytes)
        if not block:
            eof = True
            data, rest = rest, b""
            if not data:
                break
        else:
            data = rest + block
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            data, rest = data[: cut + 1], data[cut + 1 :]
        if layout is None:
            data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark is not data
            end = data.find(b"\n")
            first = data if end < 0 else data[: end + 1]
            layout = detect_layout(first.decode("utf-8", errors="replace"))
            if layout.has_header:
                data = data[len(first):]
                line_no += 1
            if not layout.has_label and require_label:
                raise DataFormatError("input has no label column but training/evaluation needs labels")
            log.debug("reader: layout %s (%d fields)", layout.name, layout.n_fields)
        if not data:
            continue
        yield data, layout, line_no + 1
        line_no += data.count(b"\n") + (0 if data.endswith(b"\n") else 1)


# ---- block parsing ----------------------------------------------------------------------------
def _line_bounds(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive, before '\\n') byte offsets of every line of a block."""
    buf = np.frombuffer(data, dtype=np.uint8)
    nl = np.flatnonzero(buf == 10)
    ends = nl if data.endswith(b"\n") else np.append(nl, len(data))
    starts = np.concatenate([[0], nl[: len(ends) - 1] + 1]).astype(np.int64)
    return starts, ends.astype(np.int64)


def _line_text(data: bytes, start: int, end: int) -> str:
    return data[start:end].decode("utf-8", errors="replace").rstrip("\r")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def parse_block(data: bytes, layout: Layout, *, first_line_no: int = 1, require_label: bool = True) -> Chunk:
    """Parse a block of whole lines (bytes) into a Chunk; every line is accounted for."""
    starts, ends = _line_bounds(data)
    n = len(starts)
    if n == 0:
        return Chunk(ARROW_SCHEMA.empty_table(), np.empty(0, np.int64))
    n_cr = data.count(b"\r")
    if n_cr and n_cr != data.count(b"\r\n"):  # pyarrow would split lines at a lone '\r'
        return _slow_block(data, starts, ends, layout, first_line_no, require_label)
    if not data.isascii() and not _is_utf8(data):
        # pyarrow decodes a wrong-width line as UTF-8 before calling on_invalid; invalid bytes there
        # print an "Exception ignored ... UnicodeDecodeError" traceback: such blocks go slow at once
        return _slow_block(data, starts, ends, layout, first_line_no, require_label)
    odd: list[int] = []  # 1-based line numbers within the block with the wrong field count

    def on_invalid(row: pcsv.InvalidRow) -> str:
        odd.append(row.number)
        return "skip"

    names = [f"f{i}" for i in range(layout.n_fields)]
    try:
        raw = pcsv.read_csv(
            io.BytesIO(data),
            read_options=pcsv.ReadOptions(column_names=names, use_threads=False, block_size=max(1 << 20, len(data) + 1)),
            parse_options=pcsv.ParseOptions(
                delimiter=layout.sep, quote_char=False, double_quote=False, escape_char=False,
                newlines_in_values=False, ignore_empty_lines=False, invalid_row_handler=on_invalid,
            ),
            convert_options=pcsv.ConvertOptions(
                column_types={c: pa.string() for c in names}, strings_can_be_null=True, null_values=[""],
                include_columns=[names[layout.positions[c]] for c in ALL_COLUMNS if c in layout.positions],
            ),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:  # e.g. invalid UTF-8 somewhere in the block
        log.debug("reader: block at line %d takes the slow path: %s", first_line_no, e)
        return _slow_block(data, starts, ends, layout, first_line_no, require_label)
    if any(x is None for x in odd) or raw.num_rows + len(odd) != n:
        return _slow_block(data, starts, ends, layout, first_line_no, require_label)
    odd_idx = np.array(sorted(odd), dtype=np.int64) - 1
    keep = np.ones(n, dtype=bool)
    keep[odd_idx] = False
    fast_idx = np.flatnonzero(keep)
    columns = {c: _as_array(raw.column(names[layout.positions[c]])) for c in ALL_COLUMNS if c in layout.positions}
    empty_line = (ends[fast_idx] - starts[fast_idx]) == 0
    if n_cr:
        empty_line |= _only_cr(data, starts[fast_idx], ends[fast_idx])
    table, valid, why = _validate(columns, fast_idx.size, layout.has_label, require_label)
    valid &= ~empty_line
    bad = [
        BadRow(first_line_no + int(fast_idx[j]),
               "empty line" if empty_line[j] else why(int(j)),
               _line_text(data, int(starts[fast_idx[j]]), int(ends[fast_idx[j]])))
        for j in np.flatnonzero(~valid)
    ]
    good = table.filter(pa.array(valid)) if len(bad) else table
    lines = fast_idx[valid] + first_line_no
    if not odd:
        return Chunk(good, lines, bad)
    texts = [_line_text(data, int(starts[i]), int(ends[i])) for i in odd_idx]
    extra = parse_lines(texts, layout, line_numbers=odd_idx + first_line_no, require_label=require_label)
    return _merge(Chunk(good, lines, bad), extra)


def _only_cr(data: bytes, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    buf = np.frombuffer(data, dtype=np.uint8)
    one = (ends - starts) == 1
    out = np.zeros(len(starts), dtype=bool)
    out[one] = buf[starts[one]] == 13
    return out


def _merge(a: Chunk, b: Chunk) -> Chunk:
    table = pa.concat_tables([a.table, b.table])
    lines = np.concatenate([a.lines, b.lines])
    order = np.argsort(lines, kind="stable")
    if not np.all(order[:-1] < order[1:]):
        table = table.take(pa.array(order))
        lines = lines[order]
    return Chunk(table, lines, sorted(a.bad + b.bad, key=lambda r: r.line))


def _slow_block(data: bytes, starts: np.ndarray, ends: np.ndarray, layout: Layout,
                first_line_no: int, require_label: bool) -> Chunk:
    texts = [_line_text(data, int(s), int(e)) for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]
    return parse_lines(texts, layout, first_line_no=first_line_no, require_label=require_label)


def parse_lines(
    lines: list[str],
    layout: Layout,
    *,
    first_line_no: int = 1,
    line_numbers: np.ndarray | None = None,
    require_label: bool = True,
) -> Chunk:
    """Parse and validate a list of lines (no trailing newlines) into a Chunk (the slow path).

    Line numbers are `first_line_no, first_line_no + 1, ...` unless `line_numbers` gives them.
    """
    n = len(lines)
    numbers = (np.arange(n, dtype=np.int64) + first_line_no) if line_numbers is None else np.asarray(line_numbers)
    if n == 0:
        return Chunk(ARROW_SCHEMA.empty_table(), np.empty(0, np.int64))
    arr = pc.utf8_rtrim(pa.array(lines, type=pa.string()), characters="\r")
    parts = pc.split_pattern(arr, pattern=layout.sep)
    counts = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    width = layout.n_fields
    too_many = counts > width
    short = counts < width
    if short.any():
        # pad lines that dropped trailing empty fields
        pad = np.where(short, width - counts, 0)
        pads = pc.binary_repeat(pa.scalar(layout.sep), pa.array(pad))
        parts = pc.split_pattern(pc.binary_join_element_wise(arr, pads, ""), pattern=layout.sep)
    bad_reason: list[str | None] = [None] * n
    for i in np.flatnonzero(too_many):
        bad_reason[i] = f"expected {width} fields, found {counts[i]}"
    for i in np.flatnonzero(counts <= 1):
        if not too_many[i] and bad_reason[i] is None:
            bad_reason[i] = "empty line" if not lines[i].strip() else f"expected {width} fields, found 1"
    shaped_idx = np.flatnonzero(~(too_many | (counts <= 1)))
    if len(shaped_idx) < n:
        parts = parts.take(pa.array(shaped_idx))
    flat = pc.list_flatten(parts)
    m = len(shaped_idx)
    base = np.arange(m, dtype=np.int64) * width
    columns: dict[str, pa.Array] = {}
    for c in ALL_COLUMNS:
        if c in layout.positions:
            col = flat.take(pa.array(base + layout.positions[c]))
            columns[c] = pc.if_else(pc.equal(col, ""), _NULL_STR, col)
    table, valid, why = _validate(columns, m, layout.has_label, require_label)
    for j in np.flatnonzero(~valid):
        bad_reason[shaped_idx[j]] = why(int(j))
    good = table.filter(pa.array(valid)) if not valid.all() else table
    bad = [BadRow(int(numbers[i]), r, lines[i].rstrip("\r")) for i, r in enumerate(bad_reason) if r is not None]
    return Chunk(table=good, lines=numbers[shaped_idx[valid]].astype(np.int64), bad=bad)


# ---- column validation --------------------------------------------------------------------------
def _as_array(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col


def _np_bool(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(_as_array(arr).to_numpy(zero_copy_only=False), dtype=bool)


def _string_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(per-value byte lengths, data bytes) of a string array, zero-copy."""
    bufs = arr.buffers()
    off = np.frombuffer(bufs[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return off, data[off[0]: off[-1]]


def _check_hex(arr: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(bad mask, lower-cased column) for 8-hex-digit categoricals; null = missing = fine."""
    off, data = _string_parts(arr)
    bad_byte = ~_HEX_BYTES[data]
    ok = np.diff(off) == 8
    if bad_byte.any():
        csum = np.concatenate([[0], np.cumsum(bad_byte, dtype=np.int64)])
        rel = off - off[0]
        ok &= (csum[rel[1:]] - csum[rel[:-1]]) == 0
    if arr.null_count:
        ok |= ~_np_bool(arr.is_valid())
    out = arr
    if _UPPER_HEX[data].any():
        out = pc.utf8_lower(arr)
    out = pc.if_else(pa.array(ok), out, _NULL_STR) if not ok.all() else out
    return ~ok, out


def _check_int(arr: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(bad mask, int64 column) for integer features; `260.0` accepted, |v| <= 2^53."""
    ints = None
    _, data = _string_parts(arr)
    if not (np.any(data == ord("x")) or np.any(data == ord("X"))):  # cast would read 0x10 as hex
        try:
            ints = pc.cast(arr, pa.int64())
            ok = np.ones(len(arr), dtype=bool)
        except pa.ArrowInvalid:
            ints = None
    if ints is None:
        ok_m = pc.match_substring_regex(arr, _INT_RE)
        ok = _np_bool(pc.fill_null(ok_m, True))
        cleaned = pc.if_else(pc.fill_null(ok_m, False), pc.replace_substring_regex(arr, r"\.0*$", ""), _NULL_STR)
        ints = pc.cast(cleaned, pa.int64())
    in_range = _np_bool(pc.fill_null(pc.less_equal(pc.abs(ints), INT_ABS_MAX), True))
    ok &= in_range
    if not in_range.all():
        ints = pc.if_else(pa.array(in_range), ints, pa.scalar(None, pa.int64()))
    return ~ok, ints


def _check_label(arr: pa.Array, require_label: bool) -> tuple[np.ndarray, pa.Array]:
    if pc.all(pc.is_in(arr, value_set=pa.array(["0", "1"]))).as_py() and not arr.null_count:
        return np.zeros(len(arr), dtype=bool), pc.cast(arr, pa.int8())
    trimmed = pc.utf8_trim_whitespace(arr)
    lab_ok = _np_bool(pc.fill_null(pc.is_in(trimmed, value_set=pa.array(["0", "1", "0.0", "1.0"])), False))
    missing = _np_bool(pc.fill_null(pc.equal(trimmed, ""), True))
    bad = ~lab_ok if require_label else ~(lab_ok | missing)
    lab = pc.if_else(pa.array(lab_ok), trimmed, _NULL_STR)
    return bad, pc.cast(pc.replace_substring_regex(lab, r"\.0$", ""), pa.int8())


def _validate(columns: dict[str, pa.Array], m: int, has_label: bool, require_label: bool):
    """Typed table of all rows, a valid mask, and `why(j)` giving the first problem of row j.

    `columns` holds string arrays (null = empty field) for every column present in the input.
    """
    out: dict[str, pa.Array] = {}
    bad: dict[str, np.ndarray] = {}
    if has_label:
        bad[LABEL], out[LABEL] = _check_label(columns[LABEL], require_label)
    else:
        if require_label:
            raise DataFormatError("input has no label column but training/evaluation needs labels")
        out[LABEL] = pa.nulls(m, pa.int8())
    for c in INT_COLUMNS:
        bad[c], out[c] = _check_int(columns[c])
    for c in CAT_COLUMNS:
        bad[c], out[c] = _check_hex(columns[c])
    valid = np.ones(m, dtype=bool)
    for mask in bad.values():
        valid &= ~mask
    table = pa.Table.from_arrays([out[c] for c in ALL_COLUMNS], schema=ARROW_SCHEMA)

    def why(j: int) -> str:
        for c in ALL_COLUMNS:
            if c in bad and bad[c][j]:
                value = columns[c][j].as_py()
                return _describe(c, "" if value is None else value)
        return "unknown"

    return table, valid, why


def _describe(column: str, value: str) -> str:
    shown = value if len(value) <= 40 else value[:40] + "..."
    if column == LABEL:
        return f"label: expected 0 or 1, found {shown!r}"
    if column in INT_COLUMNS:
        return f"{column}: not an integer within +/-2^53: {shown!r}"
    return f"{column}: expected 8 hex digits, found {shown!r}"


def read_table(source: str | BinaryIO, *, require_label: bool = True) -> tuple[pa.Table, list[BadRow]]:
    """Read a whole (small) file into one table plus its bad rows. Use iter_chunks for big files."""
    tables, bad = [], []
    for ch in iter_chunks(source, require_label=require_label):
        tables.append(ch.table)
        bad.extend(ch.bad)
    if not tables:
        return ARROW_SCHEMA.empty_table(), bad
    return pa.concat_tables(tables), bad


def read_text(text: str, *, require_label: bool = True) -> tuple[pa.Table, list[BadRow]]:
    """Parse an in-memory string of lines (for HTTP bodies and tests)."""
    return read_table(io.BytesIO(text.encode("utf-8")), require_label=require_label)
