"""check_data's polite wait for late data: a deferrable operator and the trigger that polls the landing zone.

`CheckDataOperator` asks the landing zone (`ctr.data.landing.day_incomplete`) whether every day the
run needs is complete by its completion rule (param `completion_marker`: `_SUCCESS`, `parts:N` or "").
If some are not and `data_wait_timeout` (seconds) is above 0, it defers to `LandingDaysTrigger`, which
runs in the triggerer and holds no worker slot while it polls; when the days are complete the task
resumes and validates and stages them (`ctr.airflow.tasks.check_data`). When the wait runs out the task
fails, without retries, with the landing zone's message (`landing zone day=D has 0 files under ...;
is the export late?`). An I/O error (unreachable zone, missing container, a read failing) is no reason
to wait: it fails the try, and the task's retries apply.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.sdk import BaseOperator
from airflow.triggers.base import BaseTrigger, TriggerEvent

log = logging.getLogger("ctr.dag")


def pending_days(root: str, days: list[str], marker: str) -> dict[str, str]:
    """{day: why it is not complete} for the days of `days` (ISO dates) that are not; {} when all are."""
    from ctr.data.landing import day_incomplete

    out = {}
    for d in days:
        why = day_incomplete(root, dt.date.fromisoformat(d), marker)
        if why:
            out[d] = why
    return out


def poll_interval(timeout_s: float) -> float:
    """A twentieth of the wait, between 1 s and 60 s (a 6 h wait polls every minute, a test's 20 s every second)."""
    return min(60.0, max(1.0, timeout_s / 20))


class LandingDaysTrigger(BaseTrigger):
    """Fires once: {"status": "ready"} when every day is complete, {"status": "timeout", "pending": {...}} at
    `deadline` (epoch seconds, fixed when the task first deferred, so a triggerer restart does not extend it),
    {"status": "error", "error": ...} when the landing zone cannot be read."""

    def __init__(self, root: str, days: list[str], marker: str, deadline: float, poll_s: float) -> None:
        super().__init__()
        self.root, self.days, self.marker = root, list(days), marker
        self.deadline, self.poll_s = float(deadline), float(poll_s)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("ctr.airflow.waiting.LandingDaysTrigger",
                {"root": self.root, "days": self.days, "marker": self.marker, "deadline": self.deadline,
                 "poll_s": self.poll_s})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            try:  # the landing code is synchronous (fsspec): keep it off the triggerer's event loop
                pending = await asyncio.to_thread(pending_days, self.root, self.days, self.marker)
            except Exception as e:
                yield TriggerEvent({"status": "error", "error": f"{type(e).__name__}: {e}"})
                return
            if not pending:
                yield TriggerEvent({"status": "ready", "days": self.days})
                return
            left = self.deadline - time.time()
            if left <= 0:
                yield TriggerEvent({"status": "timeout", "pending": pending})
                return
            self.log.info("waiting for %s (%.0f s left): %s", ", ".join(pending), left, "; ".join(pending.values()))
            await asyncio.sleep(min(self.poll_s, left))


class CheckDataOperator(BaseOperator):
    """Wait (deferred) for the run's landing days to be complete, then validate and stage them (the XCom of
    `ctr.airflow.tasks.check_data`)."""

    ui_color = "#e8f4ea"

    def execute(self, context: Any) -> dict[str, Any]:
        from ctr.airflow import tasks
        from ctr.data.landing import daterange

        p = context["params"]
        root = tasks.settings(context).landing_root
        start, _ = tasks.train_range(context)
        days = [d.isoformat() for d in daterange(start, tasks.holdout_day(context))]
        marker = str(p.get("completion_marker", "_SUCCESS"))
        pending = pending_days(root, days, marker)
        if not pending:
            return tasks.check_data(context)
        timeout = float(p.get("data_wait_timeout", 0))
        if timeout <= 0:
            self._late(pending, 0)
        log.info("check_data: deferring up to %.0f s for %s: %s", timeout, ", ".join(pending), "; ".join(pending.values()))
        self.defer(trigger=LandingDaysTrigger(root, days, marker, time.time() + timeout, poll_interval(timeout)),
                   method_name="resume", kwargs={"timeout": timeout})

    def resume(self, context: Any, event: dict[str, Any], timeout: float = 0) -> dict[str, Any]:
        from ctr.airflow import tasks

        if event["status"] == "error":  # an I/O error while waiting: this try fails, retries apply
            raise RuntimeError(f"check_data: the landing zone could not be read while waiting: {event['error']}")
        if event["status"] == "timeout":
            self._late(event["pending"], timeout)
        log.info("check_data: landing days complete: %s", ", ".join(event.get("days", [])))
        return tasks.check_data(context)

    @staticmethod
    def _late(pending: dict[str, str], waited: float) -> None:
        from airflow.sdk.exceptions import AirflowFailException  # a late day does not come sooner by retrying

        raise AirflowFailException("check_data failed" + (f" after waiting {waited:.0f} s" if waited else "") + ": "
                                   + "; ".join(pending.values()))
