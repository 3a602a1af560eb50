"""Day checks: bad fraction, volume and click rate against the trailing median; absent and empty days;
and the `check_data` task end to end on a local landing zone (XCom numbers, failure messages)."""

from __future__ import annotations

import datetime as dt
import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from ctr.data.checks import CheckConfig, problems, trailing_history
from ctr.data.generate import GeneratorConfig, generate
from ctr.data.landing import DayReport, LandingZoneError, list_day_files, list_days, stage_day

CFG = CheckConfig()


def _rep(day: str, rows: int = 10_000, clicks: int = 2_500, bad: int = 0) -> DayReport:
    return DayReport(day=day, files=[f"land/day={day}/part-00000.tsv.gz"], rows_in=rows + bad, rows_ok=rows,
                     rows_quarantined=bad, clicks=clicks, quarantine=f"q/day={day}.tsv" if bad else None)


HISTORY = [_rep(f"2026-11-{d:02d}") for d in range(10, 17)]


def test_a_normal_day_passes() -> None:
    assert problems(_rep("2026-11-17", rows=9_000, clicks=2_300, bad=9), HISTORY, CFG) == []
    assert problems(_rep("2026-11-17"), [], CFG) == []  # no history yet: only the bad fraction applies


def test_too_many_bad_lines_fail_naming_day_numbers_and_quarantine() -> None:
    (msg,) = problems(_rep("2026-11-17", rows=10_000, clicks=2_500, bad=11), HISTORY, CFG)
    assert "day=2026-11-17" in msg and "11 of 10011" in msg and "max_bad_fraction 0.1000%" in msg
    assert "q/day=2026-11-17.tsv" in msg
    assert problems(_rep("2026-11-17", bad=11), HISTORY, CheckConfig(max_bad_fraction=0.01)) == []


def test_volume_below_half_the_trailing_median_fails() -> None:
    (msg,) = problems(_rep("2026-11-17", rows=4_999, clicks=1_250), HISTORY, CFG)
    assert "day=2026-11-17" in msg and "4999 valid rows < 0.5 x trailing median 10000 (7 days)" in msg
    assert problems(_rep("2026-11-17", rows=5_000, clicks=1_250), HISTORY, CFG) == []


@pytest.mark.parametrize("clicks,fails", [(1_249, True), (1_250, False), (5_000, False), (5_001, True)])
def test_click_rate_outside_half_to_double_the_trailing_median_fails(clicks: int, fails: bool) -> None:
    out = problems(_rep("2026-11-17", clicks=clicks), HISTORY, CFG)
    assert bool(out) == fails
    if fails:
        assert "day=2026-11-17: click rate" in out[0] and "trailing median 0.2500" in out[0]


def test_a_day_with_no_valid_rows_fails_with_its_files() -> None:
    (msg,) = problems(_rep("2026-11-17", rows=0, clicks=0, bad=5), HISTORY, CFG)
    assert "0 valid rows of 5" in msg and "land/day=2026-11-17/part-00000.tsv.gz" in msg


def test_absent_and_empty_days_fail_with_the_path(tmp_path: Path) -> None:
    day = dt.date(2026, 11, 18)
    with pytest.raises(LandingZoneError, match=rf"day=2026-11-18 has 0 files under {tmp_path}/day=2026-11-18"):
        list_day_files(str(tmp_path), day)
    (tmp_path / "day=2026-11-18").mkdir()
    (tmp_path / "day=2026-11-18" / "part-00000.tsv").write_bytes(b"")
    with pytest.raises(LandingZoneError, match="only empty files"):
        stage_day(str(tmp_path), tmp_path / "st", tmp_path / "q", day)
    (tmp_path / "day=2026-11-18" / "part-00000.tsv").write_text("label,I1\n")
    with pytest.raises(LandingZoneError, match=r"part-00000.tsv: header names 2 columns but lacks"):
        stage_day(str(tmp_path), tmp_path / "st", tmp_path / "q", day)
    assert list_days(str(tmp_path)) == [day]
    assert list_days(str(tmp_path / "nowhere")) == []


def test_trailing_history_reads_earlier_runs_reports(tmp_path: Path) -> None:
    root = tmp_path / "land"
    generate(root, 3, 400, dt.date(2026, 11, 12), GeneratorConfig(seed=1, cardinality_scale=0.01))
    staging = tmp_path / "staging"
    for d in (dt.date(2026, 11, 10), dt.date(2026, 11, 11)):
        stage_day(str(root), staging, tmp_path / "q", d)
    known = {"2026-11-12": _rep("2026-11-12")}
    hist = trailing_history(staging, dt.date(2026, 11, 13), known, CFG)
    assert [h.day for h in hist] == ["2026-11-10", "2026-11-11", "2026-11-12"]
    assert hist[0].rows_in == 400 and hist[0].rows_in == hist[0].rows_ok + hist[0].rows_quarantined


def _context(day: dt.date, train_days: int, **params) -> dict:
    return {"params": {"train_days": train_days, **params}, "dag": SimpleNamespace(dag_id="ctr_retrain"),
            "logical_date": dt.datetime(day.year, day.month, day.day, 2, tzinfo=dt.UTC), "run_id": "test"}


def test_check_data_task_stages_days_and_returns_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.exceptions import AirflowFailException
    from ctr.airflow import tasks as airflow_tasks

    end = dt.date(2026, 11, 20)
    land = tmp_path / "land"
    generate(land, 3, 2_000, end, GeneratorConfig(seed=8, cardinality_scale=0.01))
    monkeypatch.setenv("CTR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CTR_LANDING", str(land))
    out = airflow_tasks.check_data(_context(end, 2))
    json.dumps(out)  # an XCom must be JSON
    assert sorted(out["days"]) == ["2026-11-18", "2026-11-19", "2026-11-20"]
    for d in out["days"].values():
        assert d["rows_in"] == d["rows_ok"] + d["rows_quarantined"] == 2_000
    assert out["rows_ok"] == 6_000
    # the holdout day's feature PSI against the two training days, as information (the gate decides)
    assert len(out["drift"]["features"]) == 39 and out["drift"]["rows"] == 2_000
    assert "training range 2026-11-18..2026-11-19" in out["drift"]["reference"] and isinstance(out["warnings"], list)

    # a new day with 1% malformed lines fails the task, naming the day and the numbers
    bad_day = end + dt.timedelta(days=1)
    good = gzip.decompress((land / f"day={end.isoformat()}" / "part-00000.tsv.gz").read_bytes()).splitlines()
    lines = good[:1_980] + [b"1\tnot-a-number" + b"\t" * 38] * 20
    (land / f"day={bad_day.isoformat()}").mkdir()
    (land / f"day={bad_day.isoformat()}" / "part-00000.tsv").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(AirflowFailException, match=r"day=2026-11-21: 20 of 2000 lines malformed") as err:
        airflow_tasks.check_data(_context(bad_day, 2))
    assert "quarantine/day=2026-11-21.tsv" in str(err.value)

    with pytest.raises(LandingZoneError, match=r"day=2026-11-22 has 0 files under .*land/day=2026-11-22"):
        airflow_tasks.check_data(_context(bad_day + dt.timedelta(days=1), 2))
