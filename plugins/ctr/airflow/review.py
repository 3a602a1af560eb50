"""Human approval of a borderline candidate: when to ask, what to show, and the `review` task (the standard
provider's HITL `ApprovalOperator`).

Borderline means the gate's only failed rule is `max_auc_drop` with the lower 95% CI bound of the AUC
difference in [-review_band x max_auc_drop, -max_auc_drop) (param `review_band`, default 2), or the gate
passed with warnings (a `warnings` list in the gate decision, e.g. a drift warning). The gate task then
lets the run go on to `review` instead of rejecting; every other outcome is decided without a person:
a clear pass goes straight through `review` (it returns at once), a clear failure is skipped by the gate.

`review` waits in Airflow's `awaiting_input` state (no worker slot, no triggerer) for Approve or Reject from
one of the `approvers` (param; empty = anyone allowed to answer Required Actions); anyone else is refused
by the API (403). Its subject names the day and the versions, its body carries the metrics table and the
report's link. Reject, or no answer within `review_timeout` seconds (the default option Reject is then
taken by the scheduler), skips register and every deploy task, exactly as a gate rejection does. On
Approve, register writes the approver and comment to the version's tags (`ctr.review*`).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Param

log = logging.getLogger("ctr.dag")

REVIEW_TASK_ID = "review"


def borderline(gate: dict[str, Any], doc: dict[str, Any], params: dict[str, Any]) -> str | None:
    """Why this gate decision needs a person (None: it does not; the gate's answer stands)."""
    band = float(params.get("review_band", 2))
    failed = [c for c in gate.get("checks", []) if not c["ok"]]
    if gate.get("forced") or band <= 1:  # review_band 1: nobody is ever asked (a warning stays a logged warning)
        return None
    if gate["passed"]:
        warnings = gate.get("warnings") or []
        return ("gate passed with warnings: " + "; ".join(map(str, warnings))) if warnings else None
    if [c["rule"] for c in failed] != ["max_auc_drop"]:
        return None
    drop = float((gate.get("config") or {}).get("max_auc_drop", params.get("max_auc_drop", 0.005)))
    low = float(doc["auc_diff"]["ci_low"])
    if -band * drop <= low < -drop:
        return (f"only max_auc_drop failed, and by little: lower 95% CI bound {low:+.4f} is within the review band "
                f"[{-band * drop:+.4f}, {-drop:+.4f}) (review_band {band:g} x max_auc_drop {drop:g})")
    return None


def request(day: str, doc: dict[str, Any], evaluated: dict[str, Any], why: str, params: dict[str, Any]) -> dict[str, Any]:
    """The review request the gate task hands to `review` (XCom): subject, body, timeout, approvers."""
    c, b, d = doc["candidate"], doc.get("baseline") or {}, doc.get("auc_diff") or {}
    champion = evaluated.get("champion_version")
    subject = f"ctr: approve the {day} candidate to replace champion v{champion}?" if champion else \
        f"ctr: approve the {day} candidate (no champion yet)?"
    rows = [("AUC", "auc", "{:.4f}"), ("logloss", "logloss", "{:.4f}"), ("ECE", "ece", "{:.4f}"),
            ("mean prediction", "mean_pred", "{:.4f}"), ("click rate", "ctr", "{:.4f}")]
    table = ["| metric | candidate | champion |", "|---|---|---|"]
    table += [f"| {label} | {fmt.format(c[k])} | {fmt.format(b[k]) if k in b else '-'} |" for label, k, fmt in rows]
    if d:
        table.append(f"| AUC diff (95% CI) | {d['estimate']:+.4f} ({d['ci_low']:+.4f}..{d['ci_high']:+.4f}) | |")
    gate = doc["gate"]
    link = evaluated.get("mlflow_run_url")
    body = "\n".join([
        f"Holdout day **{day}**: candidate (run {evaluated.get('mlflow_run_id')}) vs champion "
        f"{'v' + str(champion) if champion else '(none)'}.", "", f"Why you are asked: {why}.", "", *table, "",
        "Gate: " + "; ".join(gate["reasons"]), "",
        f"Report: {evaluated['report']}" + (f" ([MLflow run]({link}), artifact evaluation/report.html)" if link else ""),
        "", "Approve deploys the candidate (your name and comment go to the registry version's tags); Reject, or no "
        f"answer within {int(params.get('review_timeout', 0))} s, keeps the champion."])
    approvers = [str(u) for u in (params.get("approvers") or []) if str(u).strip()]
    return {"needed": True, "why": why, "subject": subject, "body": body,
            "timeout_s": int(params.get("review_timeout", 4 * 3600)), "approvers": approvers}


class CandidateReviewOperator(ApprovalOperator):
    """`review`: asks a person (Approve / Reject) only when the gate handed it a review request."""

    template_fields = ()  # subject and body come from the gate's XCom at run time

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("params", None)  # the DAG's params arrive here too; the review form asks for a comment only
        super().__init__(subject="ctr: candidate review", defaults=self.REJECT,
                         params={"comment": Param("", type="string", description="why (goes to the version's tags)")},
                         **kwargs)

    def execute(self, context: Any) -> Any:
        decision = context["ti"].xcom_pull(task_ids="gate", key="decision") or {}
        req = decision.get("review") or {}
        if not req.get("needed"):
            log.info("review: not needed (gate %s); no human asked", "passed" if decision.get("passed") else "?")
            return {"reviewed": False, "approved": True}
        self.subject, self.body = req["subject"], req["body"]
        self.response_timeout = timedelta(seconds=int(req["timeout_s"])) if int(req["timeout_s"]) > 0 else None
        self.assigned_users = [{"id": u, "name": u} for u in req["approvers"]] or None
        log.info("review: asking %s (timeout %s s): %s", ", ".join(req["approvers"]) or "any user allowed to respond",
                 req["timeout_s"], req["why"])
        from ctr.airflow import notify

        notify.send(context, "review_requested", f"ctr: {req['subject']} ({req['why']})", why=req["why"],
                    approvers=req["approvers"], timeout_s=req["timeout_s"])
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        ret = super().execute_complete(context=context, event=event)  # Reject (or the timeout's default) skips register
        approved = ret["chosen_options"] == [self.APPROVE]
        user = ret.get("responded_by_user") or {}
        out = {"reviewed": True, "approved": approved, "timed_out": bool(event.get("timedout")),
               "by": user.get("name") or user.get("id"), "by_id": user.get("id"),
               "comment": (ret.get("params_input") or {}).get("comment") or "",
               "at": ret["responded_at"].isoformat() if hasattr(ret["responded_at"], "isoformat") else ret["responded_at"]}
        if out["timed_out"]:
            log.warning("review: no answer within the timeout: rejected (champion unchanged)")
        else:
            log.info("review: %s by %s: %s", "APPROVED" if approved else "REJECTED", out["by"], out["comment"] or "(no comment)")
        return out


def review_tags(review: dict[str, Any] | None) -> dict[str, str]:
    """The registry version's tags for an approved review (none when no person was asked)."""
    if not review or not review.get("reviewed"):
        return {}
    return {"ctr.review": "approved" if review["approved"] else "rejected", "ctr.review_by": str(review.get("by") or ""),
            "ctr.review_comment": str(review.get("comment") or ""), "ctr.review_at": str(review.get("at") or "")}
