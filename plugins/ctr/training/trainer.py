"""LightGBM training on a range of staged days, writing a model bundle.

Deterministic: `seed`, `deterministic=True`, a fixed thread count and row-wise histograms, so
two trainings on the same data give a byte-identical `model.txt`. Early stopping watches a
time-ordered validation slice: the last day of the training range (or, for a one-day range,
its last tenth); the holdout day is never seen here.

Bounded by design (docs/scale.md): the staged Parquet is streamed twice, chunk by chunk. Pass 1
counts categorical values exactly with sorted runs spilled to disk (`ctr.features.vocab_spill`); pass 2
encodes each chunk with the serving transform and spills it (`ctr.training.chunks`), and LightGBM
builds its Dataset from those chunks through `lightgbm.Sequence`. No process holds all rows'
raw or encoded features; what grows with the rows is LightGBM's binned Dataset and the labels.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ctr.data.landing import daterange, read_staged, staged_fingerprints
from ctr.features.transform import (
    CAT_INDEX,
    DEFAULT_DERIVED,
    DEFAULT_SMOOTHING,
    DERIVED_KINDS,
    FeatureTransform,
)
from ctr.features.vocab_spill import SpillingVocabCounter
from ctr.model.bundle import bundle_metadata, finalize_bundle
from ctr.schema import INT_COLUMNS, LABEL
from ctr.training.scaling import ROWS_PER_TREE, refit_by_rows, scale_to_rows

if TYPE_CHECKING:
    from ctr.training.chunks import EncodedChunks

log = logging.getLogger(__name__)

# Measured on generated data (docs/training.md, issue 16): with the derived features (count and
# smoothed click rate per code) carrying the per-value signal, heavy regularisation of LightGBM's own
# categorical splits (at most 4 categories on a side, cat_smooth 200, 1,000 rows per group) beat its
# defaults (32 / 10 / 100) by about 0.02 AUC on 4 x 100k rows; 64 leaves, small leaves, no bagging,
# no L2 on leaves. `lgb_params` from the DAG overrides any of these.
DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "metric": ["binary_logloss", "auc"],  # the first one drives early stopping
    "learning_rate": 0.1,
    "num_leaves": 64,
    "min_data_in_leaf": 20,
    "feature_fraction": 0.8,
    "lambda_l2": 0.0,
    "max_bin": 255,
    "cat_smooth": 200.0,
    "cat_l2": 10.0,
    "max_cat_threshold": 4,
    "min_data_per_group": 1000,
    "deterministic": True,
    "force_row_wise": True,
    "verbosity": -1,
}
DEFAULT_ROUNDS = 1000  # a ceiling: early stopping ends training (~450 trees on 4 x 100k rows)
EARLY_STOPPING = 30
DEFAULT_MIN_COUNT = 10
DEFAULT_MAX_VOCAB = 10_000
SINGLE_DAY_FOLDS = 4  # a one-day range's training rows: out-of-fold statistics over 4 contiguous blocks
PROGRESS_EVERY = 25  # trees between progress log lines
ROUNDS_ALIASES = ("num_iterations", "num_iteration", "n_iter", "num_tree", "num_trees", "num_round", "num_rounds",
                  "nrounds", "num_boost_round", "n_estimators", "max_iter")
EARLY_STOPPING_ALIASES = ("early_stopping_round", "early_stopping_rounds", "early_stopping", "n_iter_no_change")
# Encoded rows up to this many bytes (float64, 39 wide; train + valid) go to LightGBM as in-memory
# matrices, where it samples bins in C++; above it, through lightgbm.Sequence over the spilled chunks
# (bounded memory, but its per-row Python sampling costs seconds). 1 GiB is ~3.4M rows.
IN_MEMORY_ENV, IN_MEMORY_MAX_BYTES = "CTR_TRAIN_IN_MEMORY_MAX_BYTES", 1 << 30
SAVE_DATASET_ENV = "CTR_TRAIN_SAVE_DATASET"  # benchmarks only: save the binned training Dataset to this path


class TrainingError(RuntimeError):
    """Training cannot proceed; the message names the days/inputs and what to do."""


@dataclass
class TrainConfig:
    start: dt.date
    end: dt.date                      # inclusive
    seed: int = 42
    num_threads: int = 2
    rounds: int = DEFAULT_ROUNDS
    early_stopping: int = EARLY_STOPPING   # 0 = train exactly `rounds` trees
    sample_fraction: float = 1.0      # < 1 trains on a deterministic slice (used to test the gate)
    min_count: int = DEFAULT_MIN_COUNT
    max_vocab: int = DEFAULT_MAX_VOCAB
    missing: str = "nan"              # categorical missing: NaN or its own code (ctr.features.transform)
    refit: bool | None = None         # after early stopping, retrain on training + validation rows;
    #                                   None: at or below rows_per_tree training rows only (ctr.training.scaling)
    derived: tuple[str, ...] = DEFAULT_DERIVED  # derived features per categorical (count, target); () = none
    target_smoothing: float = DEFAULT_SMOOTHING  # prior weight of the smoothed click rate per code
    rows_per_tree: int = ROWS_PER_TREE  # above this many training rows, bag and speed up (ctr.training.scaling); 0 = off
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """The DAG passes one object of training overrides (`lgb_params`); besides LightGBM's own
        parameters it may set the number of trees (`num_iterations` or an alias -> `rounds`), early
        stopping (`early_stopping_round` -> `early_stopping`), the vocabulary (`max_vocab`, `min_count`) and
        the derived features (`derived`: a list of "count"/"target", `target_smoothing`), `refit` and
        `rows_per_tree` (ctr.training.scaling; 0 = never scale)."""
        params = dict(self.params)
        for key in ROUNDS_ALIASES:
            if key in params:
                self.rounds = int(params.pop(key))
        for key in EARLY_STOPPING_ALIASES:
            if key in params:
                self.early_stopping = int(params.pop(key))
        for key in ("max_vocab", "min_count", "rows_per_tree"):
            if key in params:
                setattr(self, key, int(params.pop(key)))
        if "derived" in params:
            self.derived = tuple(params.pop("derived") or ())
        if "refit" in params:
            self.refit = bool(params.pop("refit"))
        if "target_smoothing" in params:
            self.target_smoothing = float(params.pop("target_smoothing"))
        self.derived = tuple(self.derived)
        self.params = params

    def lgb_params(self) -> dict[str, Any]:
        p = {**DEFAULT_PARAMS, **self.params}
        p.update(seed=self.seed, num_threads=self.num_threads)
        return p

    def for_rows(self, rows: int) -> tuple[TrainConfig, dict[str, Any], dict[str, Any] | None]:
        """For `rows` training rows (ctr.training.scaling): this config with `refit` decided, the LightGBM
        parameters, and what the rule changed (None: nothing). What `lgb_params` set is never scaled."""
        params, scaled = scale_to_rows(self.lgb_params(), rows, self.rows_per_tree, explicit=set(self.params))
        if self.refit is not None:
            return self, params, scaled
        refit = refit_by_rows(rows, self.rows_per_tree)
        if not refit:
            scaled = {**(scaled or {"rows": int(rows), "rows_per_tree": int(self.rows_per_tree)}), "refit": False}
        return replace(self, refit=refit), params, scaled

    def check(self) -> None:
        if self.end < self.start:
            raise TrainingError(f"training range {self.start}..{self.end} holds no days (--to is before --from); "
                                "give --from <= --to")
        if not 0.0 < self.sample_fraction <= 1.0:
            raise TrainingError(f"sample_fraction={self.sample_fraction} must be in (0, 1]")
        if self.rounds < 1:
            raise TrainingError(f"rounds={self.rounds} must be at least 1")
        if any(k not in DERIVED_KINDS for k in self.derived) or len(set(self.derived)) != len(self.derived):
            raise TrainingError(f"derived={list(self.derived)!r}: each must be one of {', '.join(DERIVED_KINDS)}, once")
        if not self.target_smoothing > 0:
            raise TrainingError(f"target_smoothing={self.target_smoothing} must be > 0")
        if self.rows_per_tree < 0:
            raise TrainingError(f"rows_per_tree={self.rows_per_tree} must be >= 0 (0 = never scale with the rows)")
        if self.min_count < 1 or self.max_vocab < 0:
            raise TrainingError(f"min_count={self.min_count} must be >= 1 and max_vocab={self.max_vocab} >= 0")
        for key in ("seed", "num_threads", "deterministic"):
            if key in self.params:
                raise TrainingError(f"lgb_params must not set {key!r}: it is fixed for reproducibility "
                                    "(use the seed/num_threads settings)")


def _sample(table: pa.Table, fraction: float, seed: int, salt: int) -> pa.Table:
    if fraction >= 1.0:
        return table
    rng = np.random.default_rng([seed, salt])
    return table.filter(pa.array(rng.random(table.num_rows) < fraction))


def day_chunks(staging: Path, day: dt.date, fraction: float, seed: int) -> Iterator[pa.Table]:
    """The staged rows of one day in file order, deterministically sampled when fraction < 1."""
    for i, t in enumerate(read_staged(staging, day)):
        yield _sample(t, fraction, seed, day.toordinal() * 1000 + i)


@dataclass
class Split:
    """Which rows train and which validate, as a re-iterable stream of (role, chunk)."""

    staging: Path
    days: list[dt.date]
    fraction: float
    seed: int
    single_day_cut: int | None = None   # one-day range: rows before this index train
    train_rows: int | None = None       # training rows (pass 1 counts them; one-fit-day folds need it)

    def chunks(self) -> Iterator[tuple[str, pa.Table]]:
        for role, _, t in self._chunks(folds=False):
            yield role, t

    def folded_chunks(self) -> Iterator[tuple[str, np.ndarray, pa.Table]]:
        """(role, each row's fold, chunk), for the out-of-fold statistics of the derived features: the
        training rows' folds by `fold_of_rows` (needs `train_rows`, which pass 1 sets); validation rows
        are fold 0 here (the caller numbers them)."""
        if self.train_rows is None:
            raise RuntimeError("Split.train_rows is unknown: count the rows (pass 1) before asking for folds")
        for role, folds, t in self._chunks(folds=True):
            assert folds is not None
            yield role, folds, t

    def _chunks(self, folds: bool) -> Iterator[tuple[str, np.ndarray | None, pa.Table]]:
        fold_ids = fold_of_rows(self.fit_day_rows()) if folds and len(self.days) < 3 else None
        pos = 0

        def train_folds(i: int, k: int) -> np.ndarray | None:
            if not folds:
                return None
            return np.full(k, i, dtype=np.intp) if fold_ids is None else fold_ids[pos:pos + k]

        def zeros(k: int) -> np.ndarray | None:
            return np.zeros(k, dtype=np.intp) if folds else None

        if len(self.days) >= 2:
            for i, d in enumerate(self.days[:-1]):
                for t in day_chunks(self.staging, d, self.fraction, self.seed):
                    yield "train", train_folds(i, t.num_rows), t
                    pos += t.num_rows
            for t in day_chunks(self.staging, self.days[-1], self.fraction, self.seed):
                yield "valid", zeros(t.num_rows), t
            return
        assert self.single_day_cut is not None
        seen = 0
        for t in day_chunks(self.staging, self.days[0], self.fraction, self.seed):
            k = max(0, min(t.num_rows, self.single_day_cut - seen))
            if k:
                yield "train", train_folds(0, k), t.slice(0, k)
                pos += k
            if k < t.num_rows:
                yield "valid", zeros(t.num_rows - k), t.slice(k)
            seen += t.num_rows

    def fit_day_rows(self) -> list[int]:
        """Training rows per fit day as `fold_of_rows` needs them; with one fit day only its total matters."""
        if len(self.days) >= 3:
            raise ValueError("per-day folds need no row counts")
        assert self.train_rows is not None
        return [self.train_rows]

    @property
    def n_folds(self) -> int:
        return len(self.days) - 1 if len(self.days) >= 3 else SINGLE_DAY_FOLDS

    @property
    def valid_days(self) -> str:
        return f"{self.days[-1]}" + (" (last tenth)" if len(self.days) == 1 else "")


def fold_of_rows(day_rows: list[int]) -> np.ndarray:
    """The fold of every training row, given the rows of each fit day in order (the rule the local path
    and the Spark job share): its day when there are two or more fit days, else one of
    SINGLE_DAY_FOLDS contiguous blocks of the one fit day (a one- or two-day range)."""
    if len(day_rows) >= 2:
        return np.repeat(np.arange(len(day_rows), dtype=np.intp), day_rows)
    n = day_rows[0] if day_rows else 0
    return (np.arange(n, dtype=np.int64) * SINGLE_DAY_FOLDS // max(n, 1)).astype(np.intp)


def plan_split(staging: Path, cfg: TrainConfig) -> Split:
    """The time-ordered split; fails naming the days when there is nothing to train on."""
    cfg.check()
    days = daterange(cfg.start, cfg.end)
    split = Split(staging, days, cfg.sample_fraction, cfg.seed)
    if len(days) == 1:
        n = sum(t.num_rows for t in day_chunks(staging, days[0], cfg.sample_fraction, cfg.seed))
        if n < 2:
            raise TrainingError(f"training range {days[0]}..{days[0]} has {n} rows under {staging}; "
                                "a one-day range needs rows to train on and a last tenth to validate")
        split.single_day_cut = max(1, int(n * 0.9))
    return split


def count_vocabulary(split: Split, spill: Path | None = None) -> tuple[SpillingVocabCounter, dict[str, int], list[str]]:
    """Pass 1: categorical value counts over the training role (exact, spilled under `spill`);
    rows per role; integer columns that are entirely missing in the training rows."""
    counter = SpillingVocabCounter(spill)
    rows = {"train": 0, "valid": 0}
    int_missing = dict.fromkeys(INT_COLUMNS, 0)
    for role, t in split.chunks():
        rows[role] += t.num_rows
        if role == "train":
            counter.update(t)
            for c in INT_COLUMNS:
                int_missing[c] += t.column(c).null_count
    empty_ints = [c for c, n in int_missing.items() if rows["train"] and n == rows["train"]]
    return counter, rows, empty_ints


@dataclass
class FoldStats:
    """Rows and clicks per fold and flat code slot (FeatureTransform.count_slots); shared by the local
    path and the Spark job's driver-side training."""

    rows: np.ndarray    # (folds, slots) int64
    clicks: np.ndarray  # (folds, slots) int64

    @classmethod
    def empty(cls, folds: int, transform: FeatureTransform) -> FoldStats:
        slots = sum(len(transform.vocab[c]) + 2 for c in transform.vocab)
        return cls(np.zeros((folds, slots), np.int64), np.zeros((folds, slots), np.int64))

    def add(self, transform: FeatureTransform, x: np.ndarray, y: np.ndarray, folds: np.ndarray) -> None:
        """Count a codes matrix's rows and clicks into their folds."""
        for f in np.unique(folds):
            rows, clicks = transform.count_slots(x[folds == f], y[folds == f])
            self.rows[f] += rows
            self.clicks[f] += clicks


def encode(split: Split, transform: FeatureTransform, spill: Path) -> tuple[dict[str, EncodedChunks], pa.Table | None, FoldStats]:
    """Pass 2: each chunk -> the serving transform -> a spill file under `spill`; the first
    validation rows are kept (raw) for the bundle's probe; the codes are counted per fold for the
    derived features (training folds 0..n_folds-1, the validation rows fold n_folds)."""
    from ctr.training.chunks import EncodedChunks

    out = {role: EncodedChunks(spill / role) for role in ("train", "valid")}
    head = None
    stats = FoldStats.empty(split.n_folds + 1, transform)
    for role, folds, t in split.folded_chunks():
        if t.num_rows == 0:
            continue
        if role == "valid" and head is None:
            head = t.slice(0, 16)
        x, y = transform.transform_table(t), t.column(LABEL).to_numpy()
        if role == "valid":
            folds = folds + split.n_folds  # the validation rows are one more fold (the refit's)
        out[role].append(x, y, folds)
        stats.add(transform, x, y, folds)
    return out, head, stats


def add_derived(transform: FeatureTransform, stats: FoldStats, enc: dict[str, EncodedChunks],
                cfg: TrainConfig, refit: bool = False) -> FeatureTransform:
    """The transform with its derived-feature tables, and the chunks' lookups set.

    Early stopping (`refit=False`): tables of the training rows; training rows get their out-of-fold
    statistics, validation rows the tables (as tomorrow's rows will). The refit: tables of all rows,
    every row (the validation day is one more fold) its out-of-fold statistics."""
    if not cfg.derived:
        return transform
    n = len(stats.rows) if refit else len(stats.rows) - 1
    rows, clicks = stats.rows[:n], stats.clicks[:n]
    full = transform.with_stats(rows.sum(axis=0), clicks.sum(axis=0), cfg.derived, cfg.target_smoothing)
    oof = full.oof_tables(rows, clicks)
    enc["train"].derive = lambda x, folds: full.derive(x, oof, folds)
    enc["valid"].derive = (lambda x, folds: full.derive(x, oof, folds)) if refit else (lambda x, folds: full.derive(x))
    return full


def _progress(every: int, built: list[int]) -> Callable[[Any], None]:
    """Logs progress every `every` trees and records how many trees were built (before early-stopping trim)."""

    def callback(env: Any) -> None:
        it = env.iteration + 1
        built[0] = it
        if it % every == 0 or it == env.end_iteration:
            shown = " ".join(f"{name}_{metric}={value:.5f}" for name, metric, value, _ in env.evaluation_result_list)
            log.info("trees built=%d/%d %s", it, env.end_iteration, shown)
    callback.order = 25  # type: ignore[attr-defined]  # before early_stopping (30), which raises on the last tree
    return callback


def _per_tree_metrics(params: dict[str, Any]) -> dict[str, Any]:
    """AUC sorts the whole validation set on every tree; compute it once at the end instead.
    The first metric (early stopping's) is unchanged, so the model is the same."""
    metric = params.get("metric")
    metrics = [metric] if isinstance(metric, str) else list(metric or [])
    if len(metrics) > 1 and "auc" in metrics[1:]:
        return {**params, "metric": [m for m in metrics if m != "auc"]}
    return params


def _row_count_problems(split: Split) -> list[str]:
    empty = []
    for d in split.days:
        if not any(t.num_rows for t in read_staged(split.staging, d, columns=[LABEL])):
            empty.append(d.isoformat())
    return empty


def train(staging: Path, out_dir: Path, cfg: TrainConfig, extra_metadata: dict[str, Any] | None = None) -> Path:
    """Train on staged days [cfg.start, cfg.end] and write a bundle to `out_dir`."""
    from ctr.data.spill_dir import SpillDir

    with SpillDir(Path(out_dir).parent, prefix=f".spill-{Path(out_dir).name}-") as spill:
        return _train(staging, Path(out_dir), cfg, spill.path, extra_metadata)


def _vocabulary(split: Split, cfg: TrainConfig, spill: Path, staging: Path) -> tuple[FeatureTransform, list[str]]:
    """Pass 1 over the training rows: the vocabularies (spilling counter) -> the transform, and notes about it."""
    t0 = time.monotonic()
    days = split.days
    counter, rows, empty_ints = count_vocabulary(split, spill)
    split.train_rows = rows["train"]
    if rows["train"] == 0 or rows["valid"] == 0:
        empty = _row_count_problems(split)
        raise TrainingError(
            f"no rows to {'train' if rows['train'] == 0 else 'validate'} on in days {days[0]}..{days[-1]} "
            f"(staged under {staging}; empty days: {', '.join(empty) or 'none'}"
            f"{'; sample_fraction=' + str(cfg.sample_fraction) if cfg.sample_fraction < 1 else ''})"
        )
    transform = FeatureTransform.from_counter(counter, cfg.min_count, cfg.max_vocab, cfg.missing)
    spilled = counter.spilled_pairs
    counter.close()
    notes = transform.notes + [f"{c}: entirely missing in the training range; it carries no signal" for c in empty_ints]
    for note in notes:
        log.warning("features: %s", note)
    log.info("vocabularies days=%s..%s train_rows=%d sizes=%s spilled_pairs=%s secs=%.1f", days[0], days[-1],
             rows["train"], transform.vocab_sizes, spilled, time.monotonic() - t0)
    return transform, notes


def _datasets(enc: dict[str, EncodedChunks], y_tr: np.ndarray, y_va: np.ndarray, params: dict[str, Any],
              names: list[str]) -> tuple[Any, Any]:
    """LightGBM's binned train/valid Datasets from the spilled chunks (in memory when small, else Sequences)."""
    import lightgbm as lgb

    in_memory = (len(y_tr) + len(y_va)) * len(names) * 8 <= int(os.environ.get(IN_MEMORY_ENV, IN_MEMORY_MAX_BYTES))
    source = (lambda c: list(c.matrices())) if in_memory else (lambda c: c.sequences())
    dtrain = lgb.Dataset(source(enc["train"]), y_tr, feature_name=names, categorical_feature=CAT_INDEX,
                         free_raw_data=True, params=params)
    dvalid = lgb.Dataset(source(enc["valid"]), y_va, reference=dtrain, feature_name=names,
                         categorical_feature=CAT_INDEX, params=params)
    t_ds = time.monotonic()
    dtrain.construct()
    dvalid.construct()
    enc["train"].release()
    enc["valid"].release()
    log.info("datasets built from %d spilled chunks (%s) secs=%.1f", len(enc["train"]) + len(enc["valid"]),
             "in memory" if in_memory else "lightgbm.Sequence", time.monotonic() - t_ds)
    if os.environ.get(SAVE_DATASET_ENV):  # benchmarks/scale.py times raw lightgbm.train on these very bins
        t_save = time.monotonic()
        dtrain.save_binary(os.environ[SAVE_DATASET_ENV])
        log.info("binned training dataset saved path=%s secs=%.1f", os.environ[SAVE_DATASET_ENV], time.monotonic() - t_save)
    return dtrain, dvalid


def _fit(params: dict[str, Any], dtrain: Any, dvalid: Any, cfg: TrainConfig) -> tuple[Any, int, int, dict[str, Any], float]:
    """Boost with early stopping on the validation rows: (booster, trees built, best iteration, evals, seconds)."""
    import lightgbm as lgb

    evals: dict[str, Any] = {}
    built_box = [0]
    callbacks = [_progress(PROGRESS_EVERY, built_box), lgb.record_evaluation(evals)]
    if cfg.early_stopping > 0:
        callbacks.append(lgb.early_stopping(cfg.early_stopping, first_metric_only=True, verbose=False))
    t1 = time.monotonic()
    booster = lgb.train(params, dtrain, num_boost_round=cfg.rounds, valid_sets=[dvalid], valid_names=["valid"],
                        callbacks=callbacks)
    best = booster.best_iteration or booster.current_iteration()
    return booster, built_box[0], best, evals, time.monotonic() - t1


def _refit(params: dict[str, Any], enc: dict[str, EncodedChunks], y_tr: np.ndarray, y_va: np.ndarray,
           names: list[str], best: int) -> tuple[Any, int, float]:
    """Retrain on the training and validation rows, without early stopping, for `best` trees scaled by
    the rows: (booster, trees, seconds). The validation day is the most recent: tomorrow looks most like it."""
    import lightgbm as lgb

    trees = max(1, round(best * (len(y_tr) + len(y_va)) / len(y_tr)))
    in_memory = (len(y_tr) + len(y_va)) * len(names) * 8 <= int(os.environ.get(IN_MEMORY_ENV, IN_MEMORY_MAX_BYTES))
    source = [*enc["train"].matrices(), *enc["valid"].matrices()] if in_memory \
        else [*enc["train"].sequences(), *enc["valid"].sequences()]
    t1 = time.monotonic()
    data = lgb.Dataset(source, np.concatenate([y_tr, y_va]), feature_name=names, categorical_feature=CAT_INDEX,
                       free_raw_data=True, params=params)
    booster = lgb.train({k: v for k, v in params.items() if k != "metric"}, data, num_boost_round=trees,
                        callbacks=[_progress(PROGRESS_EVERY, [0])])
    secs = time.monotonic() - t1
    log.info("refit on training + validation rows=%d trees=%d (best_iteration %d scaled by rows) secs=%.1f",
             len(y_tr) + len(y_va), trees, best, secs)
    return booster, trees, secs


def _train(staging: Path, out_dir: Path, cfg: TrainConfig, spill: Path, extra_metadata: dict[str, Any] | None) -> Path:
    t0 = time.monotonic()
    split = plan_split(staging, cfg)
    days = split.days
    fingerprints = staged_fingerprints(staging, days)  # lineage: the landing files each day was staged from
    transform, notes = _vocabulary(split, cfg, spill, staging)
    enc, probe_rows, stats = encode(split, transform, spill)  # pass 2: encoded chunks spilled to disk
    transform = add_derived(transform, stats, enc, cfg)
    y_tr, y_va = enc["train"].y(), enc["valid"].y()
    if len(np.unique(y_tr)) < 2:
        raise TrainingError(f"training rows of {days[0]}..{days[-1]} hold a single class; cannot train a click model")
    log.info("train rows=%d valid rows=%d (validation day %s) features=%d chunks=%d read_secs=%.1f",
             len(y_tr), len(y_va), split.valid_days, transform.n_features, len(enc["train"]), time.monotonic() - t0)
    cfg, params, scaled = cfg.for_rows(len(y_tr))
    params = _per_tree_metrics(params)
    if scaled:
        log.info("parameters scaled with the training rows (ctr.training.scaling): %s", scaled)
    # the Datasets are never bound here, so they are freed as soon as _fit returns
    booster, built, best, evals, train_secs = _fit(params, *_datasets(enc, y_tr, y_va, params, transform.feature_names), cfg)
    valid_metrics = {m: float(v[best - 1]) for m, v in evals.get("valid", {}).items()}
    if "auc" not in valid_metrics:
        from ctr.validation.metrics import auc

        p_valid = np.concatenate([booster.predict(m, num_iteration=best) for m in enc["valid"].matrices()])
        valid_metrics["auc"] = auc(y_va, p_valid)
    log.info("trees built=%d best_iteration=%d valid=%s train_secs=%.1f", built, best, valid_metrics, train_secs)
    if best == cfg.rounds:
        log.warning("best_iteration=%d equals rounds: the model may be undertrained; raise rounds", best)
    refit_info: dict[str, Any] = {}
    trees = best
    if cfg.refit:
        del booster
        transform = add_derived(transform.without_stats(), stats, enc, cfg, refit=True)
        booster, trees, refit_secs = _refit(params, enc, y_tr, y_va, transform.feature_names, best)
        train_secs += refit_secs
        refit_info = {"refit": {"rows": int(len(y_tr) + len(y_va)), "trees": trees, "secs": round(refit_secs, 1),
                                "rule": "best_iteration x (training + validation rows) / training rows"}}
    del enc

    now = staged_fingerprints(staging, days)
    if now != fingerprints:  # the passes above read the days more than once: all must have read one copy
        changed = sorted(d for d in now.keys() | fingerprints.keys() if now.get(d) != fingerprints.get(d))
        raise TrainingError(f"day(s) {', '.join(changed)} were re-staged under {staging} while this training read "
                            "them; re-run the training")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(out_dir / "model.txt"), num_iteration=trees)
    transform.save(out_dir / "features.json")
    metadata = bundle_metadata(
        cfg, engine="lightgbm", validation=split.valid_days, rows_train=len(y_tr), rows_valid=len(y_va),
        click_rate=(y_tr.sum() + y_va.sum()) / (len(y_tr) + len(y_va)), transform=transform, feature_notes=notes,
        params=params, trees_built=built, best_iteration=best, valid_auc=valid_metrics.get("auc"),
        valid_logloss=valid_metrics.get("binary_logloss"), data_fingerprints=fingerprints,
        extra={**refit_info, **({"scaled": scaled} if scaled else {}), **(extra_metadata or {})})
    finalize_bundle(out_dir, probe_rows, metadata)
    log.info("bundle written path=%s trees=%d train_secs=%.1f total_secs=%.1f", out_dir, trees, train_secs,
             time.monotonic() - t0)
    return out_dir
