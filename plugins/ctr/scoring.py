"""Batch scoring of files (`ctr score`): one output line per input row, in input order.

Output CSV columns: `row,probability,reason`. `row` is the 1-based data row number across the
inputs (header lines excluded; every other line, even an empty or malformed one, is a row); a
rejected row has an empty probability and the reason. Inputs may be any layout the reader
detects (raw TSV, `.gz`, header CSV, Kaggle CSV); a label column, when present, is ignored.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from ctr.bundle import Bundle
from ctr.data.reader import DataFormatError, iter_chunks

log = logging.getLogger(__name__)


class ScoringInputError(ValueError):
    """An input file cannot be read as a whole; the message names it."""


def score_files(model_dir: Path, inputs: list[str], output: Path) -> tuple[int, int]:
    """Score every row of `inputs` into `output`; returns (rows scored, rows rejected)."""
    out_real = Path(output).resolve()
    for path in inputs:
        if "://" not in path and Path(path).resolve() == out_real:
            raise ScoringInputError(f"--output {output} is also an input ({path}); writing it would destroy the "
                                    "input: choose another output file")
    bundle = Bundle.load(model_dir)
    n_ok = n_bad = 0
    row = 0
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    try:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["row", "probability", "reason"])
            for path in inputs:
                try:
                    for chunk in iter_chunks(path, require_label=False):
                        probs = bundle.predict_table(chunk.table) if chunk.table.num_rows else np.empty(0)
                        merged = [(line, repr(p), "") for line, p in
                                  zip(chunk.lines.tolist(), probs.tolist(), strict=True)]
                        merged += [(b.line, "", b.reason) for b in chunk.bad]
                        merged.sort(key=lambda t: t[0])
                        for _, p, reason in merged:
                            row += 1
                            w.writerow([row, p, reason])
                        n_ok += chunk.table.num_rows
                        n_bad += len(chunk.bad)
                except (DataFormatError, OSError) as e:
                    raise ScoringInputError(f"input {path}: {e}") from e
                log.info("scored file=%s rows_so_far=%d rejected_so_far=%d", path, n_ok + n_bad, n_bad)
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    return n_ok, n_bad
