"""Operator alerts: an Airflow notifier that POSTs a JSON message to a webhook taken from a connection.

Events: `task_failed` (a task's on_failure_callback), `gate_rejected` (the gate task, on a rejected
candidate), `rollback` (verify rolled the live service back), `review_requested` (a borderline candidate
waits for a person in task review), `deadline_missed` (the DAG's DeadlineAlert: a run neither promoted
nor rejected in time) and `monitor_drift` (the monitor task: the live model's traffic crossed a drift
threshold, or the monitor itself could not run). The webhook is the HTTP connection
`ctr_alerts` (override with CTR_ALERTS_CONN_ID); without that connection every notification is a
logged no-op, so a laptop or a test installation needs no webhook. The connection is read by
`ctr.airflow.hooks.WebhookHook`; this module only builds and posts the message.

Connection forms (e.g. `AIRFLOW_CONN_CTR_ALERTS`):
  JSON  {"conn_type": "http", "host": "hooks.example.com", "schema": "https", "port": 443,
         "password": "<bearer token, optional>", "extra": {"endpoint": "/services/T0/B0/xyz",
         "headers": {"X-Team": "ml"}}}
  URI   http://127.0.0.1:9000/alerts  (the path becomes the endpoint)
  host holding a full URL (Slack/Teams style): {"conn_type": "http", "host": "https://hooks.slack.com/services/..."}
The body is {"text": ..., "event": ..., "dag_id", "run_id", "task_id", "logical_date", "details": {...}};
`text` makes it readable as-is by Slack- and Teams-style incoming webhooks. Secrets (password,
headers, the URL's path when it carries a token) are never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseNotifier

from ctr.airflow.hooks import DEFAULT_ALERTS_CONN_ID, WebhookHook, alerts_conn_id, webhook_url

__all__ = ["DEFAULT_CONN_ID", "EVENTS", "WebhookNotifier", "alerts_conn_id", "on_task_failure", "send", "webhook_url"]

log = logging.getLogger("ctr.airflow.notify")

DEFAULT_CONN_ID = DEFAULT_ALERTS_CONN_ID
EVENTS = ("task_failed", "gate_rejected", "rollback", "review_requested", "deadline_missed", "monitor_drift")


def _field(context: Any, name: str) -> Any:
    try:
        return context.get(name) if hasattr(context, "get") else None
    except Exception:  # a Context whose lazy field is unavailable outside a task
        return None


class WebhookNotifier(BaseNotifier):
    """Send one event to the `ctr_alerts` webhook. Usable as a callback or called from a task."""

    template_fields: Sequence[str] = ("message",)

    def __init__(self, event: str, message: str = "", details: dict[str, Any] | None = None,
                 conn_id: str | None = None, timeout: float = 10.0, raise_on_error: bool = False) -> None:
        super().__init__()
        if event not in EVENTS:
            raise ValueError(f"unknown notification event {event!r}; use one of {EVENTS}")
        self.event = event
        self.message = message
        self.details = details or {}
        self.conn_id = conn_id
        self.timeout = timeout
        self.raise_on_error = raise_on_error

    def payload(self, context: Any) -> dict[str, Any]:
        ti = _field(context, "ti") or _field(context, "task_instance")
        dag = _field(context, "dag")
        dag_id = getattr(dag, "dag_id", None) or getattr(ti, "dag_id", None)
        task_id = getattr(ti, "task_id", None)
        run_id = _field(context, "run_id") or getattr(ti, "run_id", None)
        logical = _field(context, "logical_date")
        details = dict(self.details)
        if self.event == "task_failed":
            exc = _field(context, "exception")
            if exc is not None:
                details.setdefault("error", f"{type(exc).__name__}: {exc}"[:1000])
            details.setdefault("try_number", getattr(ti, "try_number", None))
        text = self.message or f"ctr: {self.event} in {dag_id}.{task_id} (run {run_id})"
        return {"text": text, "event": self.event, "dag_id": dag_id, "task_id": task_id, "run_id": run_id,
                "logical_date": logical.isoformat() if hasattr(logical, "isoformat") else logical, "details": details}

    def notify(self, context: Any) -> None:
        from airflow.sdk.exceptions import AirflowNotFoundException

        hook = WebhookHook(self.conn_id)
        conn_id = hook.conn_id
        try:
            conn = hook.get_conn()
        except AirflowNotFoundException:
            log.info("notify: event=%s not sent: no connection %r (add it to enable alerts)", self.event, conn_id)
            return
        body = self.payload(context)
        try:
            import httpx

            url, headers = hook.endpoint(conn)
            r = httpx.post(url, json=body, headers=headers, timeout=self.timeout)
            r.raise_for_status()
        except Exception as e:  # an alert must not turn a good run into a failed one
            # name the connection, not its URL (a webhook URL often is a secret)
            msg = f"notify: event={self.event} via connection {conn_id!r} failed: {type(e).__name__}"
            status = getattr(getattr(e, "response", None), "status_code", None)
            log.error("%s%s; check the connection's host/endpoint and that the receiver is up", msg,
                      f" (HTTP {status})" if status else "")
            if self.raise_on_error:
                raise
            return
        log.info("notify: event=%s sent via connection %r dag=%s run=%s task=%s", self.event, conn_id,
                 body["dag_id"], body["run_id"], body["task_id"])


def send(context: Any, event: str, message: str, **details: Any) -> None:
    """Send an event from inside a task (never raises: alerts are best effort)."""
    try:
        WebhookNotifier(event, message=message, details=details).notify(context)
    except Exception as e:
        log.error("notify: event=%s could not be sent: %s", event, e)


async def deadline_missed(context: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """The DAG's DeadlineAlert callback (an AsyncCallback: runs in the triggerer): post `deadline_missed` with the
    run's link. `context` is what Airflow hands a deadline callback: {"dag_run": {...}, "deadline": {...}}."""
    import asyncio
    from types import SimpleNamespace

    run = (context or {}).get("dag_run") or {}
    deadline = (context or {}).get("deadline") or {}
    dag_id, run_id = run.get("dag_id"), run.get("dag_run_id") or run.get("run_id")
    link = run_link(dag_id, run_id)
    message = (f"ctr: {dag_id} run {run_id} has neither promoted nor rejected a candidate by its deadline "
               f"{deadline.get('deadline_time')} (state {run.get('state')}): {link}")
    ctx = {"dag": SimpleNamespace(dag_id=dag_id), "run_id": run_id, "logical_date": run.get("logical_date")}
    notifier = WebhookNotifier("deadline_missed", message=message,
                               details={"url": link, "deadline": str(deadline.get("deadline_time")), "state": run.get("state"),
                                        "data_interval_end": run.get("data_interval_end"), **kwargs})
    await asyncio.to_thread(notifier.notify, ctx)  # the connection lookup and the POST are blocking


def deadline(hours: float) -> Any:
    """The DAG's DeadlineAlert: `deadline_missed` when a run is still unfinished `hours` after it was queued.

    None inside `airflow dags test` (make demo, the `dags test` e2e tests): Airflow 3.3.2's in-process run
    looks the DAG's deadline alerts up as database rows, which only the dag-processor writes, and fails the
    run (`'dict' object has no attribute 'hex'`); a run in the foreground needs no deadline anyway."""
    import sys
    from datetime import timedelta

    from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference

    if sys.argv[1:3] == ["dags", "test"]:
        return None
    return DeadlineAlert(reference=DeadlineReference.DAGRUN_QUEUED_AT, interval=timedelta(hours=hours),
                         callback=AsyncCallback(deadline_missed), name="ctr_promote_or_reject")


def run_link(dag_id: str | None, run_id: str | None) -> str:
    """The run's page in the Airflow UI ([api] base_url)."""
    from urllib.parse import quote

    try:
        from airflow.configuration import conf

        base = (conf.get("api", "base_url", fallback="") or "").rstrip("/")
    except Exception:  # no Airflow configuration: a relative link
        base = ""
    return f"{base}/dags/{quote(str(dag_id))}/runs/{quote(str(run_id))}"


def on_task_failure() -> WebhookNotifier:
    """The on_failure_callback for every task of the DAG."""
    return WebhookNotifier("task_failed")
