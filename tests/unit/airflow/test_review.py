"""Human review of a borderline candidate: which gate decisions ask a person, what the request says, and how the
`review` task turns an answer (or the timeout's default) into its XCom and the version's tags. The REST round trip
and the refused non-respondent run on the live stack (tests/e2e/test_live_airflow.py)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from ctr.airflow import review
from ctr.validation.gate import GateConfig, decide

DAY = "2026-11-20"


def _metrics(ci_low: float, auc: float = 0.76, logloss: float = 0.47) -> dict:
    return {"candidate": {"auc": auc, "logloss": logloss, "ece": 0.01, "mean_pred": 0.25, "ctr": 0.25},
            "baseline": {"auc": 0.765, "logloss": 0.47, "ece": 0.01, "mean_pred": 0.25, "ctr": 0.25},
            "auc_diff": {"estimate": ci_low + 0.002, "ci_low": ci_low, "ci_high": ci_low + 0.004, "method": "delong"}}


def _gate(doc: dict, **params) -> dict:
    return decide(doc, GateConfig.from_params(params))


@pytest.mark.parametrize(("ci_low", "band", "asks"), [
    (-0.004, 2, False),   # a clear pass
    (-0.006, 2, True),    # just past max_auc_drop 0.005: inside the band [-0.010, -0.005)
    (-0.0099, 2, True),
    (-0.0101, 2, False),  # a clear failure
    (-0.012, 3, True),    # a wider band
    (-0.006, 1, False),   # review_band 1: never ask
])
def test_only_a_small_auc_drop_asks_a_person(ci_low: float, band: float, asks: bool) -> None:
    doc = _metrics(ci_low)
    why = review.borderline(_gate(doc), doc, {"review_band": band, "max_auc_drop": 0.005})
    assert (why is not None) == asks, why
    if asks:
        assert f"lower 95% CI bound {ci_low:+.4f}" in why and f"{-band * 0.005:+.4f}" in why


def test_a_second_failed_rule_or_force_deploy_never_asks() -> None:
    doc = _metrics(-0.006, logloss=0.48)  # logloss rise 0.01 > 0.005 too
    assert [c["rule"] for c in _gate(doc)["checks"] if not c["ok"]] == ["max_auc_drop", "max_logloss_rise"]
    assert review.borderline(_gate(doc), doc, {}) is None
    doc = _metrics(-0.006)
    assert review.borderline(_gate(doc, force_deploy=True), doc, {}) is None
    passed = {**_gate(_metrics(0.0)), "warnings": ["PSI of C9 0.31 > 0.2"]}  # a drift warning on a passing gate asks
    assert review.borderline(passed, _metrics(0.0), {}) == "gate passed with warnings: PSI of C9 0.31 > 0.2"
    assert review.borderline(passed, _metrics(0.0), {"review_band": 1}) is None  # 1 = never ask (make demo)


def test_the_request_names_day_versions_metrics_and_report() -> None:
    doc = {**_metrics(-0.006), "gate": _gate(_metrics(-0.006))}
    evaluated = {"champion_version": "7", "mlflow_run_id": "abc", "report": "/runs/2026-11-20/report/report.html",
                 "mlflow_run_url": "http://mlflow/#/experiments/1/runs/abc"}
    req = review.request(DAY, doc, evaluated, "why", {"review_timeout": 60, "approvers": ["alice", " "]})
    assert req["subject"] == "ctr: approve the 2026-11-20 candidate to replace champion v7?"
    assert "| AUC | 0.7600 | 0.7650 |" in req["body"] and "| AUC diff (95% CI) | -0.0040 (-0.0060..-0.0020) | |" in req["body"]
    assert "Report: /runs/2026-11-20/report/report.html ([MLflow run](http://mlflow/#/experiments/1/runs/abc)" in req["body"]
    assert "max_auc_drop: AUC diff" in req["body"] and "within 60 s" in req["body"]
    assert (req["timeout_s"], req["approvers"]) == (60, ["alice"])


class _TI:
    def __init__(self, xcoms: dict | None = None) -> None:
        self.xcoms, self.pushed = xcoms or {}, {}
        self.id = "00000000-0000-0000-0000-000000000001"

    def xcom_pull(self, task_ids: str, key: str = "return_value"):
        return self.xcoms.get((task_ids, key))

    def xcom_push(self, key: str, value) -> None:
        self.pushed[key] = value


def test_the_gate_hands_a_borderline_candidate_to_review_instead_of_rejecting(tmp_path: Path, monkeypatch) -> None:
    from ctr.airflow import tasks

    monkeypatch.setenv("CTR_HOME", str(tmp_path))
    sent = []
    monkeypatch.setattr("ctr.airflow.notify.send", lambda *a, **k: sent.append(a[1]))
    for ci_low, expect, event in ((-0.006, True, []), (-0.02, False, ["gate_rejected"])):
        sent.clear()
        doc = {**_metrics(ci_low), "gate": _gate(_metrics(ci_low))}
        (tmp_path / "metrics.json").write_text(json.dumps(doc))
        ti = _TI()
        ctx = {"ti": ti, "params": {"review_band": 2, "review_timeout": 30}, "dag": SimpleNamespace(dag_id="ctr_retrain"),
               "logical_date": dt.datetime(2026, 11, 20, 2, tzinfo=dt.UTC)}
        evaluated = {"gate": doc["gate"], "metrics_path": str(tmp_path / "metrics.json"), "champion_version": "3",
                     "report": "r.html"}
        assert tasks.gate(ctx, evaluated) is expect
        req = ti.pushed["decision"]["review"]
        assert (req is not None) == expect and ti.pushed["decision"]["passed"] is False and sent == event
        if expect:
            assert req["timeout_s"] == 30 and "champion v3" in req["subject"]


def test_review_passes_a_clear_decision_through_and_reads_answers() -> None:
    op = review.CandidateReviewOperator(task_id="review")
    assert (op.options, op.defaults, list(op.params.keys())) == (["Approve", "Reject"], ["Reject"], ["comment"])
    ti = _TI({("gate", "decision"): {"passed": True, "review": None}})
    assert op.execute({"ti": ti}) == {"reviewed": False, "approved": True}  # no person asked, nothing written
    at = dt.datetime(2026, 11, 21, 9, tzinfo=dt.UTC)
    ctx = {"ti": ti, "task": op}
    ok = op.execute_complete(ctx, {"chosen_options": ["Approve"], "params_input": {"comment": "small drop, fresher data"},
                                   "responded_at": at, "responded_by_user": {"id": "alice", "name": "alice"}})
    assert ok == {"reviewed": True, "approved": True, "timed_out": False, "by": "alice", "by_id": "alice",
                  "comment": "small drop, fresher data", "at": at.isoformat()}
    assert review.review_tags(ok) == {"ctr.review": "approved", "ctr.review_by": "alice",
                                      "ctr.review_comment": "small drop, fresher data", "ctr.review_at": at.isoformat()}
    late = op.execute_complete(ctx, {"chosen_options": ["Reject"], "params_input": {"comment": ""}, "responded_at": at,
                                     "responded_by_user": None, "timedout": True})
    assert (late["approved"], late["timed_out"], late["by"]) == (False, True, None)
    assert review.review_tags({"reviewed": False, "approved": True}) == {}
