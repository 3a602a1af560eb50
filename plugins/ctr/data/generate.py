"""Synthetic Criteo-shaped click logs with a known ground truth.

Shape follows the real data: the full training set's per-column cardinalities, heavy-tailed
(log-uniform, i.e. Zipf-like) value frequencies, per-column missing rates close to the real
ones, negative values in I2, a click rate near 25%. The click probability is a noisy but
learnable function with interactions; it is written to `truth/day=YYYY-MM-DD.parquet` (column
`p`, one row per data row, same order) so tests and benchmarks can compute the oracle AUC.

Deterministic by (seed, day, chunk): any day can be regenerated alone, in constant memory.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ctr.schema import CAT_COLUMNS, INT_COLUMNS, REAL_CARDINALITY

log = logging.getLogger(__name__)

CHUNK_ROWS = 200_000

# Approximate missing rates of the real training set.
INT_MISSING = [0.45, 0.0, 0.21, 0.22, 0.03, 0.22, 0.04, 0.0005, 0.04, 0.45, 0.04, 0.77, 0.22]
CAT_MISSING = [0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.03, 0.0, 0.0, 0.0,
               0.03, 0.0, 0.0, 0.44, 0.44, 0.03, 0.76, 0.0, 0.03, 0.44, 0.44]
# log-normal scale of each integer feature (mu, sigma) and an offset (I2 can be negative)
INT_SHAPE = [(0.8, 1.2, 0), (2.5, 2.0, -3), (2.3, 1.5, 0), (1.8, 1.0, 0), (8.0, 2.0, 0), (3.5, 1.8, 0),
             (1.5, 1.5, 0), (2.5, 1.0, 0), (3.5, 1.5, 0), (0.3, 0.6, 0), (1.0, 1.0, 0), (0.2, 0.8, 0),
             (1.8, 1.2, 0)]
# strength of each categorical column's main effect on the log-odds
CAT_WEIGHT = {"C1": 0.25, "C2": 0.35, "C3": 0.25, "C4": 0.2, "C5": 0.3, "C6": 0.3, "C9": 0.4, "C11": 0.2,
              "C13": 0.2, "C14": 0.3, "C15": 0.15, "C17": 0.35, "C20": 0.25, "C23": 0.5, "C25": 0.3,
              "C26": 0.15}
INT_WEIGHT = {"I1": 0.25, "I3": -0.15, "I5": -0.12, "I6": 0.1, "I7": 0.2, "I11": 0.3, "I13": -0.1}
INTERCEPT = -1.55
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


@dataclass(frozen=True)
class GeneratorConfig:
    seed: int = 7
    drift: float = 0.0          # per-day shift applied to effects (0 = stationary)
    cardinality_scale: float = 1.0  # shrink cardinalities for tiny test data


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fast, well-spread hash of uint64 values."""
    z = (x + np.uint64(0x9E3779B97F4A7C15)).astype(np.uint64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _gauss(key: np.ndarray) -> np.ndarray:
    """A deterministic standard-normal-ish value per key (sum of 4 uniforms, rescaled)."""
    h = _mix(key)
    parts = [((h >> np.uint64(16 * k)) & np.uint64(0xFFFF)).astype(np.float64) / 65535.0 for k in range(4)]
    return (sum(parts) - 2.0) * np.sqrt(3.0)


def _hex8(values: np.ndarray) -> np.ndarray:
    shifts = np.arange(28, -1, -4, dtype=np.uint32)
    nib = (values.astype(np.uint32)[:, None] >> shifts) & np.uint32(0xF)
    return np.ascontiguousarray(_HEX[nib]).view("S8").ravel()


def _with_nulls(arr: pa.Array, missing: np.ndarray) -> pa.Array:
    if not missing.any():
        return arr
    return pc.if_else(pa.array(missing), pa.scalar(None, arr.type), arr)


def generate_chunk(cfg: GeneratorConfig, day: dt.date, chunk: int, n: int) -> tuple[pa.Table, np.ndarray]:
    """One chunk of rows for `day`: (table of label/I/C as strings-ready arrays, true p)."""
    rng = np.random.default_rng([cfg.seed, day.toordinal(), chunk])
    day_shift = cfg.drift * (day.toordinal() % 97) / 97.0
    logit = np.full(n, INTERCEPT)
    cols: dict[str, pa.Array] = {}
    ranks: dict[str, np.ndarray] = {}
    for j, c in enumerate(CAT_COLUMNS):
        k = max(2, int(REAL_CARDINALITY[c] * cfg.cardinality_scale))
        u = rng.random(n)
        r = np.minimum((np.exp(u * np.log(k + 1.0)) - 1.0).astype(np.int64), k - 1)
        ranks[c] = r
        miss = rng.random(n) < CAT_MISSING[j]
        salt = np.uint64((j + 1) * 0x1000193)
        if c in CAT_WEIGHT:
            eff = _gauss(r.astype(np.uint64) * np.uint64(2654435761) + salt)
            # tail values carry less signal: only the head is learnable, as in real logs
            eff = eff * np.where(r < 2000, 1.0, 0.3) * (1.0 + day_shift)
            logit += np.where(miss, -0.1, CAT_WEIGHT[c] * eff)
        code = (_mix(r.astype(np.uint64) + salt * np.uint64(7919)) & np.uint64(0xFFFFFFFF))
        cols[c] = _with_nulls(pa.array(_hex8(code), type=pa.binary()).cast(pa.string()), miss)
    ints: dict[str, np.ndarray] = {}
    for j, c in enumerate(INT_COLUMNS):
        mu, sigma, off = INT_SHAPE[j]
        v = np.floor(np.exp(rng.normal(mu, sigma, n))).astype(np.int64) + off
        miss = rng.random(n) < INT_MISSING[j]
        ints[c] = v
        if c in INT_WEIGHT:
            logit += np.where(miss, 0.0, INT_WEIGHT[c] * np.log1p(np.maximum(v, 0)) / 2.0)
        cols[c] = _with_nulls(pa.array(v), miss)
    # interactions: a pair of categoricals and an integer gated by a categorical
    logit += 0.6 * _gauss((ranks["C6"] % 16 * 131 + ranks["C14"] % 16).astype(np.uint64) + np.uint64(99))
    logit += 0.3 * np.where(ranks["C17"] % 3 == 0, 1.0, -1.0) * np.tanh(np.log1p(np.maximum(ints["I7"], 0)) - 1.0)
    logit += rng.normal(0.0, 0.35, n)  # unobserved noise: the oracle is not perfect
    p = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(n) < p).astype(np.int8)
    cols["label"] = pa.array(label)
    table = pa.table({"label": cols["label"], **{c: cols[c] for c in INT_COLUMNS + CAT_COLUMNS}})
    return table, p


def to_tsv_bytes(table: pa.Table) -> bytes:
    """Raw Criteo TSV lines for a table of label/I/C columns (missing = empty field)."""
    strings = [pc.fill_null(pc.cast(table.column(name), pa.string()), "") for name in table.column_names]
    lines = pc.binary_join_element_wise(*strings, "\t")
    return ("\n".join(lines.to_pylist()) + "\n").encode("ascii")


def iter_day(cfg: GeneratorConfig, day: dt.date, rows: int) -> Iterator[tuple[pa.Table, np.ndarray]]:
    done, chunk = 0, 0
    while done < rows:
        n = min(CHUNK_ROWS, rows - done)
        yield generate_chunk(cfg, day, chunk, n)
        done += n
        chunk += 1


def write_day(root: Path, day: dt.date, rows: int, cfg: GeneratorConfig) -> Path:
    """Write `root/day=D/part-00000.tsv.gz` and `root/truth/day=D.parquet`."""
    part_dir = root / f"day={day.isoformat()}"
    part_dir.mkdir(parents=True, exist_ok=True)
    (root / "truth").mkdir(parents=True, exist_ok=True)
    out = part_dir / "part-00000.tsv.gz"
    tmp = out.with_suffix(".gz.tmp")
    truth_tmp = root / "truth" / f"day={day.isoformat()}.parquet.tmp"
    writer = pq.ParquetWriter(truth_tmp, pa.schema([("p", pa.float64())]))
    t0 = time.monotonic()
    try:
        with pa.CompressedOutputStream(str(tmp), "gzip") as sink:
            for table, p in iter_day(cfg, day, rows):
                sink.write(to_tsv_bytes(table))
                writer.write_table(pa.table({"p": p}))
    finally:
        writer.close()
    tmp.replace(out)
    truth_tmp.replace(root / "truth" / f"day={day.isoformat()}.parquet")
    secs = time.monotonic() - t0
    log.info("generated day=%s rows=%d path=%s rows_per_s=%.0f", day, rows, out, rows / max(secs, 1e-9))
    return out


def generate(root: Path, days: int, rows_per_day: int, end_date: dt.date, cfg: GeneratorConfig) -> list[Path]:
    """Write `days` consecutive days ending at `end_date` (inclusive)."""
    if days < 1 or rows_per_day < 1:
        raise ValueError(f"--days ({days}) and --rows-per-day ({rows_per_day}) must be at least 1")
    start = end_date - dt.timedelta(days=days - 1)
    return [write_day(root, start + dt.timedelta(days=i), rows_per_day, cfg) for i in range(days)]
