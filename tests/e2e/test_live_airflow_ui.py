"""The Airflow UI as a person uses it: headless Chromium signs in, opens ctr_retrain, reads the gate decision.

Debian's `chromium` (make system-deps) driven by Playwright through its executable path; Playwright
never downloads a browser here. The screenshot is kept under test-artifacts/ (git-ignored, CI artifact).
Shares the session's live Airflow (tests/e2e/live_airflow.py) and its REST-triggered run.
"""

from __future__ import annotations

import pytest

from tests.e2e import live_airflow as la
from tests.e2e import ui

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]
CHROMIUM, ARTIFACTS = ui.CHROMIUM, ui.ARTIFACTS


@pytest.fixture
def browser_page():
    if not ui.have_chromium():
        pytest.skip(f"{CHROMIUM} missing: `make system-deps` (as root) installs Debian's chromium")
    with ui.chromium_page() as page:
        yield page


def test_ui_sign_in_and_gate_decision(live, browser_page):
    stack, _ = live
    run = la.api_run(stack)["run"]
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        _check_ui(stack, browser_page, run["dag_run_id"])
    except BaseException:
        browser_page.screenshot(path=str(ARTIFACTS / "airflow-ui-failure.png"), full_page=True)
        raise


def _check_ui(stack: la.LiveAirflow, page, run_id: str) -> None:
    decision = stack.xcom(run_id, "gate", "decision")
    verdict = "gate: PASSED" if decision["passed"] else "gate: REJECTED"

    # 1. sign in through the SimpleAuthManager login form
    page.goto(f"{stack.url}/dags/{la.DAG_ID}")
    page.wait_for_url("**/auth/login**")
    page.locator("input[name=username]").fill(stack.user)
    page.locator("input[name=password]").fill(stack.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"**/dags/{la.DAG_ID}**")

    # 2. the DAG page, and its runs list showing the last run
    page.get_by_text(la.DAG_ID).first.wait_for()
    page.goto(f"{stack.url}/dags/{la.DAG_ID}/runs")
    page.get_by_text(run_id).first.wait_for()

    # 3. the gate task of that run: its `decision` XCom
    page.goto(f"{stack.url}/dags/{la.DAG_ID}/runs/{run_id}/tasks/gate/xcom")
    page.get_by_text("decision", exact=True).first.wait_for()
    page.get_by_role("button", name="Expand all extra JSON").click()  # JSON values start folded
    page.get_by_text(decision["reasons"][0]).first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "airflow-ui-ctr_retrain-gate-xcom.png"), full_page=True)
    body = page.locator("body").inner_text()
    assert "passed" in body and str(decision["passed"]).lower() in body.lower(), body[:2000]

    # 4. and the gate's log says the same
    page.goto(f"{stack.url}/dags/{la.DAG_ID}/runs/{run_id}/tasks/gate")
    page.get_by_text(verdict).first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "airflow-ui-ctr_retrain-gate.png"), full_page=True)
