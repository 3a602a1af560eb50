"""The reader on the real samples, every layout variant, chunk boundaries, and fast path == slow path."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from ctr.data.reader import (
    DataFormatError,
    detect_layout,
    iter_chunks,
    parse_block,
    parse_lines,
    read_table,
    read_text,
)
from ctr.schema import ALL_COLUMNS, ARROW_SCHEMA, CAT_COLUMNS, INT_COLUMNS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import CSV_SAMPLE, RAW_SAMPLE


def _raw_lines() -> list[str]:
    return RAW_SAMPLE.read_text().splitlines()


def test_raw_sample_reads_every_row_with_the_explicit_schema() -> None:
    table, bad = read_table(str(RAW_SAMPLE))
    assert bad == []
    assert table.num_rows == 100
    assert table.schema == ARROW_SCHEMA
    assert table.column_names == ALL_COLUMNS
    first = table.slice(0, 1).to_pylist()[0]
    # 0 \t (empty) \t 0 \t 5 \t 4 \t 13275 ... C1=05db9164 ... C22 empty
    assert first["label"] == 0 and first["I1"] is None and first["I2"] == 0 and first["I5"] == 13275
    assert first["C1"] == "05db9164" and first["C22"] is None and first["C26"] == "731c3655"
    fields = [line.split("\t") for line in _raw_lines()]
    assert table.column("label").to_pylist() == [int(f[0]) for f in fields]
    assert table.column("I13").to_pylist() == [int(f[13]) if f[13] else None for f in fields]
    assert table.column("C26").to_pylist() == [f[39] or None for f in fields]


def test_csv_sample_with_float_integers_reads_every_row() -> None:
    table, bad = read_table(str(CSV_SAMPLE))
    assert bad == []
    assert table.num_rows == 200
    assert table.schema == ARROW_SCHEMA
    first = table.slice(0, 1).to_pylist()[0]
    assert first["I3"] == 260 and first["I5"] == 17668 and first["I2"] == 3 and first["I1"] is None
    assert min(v for v in table.column("I2").to_pylist() if v is not None) == -1  # negative integers
    assert first["C19"] is None and first["C21"] == "0429f84b"


def _variants(tmp: Path) -> dict[str, Path]:
    """The raw sample rewritten in every layout the reader accepts."""
    lines = _raw_lines()
    fields = [ln.split("\t") for ln in lines]
    out: dict[str, Path] = {}
    out["raw"] = RAW_SAMPLE
    gz = tmp / "raw.tsv.gz"
    gz.write_bytes(gzip.compress(RAW_SAMPLE.read_bytes()))
    out["gz"] = gz
    crlf = tmp / "crlf.tsv"
    crlf.write_bytes(RAW_SAMPLE.read_bytes().replace(b"\n", b"\r\n"))
    out["crlf"] = crlf
    dropped = tmp / "dropped.tsv"  # trailing empty fields dropped, as some exports do
    dropped.write_text("".join("\t".join(f).rstrip("\t") + "\n" for f in fields))
    out["dropped"] = dropped
    header = tmp / "header.csv"  # DeepCTR style: header, integers as floats
    rows = [",".join(ALL_COLUMNS)]
    for f in fields:
        ints = [f"{v}.0" if v else "" for v in f[1:14]]
        rows.append(",".join([f[0], *ints, *f[14:]]))
    header.write_text("\n".join(rows) + "\n")
    out["header-csv"] = header
    kaggle = tmp / "kaggle.csv"
    rows = ["Id,Label," + ",".join(ALL_COLUMNS[1:])] + [f"{10_000_000 + i}," + ",".join(f) for i, f in enumerate(fields)]
    kaggle.write_text("\n".join(rows))  # no trailing newline either
    out["kaggle-csv"] = kaggle
    bom = tmp / "bom.tsv"
    bom.write_bytes(b"\xef\xbb\xbf" + RAW_SAMPLE.read_bytes())
    out["bom"] = bom
    return out


def test_every_layout_reads_identically(tmp_path: Path) -> None:
    reference, _ = read_table(str(RAW_SAMPLE))
    variants = _variants(tmp_path)
    assert detect_layout(variants["kaggle-csv"].read_text().splitlines()[0]).name == "kaggle-csv"
    assert detect_layout(variants["header-csv"].read_text().splitlines()[0]).name == "header-csv"
    assert detect_layout(_raw_lines()[0]).name == "raw-tsv"
    for name, path in variants.items():
        table, bad = read_table(str(path))
        assert bad == [], name
        assert table.equals(reference), name


def test_chunk_boundaries_and_threads_do_not_change_rows_or_line_numbers(tmp_path: Path) -> None:
    data = RAW_SAMPLE.read_bytes() * 30 + b"garbage line\n" + RAW_SAMPLE.read_bytes() * 5
    reference = parse_lines(data.decode().splitlines(), detect_layout(_raw_lines()[0]))
    for chunk_bytes, workers in [(4093, 1), (9000, 2), (1 << 20, 2), (50_000, 3)]:
        chunks = list(iter_chunks(io.BytesIO(data), chunk_bytes=chunk_bytes, workers=workers))
        table = pa.concat_tables([c.table for c in chunks])
        lines = np.concatenate([c.lines for c in chunks])
        bad = [b for c in chunks for b in c.bad]
        assert table.equals(reference.table)
        assert lines.tolist() == reference.lines.tolist()
        assert [(b.line, b.reason) for b in bad] == [(3001, "expected 40 fields, found 1")]
        assert sorted(lines.tolist() + [b.line for b in bad]) == list(range(1, 3502))


def test_header_csv_without_label_scores_but_cannot_train() -> None:
    text = ",".join(ALL_COLUMNS[1:]) + "\n" + ",".join(["1"] * 13 + ["0a1b2c3d"] * 26) + "\n"
    table, bad = read_text(text, require_label=False)
    assert bad == [] and table.num_rows == 1 and table.column("label").null_count == 1
    with pytest.raises(DataFormatError, match="no label column"):
        read_text(text)


def test_unreadable_headers_name_the_problem() -> None:
    with pytest.raises(DataFormatError, match="without a header"):
        read_text("0,1,2,3\n")
    with pytest.raises(DataFormatError, match="lacks I4"):
        read_text("label,I1,I2,I3\n0,1,2,3\n")


def test_uppercase_hex_is_accepted_and_lower_cased() -> None:
    line = "1\t" + "\t".join(["7"] * 13) + "\t" + "\t".join(["0A1B2C3D"] * 26)
    table, bad = read_text(line + "\n")
    assert bad == [] and set(table.column("C1").to_pylist()) == {"0a1b2c3d"}


def test_invalid_utf8_quarantines_that_line_only() -> None:
    good = "\t".join(["0"] + ["1"] * 13 + ["deadbeef"] * 26)
    data = (good + "\n").encode() + b"0\t\xff\xfe" + ("\t" * 38).encode() + b"\n" + (good + "\n").encode()
    table, bad = read_table(io.BytesIO(data))
    assert table.num_rows == 2
    assert [(b.line, b.reason.split(":")[0]) for b in bad] == [(2, "I1")]


# ---- fast path (pyarrow.csv) == slow path (split per line) on random lines ---------------------
_INT_TOKENS = ["", "0", "7", "-3", "260.0", "12.00", "1.5", "+4", " 5", "0x10", "1e3", "abc", "99999999999999999999",
               "9007199254740993", "-9007199254740992", "٣", '"5"', "05"]
_HEX_TOKENS = ["", "05db9164", "ABCDEF01", "05db916", "05db91644", "05db916g", " 05db9164", '"05db9164"', "é5db9164"]
_LABEL_TOKENS = ["0", "1", "", "2", "-1", "1.0", " 1", "x", "01"]


@st.composite
def _line(draw: st.DrawFn) -> str:
    fields = [draw(st.sampled_from(_LABEL_TOKENS))]
    fields += [draw(st.sampled_from(_INT_TOKENS)) for _ in INT_COLUMNS]
    fields += [draw(st.sampled_from(_HEX_TOKENS)) for _ in CAT_COLUMNS]
    shape = draw(st.sampled_from(["ok", "ok", "ok", "short", "long", "empty", "cr"]))
    if shape == "short":
        fields = fields[: draw(st.integers(1, 39))]
    elif shape == "long":
        fields += ["x"] * draw(st.integers(1, 3))
    elif shape == "empty":
        return draw(st.sampled_from(["", " ", "\t" * 39]))
    line = "\t".join(fields)
    return line + "\r" if shape == "cr" else line


@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_line(), min_size=1, max_size=30), st.booleans())
def test_fast_path_matches_reference_parser(lines: list[str], require_label: bool) -> None:
    layout = detect_layout("\t".join(["0"] * 40))
    data = ("\n".join(lines) + "\n").encode()
    fast = parse_block(data, layout, first_line_no=11, require_label=require_label)
    ref = parse_lines([ln.rstrip("\r") for ln in lines], layout, first_line_no=11, require_label=require_label)
    assert fast.table.equals(ref.table)
    assert fast.lines.tolist() == ref.lines.tolist()
    assert [(b.line, b.reason, b.text) for b in fast.bad] == [(b.line, b.reason, b.text) for b in ref.bad]
    assert fast.rows_in == len(lines)
