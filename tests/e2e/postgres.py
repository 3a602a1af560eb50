"""A throwaway PostgreSQL server for the live-Airflow tests: Debian's binaries, initdb'd into a temporary
folder, listening on a free 127.0.0.1 port, removed on stop.

The live tests used sqlite, where `airflow backfill create` and the scheduler's writes collide
("database is locked"); a create that fails half-way leaves runs the scheduler then trips over, and
the backfill tests flaked on it. PostgreSQL is what production runs (docker-compose.yaml too).
PostgreSQL refuses to run as root, so as root (CI) the server runs as the `postgres` user that
Debian's package creates, in a folder outside pytest's root-only tmp tree.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.conftest import free_port


def pg_bin() -> Path:
    """The newest /usr/lib/postgresql/<major>/bin with initdb (`apt-get install postgresql`)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin; "
                           "`make system-deps` (as root) installs Debian's postgresql")
    return found[-1].parent


class Postgres:
    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="ctr-pg-"))
        self.proc: subprocess.Popen | None = None
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://airflow@127.0.0.1:{self.port}/airflow"

    def _run(self, *cmd: str) -> None:
        r = subprocess.run([*self._as, *cmd], capture_output=True, text=True, timeout=120, cwd=self.root)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {(r.stdout + r.stderr)[-2000:]}")

    def start(self, timeout: float = 60.0) -> Postgres:
        b = pg_bin()
        data = self.root / "data"
        self._run(str(b / "initdb"), "-D", str(data), "-U", "airflow", "--auth=trust", "-E", "UTF8", "--no-sync")
        log = open(self.root / "postgres.log", "ab")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(
            [*self._as, str(b / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(self.port),
             "-k", str(self.root), "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=200"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            r = subprocess.run([str(b / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True)
            if r.returncode == 0:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"postgres did not start on 127.0.0.1:{self.port}: {self.log_tail()}")
            time.sleep(0.2)
        self._run(str(b / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "airflow", "airflow")
        return self

    def log_tail(self, n: int = 2000) -> str:
        p = self.root / "postgres.log"
        return p.read_text(errors="replace")[-n:] if p.exists() else "(no log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)  # fast shutdown
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
