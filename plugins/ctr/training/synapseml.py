"""The `synapseml` engine: distributed LightGBM with SynapseML's LightGBMClassifier on Spark 3.5.

Runs wherever the Spark job runs: local Spark (`local[2]`), a standalone cluster (ctr.training.spark_cluster)
and a Databricks job cluster. One Spark/SynapseML pair everywhere, pinned here and in
jobs/synapseml/pom.xml: Spark 3.5 / Scala 2.12 with `com.microsoft.azure:synapseml-lightgbm_2.12`
1.1.3 from Maven Central (docs/databricks.md says why).

  * jars: on local and standalone Spark from the folder `make jars` fills (`spark_jars`), passed
    as `spark.jars`; on Databricks from the task-level Maven library. A missing jar is one error
    line naming the Maven coordinates (`SynapseMLSetupError`).
  * features: the bundle's own FeatureTransform on the executors (mapInArrow), so the model sees
    exactly the vectors `ctr serve` builds; categorical slots are LightGBM categoricals.
  * native LightGBM: lightgbmlib 3.3.500 instead of the 3.3.510 SynapseML 1.1.3 names (see
    LIGHTGBMLIB_VERSION), with `dataTransferMode="bulk"`.
  * network: barrier execution mode, `numTasks` = the executors' task slots (the data is
    repartitioned to exactly that many partitions, so the expected and actual task counts always
    agree), a per-job free `defaultListenPort` base on one machine, a bounded network `timeout`.
  * output: `saveNativeModel` text, cut to the best iteration, becomes the bundle's model.txt.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from ctr.features.transform import CAT_INDEX, FeatureTransform
from ctr.schema import FEATURE_COLUMNS, LABEL
from ctr.settings import SparkSettings, SynapseMLSettings
from ctr.training.trainer import TrainConfig, TrainingError

log = logging.getLogger("ctr.training.synapseml")

SPARK_LINE = "3.5"
SCALA_BINARY = "2.12"
SYNAPSEML_VERSION = "1.1.3"
LIGHTGBM_COORDINATES = f"com.microsoft.azure:synapseml-lightgbm_{SCALA_BINARY}:{SYNAPSEML_VERSION}"
# SynapseML 1.1.3 depends on lightgbmlib 3.3.510, whose distributed tree learner sizes the split
# exchange buffer 16 bytes short (SplitInfo::Size; LightGBM PR #6738, SynapseML issue #2697): with
# two or more LightGBM workers a categorical split over more than max_cat_threshold - 4 categories
# kills the executor (SIGSEGV in SerialTreeLearner::SplitInner; reproduced here on the two-worker
# cluster). 3.3.500 predates the bug; SynapseML 1.1.3 runs on it in bulk data-transfer mode (its
# streaming mode calls a SWIG function 3.3.500 lacks).
LIGHTGBMLIB_VERSION = "3.3.500"
LIGHTGBMLIB_COORDINATES = f"com.microsoft.ml.lightgbm:lightgbmlib:{LIGHTGBMLIB_VERSION}"
DATA_TRANSFER_MODE = "bulk"
# Maven coordinates -> the jar file copy-dependencies writes; the ones the engine cannot start without
REQUIRED_JARS = {
    LIGHTGBM_COORDINATES: f"synapseml-lightgbm_{SCALA_BINARY}-{SYNAPSEML_VERSION}.jar",
    f"com.microsoft.azure:synapseml-core_{SCALA_BINARY}:{SYNAPSEML_VERSION}": f"synapseml-core_{SCALA_BINARY}-{SYNAPSEML_VERSION}.jar",
    LIGHTGBMLIB_COORDINATES: f"lightgbmlib-{LIGHTGBMLIB_VERSION}.jar",
}
JVM_CLASS = "com.microsoft.azure.synapse.ml.lightgbm.LightGBMClassifier"
DEFAULT_TIMEOUT = SynapseMLSettings.timeout  # seconds for LightGBM's network setup and each barrier sync
DEFAULT_LISTEN_PORT = 12400  # SynapseML's default; used as is on a cluster of separate machines

# LightGBM parameter name -> LightGBMClassifier param name
PARAM_MAP = {
    "objective": "objective", "learning_rate": "learningRate", "num_leaves": "numLeaves",
    "min_data_in_leaf": "minDataInLeaf", "feature_fraction": "featureFraction",
    "bagging_fraction": "baggingFraction", "bagging_freq": "baggingFreq", "lambda_l1": "lambdaL1",
    "lambda_l2": "lambdaL2", "max_bin": "maxBin", "cat_smooth": "catSmooth", "cat_l2": "catl2",
    "max_cat_threshold": "maxCatThreshold", "min_data_per_group": "minDataPerGroup",
    "max_cat_to_onehot": "maxCatToOnehot", "max_depth": "maxDepth", "min_gain_to_split": "minGainToSplit",
    "min_sum_hessian_in_leaf": "minSumHessianInLeaf", "deterministic": "deterministic",
    "verbosity": "verbosity", "boosting": "boostingType", "is_unbalance": "isUnbalance",
}
# set from TrainConfig / the cluster, not from the params dict
HANDLED = {"seed", "num_threads", "metric"}


class SynapseMLSetupError(RuntimeError):
    """SynapseML cannot start: jars missing, or the cluster lacks the executors it was sized for."""


# ---- jars ------------------------------------------------------------------------------------
def jars_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where `make jars` puts the JVM side: CTR_SPARK_JARS_DIR, else <venv>/share/ctr/jars."""
    return Path(SparkSettings.from_env(env).jars_dir or Path(sys.prefix) / "share" / "ctr" / "jars")


def spark_jars(env: Mapping[str, str] | None = None) -> list[str]:
    """Every jar in `jars_dir` (SynapseML's LightGBM, hadoop-azure, their dependencies), sorted; [] if none."""
    d = jars_dir(env)
    return sorted(str(p) for p in d.glob("*.jar")) if d.is_dir() else []


def missing_jars_message(missing: list[str], where: str) -> str:
    return (f"SynapseML jars missing: {', '.join(missing)} not in {where}; run `make jars` "
            f"(needs Maven: apt-get install maven) or set CTR_SPARK_JARS_DIR to a folder holding them")


def require_jars(env: Mapping[str, str] | None = None) -> list[str]:
    """The jar list for `spark.jars`, or SynapseMLSetupError naming each missing Maven coordinate."""
    jars = spark_jars(env)
    names = {Path(j).name for j in jars}
    missing = [coord for coord, name in REQUIRED_JARS.items() if name not in names]
    if missing:
        raise SynapseMLSetupError(missing_jars_message(missing, str(jars_dir(env))))
    return jars


def check_jvm(spark) -> None:
    """The running JVM can load LightGBMClassifier (Databricks: the task's Maven library is attached)."""
    jvm = spark.sparkContext._jvm
    try:
        jvm.java.lang.Thread.currentThread().getContextClassLoader().loadClass(JVM_CLASS)
    except Exception:  # py4j wraps ClassNotFoundException
        raise SynapseMLSetupError(
            f"SynapseML jars missing: {LIGHTGBM_COORDINATES} is not on this Spark session's classpath "
            f"(class {JVM_CLASS} not found); on Databricks attach it as a task-level Maven library, locally "
            "start Spark with spark.jars from `make jars`") from None


# ---- parameters --------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | tuple):
        return ",".join(_fmt(x) for x in v)
    return str(v)


def synapseml_params(cfg: TrainConfig, executor_cores: int, num_tasks: int | None = None,
                     listen_port: int = DEFAULT_LISTEN_PORT, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """LightGBMClassifier keyword arguments for a training config on executors with this many cores."""
    p = cfg.lgb_params()
    metric = p.get("metric", "auc")
    first_metric = metric[0] if isinstance(metric, list | tuple) else metric
    kw: dict[str, Any] = {
        "featuresCol": "features", "labelCol": LABEL, "validationIndicatorCol": "is_valid",
        "categoricalSlotIndexes": list(CAT_INDEX), "slotNames": list(FEATURE_COLUMNS),
        "useBarrierExecutionMode": True,             # all tasks start together or none (no hung rings)
        "numThreads": max(1, int(executor_cores) - 1),  # one core left for the executor's JVM/Spark work
        "seed": int(cfg.seed), "numIterations": int(cfg.rounds), "earlyStoppingRound": int(cfg.early_stopping),
        "metric": first_metric, "useMissing": True, "zeroAsMissing": False,
        "defaultListenPort": int(listen_port), "timeout": float(timeout),
        "dataTransferMode": DATA_TRANSFER_MODE,
    }
    if num_tasks:
        kw["numTasks"] = int(num_tasks)
    passthrough = []
    for k, v in p.items():
        if k in HANDLED:
            continue
        if k in PARAM_MAP:
            kw[PARAM_MAP[k]] = v
        else:
            passthrough.append(f"{k}={_fmt(v)}")
    if passthrough:
        kw["passThroughArgs"] = " ".join(sorted(passthrough))
    return kw


# ---- the cluster --------------------------------------------------------------------------------
def is_single_host(spark) -> bool:
    """Driver and executors share this machine (local[N], or a standalone cluster on loopback)."""
    master = spark.sparkContext.master
    return master.startswith("local") or master.startswith(("spark://127.", "spark://localhost"))


def task_slots(spark, wait: float = 60.0) -> tuple[int, int]:
    """(task slots, executors) the barrier stage gets: (N, 1) for local[N], else the registered executors.

    With `spark.cores.max` set (standalone), waits up to `wait` seconds for executors holding
    that many cores to register, since a barrier stage sized before they arrive cannot start."""
    sc = spark.sparkContext
    if sc.master.startswith("local"):
        return int(sc.defaultParallelism), 1
    per_exec = int(spark.conf.get("spark.executor.cores", "1"))
    want = spark.conf.get("spark.cores.max", None)
    deadline = time.monotonic() + wait
    while True:
        executors = sc._jsc.sc().getExecutorMemoryStatus().size() - 1  # minus the driver
        slots = executors * per_exec
        if want is None or slots >= int(want) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if want is not None and slots < int(want):
        raise SynapseMLSetupError(f"only {slots} of spark.cores.max={want} executor cores registered with "
                                  f"{sc.master} within {wait:.0f}s; LightGBM needs every task slot at once")
    if slots < 1:
        raise SynapseMLSetupError(f"no executors registered with {sc.master}")
    return slots, executors


def executor_ids(spark) -> set[str]:
    """Ids of the executors registered now (empty on local Spark, where the driver runs the tasks)."""
    sc = spark.sparkContext
    if sc.master.startswith("local"):
        return set()
    ids = sc._jsc.sc().getExecutorIds()
    return set(str(ids.mkString("\n")).split("\n")) - {""}


def _lost_executors(spark, before: set[str], settle: float = 3.0) -> set[str]:
    """Executors of `before` gone now. A killed executor's peer returns its booster at once, often
    before the driver has noticed the loss, so watch for `settle` seconds (clusters only)."""
    deadline = time.monotonic() + (settle if before else 0.0)
    while True:
        lost = before - executor_ids(spark)
        if lost or time.monotonic() >= deadline:
            return lost
        time.sleep(0.25)


def free_port_base(count: int, start: int = 20000, stop: int = 60000) -> int:
    """A base port with `count` consecutive ports free on 127.0.0.1 now (per job, so two jobs on one
    machine start their LightGBM rings apart; SynapseML also steps past a port found busy)."""
    import random

    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        base = rng.randrange(start, stop - count)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise SynapseMLSetupError(f"no {count} consecutive free ports between {start} and {stop} on 127.0.0.1")


# ---- data ------------------------------------------------------------------------------------------
def _features_batches(features: dict[str, Any]):
    cols = FEATURE_COLUMNS

    def fn(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        t_ = FeatureTransform(vocab=features["vocab"], min_count=features["min_count"], max_vocab=features["max_vocab"],
                              missing=features.get("missing", "nan"))
        for rb in batches:
            t = pa.Table.from_batches([rb])
            x = t_.transform_table(t)
            arrays = [pa.array(x[:, j], pa.float64()) for j in range(len(cols))]
            arrays += [t.column(LABEL).cast(pa.float64()).combine_chunks(), t.column("is_valid").combine_chunks()]
            yield pa.record_batch(arrays, names=[*cols, LABEL, "is_valid"])
    return fn


def feature_frame(spark, train_df, valid_df, transform: FeatureTransform, partitions: int):
    """Rows -> (features vector, label, is_valid) with the bundle's own transform (NaN = missing),
    in exactly `partitions` partitions (one per LightGBM task)."""
    from pyspark.ml.feature import VectorAssembler
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    both = train_df.withColumn("is_valid", F.lit(False)).unionByName(valid_df.withColumn("is_valid", F.lit(True)))
    schema = from_arrow_schema(pa.schema([(c, pa.float64()) for c in FEATURE_COLUMNS]
                                         + [(LABEL, pa.float64()), ("is_valid", pa.bool_())]))
    x = both.repartition(partitions).mapInArrow(_features_batches(json.loads(json.dumps(transform.to_json()))), schema)
    return VectorAssembler(inputCols=FEATURE_COLUMNS, outputCol="features", handleInvalid="keep") \
        .transform(x).select("features", LABEL, "is_valid")


def _java_reason(e: BaseException) -> str:
    """The innermost JVM exception's class and message (one line), or str(e) for a Python error."""
    je = getattr(e, "java_exception", None)
    if je is None:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    reasons = []
    while je is not None:
        reasons.append(str(je.toString()).splitlines()[0])
        je = je.getCause()
    return " <- ".join(dict.fromkeys(reasons))[:1500]


# ---- training ----------------------------------------------------------------------------------------
def train_synapseml(spark, train_df, valid_df, transform: FeatureTransform, cfg: TrainConfig, executor_cores: int,
                    native_model_dir: str) -> dict[str, Any]:
    """Fit LightGBMClassifier, saveNativeModel to `native_model_dir`, return the model text (LightGBM
    format, cut to the best iteration), the best iteration and the parameters used."""
    import lightgbm as lgb

    check_jvm(spark)
    from synapse.ml.lightgbm import LightGBMClassifier

    slots, _executors = task_slots(spark)
    net = SynapseMLSettings.from_env()
    timeout = net.timeout
    port = net.listen_port or (
        free_port_base(slots + 8) if is_single_host(spark) else DEFAULT_LISTEN_PORT)
    kw = synapseml_params(cfg, executor_cores, num_tasks=slots, listen_port=port, timeout=timeout)
    log.info("synapseml: %d LightGBM tasks on %s, listen ports from %d, LightGBMClassifier(%s)", slots,
             spark.sparkContext.master, port, json.dumps(kw, sort_keys=True, default=str))
    data = feature_frame(spark, train_df, valid_df, transform, slots).cache()
    try:
        n = data.count()
        if n == 0:
            raise TrainingError(f"no rows to train on in days {cfg.start}..{cfg.end}")
        labels = {r[0] for r in data.where("not is_valid").select(LABEL).distinct().collect()}
        if len(labels) < 2:
            raise TrainingError(f"training rows of {cfg.start}..{cfg.end} hold a single class; cannot train a click model")
        t0 = time.monotonic()
        before = executor_ids(spark)
        try:
            model = LightGBMClassifier(**kw).fit(data)
        except Exception as e:  # py4j's Py4JJavaError: say what the JVM said, not "error calling o724.fit"
            raise TrainingError(f"SynapseML LightGBM training on {spark.sparkContext.master} failed: "
                                f"{_java_reason(e)}") from e
        lost = _lost_executors(spark, before)
        if lost:
            # SynapseML keeps the booster of a worker whose peer vanished ("early termination"): refuse it
            raise TrainingError(f"executor(s) {', '.join(sorted(lost))} lost during SynapseML LightGBM training on "
                                f"{spark.sparkContext.master} (killed or out of memory?); the LightGBM ring broke, "
                                "so the model would be truncated: not writing it")
        log.info("synapseml: fit %d rows in %.1fs", n, time.monotonic() - t0)
    finally:
        data.unpersist()
    model.saveNativeModel(native_model_dir, True)   # a text dataset: one part file with the booster
    text = "\n".join(r.value for r in spark.read.text(native_model_dir, wholetext=True).collect())
    if not text.startswith("tree"):
        raise RuntimeError(f"saveNativeModel output under {native_model_dir} is not a LightGBM model text")
    booster = lgb.Booster(model_str=text)
    # getBoosterBestIteration is 0-based (-1: no early stop); the saved text already ends at the best tree
    raw_best = int(model.getBoosterBestIteration())
    trees = booster.current_iteration()
    total = int(model.getBoosterNumTotalIterations())
    log.info("synapseml: booster trees=%d best_iteration(0-based)=%d total_iterations=%d", trees, raw_best, total)
    if trees < cfg.rounds and (raw_best < 0 or cfg.early_stopping == 0):
        # SynapseML keeps the booster of a worker whose peer vanished ("early termination"): refuse it
        raise TrainingError(f"SynapseML LightGBM stopped after {trees} of {cfg.rounds} iterations without early "
                            f"stopping on {spark.sparkContext.master}: a LightGBM worker was lost mid-training "
                            "(executor killed or out of memory?); not writing a truncated model")
    best = min(trees, raw_best + 1) if raw_best >= 0 else trees
    return {"model_str": booster.model_to_string(num_iteration=best), "best_iteration": best, "params": kw,
            "total_iterations": int(model.getBoosterNumTotalIterations())}
