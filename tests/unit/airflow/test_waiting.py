"""check_data's wait for late data: the completion rules, the trigger (polling a real folder) and the operator's
defer / resume / fail decisions, without a scheduler (the live stack runs it deferred: tests/e2e/test_live_airflow.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred
from ctr.airflow.waiting import CheckDataOperator, LandingDaysTrigger, poll_interval
from ctr.data.generate import GeneratorConfig, generate
from ctr.data.landing import day_incomplete

END = dt.date(2026, 11, 20)
CFG = GeneratorConfig(seed=8, cardinality_scale=0.01)


def _first(trigger: LandingDaysTrigger) -> dict:
    async def first():
        async for ev in trigger.run():
            return ev.payload
    return asyncio.run(asyncio.wait_for(first(), 30))


def _context(day: dt.date, **params) -> dict:
    return {"params": {"train_days": 1, "data_wait_timeout": 60, "completion_marker": "_SUCCESS", **params},
            "dag": SimpleNamespace(dag_id="ctr_retrain"), "run_id": "test",
            "logical_date": dt.datetime(day.year, day.month, day.day, 2, tzinfo=dt.UTC)}


@pytest.fixture
def land(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "land"
    generate(root, 2, 1_000, END - dt.timedelta(days=1), CFG)  # END-2, END-1 complete; END absent
    monkeypatch.setenv("CTR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CTR_LANDING", str(root))
    return root


def test_completion_rules(land: Path) -> None:
    r = str(land)
    assert day_incomplete(r, END - dt.timedelta(days=1)) is None  # the generator writes _SUCCESS last
    assert day_incomplete(r, END) == f"landing zone day={END} has 0 files under {land}/day={END}; is the export late?"
    day = land / f"day={END}"
    day.mkdir()
    (day / "part-00000.tsv").write_text("0\t1" + "\t" * 38 + "\n")
    assert "has 1 data file(s) but no _SUCCESS marker" in day_incomplete(r, END)
    assert day_incomplete(r, END, "") is None
    assert day_incomplete(r, END, "parts:2") == (f"landing zone day={END} has 1 of 2 data files under {land}/day={END}; "
                                                 "is the export late?")
    (day / "part-00001.tsv").write_text("0\t1" + "\t" * 38 + "\n")
    assert day_incomplete(r, END, "parts:2") is None
    (day / "_SUCCESS").touch()
    assert day_incomplete(r, END) is None


def test_trigger_fires_when_the_day_lands_and_round_trips_its_kwargs(land: Path) -> None:
    trig = LandingDaysTrigger(str(land), [(END - dt.timedelta(days=1)).isoformat(), END.isoformat()], "_SUCCESS",
                              time.time() + 20, 0.05)
    path, kwargs = trig.serialize()
    assert path == "ctr.airflow.waiting.LandingDaysTrigger"
    from airflow.sdk.module_loading import import_string

    again = import_string(path)(**kwargs)
    assert again.serialize() == (path, kwargs)
    lands = threading.Timer(0.5, lambda: generate(land, 1, 500, END, CFG))
    t0 = time.monotonic()
    lands.start()
    try:
        ev = _first(again)
    finally:
        lands.join()
    assert ev == {"status": "ready", "days": kwargs["days"]}
    assert 0.5 <= time.monotonic() - t0 < 10


def test_trigger_times_out_at_its_deadline_naming_the_late_day(land: Path) -> None:
    t0 = time.monotonic()
    ev = _first(LandingDaysTrigger(str(land), [END.isoformat()], "_SUCCESS", time.time() + 0.4, 0.1))
    assert 0.3 <= time.monotonic() - t0 < 5
    assert ev == {"status": "timeout",
                  "pending": {END.isoformat(): f"landing zone day={END} has 0 files under {land}/day={END}; is the export late?"}}


def test_trigger_reports_an_unreadable_landing_zone_as_an_error_not_a_wait(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    ev = _first(LandingDaysTrigger(str(not_a_dir), [END.isoformat()], "_SUCCESS", time.time() + 20, 0.05))
    assert ev["status"] == "error" and "NotADirectoryError" in ev["error"], ev


def test_poll_interval_scales_with_the_wait() -> None:
    assert (poll_interval(20), poll_interval(600), poll_interval(6 * 3600)) == (1.0, 30.0, 60.0)


def test_operator_defers_fails_at_once_or_stages(land: Path) -> None:
    op = CheckDataOperator(task_id="check_data")
    # a complete day is staged at once, no deferral
    out = op.execute(_context(END - dt.timedelta(days=1)))
    assert sorted(out["days"]) == [(END - dt.timedelta(days=2)).isoformat(), (END - dt.timedelta(days=1)).isoformat()]
    # a late day defers to the trigger with an absolute deadline
    t0 = time.time()
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(_context(END, data_wait_timeout=120))
    trig = deferred.value.trigger
    assert isinstance(trig, LandingDaysTrigger) and deferred.value.method_name == "resume"
    assert trig.days == [(END - dt.timedelta(days=1)).isoformat(), END.isoformat()]
    assert t0 + 120 <= trig.deadline <= time.time() + 120 and trig.poll_s == 6.0
    # no wait allowed: fails now, with the landing zone's message, and no retries (AirflowFailException)
    with pytest.raises(AirflowFailException, match=rf"^check_data failed: landing zone day={END} has 0 files under "):
        op.execute(_context(END, data_wait_timeout=0))
    # the wait ran out
    pending = {END.isoformat(): f"landing zone day={END} has 0 files under x; is the export late?"}
    with pytest.raises(AirflowFailException, match=r"^check_data failed after waiting 120 s: landing zone day=.* late\?$"):
        op.resume(_context(END), {"status": "timeout", "pending": pending}, timeout=120)
    # an I/O error while waiting fails the try as a retryable error
    with pytest.raises(RuntimeError, match="could not be read while waiting: OSError: boom") as err:
        op.resume(_context(END), {"status": "error", "error": "OSError: boom"}, timeout=120)
    assert not isinstance(err.value, AirflowFailException)
    # the day landed: resume validates and stages it
    generate(land, 1, 500, END, CFG)
    out = op.resume(_context(END), {"status": "ready", "days": [END.isoformat()]}, timeout=120)
    assert out["days"][END.isoformat()]["rows_in"] == 500
