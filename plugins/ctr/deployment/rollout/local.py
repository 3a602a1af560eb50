"""Local rollout: one scoring service on 127.0.0.1, hot-swapped in place.

Readiness first: the new bundle (and, on rollback, the previous one) is loaded and probe-checked
in a throwaway child process through the same manifest-checking loader the service uses (a
truncated or damaged file is refused before LightGBM parses it; the child is a second line of
defence should some damage ever get past the manifest). Then the switch: the
service loads and probe-checks it again and swaps its model reference; in-flight requests finish
on the old reference (the drain), so no request fails and none is computed by a mix of versions.
A refused bundle leaves the old one serving. State (pid, URL, current and previous bundle) lives
in `serving/state.json`.

Strategies (progressive.py): `rolling` (the default) is the hot swap above. `canary` and `shadow`
load the new bundle beside the champion instead (`POST /admin/candidate`, serving/traffic.py); `verify`
then bakes it for `bake_seconds` or `bake_requests` candidate requests, whichever comes first (driving
the holdout rows through the service meanwhile, so a quiet service still has a sample), judges the
live numbers against the limits, and either promotes it (`POST /admin/promote`) or drops it
(0%, `POST /admin/drop`) and fails naming the breached limit and the numbers.
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
import pyarrow as pa

from ctr.deployment.rollout.base import Release, RolloutError, RolloutResult, verify_endpoint
from ctr.deployment.rollout.progressive import (
    Strategy,
    canary_breaches,
    canary_window,
    scrape,
    shadow_breaches,
)
from ctr.schema import FEATURE_COLUMNS

log = logging.getLogger(__name__)


class LocalRollout:
    """The `Rollout` of one local `ctr serve`: start it, hot-swap bundles, put the previous one back."""

    target = "local"

    def __init__(self, state_dir: Path, host: str = "127.0.0.1", port: int = 8765, admin_token: str = "",
                 serve_token: str = "", start_timeout: float = 60.0, strategy: Strategy | None = None) -> None:
        self.state_dir = state_dir
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        self.admin_token = admin_token
        self.serve_token = serve_token
        self.start_timeout = start_timeout
        self.state_path = state_dir / "state.json"
        self.strategy = strategy or Strategy()

    # ---- state -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        if self.state_path.exists():
            return json.loads(self.state_path.read_text())
        return {}

    def save_state(self, st: dict[str, Any]) -> None:
        """Write the rollout state (current and previous bundle/version) atomically."""
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
        code = "import sys; from ctr.model.bundle import Bundle; print(Bundle.load(sys.argv[1]).version)"
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

    def current(self) -> dict[str, Any] | None:
        """The live service's /readyz document (version, bundle, digest), or None when none answers."""
        return self.readyz(timeout=10.0)

    def verify(self, release: Release, rows: pa.Table, token: str = "") -> dict[str, Any]:
        """A canary or shadow of `release` is baked and judged first (promoted, or dropped + RolloutError)."""
        cand = self.state().get("candidate")
        bake = None
        if cand and cand.get("version") == str(release.version) and not cand.get("dropped"):
            bake = self.bake(release, rows, token or self.serve_token)
        out = verify_endpoint(self.url, release.version, Path(release.bundle), rows, token=token or self.serve_token)
        return {**out, "bake": bake} if bake is not None else out

    def deploy(self, release: Release) -> RolloutResult:
        bundle, version = Path(release.bundle), str(release.version)
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
        elif self.strategy.progressive:
            return self._load_candidate(release, live, st)
        else:
            previous = {"bundle": live.get("bundle"), "version": live.get("model_version")}
            self.swap(bundle)
            live = self.readyz()
        if live is None or live.get("model_version") != str(version):
            raise RolloutError(f"after rollout {self.url} reports {live and live.get('model_version')}, expected {version}")
        st.update(bundle=str(bundle), version=str(version), url=self.url,
                  previous_bundle=previous and previous["bundle"], previous_version=previous and previous["version"])
        self.save_state(st)
        log.info("rollout: %s now serves version %s (previous %s)", self.url, version, st["previous_version"])
        return RolloutResult(self.url, str(version), st["previous_version"], st["previous_bundle"], changed=True)

    def rollback(self, failed: Release | None = None, deployed: RolloutResult | None = None) -> RolloutResult | None:
        """Put the previous bundle back (stop the service if there was none).

        With `failed`, only if the service still serves that version: if something else was deployed
        since, rolling that back would undo a model nobody found fault with. The previous bundle is
        the one this target's state file recorded at deploy (`deployed.previous_ref` reports the same).
        """
        failed_version = failed.version if failed is not None else None
        st = self.state()
        cand = st.get("candidate")
        if cand and (failed_version is None or cand.get("version") == str(failed_version)):
            if not cand.get("dropped") and self.readyz() is not None:
                self._admin("/admin/drop")
            st.pop("candidate", None)
            self.save_state(st)
            log.warning("rollback: dropped the %s of version %s; %s serves all traffic", cand.get("mode"),
                        cand.get("version"), cand.get("champion_version"))
            return RolloutResult(self.url, str(cand.get("champion_version")), None, None, changed=True)
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
        self.swap(Path(prev))
        st.update(bundle=prev, version=st.get("previous_version"), previous_bundle=None, previous_version=None)
        self.save_state(st)
        log.warning("rollback: %s serves version %s again", self.url, st["version"])
        return RolloutResult(self.url, str(st["version"]), None, None, changed=True)

    # ---- canary / shadow ----------------------------------------------------------------------
    def _admin(self, path: str, doc: dict[str, Any] | None = None, method: str = "POST") -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}
        try:
            r = httpx.request(method, f"{self.url}{path}", json=doc if method == "POST" else None, headers=headers,
                              timeout=120)
        except httpx.HTTPError as e:
            raise RolloutError(f"could not reach {self.url}{path}: {e}") from None
        if r.status_code != 200:
            raise RolloutError(f"{self.url}{path} answered HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    def _load_candidate(self, release: Release, live: dict[str, Any], st: dict[str, Any]) -> RolloutResult:
        s, version = self.strategy, str(release.version)
        prev = {"bundle": live.get("bundle"), "version": live.get("model_version")}
        cand = st.get("candidate") or {}
        loaded = (self._admin("/admin/traffic", method="GET").get("candidate") or {})
        if not (cand.get("version") == version and loaded.get("model_version") == version):
            doc: dict[str, Any] = {"bundle": str(release.bundle), "mode": s.name, "drill": s.drill or None}
            if s.name == "canary":
                doc["canary_percent"] = s.canary_percent
            self._admin("/admin/candidate", doc)
            st["candidate"] = {"bundle": str(release.bundle), "version": version, "mode": s.name,
                               "champion_bundle": prev["bundle"], "champion_version": prev["version"]}
            self.save_state(st)
        log.info("rollout: %s runs version %s as a %s beside version %s%s (drill %s)", self.url, version, s.name,
                 prev["version"], f" at {s.canary_percent:g}%" if s.name == "canary" else "", s.drill or "none")
        return RolloutResult(self.url, version, prev["version"], prev["bundle"], changed=True)

    def bake(self, release: Release, rows: pa.Table, token: str = "") -> dict[str, Any]:
        """Watch the candidate for bake_seconds or bake_requests; promote it, or drop it and raise RolloutError."""
        s, version = self.strategy, str(release.version)
        st = self.state()
        champion = str(st["candidate"].get("champion_version"))
        records = [{k: v for k, v in r.items() if v is not None and k in FEATURE_COLUMNS} for r in rows.to_pylist()]
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        before = scrape(f"{self.url}/metrics") if s.name == "canary" else {}
        t0, i, seen = time.monotonic(), 0, 0
        with httpx.Client(base_url=self.url, headers=auth, timeout=10) as c:
            while time.monotonic() - t0 < s.bake_seconds and seen < s.bake_requests:
                # the holdout rows through the live service (~100/s): a quiet service still has a sample
                c.post("/v1/score", json={"rows": [records[i % len(records)]]},
                       headers={"X-Request-Id": f"verify-{version}-{i}"})
                i += 1
                if i % 25 == 0:
                    seen = self._candidate_requests(before, version)
                time.sleep(0.01)
        time.sleep(0.2)  # shadow scorings of the last requests finish
        waited = round(time.monotonic() - t0, 3)
        if s.name == "canary":
            after = scrape(f"{self.url}/metrics")
            cand, champ = canary_window(before, after, version, "canary"), canary_window(before, after, champion, "champion")
            breaches, numbers = canary_breaches(cand, champ, s.limits), {"candidate": cand, "champion": champ}
        else:
            summary = self._admin("/admin/traffic", method="GET")["shadow"] or {}
            breaches, numbers = shadow_breaches(summary, s.limits), {"shadow": summary}
        doc = {"strategy": s.name, "seconds": waited, "verify_requests": i, **numbers, "limits": s.to_json()["limits"]}
        if breaches:
            if s.name == "canary":
                self._admin("/admin/candidate", {"canary_percent": 0})
            self._admin("/admin/drop")
            st["candidate"]["dropped"] = True  # rollback (the verify task's) clears it
            self.save_state(st)
            log.error("rollout: %s of version %s breached after %.1fs: %s; dropped, version %s serves all traffic",
                      s.name, version, waited, "; ".join(breaches), champion)
            undone = "rolled back to 0%" if s.name == "canary" else "shadow dropped"
            raise RolloutError(f"{s.name} of version {version} breached {'; '.join(breaches)}; {undone}, "
                               f"version {champion} serves all traffic")
        self._admin("/admin/promote")
        st.update(bundle=str(release.bundle), version=version, previous_bundle=st["candidate"].get("champion_bundle"),
                  previous_version=champion)
        st.pop("candidate", None)
        self.save_state(st)
        log.info("rollout: %s of version %s within limits after %.1fs (%s); promoted to 100%%", s.name, version, waited,
                 numbers)
        return doc

    def _candidate_requests(self, before: dict[Any, Any], version: str) -> int:
        if self.strategy.name == "canary":
            return canary_window(before, scrape(f"{self.url}/metrics"), version, "canary")["requests"]
        return int((self._admin("/admin/traffic", method="GET")["shadow"] or {}).get("requests", 0))

    def swap(self, bundle: Path) -> None:
        """Ask the running service to load, probe-check and swap to `bundle` (RolloutError if refused)."""
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
        self.save_state(st)
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
        for k in ("pid", "bundle", "version", "previous_bundle", "previous_version", "candidate"):
            st.pop(k, None)
        self.save_state(st)
        return stopped


def _reap(pid: int) -> None:
    """Collect `pid` if it is our exited child (else it lingers as a zombie that still 'exists')."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: init reaps it
        return
    if done == pid:
        raise ProcessLookupError(pid)
