"""Batch scoring of files (`ctr score`): one output line per input row, in input order.

Output CSV columns: `row,probability,reason`. `row` is the 1-based data row number across the
inputs (headers excluded); a rejected row has an empty probability and the reason.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ctr.bundle import Bundle
from ctr.data.reader import iter_chunks


def score_files(model_dir: Path, inputs: list[str], output: Path) -> tuple[int, int]:
    bundle = Bundle.load(model_dir)
    n_ok = n_bad = 0
    row_base = 0
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["row", "probability", "reason"])
        for path in inputs:
            header_lines = 0
            last_line = 0
            for chunk in iter_chunks(path, require_label=False):
                probs = bundle.predict_table(chunk.table) if chunk.table.num_rows else np.empty(0)
                merged = [(int(line), f"{p!r}", "") for line, p in zip(chunk.lines.tolist(), probs.tolist(), strict=True)]
                merged += [(b.line, "", b.reason) for b in chunk.bad]
                merged.sort(key=lambda t: t[0])
                if merged and last_line == 0:
                    header_lines = merged[0][0] - 1  # 1 when the file has a header line
                for line, p, reason in merged:
                    w.writerow([row_base + line - header_lines, p, reason])
                    last_line = line
                n_ok += chunk.table.num_rows
                n_bad += len(chunk.bad)
            row_base += max(last_line - header_lines, 0)
    tmp.replace(output)
    return n_ok, n_bad
