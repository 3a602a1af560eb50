"""Concurrent registration from two processes (a backfill), against a local sqlite registry
(file lock) and through a real MLflow tracking server on loopback (no lock: create-then-reconcile)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_http

pytestmark = pytest.mark.integration

WORKER = r'''
import json, sys, time
from pathlib import Path
from ctr.registry import Registry, LOGICAL_DATE_TAG
uri, day, bundle, go = sys.argv[1:5]
reg = Registry(uri, "ctr-race", artifact_root=Path(bundle).parent / "mlartifacts", cache_dir=Path(bundle).parent / f"cache-{day}")
reg.find("warm/up")  # imports and connections before the start line
Path(go + "." + day + ".ready").touch()
while not Path(go).exists():
    time.sleep(0.01)
key = f"ctr_retrain/{day}"
rid = reg.ensure_run(key, {"dag_id": "ctr_retrain"})
v = reg.register(Path(bundle), key, {LOGICAL_DATE_TAG: day}, {"candidate_auc": 0.78}, run_id=rid)
champ = reg.promote(v.version)
print(json.dumps({"day": day, "version": v.version, "run_id": rid, "champion": champ.version}))
'''


def _bundle(root: Path) -> Path:
    b = root / "bundle"
    b.mkdir(parents=True, exist_ok=True)
    (b / "model.txt").write_text("tree\n")
    (b / "features.json").write_text("{}")
    return b


def race(uri: str, days: list[str], tmp: Path) -> list[dict]:
    """Start one worker per day, release them together, return their JSON results."""
    bundle = _bundle(tmp)
    go = tmp / f"go-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "plugins")}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, uri, d, str(bundle), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for d in days]
    deadline = time.monotonic() + 90
    while not all(Path(f"{go}.{d}.ready").exists() for d in set(days)) and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.02)
    go.touch()
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-2000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def check_consistent(uri: str, results: list[dict], days: list[str]) -> None:
    from ctr.registry import CHAMPION_ALIAS, CHAMPION_TAG, Registry

    reg = Registry(uri, "ctr-race")
    versions = reg.search_versions("name = 'ctr-race'")
    assert sorted(v.logical_date for v in versions) == sorted(set(days))  # one version per run key
    by_day = {v.logical_date: v.version for v in versions}
    for r in results:  # every process got the surviving version and run of its key
        assert r["version"] == by_day[r["day"]]
        assert reg.find_run(f"ctr_retrain/{r['day']}") == r["run_id"]
    newest = by_day[max(days)]
    assert reg.champion().version == newest
    assert str(reg.client.get_model_version_by_alias("ctr-race", CHAMPION_ALIAS).version) == newest
    assert reg.client.get_registered_model("ctr-race").tags[CHAMPION_TAG] == newest
    assert any(r["champion"] == newest for r in results)  # the last promoter saw the newest date


# Two backfill runs for two logical dates, plus a duplicate of the newer one (the same run key twice).
DAYS = ["2026-11-19", "2026-11-20", "2026-11-20"]


def test_concurrent_registration_sqlite(tmp_path: Path) -> None:
    # a backfill of two logical dates; writers (and the fresh db's migration) serialise on the file lock
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    days = DAYS[:2]
    check_consistent(uri, race(uri, days, tmp_path), days)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
                             f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", (root / "artifacts").as_uri(),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout=120, proc=proc)
        yield url
    finally:  # the server's own session: stop it and its workers
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_concurrent_registration_through_an_mlflow_server(mlflow_server: str, tmp_path: Path) -> None:
    # no file lock here: duplicates from the same run key are reconciled to the lowest version
    check_consistent(mlflow_server, race(mlflow_server, DAYS, tmp_path), DAYS)
