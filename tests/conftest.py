"""Shared fixtures: tiny generated landing zones, staged days, a trained bundle, free ports.

Everything is generated here (never committed) and started on 127.0.0.1 with free ports.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.loopback import stop_process

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before any lightgbm import; see ctr/__init__.py
# Services the tests start inherit this environment, and `make test` exports CTR_HOME=<repo>/state: without
# this, their prediction logs (default rate 0.01) landed in the user's state/predictions and `make demo`'s
# monitor read test traffic. Tests of the log set the rate (and a CTR_HOME of their own) explicitly.
os.environ.setdefault("CTR_PREDICTION_LOG_RATE", "0")
# Nor do they compile their model's trees (CTR_PREDICTOR=auto would, on a background thread, per service):
# LightGBM's numbers, no compile's CPU in the suite. tests/unit/serving/test_compiled_predictor.py sets auto.
os.environ.setdefault("CTR_PREDICTOR", "lightgbm")

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"  # real Criteo extracts, committed with their sources (tests/data/README.md)
RAW_SAMPLE = TEST_DATA / "criteo_raw_sample_100.tsv"
CSV_SAMPLE = TEST_DATA / "criteo_deepctr_sample_200.csv"
END_DAY = dt.date(2026, 11, 20)


# Test modules that share one session-wide stack run on one pytest-xdist worker, one after the other: the
# live-Airflow UI module uses the stack test_live_airflow.py starts (tests/e2e/conftest.py).
SHARED_SCOPES = {"tests/e2e/test_live_airflow_ui.py": "tests/e2e/test_live_airflow.py"}


def pytest_xdist_make_scheduler(config: pytest.Config, log):  # log: xdist's Producer
    """`make test` runs pytest on two pytest-xdist workers with `--dist loadfile`: each test module is one
    unit of work, so its module-scoped servers, clusters and trained models start once, on one worker, and
    its tests run in file order; the modules in SHARED_SCOPES join the unit of the module they name."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ModuleScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return SHARED_SCOPES.get(path, path)

    return ModuleScheduling(config, log)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_landing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 days x 6,000 generated rows ending END_DAY (holdout END_DAY, train the 7 before)."""
    from ctr.data.generate import GeneratorConfig, generate

    root = tmp_path_factory.mktemp("landing")
    generate(root, 8, 6000, END_DAY, GeneratorConfig(seed=7))
    return root


@pytest.fixture(scope="session")
def staged(tiny_landing: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ctr.data.landing import daterange, stage_day

    staging = tmp_path_factory.mktemp("staging")
    q = tmp_path_factory.mktemp("quarantine")
    for d in daterange(END_DAY - dt.timedelta(days=7), END_DAY):
        stage_day(str(tiny_landing), staging, q, d)
    return staging


@pytest.fixture(scope="session")
def trained_bundle(staged: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ctr.training.trainer import TrainConfig, train

    out = tmp_path_factory.mktemp("bundle") / "model"
    train(staged, out, TrainConfig(start=END_DAY - dt.timedelta(days=7), end=END_DAY - dt.timedelta(days=1), rounds=60))
    return out


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@contextmanager
def serving(bundle: Path, log_dir: Path, **env: str) -> Iterator[str]:
    """`ctr serve BUNDLE` on a free loopback port with `env` over the environment (tokens off unless given);
    yields its base URL once /healthz answers; stopped afterwards."""
    port = free_port()
    full = {**os.environ, "CTR_SERVE_TOKEN": "", "CTR_ADMIN_TOKEN": "", **env}
    log = open(log_dir / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "ctr.cli", "serve", "--model", str(bundle),
                             "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=full)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc=proc)
        yield url
    finally:
        stop_process(proc)
        log.close()


@pytest.fixture
def scoring_server(trained_bundle: Path, tmp_path: Path) -> Iterator[str]:
    """`ctr serve` on a free loopback port, stopped afterwards; yields its base URL."""
    with serving(trained_bundle, tmp_path) as url:
        yield url
