"""SynapseML's LightGBM for real: local Spark, a two-worker standalone cluster, and its failure modes.

* `ctr train --engine synapseml` on local[2] against `--engine lightgbm` on the same days: the
  same features.json byte for byte, holdout AUC within 0.003, `ctr score` of the bundle equal to
  `lightgbm.Booster(model_str=<saveNativeModel text>)` on the same rows, while LightGBM's default
  listen port is held by another process;
* the same job on a standalone master + two workers from pyspark's own distribution (one core
  each): two LightGBM workers join one ring (both executors' logs say so), same AUC tolerance;
* an executor killed mid-training fails the job within seconds, naming the lost executor;
* missing jars: one error line naming the Maven coordinates, before Spark starts; an empty day
  fails before SynapseML starts its network.

The jars come from `make jars` (jobs/synapseml/pom.xml); the tests fail, not skip, without them.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import END_DAY

pytestmark = pytest.mark.integration

HOLDOUT = END_DAY
START, END = END_DAY - dt.timedelta(days=3), END_DAY - dt.timedelta(days=1)
AUC_TOLERANCE = 0.003
# Two LightGBM workers each build the bins of their share of the features from their own half of
# the rows (LightGBM's distributed dataset construction), so the model is not the serial one, and
# which half lands on which worker varies between runs. On these 36k training rows the two-worker
# model scored +0.0046 and +0.0068 holdout AUC over --engine lightgbm (rarer categories fall into
# the shared bin, which regularises); the check is that it is no worse than the tolerance and not
# wildly different (benchmarks/synapseml.py measures the gap on 1M rows).
DISTRIBUTED_AUC_ABOVE = 0.012
# The SynapseML engine trains on the 39 codes alone (no derived features, no refit: docs/training.md),
# so its reference is the local engine with the same model inputs.
CODES_ONLY = {"derived": [], "refit": False}


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "CTR_HOME": str(tmp / "home"), "CTR_NUM_THREADS": "2", "CTR_SPARK_MASTER": "local[2]"}
    env.pop("CTR_SPARK_CONF", None)
    return {**env, **extra}


def _train(engine: str, data: Path, out: Path, env: dict[str, str], *extra: str,
           timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ctr.cli", "train", "--data", str(data), "--from", START.isoformat(),
                           "--to", END.isoformat(), "--out", str(out), "--engine", engine, "--seed", "42", *extra],
                          capture_output=True, text=True, env=env, timeout=timeout)


def _ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, f"{' '.join(r.args[3:])} failed:\n{r.stderr[-4000:]}"
    return r


def _holdout_auc(run_dir: Path) -> float:
    return json.loads((run_dir.with_name(run_dir.name + ".spark") / "metrics.json").read_text())["candidate"]["auc"]


@pytest.fixture(scope="module")
def landing(tmp_path_factory) -> Path:
    """4 days x 12,000 rows: three training days (the last validates) and the holdout day."""
    from ctr.data.generate import GeneratorConfig, generate

    root = tmp_path_factory.mktemp("synapseml-landing")
    generate(root, 4, 12_000, HOLDOUT, GeneratorConfig(seed=5))
    return root


@pytest.fixture(scope="module")
def local_lightgbm(landing: Path, tmp_path_factory) -> tuple[Path, float]:
    """The reference: `ctr train --engine lightgbm` (no Spark) and its holdout AUC on the same days."""
    from ctr.data.landing import stage_day
    from ctr.validation.holdout import evaluate_day

    tmp = tmp_path_factory.mktemp("synapseml-ref")
    out = tmp / "lightgbm"
    _ok(_train("lightgbm", landing, out, _env(tmp), "--params", json.dumps(CODES_ONLY)))
    staging = tmp / "home" / "staging"
    stage_day(str(landing), staging, tmp / "home" / "quarantine", HOLDOUT)
    return out, evaluate_day(staging, HOLDOUT, out)["candidate"]["auc"]


def test_local_engine_matches_lightgbm_and_scores_like_the_native_booster(landing: Path, local_lightgbm, tmp_path: Path):
    import lightgbm as lgb
    from ctr.data.reader import read_table
    from ctr.features.transform import FeatureTransform
    from ctr.model.bundle import Bundle

    ref, ref_auc = local_lightgbm
    holdout_file = sorted((landing / f"day={HOLDOUT}").glob("*.tsv.gz"))[0]
    # another process holds LightGBM's default port and the base this job is told to use
    with socket.socket() as busy_default, socket.socket() as busy_base:
        try:
            busy_default.bind(("127.0.0.1", 12400))
            busy_default.listen()
        except OSError:
            pass  # held by someone else already: just as good
        busy_base.bind(("127.0.0.1", 0))
        busy_base.listen()
        port = busy_base.getsockname()[1]
        r = _ok(_train("synapseml", landing, tmp_path / "syn", _env(tmp_path, CTR_SYNAPSEML_LISTEN_PORT=str(port))))
    assert f"listen ports from {port}" in r.stderr

    out = tmp_path / "syn"
    assert (out / "features.json").read_bytes() == (ref / "features.json").read_bytes()
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["engine"] == "spark-synapseml" and meta["params"]["useBarrierExecutionMode"] is True
    auc = _holdout_auc(out)
    assert abs(auc - ref_auc) <= AUC_TOLERANCE, {"synapseml": auc, "lightgbm": ref_auc}

    # the bundle loads as any other (probe checked) and `ctr score` equals the native booster
    Bundle.load(out)
    native = sorted((tmp_path / "syn.spark" / "_synapseml").glob("part-*"))
    assert len(native) == 1, native
    booster = lgb.Booster(model_str=native[0].read_text())
    table, bad = read_table(str(holdout_file))
    assert not bad
    want = booster.predict(FeatureTransform.load(out / "features.json").transform_table(table))
    scored = tmp_path / "scores.csv"
    subprocess.run([sys.executable, "-m", "ctr.cli", "score", "--model", str(out), "--input", str(holdout_file),
                    "--output", str(scored)], check=True, capture_output=True, env=_env(tmp_path), timeout=120)
    with open(scored) as fh:
        got = np.array([float(row["probability"]) for row in csv.DictReader(fh)])
    assert got.shape == want.shape and np.max(np.abs(got - want)) <= 1e-12


def test_missing_jars_fail_in_one_line_naming_the_coordinates(landing: Path, tmp_path: Path):
    from ctr.training.synapseml import REQUIRED_JARS

    empty = tmp_path / "no-jars"
    empty.mkdir()
    t0 = time.monotonic()
    r = _train("synapseml", landing, tmp_path / "x", _env(tmp_path, CTR_SPARK_JARS_DIR=str(empty)), timeout=120)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ctr train: error: SynapseML jars missing:"), r.stderr[-2000:]
    for coords in REQUIRED_JARS:
        assert coords in last
    assert "make jars" in last and "apt-get install maven" in last
    assert "SparkSession" not in r.stderr and time.monotonic() - t0 < 60  # failed before starting Spark


def test_empty_day_fails_before_the_lightgbm_network_starts(landing: Path, tmp_path: Path):
    import shutil

    land = tmp_path / "landing"
    shutil.copytree(landing, land)
    day = land / f"day={END}"
    for f in day.iterdir():
        f.unlink()
    (day / "part-00000.tsv.gz").write_bytes(b"")  # the export created the file, then wrote nothing
    r = _train("synapseml", land, tmp_path / "x", _env(tmp_path), timeout=180)
    assert r.returncode != 0
    (error,) = [ln for ln in r.stderr.splitlines() if ln.startswith("ctr train: error:")]
    assert f"day={END} has 0 non-empty files" in error, r.stderr[-2000:]
    assert "LightGBMClassifier(" not in r.stderr and "LightGBM tasks" not in r.stderr


# ---- the two-worker standalone cluster ------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster() -> Iterator:
    from ctr.training.spark_cluster import LocalCluster

    with LocalCluster(workers=2, cores=1, memory="1g") as c:
        yield c
    assert not c.procs  # master and workers stopped


def _cluster_env(cluster, tmp: Path) -> dict[str, str]:
    conf = ";".join(f"{k}={v}" for k, v in cluster.session_conf().items())
    return _env(tmp, CTR_SPARK_MASTER=cluster.master_url, CTR_SPARK_CONF=conf, CTR_SYNAPSEML_TIMEOUT="60")


def test_two_workers_train_one_model(cluster, landing: Path, local_lightgbm, tmp_path: Path):
    ref, ref_auc = local_lightgbm
    r = _ok(_train("synapseml", landing, tmp_path / "cl", _cluster_env(cluster, tmp_path)))
    assert f"master={cluster.master_url}" in r.stderr and "2 LightGBM tasks" in r.stderr
    logs = cluster.executor_logs()
    # both LightGBM workers joined one ring, each in its own executor on its own worker
    assert "Local rank: 0, total number of machines: 2" in logs and "Local rank: 1, total number of machines: 2" in logs
    assert len({p.parts[-4] for p in cluster.dir.glob("worker-*/app-*/*/stderr")}) == 2

    out = tmp_path / "cl"
    assert (out / "features.json").read_bytes() == (ref / "features.json").read_bytes()
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["spark_master"] == cluster.master_url and meta["params"]["numTasks"] == 2
    auc = _holdout_auc(out)
    assert ref_auc - AUC_TOLERANCE <= auc <= ref_auc + DISTRIBUTED_AUC_ABOVE, {"two-worker synapseml": auc,
                                                                              "lightgbm": ref_auc}


def test_executor_killed_mid_training_fails_fast(cluster, landing: Path, tmp_path: Path):
    """No early stopping and many rounds, so training is still running when one executor dies."""
    env = _cluster_env(cluster, tmp_path)
    params = json.dumps({"num_iterations": 5000, "early_stopping_round": 0})
    cmd = [sys.executable, "-m", "ctr.cli", "train", "--data", str(landing), "--from", START.isoformat(), "--to",
           END.isoformat(), "--out", str(tmp_path / "killed"), "--engine", "synapseml", "--params", params]
    old_apps = set(cluster.dir.glob("worker-*/app-*"))

    def iterations() -> int:  # LightGBM iterations the new application's executors logged
        return sum(p.read_text(errors="replace").count("starting iteration")
                   for p in cluster.dir.glob("worker-*/app-*/*/stderr") if p.parents[1] not in old_apps)

    with open(tmp_path / "job.log", "w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 240
            while iterations() < 20:
                assert proc.poll() is None, "job ended before training started"
                assert time.monotonic() < deadline, "training did not start within 240s"
                time.sleep(0.5)
            cluster.kill_executor()
            killed_at = time.monotonic()
            proc.wait(timeout=180)
            took = time.monotonic() - killed_at
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log.seek(0)
        text = log.read()
    assert proc.returncode != 0, text[-3000:]
    (error,) = [ln for ln in text.splitlines() if ln.startswith("ctr train: error:")]
    # either Spark fails the barrier stage, or the lost executor is noticed after fit returned a partial booster
    assert "lost during SynapseML LightGBM training" in error or "failed barrier ResultStage" in error, error
    assert took < 150, f"the job took {took:.0f}s to fail after the executor died"
    assert not (tmp_path / "killed" / "model.txt").exists()
