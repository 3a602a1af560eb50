"""A Spark standalone cluster on 127.0.0.1 from pyspark's own distribution: one master, N workers.

The way to run the Spark job on more executors without a Databricks workspace, and what the
integration tests and `benchmarks/synapseml.py` start: `spark-class ...deploy.master.Master` and
`...deploy.worker.Worker` from the installed pyspark (SPARK_HOME), on free loopback ports, each
worker with its own cores/memory and work dir under a temporary folder. `spark-class` execs the
JVM, so the pid we hold is the JVM's and stopping it stops the daemon.

    with LocalCluster(workers=2) as c:
        spark = spark_session(master=c.master_url, conf=c.session_conf())
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Self


class ClusterError(RuntimeError):
    """The standalone cluster did not come up (names the daemon and the tail of its log)."""


def spark_home() -> Path:
    """The installed pyspark folder, which carries bin/spark-class and jars/."""
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCluster:
    """Master + `workers` workers (each `cores` cores, `memory`) on 127.0.0.1; stopped on exit."""

    def __init__(self, workers: int = 2, cores: int = 1, memory: str = "1g", start_timeout: float = 90.0) -> None:
        self.workers, self.cores, self.memory, self.start_timeout = workers, cores, memory, start_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="ctr-spark-cluster-"))
        self.port, self.webui_port = free_port(), free_port()
        self.master_url = f"spark://127.0.0.1:{self.port}"
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []

    def _env(self) -> dict[str, str]:
        env = {**os.environ, "SPARK_HOME": str(spark_home()), "SPARK_LOCAL_IP": "127.0.0.1",
               "SPARK_LOG_DIR": str(self.dir / "logs"), "SPARK_NO_DAEMONIZE": "1",
               # executors' Python workers run this interpreter (the one with ctr and pyarrow)
               "PYSPARK_PYTHON": sys.executable}
        env.pop("SPARK_CONF_DIR", None)
        return env

    def _start(self, name: str, cls: str, *args: str) -> None:
        log = self.dir / f"{name}.log"
        fh = open(log, "wb")  # noqa: SIM115 - the child keeps writing after we return
        cmd = [str(spark_home() / "bin" / "spark-class"), cls, *args]
        self.procs.append((name, subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self._env(),
                                                  cwd=self.dir, start_new_session=True), log))
        fh.close()

    def state(self) -> dict:
        """The master's JSON status (workers, applications), as its web UI serves it."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.webui_port}/json/", timeout=2) as r:
            return json.loads(r.read())

    def alive_workers(self) -> int:
        return sum(1 for w in self.state().get("workers", []) if w.get("state") == "ALIVE")

    def start(self) -> Self:
        self._start("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(self.port),
                    "--webui-port", str(self.webui_port))
        for i in range(self.workers):
            work = self.dir / f"worker-{i}"
            work.mkdir()
            self._start(f"worker-{i}", "org.apache.spark.deploy.worker.Worker", self.master_url, "--host", "127.0.0.1",
                        "--cores", str(self.cores), "--memory", self.memory, "--webui-port", str(free_port()),
                        "--work-dir", str(work))
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            for name, p, log in self.procs:
                if p.poll() is not None:
                    self.stop()
                    raise ClusterError(f"spark {name} exited with {p.returncode}: {_tail(log)}")
            try:
                if self.alive_workers() == self.workers:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        tails = "; ".join(f"{n}: {_tail(log)}" for n, _, log in self.procs)
        self.stop()
        raise ClusterError(f"spark standalone cluster at {self.master_url} did not get {self.workers} workers "
                           f"within {self.start_timeout:.0f}s: {tails}")

    def session_conf(self) -> dict[str, str]:
        """Spark conf for an application that uses every worker: one executor per worker, no autoscaling."""
        return {"spark.executor.cores": str(self.cores), "spark.cores.max": str(self.cores * self.workers),
                "spark.executor.memory": "768m" if self.memory == "1g" else self.memory,
                "spark.dynamicAllocation.enabled": "false", "spark.pyspark.python": sys.executable,
                "spark.sql.shuffle.partitions": str(2 * self.cores * self.workers), "spark.ui.enabled": "false",
                "spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1"}

    def executor_logs(self) -> str:
        """Every executor's stdout+stderr so far (LightGBM's native log lines land there)."""
        out = []
        for p in sorted(self.dir.glob("worker-*/app-*/*/std*")):
            out.append(f"==> {p.relative_to(self.dir)}\n{p.read_text(errors='replace')}")
        return "\n".join(out)

    def executor_pids(self) -> list[int]:
        """Pids of the executor JVMs running in this cluster's work dirs (their cwd is worker-N/app-*/id)."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cwd = (proc / "cwd").resolve()
                args = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if cwd.is_relative_to(self.dir.resolve()) and b"CoarseGrainedExecutorBackend" in args:
                pids.append(int(proc.name))
        return sorted(pids)

    def kill_executor(self) -> int:
        """SIGKILL one running executor JVM of this cluster, for failure drills; returns its pid."""
        pids = self.executor_pids()
        if not pids:
            raise ClusterError(f"no executor of {self.master_url} is running")
        os.kill(pids[0], signal.SIGKILL)
        return pids[0]

    def stop(self) -> None:
        for _, p, _ in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for _, p, _ in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _tail(log: Path, n: int = 600) -> str:
    try:
        return log.read_text(errors="replace")[-n:].strip().replace("\n", " | ")
    except OSError:
        return "(no log)"
