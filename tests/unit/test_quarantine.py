"""Every malformed line ends in the quarantine file with its line number and reason; no row is lost.

Also `ctr score` on a file mixing good and bad lines: exactly one output line per input line.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
from pathlib import Path

import pyarrow as pa
import pytest
from ctr.data.landing import stage_day
from ctr.data.reader import read_table, read_text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RAW_SAMPLE

GOOD = RAW_SAMPLE.read_text().splitlines()


def _with(field: int, value: str, base: str = GOOD[1]) -> str:
    f = base.split("\t")
    f[field] = value
    return "\t".join(f)


# (case, line, expected start of the reason)
CASES: list[tuple[str, str, str]] = [
    ("empty line", "", "empty line"),
    ("blank spaces", "   ", "empty line"),
    ("one field", "garbage", "expected 40 fields, found 1"),
    ("41 fields", GOOD[1] + "\tdeadbeef", "expected 40 fields, found 41"),
    ("45 fields", GOOD[1] + "\t1" * 5, "expected 40 fields, found 45"),
    ("label 2", _with(0, "2"), "label: expected 0 or 1, found '2'"),
    ("label -1", _with(0, "-1"), "label: expected 0 or 1"),
    ("label missing", _with(0, ""), "label: expected 0 or 1, found ''"),
    ("label text", _with(0, "yes"), "label: expected 0 or 1"),
    ("int text", _with(3, "abc"), "I3: not an integer"),
    ("int float", _with(4, "1.5"), "I4: not an integer"),
    ("int exponent", _with(5, "1e3"), "I5: not an integer"),
    ("int hex literal", _with(6, "0x10"), "I6: not an integer"),
    ("int plus sign", _with(7, "+4"), "I7: not an integer"),
    ("int too big", _with(8, "99999999999999999999"), "I8: not an integer"),
    ("int beyond 2^53", _with(9, "9007199254740993"), "I9: not an integer within +/-2^53"),
    ("int leading space", _with(10, " 5"), "I10: not an integer"),
    ("hex 7 digits", _with(14, "05db916"), "C1: expected 8 hex digits, found '05db916'"),
    ("hex 9 digits", _with(15, "05db91644"), "C2: expected 8 hex digits"),
    ("hex non-hex letter", _with(20, "05db916g"), "C7: expected 8 hex digits"),
    ("hex quoted", _with(39, '"05db9164"'), "C26: expected 8 hex digits"),
    ("hex unicode", _with(30, "é5db9164"), "C17: expected 8 hex digits"),
    ("comma separated", GOOD[1].replace("\t", ","), "expected 40 fields, found 1"),
    ("two lines glued", GOOD[1] + GOOD[2], "expected 40 fields, found 79"),
    ("first problem wins", _with(0, "7", _with(20, "zz")), "label: expected 0 or 1, found '7'"),
]


def _day(tmp: Path, lines: list[str], day: dt.date, gz: bool = True) -> Path:
    d = tmp / "landing" / f"day={day.isoformat()}"
    d.mkdir(parents=True, exist_ok=True)
    data = ("\n".join(lines) + "\n").encode()
    if gz:
        (d / "part-00000.tsv.gz").write_bytes(gzip.compress(data))
    else:
        (d / "part-00000.tsv").write_bytes(data)
    return tmp / "landing"


def _read_quarantine(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    for r in rows:
        r["raw"] = r["raw"].replace("\\t", "\t").replace("\\n", "\n").replace("\\\\", "\\")
    return rows


def test_table_of_malformed_lines_all_quarantined_with_line_and_reason(tmp_path: Path) -> None:
    assert len(CASES) >= 20
    lines: list[str] = []
    expected: dict[int, tuple[str, str, str]] = {}
    for i, (name, bad_line, reason) in enumerate(CASES):
        lines.append(GOOD[i % len(GOOD)])
        lines.append(bad_line)
        expected[len(lines)] = (name, bad_line, reason)
    lines += GOOD[:5]
    day = dt.date(2026, 11, 3)
    root = _day(tmp_path, lines, day)
    rep = stage_day(str(root), tmp_path / "staging", tmp_path / "quarantine", day)
    assert rep.rows_in == len(lines)
    assert rep.rows_quarantined == len(CASES)
    assert rep.rows_ok == len(lines) - len(CASES)
    assert rep.rows_in == rep.rows_ok + rep.rows_quarantined
    q = _read_quarantine(Path(rep.quarantine))
    assert len(q) == len(CASES)
    for row in q:
        name, bad_line, reason = expected[int(row["line"])]
        assert row["reason"].startswith(reason), name
        assert row["raw"] == bad_line, name
        assert row["file"].endswith("part-00000.tsv.gz")
    staged = pa.concat_tables(pa.parquet.read_table(p) for p in sorted(Path(rep.staged).glob("part-*.parquet")))
    good_lines = [ln for i, ln in enumerate(lines, 1) if i not in expected]
    ref, bad = read_text("\n".join(good_lines) + "\n")
    assert bad == [] and staged.equals(ref)


def test_short_lines_are_padded_not_quarantined(tmp_path: Path) -> None:
    dropped = [GOOD[3].rstrip("\t"), "1\t5", "0\t"]
    table, bad = read_text("\n".join(dropped) + "\n")
    assert bad == [] and table.num_rows == 3
    assert table.slice(1, 1).to_pylist()[0]["I1"] == 5
    # a single field cannot be told from garbage: rejected, not padded
    _, bad = read_text("0\n")
    assert [(b.line, b.reason) for b in bad] == [(1, "expected 40 fields, found 1")]


def test_staging_is_reused_by_reruns(tmp_path: Path, monkeypatch) -> None:
    day = dt.date(2026, 11, 4)
    root = _day(tmp_path, GOOD[:10] + ["bad"], day, gz=False)
    first = stage_day(str(root), tmp_path / "st", tmp_path / "q", day)

    def no_reading(path, *a, **k):
        raise AssertionError(f"a re-run on unchanged files must not re-read {path}")

    monkeypatch.setattr("ctr.data.landing.iter_chunks", no_reading)
    again = stage_day(str(root), tmp_path / "st", tmp_path / "q", day)
    assert again.to_json() == first.to_json()
    assert (first.rows_in, first.rows_ok, first.rows_quarantined) == (11, 10, 1)


_MUTATIONS = st.sampled_from(["delete", "insert", "tab", "truncate", "dup-tab", "replace"])


@st.composite
def _mutated(draw: st.DrawFn) -> str:
    line = draw(st.sampled_from(GOOD))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(_MUTATIONS)
        pos = draw(st.integers(0, max(len(line) - 1, 0)))
        if op == "delete":
            line = line[:pos] + line[pos + 1:]
        elif op == "insert":
            line = line[:pos] + draw(st.sampled_from(["x", "-", ".", "Z", "9", ",", '"', "é", " "])) + line[pos:]
        elif op == "tab":
            line = line[:pos] + "\t" + line[pos:]
        elif op == "truncate":
            line = line[:pos]
        elif op == "dup-tab":
            line = line.replace("\t\t", "\t", 1)
        else:
            line = line[:pos] + draw(st.characters(codec="utf-8", exclude_characters="\n\r")) + line[pos + 1:]
    return line


@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_mutated(), min_size=1, max_size=40))
def test_no_row_is_lost_under_random_corruption(lines: list[str]) -> None:
    table, bad = read_text("\n".join(lines) + "\n")
    assert table.num_rows + len(bad) == len(lines)
    for b in bad:
        assert b.text == lines[b.line - 1]
        assert b.reason
    assert len({b.line for b in bad}) == len(bad)


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few-tree model on two small generated days (the shared session bundle is far slower to train)."""
    from ctr.data.generate import GeneratorConfig, generate
    from ctr.train import TrainConfig, train

    root = tmp_path_factory.mktemp("score-data")
    end = dt.date(2026, 11, 20)
    generate(root, 2, 3000, end, GeneratorConfig(seed=3, cardinality_scale=0.001))
    for d in (end - dt.timedelta(days=1), end):
        stage_day(str(root), root / "staging", root / "quarantine", d)
    out = root / "model"
    train(root / "staging", out, TrainConfig(start=end - dt.timedelta(days=1), end=end, rounds=8, num_threads=1))
    return out


def test_score_writes_one_line_per_input_line(small_bundle: Path, tmp_path: Path) -> None:
    from ctr.bundle import Bundle
    from ctr.cli import main

    lines = []
    bad_at = set()
    for i, (_, bad_line, _) in enumerate(CASES):
        lines.append(GOOD[i])
        lines.append(bad_line)
        if not bad_line.startswith("\t"):  # a missing label is fine when scoring
            bad_at.add(len(lines))
    mixed = tmp_path / "mixed.tsv"
    mixed.write_text("\n".join(lines) + "\n")
    csv_in = tmp_path / "more.csv"
    csv_in.write_text("label," + ",".join(f"I{i}" for i in range(1, 14)) + "," + ",".join(f"C{i}" for i in range(1, 27))
                      + "\n" + "\n".join(ln.replace("\t", ",") for ln in GOOD[:3]) + "\n")
    out = tmp_path / "scores.csv"
    assert main(["score", "--model", str(small_bundle), "--input", str(mixed), str(csv_in), "--output", str(out)]) == 0
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(lines) + 3
    assert [int(r["row"]) for r in rows] == list(range(1, len(lines) + 4))
    for i, r in enumerate(rows[: len(lines)], 1):
        if i in bad_at:
            assert r["probability"] == "" and r["reason"], i
        else:
            assert 0.0 < float(r["probability"]) < 1.0 and r["reason"] == "", i
    good, _ = read_table(str(mixed), require_label=False)
    expected = Bundle.load(small_bundle).predict_table(good)
    got = [float(r["probability"]) for r in rows[: len(lines)] if r["probability"]]
    assert got == pytest.approx(expected.tolist(), abs=0)


def test_score_names_an_unreadable_input(small_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ctr.cli import main

    out = tmp_path / "scores.csv"
    assert main(["score", "--model", str(small_bundle), "--input", str(tmp_path / "nope.tsv"), "--output", str(out)]) == 1
    assert "nope.tsv" in capsys.readouterr().err
    assert not out.exists()
