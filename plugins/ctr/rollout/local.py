"""Local rollout: one scoring service on 127.0.0.1, hot-swapped in place.

Readiness first: the new bundle (and, on rollback, the previous one) is loaded and probe-checked
in a throwaway child process through the same manifest-checking loader the service uses (a
truncated or damaged file is refused before LightGBM parses it; the child is a second line of
defence should some damage ever get past the manifest). Then the switch: the
service loads and probe-checks it again and swaps its model reference; in-flight requests finish
on the old reference (the drain), so no request fails and none is computed by a mix of versions.
A refused bundle leaves the old one serving. State (pid, URL, current and previous bundle) lives
in `serving/state.json`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from ctr.rollout.base import RolloutError, RolloutResult

log = logging.getLogger(__name__)


class LocalRollout:
    def __init__(self, state_dir: Path, host: str = "127.0.0.1", port: int = 8765, admin_token: str = "",
                 serve_token: str = "", start_timeout: float = 60.0) -> None:
        self.state_dir = state_dir
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        self.admin_token = admin_token
        self.serve_token = serve_token
        self.start_timeout = start_timeout
        self.state_path = state_dir / "state.json"

    # ---- state -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        if self.state_path.exists():
            return json.loads(self.state_path.read_text())
        return {}

    def _save(self, st: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(st, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.state_path)

    def readyz(self, timeout: float = 2.0) -> dict[str, Any] | None:
        try:
            r = httpx.get(f"{self.url}/readyz", timeout=timeout)
            return r.json() if r.status_code == 200 else None
        except httpx.HTTPError:
            return None

    # ---- actions -----------------------------------------------------------------------
    def preflight(self, bundle: Path, version: str | None, timeout: float = 120.0) -> None:
        """Load + probe-check `bundle` in a child process; it must report `version` (when known)."""
        code = "import sys; from ctr.bundle import Bundle; print(Bundle.load(sys.argv[1]).version)"
        try:
            r = subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True, errors="replace",
                               timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise RolloutError(f"pre-flight load of {bundle} took over {timeout:.0f}s; live service untouched") from None
        if r.returncode != 0:
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()] or [ln for ln in r.stdout.splitlines() if ln.strip()]
            why = (f"the loader crashed with {signal.Signals(-r.returncode).name}; LightGBM says: " if r.returncode < 0 else "") + \
                (lines[-1] if lines else "no output")
            raise RolloutError(f"bundle {bundle} failed its pre-flight load/probe check (exit {r.returncode}: {why[:300]}); "
                               f"the live service was not touched. Rebuild the bundle or re-run build_image.")
        got = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
        if version is not None and got != str(version):
            raise RolloutError(f"bundle {bundle} reports version {got!r}, expected {version!r}; was it stamped by build_image?")

    def deploy(self, bundle: Path, version: str) -> RolloutResult:
        st = self.state()
        # patient: a busy service answering late must not be mistaken for none (we would start a second one)
        live = self.readyz(timeout=10.0)
        if not (live and live.get("model_version") == str(version) and st.get("bundle") == str(bundle)):
            self.preflight(bundle, version)
        if live is None:
            self._start(bundle)
            st = self.state()  # now holds the new pid
            live = self.readyz()
            previous = None
        elif live.get("model_version") == str(version) and st.get("bundle") == str(bundle):
            log.info("rollout: %s already serves version %s; nothing to do", self.url, version)
            return RolloutResult(self.url, str(version), st.get("previous_version"), st.get("previous_bundle"), changed=False)
        else:
            previous = {"bundle": live.get("bundle"), "version": live.get("model_version")}
            self._swap(bundle)
            live = self.readyz()
        if live is None or live.get("model_version") != str(version):
            raise RolloutError(f"after rollout {self.url} reports {live and live.get('model_version')}, expected {version}")
        st.update(bundle=str(bundle), version=str(version), url=self.url,
                  previous_bundle=previous and previous["bundle"], previous_version=previous and previous["version"])
        self._save(st)
        log.info("rollout: %s now serves version %s (previous %s)", self.url, version, st["previous_version"])
        return RolloutResult(self.url, str(version), st["previous_version"], st["previous_bundle"], changed=True)

    def rollback(self, failed_version: str | None = None) -> RolloutResult | None:
        """Put the previous bundle back (stop the service if there was none).

        With `failed_version`, only if the service still serves it: if something else was deployed
        since, rolling that back would undo a model nobody found fault with.
        """
        st = self.state()
        if failed_version is not None:
            live = self.readyz(timeout=10.0)
            if live is not None and live.get("model_version") != str(failed_version):
                log.warning("rollback: %s serves version %s, not the failed %s; leaving it as it is",
                            self.url, live.get("model_version"), failed_version)
                return RolloutResult(self.url, str(live.get("model_version")), None, None, changed=False)
        prev = st.get("previous_bundle")
        if not prev:
            log.warning("rollback: no previous model recorded; stopping the service at %s", self.url)
            self.stop()
            return None
        # the same pre-flight as deploy: the previous bundle may have been damaged since it served
        self.preflight(Path(prev), st.get("previous_version"))
        self._swap(Path(prev))
        st.update(bundle=prev, version=st.get("previous_version"), previous_bundle=None, previous_version=None)
        self._save(st)
        log.warning("rollback: %s serves version %s again", self.url, st["version"])
        return RolloutResult(self.url, str(st["version"]), None, None, changed=True)

    def _swap(self, bundle: Path) -> None:
        headers = {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}
        try:
            r = httpx.post(f"{self.url}/admin/load", json={"bundle": str(bundle)}, headers=headers, timeout=120)
        except httpx.HTTPError as e:
            raise RolloutError(f"could not reach {self.url}/admin/load: {e}") from None
        if r.status_code != 200:
            raise RolloutError(f"{self.url} refused bundle {bundle}: HTTP {r.status_code} {r.text[:300]}")

    def _start(self, bundle: Path) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.state_dir / "serve.log"
        env = {**os.environ, "CTR_ADMIN_TOKEN": self.admin_token, "CTR_SERVE_TOKEN": self.serve_token}
        cmd = [sys.executable, "-m", "ctr.cli", "serve", "--model", str(bundle), "--host", self.host, "--port", str(self.port)]
        with open(log_path, "ab") as lf:
            proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True, close_fds=True)
        st = self.state()
        st["pid"] = proc.pid
        self._save(st)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").splitlines()[-5:]
                raise RolloutError(f"scoring service exited with {proc.returncode} at start: {' | '.join(tail)}")
            if self.readyz(timeout=0.5):
                log.info("rollout: started scoring service pid=%d on %s (log %s)", proc.pid, self.url, log_path)
                return
            time.sleep(0.2)
        proc.kill()
        raise RolloutError(f"scoring service did not become ready on {self.url} within {self.start_timeout:.0f}s; see {log_path}")

    def stop(self) -> bool:
        st = self.state()
        pid = st.get("pid")
        stopped = False
        if pid:
            try:
                os.kill(int(pid), signal.SIGTERM)
                for _ in range(100):
                    _reap(int(pid))
                    os.kill(int(pid), 0)
                    time.sleep(0.1)
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                stopped = True
            except PermissionError:
                pass
        for k in ("pid", "bundle", "version", "previous_bundle", "previous_version"):
            st.pop(k, None)
        self._save(st)
        return stopped


def _reap(pid: int) -> None:
    """Collect `pid` if it is our exited child (else it lingers as a zombie that still 'exists')."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: init reaps it
        return
    if done == pid:
        raise ProcessLookupError(pid)
