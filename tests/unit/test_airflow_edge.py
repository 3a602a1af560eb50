"""Only `ctr.airflow` imports Airflow: every other module imports in a process where `import airflow` raises.

The scoring image and the Spark/Databricks job run the package without Airflow installed, so the
edge is proven, not described: a meta-path finder refuses `airflow` and `airflow.*`, then each
module of the package is imported on its own, and the test names every module that reached for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO

PROBE = r"""
import importlib, importlib.abc, json, pkgutil, sys

class BlockAirflow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "airflow" or name.startswith("airflow."):
            raise ImportError(f"airflow is blocked here (wanted {name})")
        return None

sys.meta_path.insert(0, BlockAirflow())
import ctr

names = sorted(m.name for m in pkgutil.walk_packages(ctr.__path__, "ctr."))
out = {"imported": [], "failed": {}}
for name in names:
    edge = name == "ctr.airflow" or name.startswith("ctr.airflow.")
    try:
        importlib.import_module(name)
        out["imported"].append(name)
    except ImportError as e:
        out["failed"][name] = str(e)
    if not edge:
        # a later module must not look clean only because an earlier one cached a failure
        for m in [m for m in sys.modules if m == "airflow" or m.startswith("airflow.")]:
            out["failed"].setdefault(name, f"left {m} in sys.modules")
print(json.dumps(out))
"""


def _probe() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), str(REPO)])}
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_only_the_airflow_subpackage_imports_airflow() -> None:
    out = _probe()
    outside = {n: why for n, why in out["failed"].items() if not (n == "ctr.airflow" or n.startswith("ctr.airflow."))}
    assert not outside, "modules outside ctr.airflow import Airflow: " + "; ".join(f"{n} ({w})" for n, w in outside.items())
    # the probe really blocks: the edge itself cannot import, and the rest of the package did
    assert "ctr.airflow.notify" in out["failed"] and "ctr.airflow.links" in out["failed"]
    for stage in ("ctr.training.trainer", "ctr.training.spark_job", "ctr.model.bundle", "ctr.serving.app",
                  "ctr.deployment.rollout.aks", "ctr.validation.gate", "ctr.data.landing", "ctr.cli"):
        assert stage in out["imported"], stage
