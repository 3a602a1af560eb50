"""ctr_retrain against a real, running Airflow 3: REST trigger, backfill CLI, re-run, timetable, alerts.

One live stack per session (tests/e2e/live_airflow.py): api-server, scheduler, dag-processor and
triggerer on free 127.0.0.1 ports, PostgreSQL (tests/e2e/postgres.py), LocalExecutor (parallelism 1). Dates come from the DAG's
own timetable: D0 is the interval it schedules first (the latest complete day), the backfill covers
D0-3 .. D0-1, the alert drill D0-5.

  a. POST /api/v2/dags/ctr_retrain/dagRuns (token from /auth/token) for D0 -> success end to end
  b. airflow backfill create D0-3 .. D0-1 -> three runs, in date order, three versions, champion = latest
  c. a backfill of D0-1 again with --reprocess-behavior completed -> re-runs, no new registry version
  d. the scheduler's next run is the timetable's: 02:00 UTC, the day after D0's interval
  e. a rollback and the failed verify task reach the webhook of `ctr_alerts` (fail_verify drill)
  f. a late day: check_data defers to the triggerer, then fails naming the day (earliest landing day); the run
     misses the stack's 3.6 s DeadlineAlert and deadline_missed reaches the webhook with the run's link
  g. a borderline candidate waits in review: a non-respondent is refused, the reviewer rejects one run and approves
     the next (REST); the approved one is promoted, and the champion asset event runs ctr_batch_score with it
"""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest
from ctr.registry import Registry

from tests.e2e import live_airflow as la

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]
DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def first(live):
    return la.api_run(live[0])


def _registry(stack: la.LiveAirflow) -> Registry:
    return Registry(f"sqlite:///{stack.ctr_home / 'mlflow.db'}", "ctr-lightgbm")


def _versions(stack: la.LiveAirflow) -> dict[str, dict[str, str]]:
    reg = _registry(stack)
    return {str(mv.version): dict(mv.tags) for mv in reg.client.search_model_versions("name = 'ctr-lightgbm'")}


def _d0(first) -> dt.date:
    return first["info"].data_interval.start.date()


def _iso(s: str) -> dt.datetime:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


def _backfill(stack: la.LiveAirflow, d1: dt.date, d3: dt.date, *extra: str) -> dict:
    # --to-date is inclusive on the logical date, which is <day> 02:00 UTC for holdout day <day>
    return stack.backfill("--from-date", d1.isoformat(), "--to-date", f"{d3.isoformat()}T02:00:00+00:00",
                          "--max-active-runs", "1", "--dag-run-conf", json.dumps(la.LENIENT), *extra)


def test_a_rest_triggered_run_succeeds_end_to_end(live, first):
    stack, _ = live
    run, d0 = first["run"], _d0(first)
    assert first["created"]["state"] == "queued" and first["dag_before"]["is_paused"] is True
    assert run["state"] == "success", run
    assert _iso(run["logical_date"]) == first["info"].data_interval.start
    assert (_iso(run["data_interval_start"]), _iso(run["data_interval_end"])) == tuple(first["info"].data_interval)
    tis = stack.task_instances(run["dag_run_id"])
    states = {k: v["state"] for k, v in tis.items()}
    spine = ("check_data", "train", "evaluate", "gate", "register", "build_image", "rollout", "verify", "promote")
    assert all(states[t] == "success" for t in spine), states
    assert all(s in ("success", "skipped") for s in states.values()), states  # other compute branches skipped
    decision = stack.xcom(run["dag_run_id"], "gate", "decision")
    assert decision["passed"] is True, decision
    reg = _registry(stack)
    mine = reg.find(f"ctr_retrain/{d0.isoformat()}")
    assert mine is not None and reg.champion().version == mine.version
    assert mine.tags["data_interval"] == f"{d0 - 7 * DAY}..{d0 - DAY}"
    import httpx

    ready = httpx.get(f"http://127.0.0.1:{stack.serve_port}/readyz", timeout=5).json()
    assert str(ready["model_version"]) == mine.version


def test_b_backfill_three_days_in_order(live, first):
    stack, _ = live
    d0 = _d0(first)
    days = [d0 - 3 * DAY, d0 - 2 * DAY, d0 - DAY]
    backfill = _backfill(stack, days[0], days[-1])
    runs = [r for r in stack.runs() if r["run_type"] == "backfill"]
    assert [_iso(r["logical_date"]).date() for r in runs] == days, [r["dag_run_id"] for r in runs]
    assert all(r["state"] == "success" for r in runs), [(r["dag_run_id"], r["state"]) for r in runs]
    for r, day in zip(runs, days, strict=True):
        start = dt.datetime.combine(day, dt.time(2), dt.UTC)
        assert (_iso(r["data_interval_start"]), _iso(r["data_interval_end"])) == (start, start + DAY)
    for earlier, later in zip(runs, runs[1:], strict=False):  # completed in date order, one at a time
        assert _iso(earlier["end_date"]) <= _iso(later["start_date"]), (earlier, later)
    reg = _registry(stack)
    found = [reg.find(f"ctr_retrain/{d.isoformat()}") for d in days]
    assert all(found), found
    assert len({v.version for v in found}) == 3
    for v, day in zip(found, days, strict=True):
        assert v.tags["holdout_day"] == day.isoformat()
        assert v.tags["data_interval"] == f"{day - 7 * DAY}..{day - DAY}"
    decisions = [stack.xcom(r["dag_run_id"], "gate", "decision") for r in runs]
    assert all(d["passed"] for d in decisions), decisions
    # the champion is the latest passing one by data (holdout day), not the last one written: the
    # backfilled older days deployed and verified, but D0's version (run a) stays champion
    passing = [*found, reg.find(f"ctr_retrain/{d0.isoformat()}")]
    latest = max(passing, key=lambda v: v.tags["holdout_day"])
    assert latest.tags["holdout_day"] == d0.isoformat()
    assert reg.champion().version == latest.version != found[-1].version
    assert backfill["completed_at"]


def test_c_backfill_again_reprocess_completed_makes_no_new_version(live, first):
    stack, _ = live
    d0 = _d0(first)
    before = _versions(stack)
    old_runs = {r["dag_run_id"]: r for r in stack.runs() if r["run_type"] == "backfill"}
    # the last day of test b's range (one run keeps the module inside its CI budget; the rule is per run)
    _backfill(stack, d0 - DAY, d0 - DAY, "--reprocess-behavior", "completed")
    runs = {r["dag_run_id"]: r for r in stack.runs() if r["run_type"] == "backfill"}
    assert runs.keys() == old_runs.keys() and all(r["state"] == "success" for r in runs.values())
    again = [r for r in runs.values() if _iso(r["logical_date"]).date() == d0 - DAY]
    assert len(again) == 1
    # really re-run: the same run id, cleared and executed again after the first backfill had finished
    r = again[0]
    assert _iso(r["start_date"]) > _iso(old_runs[r["dag_run_id"]]["end_date"])
    register = stack.task_instances(r["dag_run_id"])["register"]
    assert register["state"] == "success" and register["try_number"] >= 2, register  # ran again, found its version
    for other in runs.values():  # the rest of test b's range was not touched
        if other is not r:
            assert other["start_date"] == old_runs[other["dag_run_id"]]["start_date"]
    assert {v: t.get("holdout_day") for v, t in _versions(stack).items()} == {v: t.get("holdout_day") for v, t in before.items()}


def test_d_next_run_is_the_timetables_0200_utc(live, first):
    stack, _ = live
    info = first["info"]
    before = first["dag_before"]
    # before unpausing, Airflow had planned exactly the timetable's first interval
    assert _iso(before["next_dagrun_logical_date"]) == info.data_interval.start
    assert _iso(before["next_dagrun_data_interval_start"]) == info.data_interval.start
    assert _iso(before["next_dagrun_data_interval_end"]) == info.data_interval.end
    assert _iso(before["next_dagrun_run_after"]) == info.run_after
    # the scheduler found that interval done by the API-triggered run and moved to the next one
    from airflow.timetables.base import TimeRestriction

    dag, tt = la.core_timetable()
    expected = tt.next_dagrun_info(last_automated_data_interval=info.data_interval,
                                   restriction=TimeRestriction(dag.start_date, None, dag.catchup))
    now = stack.wait_dag(lambda d: d["next_dagrun_logical_date"] != before["next_dagrun_logical_date"])
    assert _iso(now["next_dagrun_data_interval_start"]) == expected.data_interval.start == info.data_interval.end
    assert _iso(now["next_dagrun_data_interval_end"]) == expected.data_interval.end
    assert _iso(now["next_dagrun_run_after"]) == expected.run_after
    run_after = _iso(now["next_dagrun_run_after"])
    assert (run_after.hour, run_after.minute, run_after.utcoffset()) == (2, 0, dt.timedelta(0))
    assert expected.data_interval.end - expected.data_interval.start == DAY
    assert run_after > dt.datetime.now(dt.UTC)
    assert not [r for r in stack.runs() if r["run_type"] == "scheduled"], "scheduler duplicated the API run's interval"


def test_e_rollback_and_failed_task_reach_the_webhook(live, first):
    """A real run's verify fails (fail_verify drill): the service rolls back and both alerts are sent.

    (A gate rejection's alert is sent from the same gate code path exercised in
    tests/integration/test_notify.py; it is left out here to keep this module inside its CI budget.)
    """
    stack, receiver = live
    d0 = _d0(first)
    champion = _registry(stack).champion().version
    import httpx

    live_url = f"http://127.0.0.1:{stack.serve_port}/readyz"
    serving = httpx.get(live_url, timeout=5).json()["model_version"]  # the last deployed version
    # a rollback: verification forced to fail after the rollout
    day = d0 - 5 * DAY
    logical = dt.datetime.combine(day, dt.time(2), dt.UTC)
    r = stack.trigger(logical, (logical, logical + DAY), {**la.LENIENT, "fail_verify": True}, run_id=f"drill_rollback__{day}")
    run = stack.wait_run(r["dag_run_id"])
    assert run["state"] == "failed"
    tis = stack.task_instances(r["dag_run_id"])
    assert tis["verify"]["state"] == "failed" and tis["promote"]["state"] == "upstream_failed"
    rb = receiver.wait_for("rollback", run_id=r["dag_run_id"])
    assert rb["task_id"] == "verify" and str(rb["details"]["restored_version"]) == str(serving), rb
    assert rb["details"]["failed_version"] not in (None, serving), rb
    failed = receiver.wait_for("task_failed", run_id=r["dag_run_id"])
    assert failed["task_id"] == "verify" and "fail_verify" in failed["details"]["error"], failed
    assert receiver.received[-1]["path"] == "/hooks/ctr"
    assert _registry(stack).champion().version == champion  # the champion pointer never moved
    assert str(httpx.get(live_url, timeout=5).json()["model_version"]) == str(serving)  # serving what it served


def test_f_a_late_day_defers_check_data_then_fails_naming_it(live, first):
    """check_data waits in the triggerer (state `deferred`, no worker slot) for days that never land, then fails
    with the landing zone's message. (The wait ending because the day landed: tests/unit/airflow/test_waiting.py.)"""
    stack, receiver = live
    day = dt.date.fromisoformat(min(p.name for p in stack.landing.glob("day=*"))[4:])  # its 7 training days are absent
    logical = dt.datetime.combine(day, dt.time(2), dt.UTC)
    # 20 s, not less: when the trigger fires within seconds of the deferral, the scheduler can still be holding the
    # deferring process's own exit ("success") and fails the requeued TI as "state changed externally" (an
    # Airflow race, apache/airflow#66374; seen here when the suite ran on two workers with a 5 s wait)
    r = stack.trigger(logical, (logical, logical + DAY), {**la.LENIENT, "data_wait_timeout": 20}, run_id=f"late__{day}")
    seen, deadline = set(), time.monotonic() + 120
    while (state := stack.task_instances(r["dag_run_id"]).get("check_data", {}).get("state")) not in ("failed", "success"):
        seen.add(state)
        stack._check_alive()
        assert time.monotonic() < deadline, f"check_data still {state} after 120 s"
        time.sleep(0.5)
    assert state == "failed" and "deferred" in seen, seen
    assert stack.wait_run(r["dag_run_id"], timeout=60)["state"] == "failed"
    text = stack.task_log(r["dag_run_id"], "check_data")
    first_absent = day - 7 * DAY
    assert "check_data failed after waiting 20 s" in text, text[-3000:]
    assert f"landing zone day={first_absent} has 0 files under {stack.landing}/day={first_absent}; is the export late?" in text
    # the stack's DeadlineAlert is 3.6 s after queueing (CTR_DEADLINE_HOURS): this waiting run missed it
    missed = receiver.wait_for("deadline_missed", timeout=60, run_id=r["dag_run_id"])
    assert missed["details"]["url"] == f"{stack.url}/dags/{la.DAG_ID}/runs/late__{day}", missed
    assert "has neither promoted nor rejected a candidate by its deadline" in missed["text"]



def _wait_ti(stack: la.LiveAirflow, run_id: str, task_id: str, states: set[str], timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while (ti := stack.task_instances(run_id).get(task_id, {})).get("state") not in states:
        assert time.monotonic() < deadline, f"{task_id} of {run_id} not in {states} within {timeout}s: {ti.get('state')}"
        stack._check_alive()
        time.sleep(1.0)
    return ti


def test_g_a_borderline_candidate_waits_for_its_approver_and_its_promotion_triggers_ctr_batch_score(live, first):
    """Day D0+1 lands; its candidate (30% of the rows) trails the champion a little: the gate hands it to `review`.
    Run 1: the admin's answer is refused (not a respondent), the reviewer rejects -> deploy skipped. Run 2 (same
    candidate): the reviewer approves -> registered with the approval in its tags, deployed, promoted; the champion
    asset event schedules ctr_batch_score, which scores the request folder with that version."""
    from ctr.data.generate import GeneratorConfig, write_day

    stack, _ = live
    d0 = _d0(first)
    day = d0 + DAY
    write_day(stack.landing, day, la.ROWS_PER_DAY, GeneratorConfig(seed=5))
    requests = stack.ctr_home / "batch" / "requests"
    requests.mkdir(parents=True, exist_ok=True)
    lines = (la.REPO / "tests" / "data" / "criteo_raw_sample_100.tsv").read_text().splitlines()
    (requests / "requests-1.tsv").write_text("\n".join(lines[:40]) + "\n")
    deadline = time.monotonic() + 60  # parsed with ctr_retrain, by the same dag-processor
    while stack.api("GET", "/api/v2/dags/ctr_batch_score", check=False).status_code == 404:
        assert time.monotonic() < deadline, "ctr_batch_score not parsed"
        time.sleep(1.0)
    assert stack.api("PATCH", "/api/v2/dags/ctr_batch_score", json={"is_paused": False}).json()["is_paused"] is False
    champion = _registry(stack).champion().version
    # any AUC drop of the weaker candidate is "small" here: max_auc_drop 1e-6, review band up to -1
    conf = {**la.LENIENT, "sample_fraction": 0.3, "max_auc_drop": 1e-6, "review_band": 1e6, "review_timeout": 600,
            "approvers": [stack.reviewer]}
    interval = (dt.datetime.combine(day, dt.time(2), dt.UTC), dt.datetime.combine(day + DAY, dt.time(2), dt.UTC))
    answers = {}
    for n, (option, comment) in enumerate((("Reject", "not this one"), ("Approve", "fresher data; the drop is noise"))):
        run_id = f"review_{n}__{day}"
        # logical dates are unique per DAG: day D at 02:01 and 02:02 (the holdout day is the logical date's day)
        logical = interval[0] + (n + 1) * dt.timedelta(minutes=1)
        same_day = [(r["dag_run_id"], r["logical_date"], r["state"]) for r in stack.runs() if r["logical_date"]
                    and _iso(r["logical_date"]).date() == day]
        assert not same_day or n == 1, f"runs for {day} before the review runs: {same_day}"
        stack.trigger(logical, interval, conf, run_id=run_id)
        _wait_ti(stack, run_id, "review", {"awaiting_input"})
        hitl = f"/api/v2/dags/{la.DAG_ID}/dagRuns/{run_id}/taskInstances/review/-1/hitlDetails"
        detail = stack.api("GET", hitl).json()
        assert detail["subject"] == f"ctr: approve the {day} candidate to replace champion v{champion}?", detail
        assert "| AUC | 0." in detail["body"] and "Report: " in detail["body"] and "max_auc_drop" in detail["body"]
        assert [u["id"] for u in detail["assigned_users"]] == [stack.reviewer] and detail["options"] == ["Approve", "Reject"]
        if n == 0:  # the pending action as the reviewer sees it in Browse -> Required Actions (a CI artifact)
            from tests.e2e.ui import required_actions_screenshot

            shot = required_actions_screenshot(stack, stack.reviewer, stack.reviewer_password, detail["subject"])
            assert shot is None or shot.stat().st_size > 10_000
        # a person never answers within a second; a scripted answer that fast can beat the scheduler's handling of
        # the deferring process's exit, and Airflow 3.3.2 then fails the resumed task ("finished with state
        # success, but the task instance's state attribute is queued")
        time.sleep(5)
        body = {"chosen_options": [option], "params_input": {"comment": comment}}
        refused = stack.api("PATCH", hitl, json=body, check=False)  # the admin is no respondent of this review
        assert refused.status_code == 403 and f"User={stack.user} (id={stack.user}) is not a respondent" in refused.text
        answers[option] = stack.api("PATCH", hitl, json=body, as_user=stack.reviewer).json()
        assert stack.wait_run(run_id, timeout=300)["state"] == "success"
        states = {k: v["state"] for k, v in stack.task_instances(run_id).items()}
        deploy = ("register", "build_image", "rollout", "verify", "promote")
        assert states["gate"] == states["review"] == "success", states
        assert {states[t] for t in deploy} == ({"skipped"} if option == "Reject" else {"success"}), states
    assert answers["Approve"]["responded_by"]["id"] == stack.reviewer
    mine = _registry(stack).find(f"ctr_retrain/{day.isoformat()}")
    assert mine is not None and _registry(stack).champion().version == mine.version != champion
    assert (mine.tags["ctr.review"], mine.tags["ctr.review_by"], mine.tags["ctr.review_comment"]) == (
        "approved", stack.reviewer, "fresher data; the drop is noise")
    # the promotion's asset event ran ctr_batch_score with the new champion
    deadline = time.monotonic() + 180
    while not (runs := stack.api("GET", "/api/v2/dags/ctr_batch_score/dagRuns").json()["dag_runs"]) \
            or runs[-1]["state"] not in la.TERMINAL:
        assert time.monotonic() < deadline, f"ctr_batch_score did not finish: {runs}"
        stack._check_alive()
        time.sleep(1.0)
    (batch,) = runs
    assert batch["state"] == "success" and batch["run_type"] == "asset_triggered", batch
    base = f"/api/v2/dags/ctr_batch_score/dagRuns/{batch['dag_run_id']}"
    # the consumer's first run lists every champion event since the asset appeared (earlier runs' too): the newest counts
    event = max(stack.api("GET", f"{base}/upstreamAssetEvents").json()["asset_events"], key=lambda e: e["timestamp"])
    assert event["uri"] == "ctr://models/ctr-lightgbm/champion" and event["source_run_id"] == f"review_1__{day}", event
    extra = event["extra"]
    assert (extra["version"], extra["logical_date"], extra["champion_changed"]) == (mine.version, day.isoformat(), True)
    assert extra["auc"] > 0.6 and extra["image"].startswith(f"ctr-scorer:{mine.version}-"), extra
    log = stack.api("GET", f"{base}/taskInstances/score/logs/1", params={"full_content": True},
                    headers={"Accept": "application/json"}).text
    assert f"score: version {mine.version} scored 40 rows of 1 file(s)" in log, log[-3000:]
    manifest = json.loads((stack.ctr_home / "batch" / "scores" / mine.version / "manifest.json").read_text())
    assert (manifest["version"], manifest["source"]["run_id"], manifest["files"][0]["rows_scored"]) == (
        mine.version, f"review_1__{day}", 40)
