"""Streaming reader for Criteo click logs: raw TSV (plain or .gz), Kaggle CSV and header CSV.

Every input line ends up in exactly one place: a good row in an Arrow chunk (with its line
number) or a `BadRow` with its line number and a reason. Nothing is dropped silently.

The variant is detected from the first line:
  * raw Criteo: no header, tab-separated `label, I1..I13, C1..C26`; lines that dropped
    trailing empty fields are padded;
  * header CSV/TSV: first line `label,I1,...,C26` (DeepCTR sample; integers may be `260.0`);
  * Kaggle CSV: first line `Id,Label,I1,...` (the `Id` column is ignored).
Parsing and validation are vectorised with Arrow compute; only bad lines touch Python.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctr.schema import ALL_COLUMNS, ARROW_SCHEMA, CAT_COLUMNS, INT_ABS_MAX, INT_COLUMNS, LABEL

DEFAULT_CHUNK_BYTES = 32 * 1024 * 1024

_INT_RE = r"^-?[0-9]{1,18}(\.0*)?$"
_HEX_RE = r"^[0-9a-fA-F]{8}$"


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

        return fsspec.open(path, "rb", compression="infer").open()
    local = path.removeprefix("file://")
    if local.endswith(".gz"):
        return pa.input_stream(local, compression="gzip")  # type: ignore[return-value]
    return open(local, "rb")  # noqa: SIM115


def iter_chunks(
    source: str | BinaryIO,
    *,
    require_label: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[Chunk]:
    """Yield parsed chunks of a file, each holding whole lines, in file order."""
    f = open_binary(source) if isinstance(source, str) else source
    try:
        yield from _iter_chunks(f, require_label, chunk_bytes)
    finally:
        if isinstance(source, str):
            f.close()


def _iter_chunks(f: BinaryIO, require_label: bool, chunk_bytes: int) -> Iterator[Chunk]:
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
        text = data.decode("utf-8", errors="replace")
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if layout is None:
            layout = detect_layout(lines[0] if lines else "")
            if layout.has_header:
                lines = lines[1:]
                line_no += 1
        if not lines:
            continue
        yield parse_lines(lines, layout, first_line_no=line_no + 1, require_label=require_label)
        line_no += len(lines)


def parse_lines(
    lines: list[str], layout: Layout, *, first_line_no: int = 1, require_label: bool = True
) -> Chunk:
    """Parse and validate a list of lines (no trailing newlines) into a Chunk."""
    n = len(lines)
    arr = pa.array(lines, type=pa.string())
    arr = pc.utf8_rtrim(arr, characters="\r")
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
    ok_shape = ~(too_many | (counts <= 1))
    shaped_idx = np.flatnonzero(ok_shape)
    if len(shaped_idx) < n:
        parts = parts.take(pa.array(shaped_idx))
    flat = pc.list_flatten(parts)
    m = len(shaped_idx)
    base = np.arange(m, dtype=np.int64) * width

    def column(pos: int) -> pa.Array:
        return flat.take(pa.array(base + pos))

    columns: dict[str, pa.Array] = {}
    valid = np.ones(m, dtype=bool)
    reasons: dict[str, np.ndarray] = {}
    if layout.has_label:
        raw = pc.utf8_trim_whitespace(column(layout.positions[LABEL]))
        lab_ok = pc.is_in(raw, value_set=pa.array(["0", "1", "0.0", "1.0"]))
        lab_ok = lab_ok.to_numpy(zero_copy_only=False)
        is_empty = pc.equal(raw, "").to_numpy(zero_copy_only=False)
        if require_label:
            reasons[LABEL] = ~lab_ok
        else:
            reasons[LABEL] = ~(lab_ok | is_empty)
        lab = pc.if_else(pa.array(lab_ok), raw, pa.scalar(None, pa.string()))
        columns[LABEL] = pc.cast(pc.replace_substring_regex(lab, r"\.0$", ""), pa.int8())
    else:
        if require_label:
            raise DataFormatError("input has no label column but training/evaluation needs labels")
        columns[LABEL] = pa.nulls(m, pa.int8())
    for c in INT_COLUMNS:
        raw = column(layout.positions[c])
        empty = pc.equal(raw, "")
        ok = pc.match_substring_regex(raw, _INT_RE)
        okn = ok.to_numpy(zero_copy_only=False)
        emn = empty.to_numpy(zero_copy_only=False)
        cleaned = pc.if_else(ok, pc.replace_substring_regex(raw, r"\.0*$", ""), pa.scalar(None, pa.string()))
        ints = pc.cast(cleaned, pa.int64())
        in_range = pc.fill_null(pc.less_equal(pc.abs(ints), INT_ABS_MAX), True).to_numpy(zero_copy_only=False)
        reasons[c] = ~(okn | emn) | ~in_range
        columns[c] = ints
    for c in CAT_COLUMNS:
        raw = column(layout.positions[c])
        empty = pc.equal(raw, "")
        ok = pc.match_substring_regex(raw, _HEX_RE)
        reasons[c] = ~(ok.to_numpy(zero_copy_only=False) | empty.to_numpy(zero_copy_only=False))
        columns[c] = pc.if_else(ok, pc.utf8_lower(raw), pa.scalar(None, pa.string()))
    for c in ALL_COLUMNS:
        if c in reasons:
            valid &= ~reasons[c]
    bad_local = np.flatnonzero(~valid)
    for j in bad_local:
        for c in ALL_COLUMNS:
            if c in reasons and reasons[c][j]:
                value = flat[int(base[j]) + layout.positions[c]].as_py()
                bad_reason[shaped_idx[j]] = _describe(c, value)
                break
    table = pa.Table.from_arrays([columns[c] for c in ALL_COLUMNS], schema=ARROW_SCHEMA)
    if len(bad_local):
        table = table.filter(pa.array(valid))
    good_idx = shaped_idx[valid]
    bad = [
        BadRow(first_line_no + i, r, lines[i].rstrip("\r"))
        for i, r in enumerate(bad_reason)
        if r is not None
    ]
    return Chunk(table=table, lines=good_idx.astype(np.int64) + first_line_no, bad=bad)


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
