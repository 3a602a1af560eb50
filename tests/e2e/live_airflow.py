"""A real, running Airflow 3 for tests: api-server, scheduler, dag-processor and triggerer as subprocesses.

Each component runs in its own process group on 127.0.0.1 (free ports), against a PostgreSQL metadata DB
of its own (tests/e2e/postgres.py: initdb'd, started and removed with the stack), in a tmp AIRFLOW_HOME, with the LocalExecutor at parallelism 1, this repo's dags/ and plugins/, and
SimpleAuthManager with one admin user whose password we write ourselves. `stop()` kills every
process group (and the scoring service a rollout started), also after a failed start.

Also here: `WebhookReceiver`, a loopback HTTP server that records the JSON bodies POSTed to it
(the target of the `ctr_alerts` notifier connection in tests).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import REPO, free_port
from tests.e2e.airflow_env import BIN, isolated_env
from tests.e2e.postgres import Postgres
from tests.loopback import LoopbackServer

log = logging.getLogger("tests.live_airflow")
DAG_ID = "ctr_retrain"
COMPONENTS = {
    "dag-processor": ["dag-processor"],
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
}
TERMINAL = {"success", "failed"}


class WebhookReceiver(LoopbackServer):
    """Records every JSON POST on http://127.0.0.1:<port>/<path>; answers `status` (default 200)."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.received: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    doc = json.loads(body or b"{}")
                except ValueError:
                    doc = {"_raw": body.decode("utf-8", "replace")}
                with receiver._cond:
                    receiver.received.append({"path": self.path, "headers": dict(self.headers), "json": doc})
                    receiver._cond.notify_all()
                self.send_response(receiver.status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("receiver: " + fmt, *args)

        self._serve(Handler)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        with self._cond:
            return [r["json"] for r in self.received if kind is None or r["json"].get("event") == kind]

    def wait_for(self, kind: str, timeout: float = 30.0, **match: Any) -> dict[str, Any]:
        """The first event of `kind` whose fields equal `match`; waits on a condition, not a fixed sleep."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for r in self.received:
                    j = r["json"]
                    if j.get("event") == kind and all(j.get(k) == v for k, v in match.items()):
                        return j
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {kind!r} event matching {match} within {timeout}s; got {self.events()}")
                self._cond.wait(left)


@dataclass
class LiveAirflow:
    root: Path
    landing: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    api_port: int = field(default_factory=free_port)
    serve_port: int = field(default_factory=free_port)
    user: str = "admin"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12), repr=False)
    reviewer: str = "reviewer"  # a second user (role "user"): the respondent of the review task's approvals
    reviewer_password: str = field(default_factory=lambda: secrets.token_urlsafe(12), repr=False)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    db: Postgres | None = None
    _tokens: dict[str, str] = field(default_factory=dict, repr=False)

    # ---- configuration --------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def airflow_home(self) -> Path:
        return self.root / "airflow"

    @property
    def ctr_home(self) -> Path:
        return self.root / "ctr"

    @property
    def logs(self) -> Path:
        return self.root / "component-logs"

    def env(self) -> dict[str, str]:
        jwt = getattr(self, "_jwt", None) or secrets.token_urlsafe(32)
        self._jwt = jwt
        env = isolated_env(self.airflow_home, self.ctr_home, self.landing, self.serve_port)
        env.update(
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=self.db.url if self.db else "",
            AIRFLOW__CORE__EXECUTOR="LocalExecutor",
            AIRFLOW__CORE__PARALLELISM="1",
            AIRFLOW__CORE__AUTH_MANAGER="airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=f"{self.user}:admin,{self.reviewer}:user",
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(self.root / "passwords.json"),
            AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{self.url}/execution/",
            AIRFLOW__API__HOST="127.0.0.1",
            AIRFLOW__API__PORT=str(self.api_port),
            AIRFLOW__API__BASE_URL=self.url,
            AIRFLOW__API__WORKERS="1",
            AIRFLOW__API__SECRET_KEY=jwt,
            AIRFLOW__API_AUTH__JWT_SECRET=jwt,
            AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="10",
            AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL="30",
            CTR_SERVE_TOKEN="",
            CTR_ADMIN_TOKEN="",
        )
        env.update(self.extra_env)
        return env

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> LiveAirflow:
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        (self.root / "passwords.json").write_text(json.dumps({self.user: self.password,
                                                              self.reviewer: self.reviewer_password}) + "\n")
        try:
            self.db = Postgres().start()
            self._env = self.env()
            self.cli("db", "migrate")
            self._spawn("api-server", ["api-server", "--host", "127.0.0.1", "--port", str(self.api_port), "--workers", "1"])
            for name, args in COMPONENTS.items():
                self._spawn(name, args)
            self._wait(f"{self.url}/api/v2/monitor/health", timeout)
            self._wait_dag_parsed(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, args: list[str]) -> None:
        out = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        self.procs[name] = subprocess.Popen([str(BIN / "airflow"), *args], env=self._env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)
        out.close()

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"airflow {name} exited with {p.returncode}; log tail:\n{self.tail(name)}")

    def tail(self, name: str, n: int = 4000) -> str:
        p = self.logs / f"{name}.log"
        return p.read_text(errors="replace")[-n:] if p.exists() else "(no log)"

    def _wait(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{url} did not answer 200 within {timeout}s; api-server log:\n{self.tail('api-server')}")

    def _wait_dag_parsed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            r = self.api("GET", f"/api/v2/dags/{DAG_ID}", check=False)
            if r.status_code == 200:
                return
            time.sleep(0.5)
        raise TimeoutError(f"dag {DAG_ID} not parsed within {timeout}s; dag-processor log:\n{self.tail('dag-processor')}")

    def stop(self) -> None:
        for p in list(self.procs.values()):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for name, p in list(self.procs.items()):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("airflow %s ignored SIGTERM for 15s; killing its process group", name)
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        self.procs.clear()
        if self.db is not None:
            self.db.stop()
            self.db = None
        from ctr.deployment.rollout.local import LocalRollout

        LocalRollout(self.ctr_home / "serving", "127.0.0.1", self.serve_port).stop()

    # ---- clients --------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([str(BIN / "airflow"), *args], env=self._env, text=True, capture_output=True,
                           timeout=timeout, cwd=self.root)
        with open(self.logs / "cli.log", "a") as fh:
            fh.write(f"$ airflow {' '.join(args)}\n{r.stdout}\n{r.stderr}\n")
        if check and r.returncode != 0:
            raise AssertionError(f"airflow {' '.join(args)} exited {r.returncode}:\n{(r.stdout + r.stderr)[-3000:]}")
        return r

    def backfills(self) -> list[dict[str, Any]]:
        return self.api("GET", "/api/v2/backfills", params={"dag_id": DAG_ID, "limit": 100}).json()["backfills"]

    def backfill(self, *args: str) -> dict[str, Any]:
        """`airflow backfill create --dag-id ctr_retrain <args>`; waits for the backfill to complete.

        (On sqlite, `backfill create` could fail half-way with "database is locked" when the scheduler
        wrote between its read and its write, leaving runs behind that the scheduler then crashed on;
        on this stack's PostgreSQL it cannot, so a failure here is a real one.)"""
        seen = {b["id"] for b in self.backfills()}
        self.cli("backfill", "create", "--dag-id", DAG_ID, *args)
        created = [b for b in self.backfills() if b["id"] not in seen]
        assert len(created) == 1, f"backfill create made {len(created)} backfills: {created}"
        return self.wait_backfill(created[0]["id"])

    def token(self, user: str | None = None) -> str:
        user = user or self.user
        if user not in self._tokens:
            password = self.password if user == self.user else self.reviewer_password
            r = httpx.post(f"{self.url}/auth/token", json={"username": user, "password": password}, timeout=30)
            assert r.status_code == 201, f"/auth/token answered {r.status_code}: {r.text[:300]}"
            self._tokens[user] = r.json()["access_token"]
        return self._tokens[user]

    def api(self, method: str, path: str, check: bool = True, as_user: str | None = None, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token(as_user)}", **kw.pop("headers", {})}
        r = httpx.request(method, f"{self.url}{path}", headers=headers, timeout=30, **kw)
        if check and r.status_code >= 400:
            raise AssertionError(f"{method} {path} answered {r.status_code}: {r.text[:500]}")
        return r

    # ---- DAG helpers ----------------------------------------------------------------------
    def unpause(self) -> None:
        r = self.api("PATCH", f"/api/v2/dags/{DAG_ID}", json={"is_paused": False})
        assert r.json()["is_paused"] is False

    def dag(self) -> dict[str, Any]:
        return self.api("GET", f"/api/v2/dags/{DAG_ID}").json()

    def wait_dag(self, ready: Any, timeout: float = 120.0) -> dict[str, Any]:
        """GET the DAG until `ready(dag)` holds: waits on the scheduler's loop, not on the schedule."""
        deadline = time.monotonic() + timeout
        while True:
            d = self.dag()
            if ready(d) or time.monotonic() > deadline:
                return d
            time.sleep(1.0)

    def runs(self) -> list[dict[str, Any]]:
        r = self.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns", params={"order_by": "logical_date", "limit": 100})
        return r.json()["dag_runs"]

    def run(self, run_id: str) -> dict[str, Any]:
        return self.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}").json()

    def task_instances(self, run_id: str) -> dict[str, dict[str, Any]]:
        r = self.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
        return {ti["task_id"]: ti for ti in r.json()["task_instances"]}

    def xcom(self, run_id: str, task_id: str, key: str = "return_value") -> Any:
        r = self.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}",
                     params={"deserialize": True}, check=False)
        if r.status_code == 404:
            return None
        assert r.status_code == 200, f"xcom {task_id}/{key} of {run_id}: {r.status_code} {r.text[:300]}"
        value = r.json()["value"]
        return json.loads(value) if isinstance(value, str) and value[:1] in "{[" else value

    def trigger(self, logical: dt.datetime, interval: tuple[dt.datetime, dt.datetime] | None = None,
                conf: dict[str, Any] | None = None, run_id: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"logical_date": logical.isoformat(), "conf": conf or {}}
        if interval:
            body.update(data_interval_start=interval[0].isoformat(), data_interval_end=interval[1].isoformat())
        if run_id:
            body["dag_run_id"] = run_id
        return self.api("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", json=body).json()

    def wait_run(self, run_id: str, timeout: float = 600.0) -> dict[str, Any]:
        """Poll the run's state until it is terminal (event-driven by the scheduler; no schedule sleeping)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            run = self.run(run_id)
            if run["state"] in TERMINAL:
                return run
            time.sleep(1.0)
        raise TimeoutError(f"run {run_id} not finished within {timeout}s (state {run['state']}); "
                           f"tasks: { {k: v['state'] for k, v in self.task_instances(run_id).items()} }\n"
                           f"scheduler log:\n{self.tail('scheduler')}")

    def wait_backfill(self, backfill_id: int, timeout: float = 900.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            b = self.api("GET", f"/api/v2/backfills/{backfill_id}").json()
            if b.get("completed_at"):
                return b
            time.sleep(1.0)
        raise TimeoutError(f"backfill {backfill_id} not completed within {timeout}s; scheduler log:\n{self.tail('scheduler')}")

    def task_log(self, run_id: str, task_id: str, try_number: int = 1) -> str:
        r = self.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
                     params={"full_content": True}, headers={"Accept": "application/json"})
        return r.text  # the JSON document of the log's records (3.3 answers 406 to text/plain)


# ---- one shared stack per pytest session ----------------------------------------------------
_SHARED: dict[str, Any] = {}


def shared_stack(tmp_path_factory: Any, make_landing: Any) -> tuple[LiveAirflow, WebhookReceiver]:
    """Start (once per session) a receiver and a live Airflow whose `ctr_alerts` connection points at it."""
    if "stack" not in _SHARED:
        receiver = WebhookReceiver().__enter__()
        root = tmp_path_factory.mktemp("live-airflow")
        landing = make_landing(root / "landing")
        conn = json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": receiver.port, "schema": "http",
                           "extra": {"endpoint": "/hooks/ctr"}})
        # CTR_DEADLINE_HOURS: a 3.6 s DeadlineAlert, so a run that waits (test_f's late day) misses it for real
        stack = LiveAirflow(root, landing, extra_env={"AIRFLOW_CONN_CTR_ALERTS": conn, "CTR_DEADLINE_HOURS": "0.001"})
        try:
            stack.start()
        except BaseException:
            receiver.__exit__(None, None, None)
            raise
        _SHARED.update(stack=stack, receiver=receiver)
    return _SHARED["stack"], _SHARED["receiver"]


def stop_shared() -> None:
    """Stop the shared stack and receiver, if running (and forget its API run: a new stack makes its own)."""
    stack, receiver = _SHARED.pop("stack", None), _SHARED.pop("receiver", None)
    _SHARED.pop("api_run", None)
    try:
        if stack is not None:
            stack.stop()
    finally:
        if receiver is not None:
            receiver.__exit__(None, None, None)


# ---- the DAG's own timetable, and the run every live test builds on -------------------------
# Tiny data: a lower AUC floor and no relative rules, so every run passes the gate deterministically
# (the gate's own rules are tested in tests/unit/test_gate.py; the rejection path below forces min_auc up).
LENIENT = {"min_auc": 0.6, "max_auc_drop": 1.0, "max_logloss_rise": 1.0, "max_ece": 0.5, "verify_rows": 50}
ROWS_PER_DAY = 3000
HISTORY_DAYS = 13  # first scheduled holdout day D0 and D0-12 .. D0-1 (backfills and drills need D-7 .. D)


def core_timetable() -> tuple[Any, Any]:
    """(dag, core timetable) of dags/ctr_retrain.py, parsed in this process."""
    import runpy

    from airflow.serialization.encoders import coerce_to_core_timetable

    dag = runpy.run_path(str(REPO / "dags" / "ctr_retrain.py"))["dag"]
    return dag, coerce_to_core_timetable(dag.timetable)


def first_scheduled_info() -> Any:
    """What the scheduler will run first for a new, unpaused ctr_retrain (catchup off): from the timetable."""
    from airflow.timetables.base import TimeRestriction

    dag, tt = core_timetable()
    return tt.next_dagrun_info(last_automated_data_interval=None,
                               restriction=TimeRestriction(dag.start_date, None, dag.catchup))


def make_landing(root: Path) -> Path:
    from ctr.data.generate import GeneratorConfig, generate

    d0 = first_scheduled_info().data_interval.start.date()
    generate(root, HISTORY_DAYS, ROWS_PER_DAY, d0, GeneratorConfig(seed=5))
    return root


def api_run(stack: LiveAirflow) -> dict[str, Any]:
    """Once per session: trigger the first scheduled interval through POST /api/v2/.../dagRuns, unpause, wait.

    Triggering exactly the interval the timetable schedules next means the scheduler, once the DAG is
    unpaused, finds that run already there and moves on to the following interval instead of
    starting a second run for the same day. Records the DAG as the API showed it before unpausing.
    """
    if "api_run" not in _SHARED:
        info = first_scheduled_info()
        before = stack.dag()
        created = stack.trigger(info.data_interval.start, (info.data_interval.start, info.data_interval.end), LENIENT,
                                run_id=f"api__{info.data_interval.start.date().isoformat()}")
        stack.unpause()
        run = stack.wait_run(created["dag_run_id"])
        _SHARED["api_run"] = {"info": info, "dag_before": before, "created": created, "run": run}
    return _SHARED["api_run"]
