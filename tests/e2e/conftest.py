"""Whole-DAG runs with `airflow dags test` in subprocesses, each installation in its own tmp dirs."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.e2e.airflow_env import BIN, isolated_env


@dataclass
class AirflowInstall:
    """An isolated Airflow home + CTR home: a real sqlite metadata DB, this repo's DAGs and plugins."""

    root: Path
    landing: Path
    serve_port: int = field(default_factory=free_port)

    @property
    def ctr_home(self) -> Path:
        return self.root / "ctr"

    @property
    def env(self) -> dict[str, str]:
        return isolated_env(self.root / "airflow", self.ctr_home, self.landing, self.serve_port)

    def airflow(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([str(BIN / "airflow"), *args], env=self.env, text=True, capture_output=True, timeout=timeout)
        log = self.root / "airflow-cli.log"
        with open(log, "a") as fh:
            fh.write(f"$ airflow {' '.join(args)}\n{r.stdout}\n{r.stderr}\n")
        if check and r.returncode != 0:
            raise AssertionError(f"airflow {' '.join(args)} exited {r.returncode}; tail:\n{(r.stdout + r.stderr)[-3000:]}")
        return r

    def dags_test(self, day: str, conf: dict | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        args = ["dags", "test", "ctr_retrain", day]
        if conf:
            args += ["--conf", json.dumps(conf)]
        return self.airflow(*args, check=check)

    def metrics(self, day: str) -> dict:
        return json.loads((self.ctr_home / "runs" / "ctr_retrain" / day / "metrics.json").read_text())

    def stop_service(self) -> None:
        from ctr.deployment.rollout.local import LocalRollout

        LocalRollout(self.ctr_home / "serving", "127.0.0.1", self.serve_port).stop()


@pytest.fixture(scope="session")
def migrated_airflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sqlite metadata DB migrated by `airflow db migrate` (the schema of the Airflow installed), copied
    into each installation below: every install starts from the same fresh, real schema without paying
    the migration (about 4 s on a quiet machine) again."""
    template = AirflowInstall(tmp_path_factory.mktemp("airflow-db-template"), tmp_path_factory.mktemp("no-landing"))
    template.airflow("db", "migrate")
    return template.root / "airflow" / "airflow.db"


@pytest.fixture(scope="module")
def airflow_install(tmp_path_factory: pytest.TempPathFactory, migrated_airflow_db: Path):
    """Factory fixture: make_install(landing) -> a migrated AirflowInstall; services stopped at the end."""
    made: list[AirflowInstall] = []

    def make(landing: Path) -> AirflowInstall:
        inst = AirflowInstall(tmp_path_factory.mktemp("install"), landing)
        (inst.root / "airflow").mkdir(parents=True)
        shutil.copyfile(migrated_airflow_db, inst.root / "airflow" / "airflow.db")
        made.append(inst)
        return inst

    yield make
    for inst in made:
        inst.stop_service()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory):
    """(stack, webhook receiver): the one live Airflow stack both live modules share (they run one after the
    other); it is stopped after the last test that uses it (below), not at the end of the session."""
    from tests.e2e import live_airflow as la

    return la.shared_stack(tmp_path_factory, la.make_landing)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """The shared live Airflow stack (live_airflow.shared_stack: api-server, scheduler, dag-processor,
    triggerer, PostgreSQL) stops as soon as the next test does not use it, instead of running (and taking
    CPU) beside the rest of the suite until the session ends; a later test that needs it starts a new one."""
    if "live" in item.fixturenames and (nextitem is None or "live" not in nextitem.fixturenames):
        from tests.e2e import live_airflow as la

        la.stop_shared()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Whatever happened (an interrupted run), no live stack outlives the session."""
    from tests.e2e import live_airflow as la

    la.stop_shared()
