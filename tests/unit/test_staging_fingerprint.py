"""A staged day is reused only while the landing zone holds the files it was staged from.

Each case stages a day of real Criteo lines, changes the landing zone (or not) and stages again:
same root and files -> reused without reading; a file added, removed or rewritten, or another
root -> re-staged with the reason logged, quarantine rewritten; a file that changes while it is
read -> a clear failure and the previous copy untouched. Also: a read in progress during a
re-stage finishes on the copy it started on.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from ctr.data import landing
from ctr.data.landing import LandingZoneError, fingerprint_day, load_report, read_staged, stage_day

from tests.conftest import RAW_SAMPLE

GOOD = RAW_SAMPLE.read_text().splitlines()
DAY = dt.date(2026, 11, 4)


def _write(root: Path, name: str, lines: list[str], mtime_ms: int | None = None) -> Path:
    p = root / f"day={DAY.isoformat()}" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(lines) + "\n")
    if mtime_ms is not None:
        os.utime(p, ns=(mtime_ms * 1_000_000, mtime_ms * 1_000_000))
    return p


def _stage(root: Path, tmp: Path):
    return stage_day(str(root), tmp / "staging", tmp / "quarantine", DAY)


def _rows(tmp: Path) -> int:
    return sum(t.num_rows for t in read_staged(tmp / "staging", DAY))


def _copies(tmp: Path) -> list[str]:
    return sorted(p.name for p in (tmp / "staging" / landing.STAGED_DIR).iterdir() if p.is_dir())


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "landing"
    _write(r, "part-00000.tsv", GOOD[:30] + ["bad line"], mtime_ms=1_790_000_000_123)
    return r


def test_same_root_same_files_is_reused_without_reading(root: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    first = _stage(root, tmp_path)
    assert first.fingerprint["root"] == str(root.resolve())
    assert [f["name"] for f in first.fingerprint["files"]] == ["part-00000.tsv"]
    assert first.fingerprint["files"][0]["mtime_ms"] == 1_790_000_000_123
    copy = (tmp_path / "staging" / f"day={DAY.isoformat()}").resolve()
    monkeypatch.setattr(landing, "iter_chunks", lambda *a, **k: pytest.fail("an unchanged day was read again"))
    with caplog.at_level(logging.INFO, logger="ctr.data.landing"):
        again = _stage(root, tmp_path)
    assert again.to_json() == first.to_json()
    assert (tmp_path / "staging" / f"day={DAY.isoformat()}").resolve() == copy
    assert "reusing it" in caplog.text and "re-staged" not in caplog.text


@pytest.mark.parametrize("change, reason, rows", [
    ("add", "part-00001.tsv added", 30 + 20),
    ("remove", "part-00001.tsv removed", 30),
    ("rewrite", "part-00000.tsv changed (", 25 + 0),
])
def test_changed_files_are_restaged(root: Path, tmp_path: Path, caplog, change: str, reason: str, rows: int) -> None:
    if change == "remove":
        _write(root, "part-00001.tsv", GOOD[40:60])
    first = _stage(root, tmp_path)
    assert first.rows_quarantined == 1 and (tmp_path / "quarantine" / f"day={DAY.isoformat()}.tsv").exists()
    if change == "add":
        _write(root, "part-00001.tsv", GOOD[40:60])
    elif change == "remove":
        (root / f"day={DAY.isoformat()}" / "part-00001.tsv").unlink()
    else:  # a corrected re-delivery: other rows, no bad line
        _write(root, "part-00000.tsv", GOOD[50:75], mtime_ms=1_790_000_100_000)
    with caplog.at_level(logging.INFO, logger="ctr.data.landing"):
        rep = _stage(root, tmp_path)
    assert f"day={DAY.isoformat()} re-staged: {reason}" in caplog.text
    assert rep.rows_ok == rows == _rows(tmp_path)
    assert rep.digest != first.digest
    assert load_report(tmp_path / "staging", DAY).to_json() == rep.to_json()
    assert len(_copies(tmp_path)) == 1, "the replaced copy is removed"
    q = tmp_path / "quarantine" / f"day={DAY.isoformat()}.tsv"
    if change == "rewrite":  # the quarantine file matches the new copy: no bad line any more
        assert rep.rows_quarantined == 0 and not q.exists()
    else:
        assert q.read_text().count("bad line") == 1


def test_rewritten_file_keeps_rows_in_sync_with_quarantine(root: Path, tmp_path: Path) -> None:
    _stage(root, tmp_path)
    _write(root, "part-00000.tsv", GOOD[:10] + ["other bad", "x\ty"], mtime_ms=1_790_000_200_000)
    rep = _stage(root, tmp_path)
    q = (tmp_path / "quarantine" / f"day={DAY.isoformat()}.tsv").read_text()
    assert rep.rows_quarantined == 2 and "other bad" in q and "bad line" not in q


def test_another_root_for_the_same_day_is_restaged(root: Path, tmp_path: Path, caplog) -> None:
    first = _stage(root, tmp_path)
    other = tmp_path / "landing-b"
    shutil.copytree(root, other)  # copy2: same names, sizes and mtimes
    _write(other, "part-00000.tsv", GOOD[:12], mtime_ms=1_790_000_000_123)
    with caplog.at_level(logging.INFO, logger="ctr.data.landing"):
        rep = _stage(other, tmp_path)
    assert f"landing root changed from {root.resolve()} to {other.resolve()}" in caplog.text
    assert rep.rows_ok == 12 == _rows(tmp_path)
    assert rep.fingerprint["root"] == str(other.resolve()) and rep.digest != first.digest


def test_same_files_under_another_root_have_the_same_digest(root: Path, tmp_path: Path) -> None:
    other = tmp_path / "landing-copy"
    shutil.copytree(root, other)  # copy2 keeps names, sizes and mtimes: the same files
    a, b = fingerprint_day(str(root), DAY), fingerprint_day(str(other), DAY)
    assert a.root != b.root and a.digest == b.digest
    assert a.differences(b) == [f"landing root changed from {a.root} to {b.root}"]


def test_report_without_fingerprint_is_restaged(root: Path, tmp_path: Path, caplog) -> None:
    """A day staged before fingerprints existed (a real folder, no fingerprint) is staged again, once."""
    legacy = tmp_path / "staging" / f"day={DAY.isoformat()}"
    legacy.mkdir(parents=True)
    pa.parquet.write_table(pa.table({"label": pa.array([1], pa.int8())}), legacy / "part-00000.parquet")
    (legacy / "_report.json").write_text('{"day": "2026-11-04", "files": ["x"], "rows_in": 1, "rows_ok": 1}')
    with caplog.at_level(logging.INFO, logger="ctr.data.landing"):
        rep = _stage(root, tmp_path)
    assert "re-staged: no fingerprint recorded" in caplog.text
    assert legacy.is_symlink() and rep.rows_ok == 30 == _rows(tmp_path)
    assert len(_copies(tmp_path)) == 1


def test_file_changing_mid_read_fails_and_leaves_staging_untouched(root: Path, tmp_path: Path, monkeypatch) -> None:
    before = _stage(root, tmp_path)
    q = tmp_path / "quarantine" / f"day={DAY.isoformat()}.tsv"
    q_before = q.read_text()
    copy_before = (tmp_path / "staging" / f"day={DAY.isoformat()}").resolve()
    late = _write(root, "part-00001.tsv", GOOD[40:60])  # a new part: the day is re-staged ...
    real = landing.iter_chunks

    def appending(path, *a, **k):  # ... and the exporter is still appending to it while we read
        for i, chunk in enumerate(real(path, *a, **k)):
            yield chunk
            if i == 0 and path.endswith("part-00001.tsv"):
                with open(late, "a") as fh:
                    fh.write(GOOD[70] + "\n")

    monkeypatch.setattr(landing, "iter_chunks", appending)
    with pytest.raises(LandingZoneError) as e:
        _stage(root, tmp_path)
    msg = str(e.value)
    assert f"file {late}" in msg and "while it was being staged; is the export still being written?" in msg
    assert f"changed from {len(chr(10).join(GOOD[40:60])) + 1} bytes, modified " in msg
    assert (tmp_path / "staging" / f"day={DAY.isoformat()}").resolve() == copy_before
    assert load_report(tmp_path / "staging", DAY).to_json() == before.to_json()
    assert _rows(tmp_path) == 30 and q.read_text() == q_before
    assert _copies(tmp_path) == [copy_before.name], "nothing half-staged is left behind"
    assert not list((tmp_path / "quarantine").glob(".*"))
    monkeypatch.setattr(landing, "iter_chunks", real)  # the export has finished: the next run stages it
    assert _stage(root, tmp_path).rows_ok == 30 + 21


def test_a_read_in_progress_finishes_on_its_copy(root: Path, tmp_path: Path) -> None:
    _write(root, "part-00001.tsv", GOOD[40:60])
    _stage(root, tmp_path)
    reader = read_staged(tmp_path / "staging", DAY)
    first = next(reader)  # part 0 of the old copy
    _write(root, "part-00001.tsv", GOOD[60:65], mtime_ms=1_790_000_300_000)
    assert _stage(root, tmp_path).rows_ok == 35  # swapped in, old copy removed
    rest = list(reader)
    assert first.num_rows + sum(t.num_rows for t in rest) == 50, "the started read saw the old copy only"
    assert _rows(tmp_path) == 35, "a read started after the swap sees the new copy only"


def test_ctr_train_on_another_landing_zone_trains_on_its_rows(tmp_path: Path, monkeypatch) -> None:
    """`ctr train --data A` then `--data B` for the same day: the second bundle holds B's rows, not A's."""
    from ctr.cli import main
    from ctr.data.generate import GeneratorConfig, generate

    monkeypatch.setenv("CTR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CTR_NUM_THREADS", "1")
    a, b = tmp_path / "A", tmp_path / "B"
    generate(a, 1, 3000, DAY, GeneratorConfig(seed=1, cardinality_scale=0.01))
    generate(b, 1, 4000, DAY, GeneratorConfig(seed=2, cardinality_scale=0.01))
    args = ["--from", DAY.isoformat(), "--to", DAY.isoformat()]
    assert main(["train", "--data", str(a), *args, "--out", str(tmp_path / "ma")]) == 0
    assert main(["train", "--data", str(b), *args, "--out", str(tmp_path / "mb")]) == 0
    meta_a = json.loads((tmp_path / "ma" / "metadata.json").read_text())
    meta_b = json.loads((tmp_path / "mb" / "metadata.json").read_text())
    assert meta_a["rows"]["total"] == 3000 and meta_b["rows"]["total"] == 4000
    assert meta_b["data_fingerprints"] == {DAY.isoformat(): fingerprint_day(str(b), DAY).digest}
    assert meta_a["data_fingerprints"][DAY.isoformat()] != meta_b["data_fingerprints"][DAY.isoformat()]


def test_part_added_while_staging_fails_the_day(root: Path, tmp_path: Path, monkeypatch) -> None:
    real = landing.iter_chunks

    def second_part_lands(path, *a, **k):
        yield from real(path, *a, **k)
        _write(root, "part-00001.tsv", GOOD[40:50])

    monkeypatch.setattr(landing, "iter_chunks", second_part_lands)
    with pytest.raises(LandingZoneError, match=r"day=2026-11-04 changed while it was being staged \(part-00001.tsv "
                                               r"added\); is the export still being written\?"):
        _stage(root, tmp_path)
    assert load_report(tmp_path / "staging", DAY) is None and _copies(tmp_path) == []
    assert not (tmp_path / "quarantine" / f"day={DAY.isoformat()}.tsv").exists()
