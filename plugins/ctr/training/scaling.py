"""LightGBM parameters scaled with the training rows, so the DAG's defaults stay inside a daily budget at any size.

Every tree's histograms cost time in proportion to the rows it is grown on, and the number of trees to
early stopping grows only slowly with the rows (docs/scale.md). Above `rows_per_tree` training rows
the rule keeps the per-tree cost flat and shortens the boosting:

* each tree is grown on a random bag of about `rows_per_tree` rows
  (`bagging_fraction = rows_per_tree / rows`, `bagging_freq = 1`; the bag is drawn from LightGBM's
  seeded generator, so the model stays deterministic);
* the learning rate grows with the square root of the rows beyond twice `rows_per_tree`, at most
  doubled: `learning_rate x min(2, max(1, sqrt(rows / (2 x rows_per_tree))))`.

* the refit on the training and validation rows (ctr.training.trainer) is skipped: at full Criteo size
  it would add a fifth to 32.7M rows for as much time again as the fit (docs/scale.md); the
  early-stopped model is the bundle's.

A parameter the caller set explicitly (any bagging or sampling parameter, or the learning rate, under
any of LightGBM's aliases) is never changed. At or below `rows_per_tree` rows nothing changes (the
quality benchmark's 200k-row days, 0.8M fit rows, train exactly the measured defaults of docs/training.md).
"""

from __future__ import annotations

import math
from typing import Any

# Measured on 3.27M rows x 91 inputs (docs/scale.md): a tree costs ~0.53 s per million bagged rows plus
# ~0.055 s per million rows of the whole range (gradients, out-of-bag scores, drawing the bag); a 2.5M-row
# bag still gives each of 64 leaves tens of thousands of rows, and costs 1.3 s a tree beside the fixed part.
ROWS_PER_TREE = 2_500_000
MAX_LR_FACTOR = 2.0        # 0.1 -> 0.2 at most: the largest learning rate measured here (the speed-tuned runs)

# LightGBM's names for row sampling (docs: Parameters, "bagging_fraction", "bagging_freq", "data_sample_strategy")
SAMPLING_KEYS = frozenset({
    "bagging_fraction", "sub_row", "subsample", "bagging", "bagging_freq", "subsample_freq",
    "pos_bagging_fraction", "pos_sub_row", "pos_subsample", "pos_bagging",
    "neg_bagging_fraction", "neg_sub_row", "neg_subsample", "neg_bagging",
    "data_sample_strategy", "boosting", "boosting_type", "boost",
})
LEARNING_RATE_KEYS = frozenset({"learning_rate", "shrinkage_rate", "eta"})


def scale_to_rows(params: dict[str, Any], rows: int, rows_per_tree: int = ROWS_PER_TREE,
                  explicit: frozenset[str] | set[str] = frozenset()) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(params for `rows` training rows, what was scaled or None). `explicit` holds the keys the caller
    set itself (the DAG's `lgb_params`); those are left as they are. `rows_per_tree` 0 turns the rule off."""
    if rows_per_tree <= 0 or rows <= rows_per_tree:
        return params, None
    out = dict(params)
    scaled: dict[str, Any] = {"rows": int(rows), "rows_per_tree": int(rows_per_tree)}
    if not SAMPLING_KEYS & set(explicit):
        out["bagging_fraction"] = round(rows_per_tree / rows, 4)
        out["bagging_freq"] = 1
        scaled["bagging_fraction"] = out["bagging_fraction"]
    factor = min(MAX_LR_FACTOR, max(1.0, math.sqrt(rows / (2 * rows_per_tree))))
    if factor > 1.0 and not LEARNING_RATE_KEYS & set(explicit):
        out["learning_rate"] = round(float(params.get("learning_rate", 0.1)) * factor, 4)
        scaled["learning_rate"] = out["learning_rate"]
    return out, (scaled if len(scaled) > 2 else None)


def refit_by_rows(rows: int, rows_per_tree: int = ROWS_PER_TREE) -> bool:
    """The refit's default for `rows` training rows: on at or below `rows_per_tree` (or with the rule off)."""
    return rows_per_tree <= 0 or rows <= rows_per_tree
