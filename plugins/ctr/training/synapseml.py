"""The `synapseml` engine: distributed LightGBM with SynapseML on a Databricks cluster.

Not runnable on this machine (SynapseML's jars come from its Maven repository, unreachable here);
written against synapse.ml.lightgbm 1.1.3's Python API. `synapseml_params` is the testable part:
it maps ctr.training.trainer's LightGBM parameters onto LightGBMClassifier's, passing anything it does not
map through `passThroughArgs`, so a parameter tuned in ctr.training.trainer reaches the cluster too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from ctr.features.transform import CAT_INDEX, FeatureTransform
from ctr.schema import FEATURE_COLUMNS, LABEL
from ctr.training.trainer import TrainConfig

log = logging.getLogger("ctr.training.synapseml")

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


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | tuple):
        return ",".join(_fmt(x) for x in v)
    return str(v)


def synapseml_params(cfg: TrainConfig, executor_cores: int) -> dict[str, Any]:
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
    }
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


def _features_batches(features: dict[str, Any]):
    cols = FEATURE_COLUMNS

    def fn(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        t_ = FeatureTransform(vocab=features["vocab"], min_count=features["min_count"], max_vocab=features["max_vocab"])
        for rb in batches:
            t = pa.Table.from_batches([rb])
            x = t_.transform_table(t)
            arrays = [pa.array(x[:, j], pa.float64()) for j in range(len(cols))]
            arrays += [t.column(LABEL).cast(pa.float64()).combine_chunks(), t.column("is_valid").combine_chunks()]
            yield pa.record_batch(arrays, names=[*cols, LABEL, "is_valid"])
    return fn


def feature_frame(spark, train_df, valid_df, transform: FeatureTransform):
    """Rows -> (features vector, label, is_valid) with the bundle's own transform (NaN = missing)."""
    from pyspark.ml.feature import VectorAssembler
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    both = train_df.withColumn("is_valid", F.lit(False)).unionByName(valid_df.withColumn("is_valid", F.lit(True)))
    schema = from_arrow_schema(pa.schema([(c, pa.float64()) for c in FEATURE_COLUMNS]
                                         + [(LABEL, pa.float64()), ("is_valid", pa.bool_())]))
    x = both.mapInArrow(_features_batches(json.loads(json.dumps(transform.to_json()))), schema)
    return VectorAssembler(inputCols=FEATURE_COLUMNS, outputCol="features", handleInvalid="keep") \
        .transform(x).select("features", LABEL, "is_valid")


def train_synapseml(spark, train_df, valid_df, transform: FeatureTransform, cfg: TrainConfig, executor_cores: int,
                    native_model_dir: str) -> dict[str, Any]:
    """Fit LightGBMClassifier, saveNativeModel to `native_model_dir`, return the model text (LightGBM format)."""
    from synapse.ml.lightgbm import LightGBMClassifier

    kw = synapseml_params(cfg, executor_cores)
    log.info("synapseml: LightGBMClassifier(%s)", json.dumps(kw, sort_keys=True, default=str))
    data = feature_frame(spark, train_df, valid_df, transform)
    model = LightGBMClassifier(**kw).fit(data)
    model.saveNativeModel(native_model_dir, True)   # a text dataset: one part file with the booster
    text = "\n".join(r.value for r in spark.read.text(native_model_dir, wholetext=True).collect())
    if not text.startswith("tree"):
        raise RuntimeError(f"saveNativeModel output under {native_model_dir} is not a LightGBM model text")
    best = int(model.getBoosterBestIteration())
    return {"model_str": text, "best_iteration": best if best > 0 else int(model.getBoosterNumTotalIterations()), "params": kw}
