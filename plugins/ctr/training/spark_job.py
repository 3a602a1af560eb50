"""The Spark training job: landing zone -> validated rows -> vocabularies -> LightGBM -> bundle + metrics.

Runs the same on pyspark's bundled local Spark (`ctr train --engine spark`, CI) and on a
Databricks cluster (`ctr.training.spark_entry` as a spark_python_task). Each step reuses the local
path's rule rather than re-implementing it:

  * validation: `ctr.data.reader.parse_lines` on every partition (mapInArrow), so bad-row reasons
    and counts equal `check_data`'s; day checks are `ctr.data.checks.problems`;
  * vocabularies: value counts aggregated by Spark, then `ctr.features.transform.select_vocabulary` and
    `FeatureTransform(...).save`, so features.json is byte-identical to the local path's; the derived
    features' rows and clicks per code are a Spark aggregation too (`code_stats`), over the rows the
    local path counts them on (`spark` engine only; `synapseml` trains on the codes alone);
  * training: engine `lightgbm` (driver-side LightGBM over Arrow batches, params from
    `ctr.training.trainer.TrainConfig`) or `synapseml` (see ctr.training.synapseml);
  * evaluation on the holdout day: scored on the executors, `ctr.validation.metrics.compare` +
    `ctr.validation.gate.decide` -> metrics.json in the gate's format;
  * feature drift (metrics.json's `drift`, the gate's max_feature_psi): `ctr.monitoring.drift`'s
    reference built from the training rows the driver already holds, the holdout day counted in its
    bins on the executors (`Reference.add_table`), the score PSI by `ctr.validation.holdout.drift_from_scores`:
    the numbers the DAG's evaluate computes from the staged days.

Output layout under --out (a local folder or an abfss:// prefix):
  model/ (the bundle), metrics.json, drift_reference.json (what `ctr monitor` compares live traffic
  with), data_report.json, quarantine/day=D/*.csv (bad rows).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

import ctr
from ctr.data.landing import DATA_SUFFIXES, DayReport, FileStamp, LandingZoneError, daterange, files_digest
from ctr.data.reader import Layout, parse_lines
from ctr.features.transform import CAT_INDEX, FeatureTransform, VocabCounter
from ctr.schema import ALL_COLUMNS, ARROW_SCHEMA, CAT_COLUMNS, LABEL
from ctr.settings import Settings, SparkSettings
from ctr.training.trainer import TrainConfig, TrainingError

log = logging.getLogger("ctr.training.spark_job")

ENGINES = ("lightgbm", "synapseml")
RAW_LAYOUT = Layout("\t", len(ALL_COLUMNS), {c: i for i, c in enumerate(ALL_COLUMNS)}, False, "raw-tsv")
# Columns carried next to the parsed row through the job.
META_FIELDS = [("day", pa.string()), ("file", pa.string()), ("pos", pa.int64()),
               ("bad_reason", pa.string()), ("raw", pa.string())]
PARSED_SCHEMA = pa.schema(list(ARROW_SCHEMA) + [pa.field(n, t) for n, t in META_FIELDS])


@dataclass
class JobArgs:
    data: str                       # landing zone root: local folder, file:// or abfss:// URI
    start: dt.date                  # first training day
    end: dt.date                    # last training day (inclusive)
    out: str                        # output prefix (local folder or abfss://)
    holdout: dt.date | None = None  # evaluation day; None skips evaluation
    engine: str = "lightgbm"
    seed: int = 42
    params: dict[str, Any] = field(default_factory=dict)
    num_threads: int = 2
    sample_fraction: float = 1.0
    max_bad_fraction: float = 0.001
    gate_params: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None     # champion bundle dir reachable from the driver (optional)
    metadata: dict[str, Any] = field(default_factory=dict)
    executor_cores: int | None = None
    bundle_dir: str | None = None   # override: where the bundle goes (default OUT/model)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine {self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.end < self.start:
            raise ValueError(f"training range {self.start}..{self.end} is empty; --to is before --from")
        if self.holdout is not None and self.start <= self.holdout <= self.end:
            raise ValueError(f"holdout day {self.holdout} lies inside the training range {self.start}..{self.end}")

    def train_config(self) -> TrainConfig:
        return TrainConfig(start=self.start, end=self.end, seed=self.seed, num_threads=self.num_threads,
                           sample_fraction=self.sample_fraction, params=dict(self.params))


# ---- Spark session -------------------------------------------------------------------------
def spark_session(app: str = "ctr-train", master: str | None = None, conf: dict[str, str] | None = None):
    """The active session (Databricks) or a new one: local[2] by default (no UI, few shuffle
    partitions), or the `CTR_SPARK_MASTER` / `master` given (e.g. a standalone cluster's spark://).

    A new session gets the jars of `make jars` (SynapseML's LightGBM, hadoop-azure) as `spark.jars`,
    then `CTR_SPARK_CONF` ("k=v;k=v", e.g. a standalone cluster's executor sizing), then `conf`."""
    from pyspark.sql import SparkSession

    from ctr.training.synapseml import spark_jars

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    cfg = SparkSettings.from_env()
    master = master or cfg.master
    b = SparkSession.builder.appName(app).master(master)
    # Python workers run this interpreter (the one with ctr installed), not whatever python3 is on PATH
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if master.startswith("local"):
        b = (b.config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2")
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.driver.memory", cfg.driver_memory)
             .config("spark.sql.session.timeZone", "UTC"))
    jars = spark_jars()
    if jars:
        b = b.config("spark.jars", ",".join(jars))
    for k, v in {**cfg.conf_pairs(), **(conf or {})}.items():
        b = b.config(k.strip(), v.strip())
    return b.getOrCreate()


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _hadoop_fs(spark, uri: str):
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(uri)
    return path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), path


def list_day_files(spark, root: str, day: dt.date) -> list[str]:
    """Data files of one landing-zone day via Hadoop's FileSystem (local, abfss, dbfs alike)."""
    return _list_day(spark, root, day)[0]


def day_fingerprint_digest(spark, root: str, day: dt.date) -> str:
    """The day's fingerprint digest from Hadoop's listing: the same as `stage_day` records for the same
    files (name, length, modification time in ms; empty files included, as there)."""
    return files_digest(_list_day(spark, root, day)[1])


def _list_day(spark, root: str, day: dt.date) -> tuple[list[str], list[FileStamp]]:
    where = f"{root.rstrip('/')}/day={day.isoformat()}"
    fs, path = _hadoop_fs(spark, where)
    files, stamps = [], []
    if fs.exists(path):
        for st in fs.listStatus(path):
            name = st.getPath().getName()
            if st.isFile() and name.endswith(DATA_SUFFIXES) and not name.startswith((".", "_")):
                stamps.append(FileStamp(name, int(st.getLen()), int(st.getModificationTime())))
                if st.getLen() > 0:
                    files.append(st.getPath().toString())
    if not files:
        raise LandingZoneError(f"landing zone day={day.isoformat()} has 0 non-empty files under {where}; is the export late?")
    return sorted(files), stamps


# ---- read + validate -----------------------------------------------------------------------
def _parse_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: raw lines -> parsed rows, bad lines kept with their reason (check_data's)."""
    for rb in batches:
        t = pa.Table.from_batches([rb])
        if t.num_rows == 0:
            continue
        lines = t.column("value").to_pylist()
        chunk = parse_lines(lines, RAW_LAYOUT, first_line_no=0)
        good = pa.array(chunk.lines, type=pa.int64())
        meta = t.select(["day", "file", "pos"])
        n_good = chunk.table.num_rows
        good_t = pa.Table.from_arrays(
            chunk.table.columns + meta.take(good).columns + [pa.nulls(n_good, pa.string()), pa.nulls(n_good, pa.string())],
            schema=PARSED_SCHEMA)
        out = [good_t]
        if chunk.bad:
            idx = pa.array([b.line for b in chunk.bad], type=pa.int64())
            n_bad = len(chunk.bad)
            cols = [pa.nulls(n_bad, f.type) for f in ARROW_SCHEMA] + meta.take(idx).columns + [
                pa.array([b.reason for b in chunk.bad], pa.string()), pa.array([b.text for b in chunk.bad], pa.string())]
            out.append(pa.Table.from_arrays(cols, schema=PARSED_SCHEMA))
        yield from pa.concat_tables(out).to_batches()


def read_days(spark, root: str, days: list[dt.date]):
    """Every line of the days as a DataFrame with PARSED_SCHEMA (good rows: bad_reason is null)."""
    from pyspark.sql import functions as F

    frames = []
    for d in days:
        files = list_day_files(spark, root, d)
        # lineSep "\n" as the local reader: a "\r" stays in the line and parse_lines strips it
        df = spark.read.option("lineSep", "\n").text(files)
        frames.append(df.select("value", F.lit(d.isoformat()).alias("day"), F.input_file_name().alias("file")))
    raw = frames[0]
    for f in frames[1:]:
        raw = raw.unionByName(f)
    raw = raw.withColumn("pos", F.monotonically_increasing_id())
    return raw.mapInArrow(_parse_batches, _spark_schema(PARSED_SCHEMA))


def _spark_schema(schema: pa.Schema):
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(schema)


def day_reports(parsed, days: list[dt.date], files: dict[str, list[str]]) -> list[DayReport]:
    """Per-day counts and bad-row reasons, the same numbers stage_day reports."""
    from pyspark.sql import functions as F

    agg = {r["day"]: r for r in parsed.groupBy("day").agg(
        F.count(F.lit(1)).alias("rows_in"),
        F.sum(F.col("bad_reason").isNull().cast("long")).alias("rows_ok"),
        F.sum(F.when(F.col("bad_reason").isNull(), F.col(LABEL)).otherwise(0).cast("long")).alias("clicks"),
    ).collect()}
    reasons: dict[str, dict[str, int]] = {}
    for r in (parsed.where(F.col("bad_reason").isNotNull())
              .groupBy("day", F.substring_index("bad_reason", ":", 1).alias("key")).count().collect()):
        reasons.setdefault(r["day"], {})[r["key"]] = int(r["count"])
    out = []
    for d in days:
        k = d.isoformat()
        a = agg.get(k)
        rows_in, rows_ok = (int(a["rows_in"]), int(a["rows_ok"] or 0)) if a else (0, 0)
        out.append(DayReport(day=k, files=files.get(k, []), rows_in=rows_in, rows_ok=rows_ok,
                             rows_quarantined=rows_in - rows_ok, clicks=int(a["clicks"] or 0) if a else 0,
                             reasons=dict(sorted(reasons.get(k, {}).items()))))
    return out


# ---- vocabularies ----------------------------------------------------------------------------
class _Counts(dict):
    """Kept value counts of one column whose len() is the column's true number of distinct values
    (only values at or above min_count travel to the driver; VocabCounter.notes needs the total)."""

    def __init__(self, kept: dict[str, int], distinct: int) -> None:
        super().__init__(kept)
        self.distinct = distinct

    def __len__(self) -> int:
        return self.distinct


def fit_vocabulary(fit_df, min_count: int, max_vocab: int) -> FeatureTransform:
    """Count categorical values with Spark; the rule itself is ctr.features.transform.select_vocabulary."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    kv = F.explode(F.array(*[F.struct(F.lit(c).alias("col"), F.col(c).alias("value")) for c in CAT_COLUMNS]))
    counts = (fit_df.select(kv.alias("kv")).select("kv.col", "kv.value").where(F.col("value").isNotNull())
              .groupBy("col", "value").count().cache())
    try:
        rank = F.row_number().over(Window.partitionBy("col").orderBy(F.desc("count"), F.asc("value")))
        kept_rows = counts.where(F.col("count") >= min_count).withColumn("r", rank).where(F.col("r") <= max_vocab).collect()
        distinct = {r["col"]: int(r["count"]) for r in counts.groupBy("col").count().collect()}
    finally:
        counts.unpersist()
    stats = fit_df.agg(F.count(F.lit(1)).alias("rows"),
                       *[F.sum(F.col(c).isNull().cast("long")).alias(c) for c in CAT_COLUMNS]).collect()[0]
    kept: dict[str, dict[str, int]] = {c: {} for c in CAT_COLUMNS}
    for r in kept_rows:
        kept[r["col"]][r["value"]] = int(r["count"])
    counter = VocabCounter()
    counter.rows = int(stats["rows"])
    counter.missing = {c: int(stats[c] or 0) for c in CAT_COLUMNS}
    counter.counts = {c: _Counts(kept[c], distinct.get(c, 0)) for c in CAT_COLUMNS}
    vocab = counter.vocabulary(min_count, max_vocab)
    return FeatureTransform(vocab=vocab, min_count=min_count, max_vocab=max_vocab, notes=counter.notes(vocab))


def code_stats(stats_df, transform: FeatureTransform, cfg: TrainConfig) -> FeatureTransform:
    """The transform with its derived features from a Spark aggregation of `stats_df`: per column and
    code the rows and clicks (vocabulary values joined to their codes; rare = the column's non-missing
    rest, missing = its nulls), the integers `FeatureTransform.with_stats` takes from the local path."""
    from pyspark.sql import functions as F

    spark = stats_df.sparkSession
    vocab_rows = [(c, v, i) for c in CAT_COLUMNS for i, v in enumerate(transform.vocab[c])]
    vdf = spark.createDataFrame(vocab_rows, "col string, value string, code int")
    kv = F.explode(F.array(*[F.struct(F.lit(c).alias("col"), F.col(c).alias("value")) for c in CAT_COLUMNS]))
    label = F.col(LABEL).cast("long")
    pairs = stats_df.select(label.alias("y"), kv.alias("kv")).select("y", "kv.col", "kv.value")
    per_code = (pairs.join(F.broadcast(vdf), ["col", "value"]).groupBy("col", "code")
                .agg(F.count(F.lit(1)).alias("n"), F.sum("y").alias("clicks")).collect())
    tot = stats_df.agg(F.count(F.lit(1)).alias("rows"), F.sum(label).alias("clicks"),
                       *[F.sum(F.col(c).isNull().cast("long")).alias(f"{c}_null") for c in CAT_COLUMNS],
                       *[F.sum(F.when(F.col(c).isNull(), label).otherwise(0)).alias(f"{c}_null_clicks")
                         for c in CAT_COLUMNS]).collect()[0]
    sizes = [len(transform.vocab[c]) + 2 for c in CAT_COLUMNS]
    offset = dict(zip(CAT_COLUMNS, np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist(), strict=True))
    rows, clicks = np.zeros(sum(sizes), np.int64), np.zeros(sum(sizes), np.int64)
    for r in per_code:
        rows[offset[r["col"]] + r["code"]] = int(r["n"])
        clicks[offset[r["col"]] + r["code"]] = int(r["clicks"] or 0)
    n, k = int(tot["rows"]), int(tot["clicks"] or 0)
    for c, size in zip(CAT_COLUMNS, sizes, strict=True):
        o, v = offset[c], size - 2
        null, null_clicks = int(tot[f"{c}_null"] or 0), int(tot[f"{c}_null_clicks"] or 0)
        rows[o + v + 1], clicks[o + v + 1] = null, null_clicks
        rows[o + v] = n - null - int(rows[o:o + v].sum())
        clicks[o + v] = k - null_clicks - int(clicks[o:o + v].sum())
    return transform.with_stats(rows, clicks, cfg.derived, cfg.target_smoothing)


# ---- train/validation split (ctr.training.trainer.split_validation's rule, in Spark) ---------------------
def split_train_valid(good, days: list[dt.date], cfg: TrainConfig):
    """(train_df, valid_df): the last day validates; one day splits at its last tenth (file/line order)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if cfg.sample_fraction < 1.0:
        # Spark's sampler, seeded; not the same rows as the local path's numpy sampler (drills only).
        good = good.sample(withReplacement=False, fraction=cfg.sample_fraction, seed=cfg.seed)
    if len(days) >= 2:
        last = days[-1].isoformat()
        return good.where(F.col("day") != last), good.where(F.col("day") == last)
    n = good.count()
    cut = int(n * 0.9)
    ranked = good.withColumn("_rn", F.row_number().over(Window.orderBy("file", "pos")))
    return ranked.where(F.col("_rn") <= cut).drop("_rn"), ranked.where(F.col("_rn") > cut).drop("_rn")


def collect_arrow(df) -> pa.Table:
    """A DataFrame collected to the driver as an Arrow table (Spark 3.5 has no public `toArrow`)."""
    if hasattr(df, "toArrow"):  # Spark >= 4.0
        return df.toArrow()
    from pyspark.sql.pandas.types import to_arrow_schema

    schema = to_arrow_schema(df.schema)
    return pa.Table.from_batches(df._collect_as_arrow(), schema=schema)


def to_arrow(df) -> pa.Table:
    """Rows in landing-zone order (day, file, line) as an Arrow table with ARROW_SCHEMA."""
    t = collect_arrow(df.orderBy("day", "file", "pos").select(*ALL_COLUMNS))
    return t.cast(ARROW_SCHEMA)


# ---- engines -----------------------------------------------------------------------------------
def train_lightgbm(train_t: pa.Table, valid_t: pa.Table, transform: FeatureTransform, cfg: TrainConfig,
                   day_rows: list[int] | None = None):
    """Driver-side LightGBM with ctr.training.trainer's parameters, derived features (out-of-fold on the
    training rows, folds by `ctr.training.trainer.fold_of_rows` of `day_rows`, the training rows per day)
    and refit as the local path does; returns (booster, best_iteration, valid AUC, logloss, trees, served
    transform)."""
    import lightgbm as lgb

    from ctr.training.trainer import SINGLE_DAY_FOLDS, FoldStats, fold_of_rows

    x_tr = transform.transform_table(train_t)
    y_tr = train_t.column(LABEL).to_numpy().astype(np.float64)
    x_va = transform.transform_table(valid_t)
    y_va = valid_t.column(LABEL).to_numpy().astype(np.float64)
    if len(np.unique(y_tr)) < 2:
        raise TrainingError(f"training rows of {cfg.start}..{cfg.end} hold a single class; cannot train a click model")
    day_rows = day_rows or [len(y_tr)]
    n_folds = len(day_rows) if len(day_rows) >= 2 else SINGLE_DAY_FOLDS
    f_tr, f_va = fold_of_rows(day_rows), np.full(len(y_va), n_folds, dtype=np.intp)
    stats = FoldStats.empty(n_folds + 1, transform)
    stats.add(transform, x_tr, y_tr.astype(np.int64), f_tr)
    stats.add(transform, x_va, y_va.astype(np.int64), f_va)

    def derived(n: int) -> tuple[FeatureTransform, np.ndarray]:
        if not cfg.derived:
            return transform, np.empty(0)
        rows, clicks = stats.rows[:n], stats.clicks[:n]
        full = transform.with_stats(rows.sum(axis=0), clicks.sum(axis=0), cfg.derived, cfg.target_smoothing)
        return full, full.oof_tables(rows, clicks)

    served, oof = derived(n_folds)
    d_tr = served.derive(x_tr, oof, f_tr) if cfg.derived else x_tr
    d_va = served.derive(x_va)
    names = served.feature_names
    dtrain = lgb.Dataset(d_tr, y_tr, feature_name=names, categorical_feature=CAT_INDEX, free_raw_data=True)
    dvalid = lgb.Dataset(d_va, y_va, reference=dtrain)
    evals: dict[str, Any] = {}
    cfg, params, _ = cfg.for_rows(len(y_tr))  # the local path's rule (ctr.training.scaling)
    booster = lgb.train(params, dtrain, num_boost_round=cfg.rounds, valid_sets=[dvalid], valid_names=["valid"],
                        callbacks=[lgb.early_stopping(cfg.early_stopping, first_metric_only=True, verbose=False),
                                   lgb.log_evaluation(period=25), lgb.record_evaluation(evals)])
    best = booster.best_iteration or cfg.rounds
    valid = evals.get("valid", {})
    valid_auc = valid.get("auc", [None] * best)[best - 1]
    valid_logloss = valid.get("binary_logloss", [None] * best)[best - 1]
    trees = best
    if cfg.refit:  # the local path's refit: every row, the validation rows one more fold, trees scaled by rows
        served, oof = derived(n_folds + 1)
        x_all = np.vstack([x_tr, x_va])
        f_all = np.concatenate([f_tr, f_va])
        d_all = served.derive(x_all, oof, f_all) if cfg.derived else x_all
        trees = max(1, round(best * (len(y_tr) + len(y_va)) / len(y_tr)))
        params = {k: v for k, v in params.items() if k != "metric"}
        booster = lgb.train(params, lgb.Dataset(d_all, np.concatenate([y_tr, y_va]), feature_name=names,
                                                categorical_feature=CAT_INDEX, free_raw_data=True),
                            num_boost_round=trees)
    return booster, int(best), valid_auc, valid_logloss, int(trees), served


# ---- scoring on the executors --------------------------------------------------------------------
def _scorer(model_str: str, features: dict[str, Any]):
    def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import lightgbm as lgb

        from ctr.model.bundle import Bundle

        transform = FeatureTransform.from_json(features)  # with its derived-feature tables
        b = Bundle(path=Path("."), booster=lgb.Booster(model_str=model_str), transform=transform, metadata={}, digest="")
        for rb in batches:
            t = pa.Table.from_batches([rb])
            p = b.predict_table(t)
            yield pa.record_batch([t.column("pos").combine_chunks(), t.column(LABEL).cast(pa.float64()).combine_chunks(),
                                   pa.array(p, pa.float64())], names=["pos", "y", "p"])
    return score


def score_holdout(holdout_df, bundle_dirs: list[Path]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels and each bundle's probabilities on the same holdout rows, scored on the executors."""
    ys: np.ndarray | None = None
    ps = []
    for d in bundle_dirs:
        model_str = (d / "model.txt").read_text()
        features = json.loads((d / "features.json").read_text())
        schema = _spark_schema(pa.schema([("pos", pa.int64()), ("y", pa.float64()), ("p", pa.float64())]))
        t = collect_arrow(holdout_df.mapInArrow(_scorer(model_str, features), schema).orderBy("pos"))
        if ys is None:
            ys = t.column("y").to_numpy()
        ps.append(t.column("p").to_numpy())
    return (ys if ys is not None else np.empty(0)), ps


# ---- feature drift of the holdout day (ctr.monitoring.drift, as the DAG's evaluate) ------------------
def _profiler(ref_json: dict[str, Any]):
    def profile(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from ctr.monitoring.drift import Reference

        ref = Reference.from_json(ref_json)
        prof = ref.empty_profile()
        for rb in batches:
            ref.add_table(prof, pa.Table.from_batches([rb]))
        yield pa.record_batch([pa.array([json.dumps(prof.to_json())], pa.string())], names=["profile"])
    return profile


def holdout_profile(df, ref):
    """The rows of `df` counted in `ref`'s bins on the executors (`Reference.add_table` per partition),
    the partial counts summed on the driver: the same integers as `ref.profile` over the same rows."""
    from ctr.monitoring.drift import merge_profiles
    from ctr.schema import FEATURE_COLUMNS

    schema = _spark_schema(pa.schema([("profile", pa.string())]))
    parts = df.select(*FEATURE_COLUMNS).mapInArrow(_profiler(ref.to_json()), schema).collect()
    return merge_profiles(ref, (json.loads(r["profile"]) for r in parts))


def holdout_drift(train_rows: list[pa.Table] | None, train_good, train_days: list[dt.date], total: int,
                  holdout_df, holdout_scores: np.ndarray, valid_scores: np.ndarray, transform: FeatureTransform,
                  seed: int):
    """metrics.json's `drift` and the drift reference, computed as `ctr.validation.holdout.evaluate_day`
    computes them: the training range's reference (`reference_from_rows`: its deciles, the vocabulary's
    top values) from `train_rows` (the driver's training + validation tables in landing-zone order) or,
    without them, from the range collected here; the holdout day profiled on the executors; the
    candidate's holdout scores vs its scores on the validation day (the last training day)."""
    from ctr.monitoring.drift import REFERENCE_MAX_ROWS, build_reference, reference_from_rows
    from ctr.schema import FEATURE_COLUMNS
    from ctr.validation.holdout import drift_from_scores

    if train_rows is None and total > REFERENCE_MAX_ROWS:
        # no full copy on the driver (synapseml on a big range): a seeded Spark sample of the same size
        frac = REFERENCE_MAX_ROWS / total
        rows = to_arrow(train_good.sample(withReplacement=False, fraction=frac, seed=seed)).select(FEATURE_COLUMNS)
        ref = build_reference([rows], transform.vocab,
                              source=f"training range {train_days[0]}..{train_days[-1]}, a seeded {frac:.4g} "
                                     f"Spark sample ({rows.num_rows} rows) of {total}")
    else:
        tables = train_rows if train_rows is not None else [to_arrow(train_good)]
        ref = reference_from_rows((t.select(FEATURE_COLUMNS) for t in tables), total, train_days, transform.vocab)
    return drift_from_scores(ref, holdout_profile(holdout_df, ref), holdout_scores, valid_scores, train_days[-1]), ref


# ---- outputs --------------------------------------------------------------------------------------
def publish(spark, local_dir: Path, dest: str) -> None:
    """Copy a local folder to its destination: a local path, or any Hadoop URI (abfss://, dbfs:/)."""
    if not _is_remote(dest):
        target = Path(dest.removeprefix("file://"))
        if target.resolve() != local_dir.resolve():
            shutil.copytree(local_dir, target, dirs_exist_ok=True)
        return
    fs, path = _hadoop_fs(spark, dest)
    jvm = spark.sparkContext._jvm
    fs.mkdirs(path)
    for p in sorted(local_dir.rglob("*")):
        if p.is_file():
            dst = jvm.org.apache.hadoop.fs.Path(f"{dest.rstrip('/')}/{p.relative_to(local_dir).as_posix()}")
            fs.copyFromLocalFile(False, True, jvm.org.apache.hadoop.fs.Path(p.resolve().as_uri()), dst)


def _fetch_baseline(spark, uri: str, into: Path) -> Path:
    if not _is_remote(uri):
        return Path(uri.removeprefix("file://"))
    fs, path = _hadoop_fs(spark, uri)
    jvm = spark.sparkContext._jvm
    into.mkdir(parents=True, exist_ok=True)

    def get(name: str) -> None:
        fs.copyToLocalFile(False, jvm.org.apache.hadoop.fs.Path(f"{uri.rstrip('/')}/{name}"),
                           jvm.org.apache.hadoop.fs.Path((into / name).resolve().as_uri()), True)

    from ctr.model.bundle import MANIFEST

    get(MANIFEST)  # then every file it lists; Bundle.load checks them against it
    listed = json.loads((into / MANIFEST).read_text()).get("files", {})
    for name in sorted(listed):
        if "/" in name or name in (".", ".."):
            raise ValueError(f"baseline {uri}: {MANIFEST} lists {name[:60]!r}, not a file name")
        get(name)
    return into


# ---- the job ---------------------------------------------------------------------------------------
def run_job(spark, a: JobArgs) -> dict[str, Any]:
    """The whole job; returns the summary also written to OUT/data_report.json (and metrics).

    One function on purpose (~120 lines): its numbered steps share the cached `parsed` DataFrame and
    the work folder whose release the `finally` owns, and read top to bottom as the job's outline;
    each step's substance is a function of this module (day_reports, fit_vocabulary, train_lightgbm,
    score_holdout, publish) or a shared builder (bundle_metadata, finalize_bundle, evaluation_document).
    """
    from pyspark.sql import functions as F

    from ctr.data.checks import CheckConfig, problems
    from ctr.model.bundle import bundle_metadata, finalize_bundle

    t0 = time.monotonic()
    cfg = a.train_config()
    train_days = daterange(a.start, a.end)
    all_days = train_days + ([a.holdout] if a.holdout else [])
    listed = {d.isoformat(): _list_day(spark, a.data, d) for d in all_days}
    files = {k: v[0] for k, v in listed.items()}
    fingerprints = {k: files_digest(v[1]) for k, v in listed.items()}  # lineage, as stage_day records it
    log.info("spark_job: days=%s..%s holdout=%s files=%d engine=%s master=%s", a.start, a.end, a.holdout,
             sum(len(v) for v in files.values()), a.engine, spark.sparkContext.master)
    parsed = read_days(spark, a.data, all_days).cache()
    work = Path(tempfile.mkdtemp(prefix="ctr-spark-job-"))
    try:
        # 1. validate exactly as check_data does
        reports = day_reports(parsed, all_days, files)
        check = CheckConfig(max_bad_fraction=a.max_bad_fraction)
        failures: list[str] = []
        for i, rep in enumerate(reports):
            failures += problems(rep, reports[max(0, i - check.history_days):i], check)
            log.info("day=%s rows=%d ok=%d bad=%d reasons=%s", rep.day, rep.rows_in, rep.rows_ok,
                     rep.rows_quarantined, rep.reasons)
        reports_dir = work / "reports"
        reports_dir.mkdir()
        bad = parsed.where(F.col("bad_reason").isNotNull())
        if any(r.rows_quarantined for r in reports):
            qdir = f"{a.out.rstrip('/')}/quarantine"
            bad.select("day", "file", F.col("bad_reason").alias("reason"), "raw").write.mode("overwrite") \
                .partitionBy("day").option("sep", "\t").option("header", True).csv(qdir)
            for r in reports:
                r.quarantine = f"{qdir}/day={r.day}" if r.rows_quarantined else None
        data_report = {"days": {r.day: r.to_json() for r in reports}, "problems": failures}
        (reports_dir / "data_report.json").write_text(json.dumps(data_report, indent=1, sort_keys=True) + "\n")
        if failures:
            publish(spark, reports_dir, a.out)
            raise LandingZoneError("data checks failed: " + "; ".join(failures))

        # 2. vocabularies with Spark, on the rows the local path fits them on
        good = parsed.where(F.col("bad_reason").isNull())
        train_good = good.where(F.col("day").isin([d.isoformat() for d in train_days]))
        train_df, valid_df = split_train_valid(train_good, train_days, cfg)
        t1 = time.monotonic()
        transform = fit_vocabulary(train_df, cfg.min_count, cfg.max_vocab)
        for note in transform.notes:
            log.warning("features: %s", note)
        log.info("vocabularies: sizes=%s secs=%.1f", {c: len(v) for c, v in transform.vocab.items()}, time.monotonic() - t1)

        # 3. train
        bundle = work / "model"
        bundle.mkdir()
        t2 = time.monotonic()
        engine_info: dict[str, Any] = {}
        drift_rows: list[pa.Table] | None = None
        if a.engine == "lightgbm":
            train_t, valid_t = to_arrow(train_df), to_arrow(valid_df)
            if train_t.num_rows == 0:
                raise TrainingError(f"no rows to train on in days {a.start}..{a.end} under {a.data}")
            log.info("train rows=%d valid rows=%d (driver-side LightGBM over Arrow)", train_t.num_rows, valid_t.num_rows)
            day_rows = [int(r["count"]) for r in train_df.groupBy("day").count().orderBy("day").collect()] \
                if len(train_days) >= 2 else [train_t.num_rows]
            cfg, params, scaled = cfg.for_rows(train_t.num_rows)  # refit decided here: the tables below follow it
            booster, best, valid_auc, valid_logloss, trees, served = train_lightgbm(train_t, valid_t, transform, cfg,
                                                                                   day_rows)
            if cfg.derived:  # the bundle's tables: Spark's aggregation, which must equal the driver's counts
                # the rows the driver trained on (sampled ones when sample_fraction < 1)
                transform = code_stats(train_df.unionByName(valid_df) if cfg.refit else train_df, transform, cfg)
                if transform.code_stats != served.code_stats:
                    raise TrainingError("the Spark aggregation of the derived features' rows/clicks per code differs "
                                        "from the driver's count of the same rows; refusing an inconsistent bundle")
            trees_built = booster.current_iteration()
            if cfg.refit:
                engine_info = {"refit": {"rows": train_t.num_rows + valid_t.num_rows, "trees": trees,
                                        "rule": "best_iteration x (training + validation rows) / training rows"}}
            booster.save_model(str(bundle / "model.txt"), num_iteration=trees)
            n_train, n_valid, sample = train_t.num_rows, valid_t.num_rows, valid_t
            if cfg.sample_fraction >= 1.0:  # every valid training row, in landing-zone order: the drift reference's
                drift_rows = [train_t, valid_t]
            click_rate = float(np.concatenate([train_t.column(LABEL).to_numpy(), valid_t.column(LABEL).to_numpy()]).mean())
            if scaled:
                engine_info["scaled"] = scaled
        else:
            from ctr.training.synapseml import train_synapseml

            if cfg.derived or cfg.refit:
                log.warning("engine synapseml trains on the 39 codes alone: no derived features (%s) and no refit; "
                            "--engine spark or lightgbm train the default model", ", ".join(cfg.derived) or "none")

            cores = a.executor_cores or executor_cores(spark)
            res = train_synapseml(spark, train_df, valid_df, transform, cfg, cores, f"{a.out.rstrip('/')}/_synapseml")
            (bundle / "model.txt").write_text(res["model_str"])
            best, valid_auc, valid_logloss, params = res["best_iteration"], None, None, res["params"]
            trees_built = res.get("trees_built", best)
            n_train, n_valid = train_df.count(), valid_df.count()
            click_rate = float(train_good.agg(F.avg(LABEL)).collect()[0][0])
            sample = collect_arrow(valid_df.limit(16).select(*ALL_COLUMNS)).cast(ARROW_SCHEMA)
        log.info("trees best_iteration=%s valid_auc=%s train_secs=%.1f", best, valid_auc, time.monotonic() - t2)
        transform.save(bundle / "features.json")
        validation = train_days[-1].isoformat() + (" (last tenth)" if len(train_days) == 1 else "")
        metadata = bundle_metadata(
            cfg, engine=f"spark-{a.engine}", validation=validation, rows_train=n_train, rows_valid=n_valid,
            click_rate=click_rate, transform=transform, feature_notes=transform.notes, params=params,
            trees_built=trees_built, best_iteration=best, valid_auc=valid_auc, valid_logloss=valid_logloss,
            data_fingerprints={d.isoformat(): fingerprints[d.isoformat()] for d in train_days},
            extra={  # Spark-only lineage, then the caller's (DAG run) metadata
                "ctr_location": str(Path(ctr.__file__).parent), "spark_master": spark.sparkContext.master,
                "data_report": {r.day: {"rows_in": r.rows_in, "rows_ok": r.rows_ok} for r in reports},
                **({"holdout_fingerprint": {a.holdout.isoformat(): fingerprints[a.holdout.isoformat()]}} if a.holdout else {}),
                **engine_info, **a.metadata})
        finalize_bundle(bundle, sample, metadata)

        # 4. evaluate on the holdout day, on the executors
        summary: dict[str, Any] = {"bundle": None, "metrics": None, "data_report": data_report}
        if a.holdout is not None:
            from ctr.model.bundle import Bundle
            from ctr.validation.gate import GateConfig
            from ctr.validation.holdout import evaluation_document

            dirs = [bundle] + ([_fetch_baseline(spark, a.baseline, work / "baseline")] if a.baseline else [])
            holdout_df = good.where(F.col("day") == a.holdout.isoformat())
            y, probs = score_holdout(holdout_df, dirs)
            if len(y) == 0:
                raise ValueError(f"holdout day={a.holdout} has no valid rows under {a.data}")
            gate = GateConfig.from_params(a.gate_params)
            version = Bundle.load(bundle).version
            _, (valid_scores,) = score_holdout(good.where(F.col("day") == train_days[-1].isoformat()), [bundle])
            n_range = sum(r.rows_ok for r in reports if r.day != a.holdout.isoformat())
            drift, ref = holdout_drift(drift_rows, train_good, train_days, n_range, holdout_df, probs[0], valid_scores,
                                       transform, a.seed)
            log.info("holdout drift vs %s: largest feature PSI %s; score PSI %s", ref.source,
                     ", ".join(f"{m['feature']} {m['psi']:.3f}" for m in drift["largest"]), drift["score_psi"])
            doc = evaluation_document(y, probs[0], probs[1] if a.baseline else None, day=a.holdout, gate=gate,
                                      candidate_version=version,
                                      baseline_version=Bundle.load(dirs[1]).version if a.baseline else None, drift=drift)
            (reports_dir / "metrics.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
            from ctr.monitoring.drift import REFERENCE_FILE

            ref.with_scores(probs[0], f"candidate {version} on holdout day {a.holdout.isoformat()}")  # what `ctr monitor` reads
            (reports_dir / REFERENCE_FILE).write_text(json.dumps(ref.to_json(), sort_keys=True) + "\n")
            summary["metrics"] = doc
            log.info("holdout day=%s rows=%d candidate AUC %.4f logloss %.4f gate=%s", a.holdout, doc["rows"],
                     doc["candidate"]["auc"], doc["candidate"]["logloss"], "PASSED" if doc["gate"]["passed"] else "REJECTED")
        bundle_dest = a.bundle_dir or f"{a.out.rstrip('/')}/model"
        publish(spark, bundle, bundle_dest)
        publish(spark, reports_dir, a.out)
        summary["bundle"] = bundle_dest
        log.info("spark_job: bundle at %s, reports at %s (total secs %.1f)", bundle_dest, a.out, time.monotonic() - t0)
        return summary
    finally:
        parsed.unpersist()
        shutil.rmtree(work, ignore_errors=True)


def executor_cores(spark) -> int:
    """Cores per executor: spark.executor.cores when set, else this node's CPU count (Databricks
    workers and driver share the node type in our cluster spec)."""
    v = spark.conf.get("spark.executor.cores", None)
    return int(v) if v else (os.cpu_count() or 2)


def run_local_spark_job(*, data: str, start: dt.date, end: dt.date, out: Path, seed: int = 42,
                        params: dict[str, Any] | None = None, holdout: dt.date | None = None,
                        sample_fraction: float = 1.0, engine: str = "lightgbm") -> dict[str, Any]:
    """`ctr train --engine spark|synapseml`: the job on pyspark's bundled local Spark (or
    CTR_SPARK_MASTER), with driver-side LightGBM (`spark`) or SynapseML's LightGBM (`synapseml`).

    The bundle goes to `out`; metrics.json (holdout = the day after `end`, when the landing zone
    has it), data_report.json and quarantine/ go to `<out>.spark/`.
    """
    out = Path(out).resolve()
    reports = out.with_name(out.name + ".spark")
    if engine == "synapseml":
        from ctr.training.synapseml import require_jars

        require_jars()  # before Spark starts: one line naming the missing Maven coordinates
    spark = spark_session()
    if holdout is None:
        try:
            list_day_files(spark, data, end + dt.timedelta(days=1))
            holdout = end + dt.timedelta(days=1)
        except LandingZoneError:
            log.info("no day %s in %s: skipping the holdout evaluation", end + dt.timedelta(days=1), data)
    args = JobArgs(data=str(Path(data).resolve()) if not _is_remote(data) else data, start=start, end=end,
                   out=str(reports), holdout=holdout, engine=engine, seed=seed, params=params or {},
                   sample_fraction=sample_fraction, bundle_dir=str(out),
                   num_threads=Settings.from_env().num_threads)
    summary = run_job(spark, args)
    if summary["metrics"]:
        m = summary["metrics"]["candidate"]
        print(f"holdout {holdout}: AUC {m['auc']:.4f} logloss {m['logloss']:.4f} (metrics at {reports}/metrics.json)")
    print(f"bundle written to {out}")
    return summary
