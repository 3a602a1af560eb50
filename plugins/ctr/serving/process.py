"""Start `ctr serve` as a child process on a free loopback port and stop it (tests, benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """`with ServiceProcess(bundle, env={...}) as svc: svc.url ...`; SIGTERM on exit, SIGKILL if stuck."""

    def __init__(self, bundle: str | Path, env: dict[str, str] | None = None, log_path: Path | None = None,
                 start_timeout: float = 90.0) -> None:
        self.bundle = Path(bundle)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "CTR_SERVE_TOKEN": "", "CTR_ADMIN_TOKEN": "", **(env or {})}
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ctr.cli", "serve", "--model", str(self.bundle), "--host", "127.0.0.1",
             "--port", str(self.port)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env)
        if self.log_path:
            out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ctr serve exited with {self.proc.returncode} before answering; log: {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1.0) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"ctr serve on {self.url} not ready within {self.start_timeout:.0f}s; log: {self.log_path}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL after `timeout`; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
