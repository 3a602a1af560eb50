"""A local Databricks workspace speaking the Jobs API 2.1/2.2 wire format, for contract tests.

Endpoints (JSON in, JSON out, `Authorization: Bearer <token>` required):
  POST /api/2.{1,2}/jobs/runs/submit      {run_name, idempotency_token?, new_cluster|existing_cluster_id,
                                            libraries?, spark_python_task{python_file, parameters}} -> {run_id}
  GET  /api/2.{1,2}/jobs/runs/get         ?run_id -> run (state, tasks[], run_page_url, job_id, ...)
  GET  /api/2.{1,2}/jobs/runs/get-output  ?run_id=<task run id> -> {metadata, error?, error_trace?, logs?}
  POST /api/2.{1,2}/jobs/runs/cancel      {run_id} -> {}
  POST /api/2.0/workspace/mkdirs | import, GET /api/2.0/workspace/get-status
Life cycle: PENDING -> RUNNING -> TERMINATED (SUCCESS | FAILED | CANCELED); INTERNAL_ERROR when the
"cluster" cannot start the task (python_file or a library missing, a Maven library it cannot
resolve, a runtime whose Spark line is not the local pyspark's). A submitted spark_python_task
really runs: `python <python_file> <parameters>` with local pyspark, the shipped wheel first on
PYTHONPATH (so the job imports ctr from the wheel it was given), in its own process group. Maven
libraries resolve against the jars `make jars` fetched from Maven Central (the "cluster's" Maven
cache): the run's Spark gets them only when the request names them, as a real cluster would.
Errors follow the API: {"error_code": "...", "message": "..."} with 400/401/404.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Run:
    run_id: int
    task_run_id: int
    job_id: int
    request: dict[str, Any]
    life_cycle_state: str = "PENDING"
    result_state: str | None = None
    state_message: str = "Waiting for cluster"
    start_time: int = field(default_factory=lambda: int(time.time() * 1000))
    end_time: int = 0
    proc: subprocess.Popen | None = None
    error: str | None = None
    error_trace: str | None = None
    logs: str = ""
    cancel_requested: bool = False


class FakeDatabricks:
    def __init__(self, root: Path, token: str = "dapi-test-token", env: dict[str, str] | None = None,
                 start_delay: float = 0.5) -> None:
        self.root = Path(root)
        self.workspace = self.root / "workspace"
        self.logs_dir = self.root / "logs"
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.env = env or {}
        self.start_delay = start_delay
        self.runs: dict[int, Run] = {}
        self.by_token: dict[str, int] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) log
        self.lock = threading.Lock()
        self._next = 1000
        self.httpd: ThreadingHTTPServer | None = None
        self.port = 0

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> FakeDatabricks:
        handler = _handler(self)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        for r in list(self.runs.values()):
            if r.proc and r.proc.poll() is None:
                _kill_group(r.proc)
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def local_path(self, workspace_path: str) -> Path:
        p = workspace_path.removeprefix("/Workspace")
        return self.workspace / p.lstrip("/")

    # ---- API ------------------------------------------------------------------------------
    def submit(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        token = body.get("idempotency_token")
        if token is not None and len(token) > 64:
            return 400, _err("INVALID_PARAMETER_VALUE", "idempotency_token must be at most 64 characters")
        task = body.get("spark_python_task")
        if not isinstance(task, dict) or not task.get("python_file"):
            return 400, _err("INVALID_PARAMETER_VALUE", "this workspace runs spark_python_task with a python_file")
        if ("new_cluster" in body) == ("existing_cluster_id" in body):
            return 400, _err("INVALID_PARAMETER_VALUE", "exactly one of new_cluster or existing_cluster_id is required")
        nc = body.get("new_cluster") or {}
        if "new_cluster" in body:
            if not nc.get("spark_version"):
                return 400, _err("INVALID_PARAMETER_VALUE", "new_cluster.spark_version is required")
            if "num_workers" not in nc and "autoscale" not in nc:
                return 400, _err("INVALID_PARAMETER_VALUE", "new_cluster needs num_workers or autoscale")
            if "libraries" in nc:
                return 400, _err("INVALID_PARAMETER_VALUE", "Unknown field new_cluster.libraries; libraries go on the task")
        for lib in body.get("libraries", []):
            if not isinstance(lib, dict) or len(lib) != 1 or next(iter(lib)) not in ("whl", "jar", "pypi", "maven", "requirements"):
                return 400, _err("INVALID_PARAMETER_VALUE", f"invalid library {lib!r}")
        with self.lock:
            if token and token in self.by_token:  # the documented idempotency: same token, same run
                return 200, {"run_id": self.by_token[token]}
            run_id, self._next = self._next, self._next + 2
            run = Run(run_id=run_id, task_run_id=run_id + 1, job_id=run_id * 10, request=body)
            self.runs[run_id] = run
            if token:
                self.by_token[token] = run_id
        threading.Thread(target=self._execute, args=(run,), daemon=True).start()
        return 200, {"run_id": run_id}

    def _execute(self, run: Run) -> None:
        time.sleep(self.start_delay)  # "cluster start": the run is observable as PENDING
        task = run.request["spark_python_task"]
        py = self.local_path(task["python_file"])
        wheels = [self.local_path(lib["whl"]) for lib in run.request.get("libraries", []) if "whl" in lib]
        missing = [str(p) for p in [py, *wheels] if not p.is_file()]
        with self.lock:
            if run.cancel_requested:
                return
            if missing:
                self._finish(run, "INTERNAL_ERROR", None, f"Run failed to start: file(s) not found in workspace: {missing}")
                return
            for w in wheels:
                if not zipfile.is_zipfile(w):
                    self._finish(run, "INTERNAL_ERROR", None, f"Library installation failed: {w.name} is not a wheel")
                    return
            problem, jars_dir = self._cluster_libraries(run.request)
            if problem:
                self._finish(run, "INTERNAL_ERROR", None, problem)
                return
            env = {**os.environ, **self.env, "PYTHONPATH": os.pathsep.join(str(w) for w in wheels),
                   "PYTHONUNBUFFERED": "1", "CTR_SPARK_JARS_DIR": str(jars_dir)}
            log_path = self.logs_dir / f"run-{run.run_id}.log"
            log = open(log_path, "wb")  # noqa: SIM115
            run.proc = subprocess.Popen([sys.executable, str(py), *task.get("parameters", [])], stdout=log,
                                        stderr=subprocess.STDOUT, env=env, cwd=self.root, start_new_session=True)
            run.life_cycle_state, run.state_message = "RUNNING", "In run"
        code = run.proc.wait()
        log.close()
        text = log_path.read_text(errors="replace")
        with self.lock:
            run.logs = text[-20000:]
            if run.cancel_requested:
                self._finish(run, "TERMINATED", "CANCELED", "Run cancelled.")
            elif code == 0:
                self._finish(run, "TERMINATED", "SUCCESS", "")
            else:
                lines = [ln for ln in text.splitlines() if ln.strip()]
                run.error = lines[-1] if lines else f"exit code {code}"
                run.error_trace = "\n".join(lines[-40:])
                self._finish(run, "TERMINATED", "FAILED", "Workload failed, see run output for details")

    def _cluster_libraries(self, body: dict[str, Any]) -> tuple[str | None, Path]:
        """(problem, jars folder for the run's Spark): the runtime must run the local pyspark's Spark line,
        and every Maven library must resolve from the local Maven cache (.venv/share/ctr/jars)."""
        import pyspark
        from ctr.training.synapseml import jars_dir

        runtime = (body.get("new_cluster") or {}).get("spark_version", "")
        spark = RUNTIME_SPARK.get(runtime.split(".x-")[0])
        if spark and spark[:3] != pyspark.__version__[:3]:
            return (f"Cluster could not start: runtime {runtime} runs Spark {spark}; this workspace's Spark is "
                    f"pyspark {pyspark.__version__}"), Path()
        coords = [lib["maven"] for lib in body.get("libraries", []) if "maven" in lib]
        if not coords:
            empty = self.root / "no-maven-libraries"
            empty.mkdir(exist_ok=True)
            return None, empty
        cache = jars_dir(self.env)
        for m in coords:
            group, artifact, version = (m.get("coordinates", "") + "::").split(":")[:3]
            if m.get("repo") or not (cache / f"{artifact}-{version}.jar").is_file():
                return (f"Library installation failed for library due to user error for maven {m.get('coordinates')!r}: "
                        f"not resolvable from Maven Central (checked {cache})"), Path()
        return None, cache

    def _finish(self, run: Run, life: str, result: str | None, message: str) -> None:
        run.life_cycle_state, run.result_state, run.state_message = life, result, message
        run.end_time = int(time.time() * 1000)

    def cancel(self, run_id: int) -> tuple[int, dict[str, Any]]:
        with self.lock:
            run = self.runs.get(run_id)
            if run is None:
                return 404, _err("RESOURCE_DOES_NOT_EXIST", f"Run {run_id} does not exist.")
            if run.life_cycle_state in ("TERMINATED", "INTERNAL_ERROR", "SKIPPED"):
                return 200, {}
            run.cancel_requested = True
            run.life_cycle_state, run.state_message = "TERMINATING", "Run cancellation requested"
            proc = run.proc
            if proc is None:
                self._finish(run, "TERMINATED", "CANCELED", "Run cancelled.")
        if proc is not None:
            _kill_group(proc)
        return 200, {}

    def _state(self, run: Run) -> dict[str, Any]:
        st: dict[str, Any] = {"life_cycle_state": run.life_cycle_state, "state_message": run.state_message,
                              "user_cancelled_or_timedout": run.result_state == "CANCELED"}
        if run.result_state:
            st["result_state"] = run.result_state
        return st

    def get(self, run_id: int) -> tuple[int, dict[str, Any]]:
        with self.lock:
            run = self.runs.get(run_id)
            if run is None:
                return 404, _err("RESOURCE_DOES_NOT_EXIST", f"Run {run_id} does not exist.")
            body = run.request
            task_key = body.get("run_name", "task").replace(" ", "_")
            return 200, {
                "job_id": run.job_id, "run_id": run.run_id, "number_in_job": run.run_id,
                "creator_user_name": "airflow@example.com", "run_name": body.get("run_name"),
                "run_type": "SUBMIT_RUN", "format": "MULTI_TASK", "state": self._state(run),
                "start_time": run.start_time, "end_time": run.end_time, "setup_duration": 0,
                "execution_duration": 0, "cleanup_duration": 0,
                "run_page_url": f"{self.url}/?o=0#job/{run.job_id}/run/{run.run_id}",
                "tasks": [{"run_id": run.task_run_id, "task_key": task_key, "state": self._state(run),
                           "spark_python_task": body["spark_python_task"], "libraries": body.get("libraries", []),
                           "new_cluster": body.get("new_cluster"), "attempt_number": 0,
                           "start_time": run.start_time, "end_time": run.end_time}],
            }

    def get_output(self, run_id: int) -> tuple[int, dict[str, Any]]:
        with self.lock:
            if run_id in self.runs:
                return 400, _err("INVALID_PARAMETER_VALUE", "Retrieving the output of runs with multiple tasks is not "
                                 "supported. Please retrieve the output of each individual task run instead.")
            run = next((r for r in self.runs.values() if r.task_run_id == run_id), None)
            if run is None:
                return 404, _err("RESOURCE_DOES_NOT_EXIST", f"Run {run_id} does not exist.")
            out: dict[str, Any] = {"metadata": {"run_id": run.task_run_id, "job_id": run.job_id,
                                                "state": self._state(run)}}
            if run.error:
                out["error"], out["error_trace"] = run.error, run.error_trace
            if run.life_cycle_state == "TERMINATED":
                out["logs"], out["logs_truncated"] = run.logs[-5000:], len(run.logs) > 5000
            return 200, out

    # workspace
    def ws_import(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        import base64

        path = body.get("path", "")
        if not path.startswith("/"):
            return 400, _err("INVALID_PARAMETER_VALUE", f"Path ({path}) must be absolute")
        target = self.local_path(path)
        if target.exists() and not body.get("overwrite"):
            return 400, _err("RESOURCE_ALREADY_EXISTS", f"{path} already exists")
        if not target.parent.is_dir():
            return 404, _err("RESOURCE_DOES_NOT_EXIST", f"The parent folder ({Path(path).parent}) does not exist.")
        target.write_bytes(base64.b64decode(body.get("content", "")))
        return 200, {}

    def ws_mkdirs(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.local_path(body["path"]).mkdir(parents=True, exist_ok=True)
        return 200, {}

    def ws_status(self, path: str) -> tuple[int, dict[str, Any]]:
        p = self.local_path(path)
        if not p.exists():
            return 404, _err("RESOURCE_DOES_NOT_EXIST", f"Path ({path}) doesn't exist.")
        return 200, {"path": path, "object_type": "DIRECTORY" if p.is_dir() else "FILE", "object_id": p.stat().st_ino}


# Databricks runtime -> Apache Spark version (release notes)
RUNTIME_SPARK = {"15.4": "3.5.0", "16.4": "3.5.2", "17.3": "4.0.0"}


def _err(code: str, message: str) -> dict[str, Any]:
    return {"error_code": code, "message": message}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _handler(api: FakeDatabricks):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            if self.headers.get("Authorization") != f"Bearer {api.token}":
                self._reply(401, _err("UNAUTHENTICATED", "Invalid access token."))
                return False
            return True

        def _route(self, method: str) -> None:
            u = urlsplit(self.path)
            api.requests.append((method, u.path))
            if not self._authorised():
                return
            q = {k: v[0] for k, v in parse_qs(u.query).items()}
            body: dict[str, Any] = {}
            n = int(self.headers.get("Content-Length") or 0)
            if n:  # POST bodies, and GET bodies too: the provider's async hook sends GET parameters as JSON
                try:
                    body = json.loads(self.rfile.read(n) or b"{}")
                except json.JSONDecodeError:
                    return self._reply(400, _err("MALFORMED_REQUEST", "Invalid JSON given in the body of the request"))
            if method == "GET":
                q = {**{k: str(v) for k, v in body.items()}, **q}
            path = u.path
            for v in ("2.1", "2.2"):
                path = path.replace(f"/api/{v}/jobs/", "/jobs/")
            try:
                if method == "POST" and path == "/jobs/runs/submit":
                    return self._reply(*api.submit(body))
                if method == "GET" and path == "/jobs/runs/get":
                    return self._reply(*api.get(int(q["run_id"])))
                if method == "GET" and path == "/jobs/runs/get-output":
                    return self._reply(*api.get_output(int(q["run_id"])))
                if method == "POST" and path == "/jobs/runs/cancel":
                    return self._reply(*api.cancel(int(body["run_id"])))
                if method == "POST" and path == "/api/2.0/workspace/import":
                    return self._reply(*api.ws_import(body))
                if method == "POST" and path == "/api/2.0/workspace/mkdirs":
                    return self._reply(*api.ws_mkdirs(body))
                if method == "GET" and path == "/api/2.0/workspace/get-status":
                    return self._reply(*api.ws_status(q["path"]))
            except (KeyError, ValueError) as e:
                return self._reply(400, _err("INVALID_PARAMETER_VALUE", f"missing or invalid parameter: {e}"))
            self._reply(404, _err("ENDPOINT_NOT_FOUND", f"No API found for '{method} {u.path}'"))

        def do_GET(self) -> None:  # noqa: N802
            self._route("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._route("POST")

    return Handler
