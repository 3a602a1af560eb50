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
import functools
import logging
import time
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctr.data.landing import COMPLETION_MARKER
from ctr.data.tsv import to_tsv_bytes
from ctr.schema import CAT_COLUMNS, INT_COLUMNS, REAL_CARDINALITY

log = logging.getLogger(__name__)

CHUNK_ROWS = 100_000
WORKERS = 2
GZIP_LEVEL = 1  # fast; the landing zone is re-read more often than it is stored

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
TARGET_CLICK_RATE = 0.25  # as in the real data; the intercept is solved per (config, day)
CALIBRATION_ROWS = 20_000
_HEX2 = np.array([f"{i:02x}".encode() for i in range(256)], dtype="S2").view(np.uint16)


@dataclass(frozen=True)
class GeneratorConfig:
    seed: int = 7
    drift: float = 0.0          # per-day shift applied to effects (0 = stationary)
    cardinality_scale: float = 1.0  # shrink cardinalities for tiny test data


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fast, well-spread hash of uint64 values."""
    z = x + np.uint64(0x9E3779B97F4A7C15)  # a new array; everything below is in place
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def _gauss(key: np.ndarray) -> np.ndarray:
    """A deterministic standard-normal-ish value per key (sum of 4 uniforms, rescaled)."""
    w = _mix(key).view(np.uint16).reshape(-1, 4)  # the four 16-bit words of the hash
    total = w[:, 0].astype(np.uint32) + w[:, 1] + w[:, 2] + w[:, 3]
    return (total / 65535.0 - 2.0) * np.sqrt(3.0)


def _hex8(values: np.ndarray) -> np.ndarray:
    """8 lower-case hex digits of each uint32, as an (n,) array of S8, via a 256-entry byte table."""
    be = values.astype("<u4", copy=False).view(np.uint8).reshape(-1, 4)[:, ::-1]  # most significant byte first
    return np.ascontiguousarray(_HEX2[be]).view("S8").ravel()


def _missing(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    return rng.random(n) < rate if rate > 0 else np.zeros(n, dtype=bool)


def _validity(missing: np.ndarray) -> pa.Buffer | None:
    return pa.py_buffer(np.packbits(~missing, bitorder="little")) if missing.any() else None


def _hex_column(codes: np.ndarray, missing: np.ndarray) -> pa.Array:
    """A string column of 8-hex-digit values with nulls where `missing` (null slots keep their bytes)."""
    n = len(codes)
    offsets = np.arange(0, 8 * n + 1, 8, dtype=np.int32)
    data = _hex8(codes)
    return pa.Array.from_buffers(pa.string(), n, [_validity(missing), pa.py_buffer(offsets), pa.py_buffer(data)],
                                 null_count=int(missing.sum()))


def _int_column(values: np.ndarray, missing: np.ndarray) -> pa.Array:
    return pa.Array.from_buffers(pa.int64(), len(values), [_validity(missing), pa.py_buffer(values)],
                                 null_count=int(missing.sum()))


TABLE_MAX = 300_000  # columns with at most this many values get per-value lookup tables


def _salt(j: int) -> np.uint64:
    return np.uint64((j + 1) * 0x1000193)


def _code(j: int, r: np.ndarray) -> np.ndarray:
    """The 32-bit id (printed as 8 hex digits) of value rank r of categorical column j."""
    return _mix(r + _salt(j) * np.uint64(7919)).astype(np.uint32)  # the low 32 bits


def _effect(j: int, r: np.ndarray) -> np.ndarray:
    """Log-odds effect of value rank r of column j (before its weight); the tail carries less signal,
    as in real logs: only the head is learnable."""
    return _gauss(r * np.uint64(2654435761) + _salt(j)) * np.where(r < 2000, 1.0, 0.3)


@functools.lru_cache(maxsize=64)
def _value_tables(j: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(code, effect) of every value of a column with k values, computed once: a gather per row."""
    r = np.arange(k, dtype=np.uint64)
    return _code(j, r), _effect(j, r)


def generate_chunk(cfg: GeneratorConfig, day: dt.date, chunk: int, n: int) -> tuple[pa.Table, np.ndarray]:
    """One chunk of rows for `day`: (table with ARROW_SCHEMA's columns, true click probability p)."""
    rng = np.random.default_rng([cfg.seed, day.toordinal(), chunk])
    cols, logit = _features(cfg, day, rng, n, build=True)
    p = 1.0 / (1.0 + np.exp(-(logit + _intercept(cfg, day))))
    label = (rng.random(n) < p).astype(np.int8)
    cols["label"] = pa.array(label)
    table = pa.table({"label": cols["label"], **{c: cols[c] for c in INT_COLUMNS + CAT_COLUMNS}})
    return table, p


@functools.lru_cache(maxsize=256)
def _intercept(cfg: GeneratorConfig, day: dt.date) -> float:
    """The intercept giving a mean true p of TARGET_CLICK_RATE for this config and day.

    Solved by bisection on a fixed calibration sample, so the click rate stays near 25% whatever
    the cardinality scale or drift; deterministic, so the data stays deterministic too.
    """
    rng = np.random.default_rng([cfg.seed, day.toordinal(), 2**31 - 1])
    _, logit = _features(cfg, day, rng, CALIBRATION_ROWS, build=False)
    lo, hi = -10.0, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(logit + mid)))) < TARGET_CLICK_RATE:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _features(cfg: GeneratorConfig, day: dt.date, rng: np.random.Generator, n: int,
              build: bool) -> tuple[dict[str, pa.Array], np.ndarray]:
    """Feature columns (when `build`) and the log-odds of each row without the intercept."""
    day_shift = cfg.drift * (day.toordinal() % 97) / 97.0
    logit = np.zeros(n)
    cols: dict[str, pa.Array] = {}
    ranks: dict[str, np.ndarray] = {}
    for j, c in enumerate(CAT_COLUMNS):
        k = max(2, int(REAL_CARDINALITY[c] * cfg.cardinality_scale))
        u = rng.random(n)
        r = np.minimum((np.exp(u * np.log(k + 1.0)) - 1.0).astype(np.uint64), np.uint64(k - 1))
        ranks[c] = r
        miss = _missing(rng, n, CAT_MISSING[j])
        tables = _value_tables(j, k) if k <= TABLE_MAX else None
        if c in CAT_WEIGHT:
            eff = (tables[1][r] if tables is not None else _effect(j, r)) * (1.0 + day_shift)
            logit += np.where(miss, -0.1, CAT_WEIGHT[c] * eff)
        if build:
            codes = tables[0][r] if tables is not None else _code(j, r)
            cols[c] = _hex_column(codes, miss)
    ints: dict[str, np.ndarray] = {}
    for j, c in enumerate(INT_COLUMNS):
        mu, sigma, off = INT_SHAPE[j]
        v = np.floor(np.exp(rng.normal(mu, sigma, n))).astype(np.int64) + off
        miss = _missing(rng, n, INT_MISSING[j])
        ints[c] = v
        if c in INT_WEIGHT:
            logit += np.where(miss, 0.0, INT_WEIGHT[c] * np.log1p(np.maximum(v, 0)) / 2.0)
        if build:
            cols[c] = _int_column(v, miss)
    # interactions: a pair of categoricals and an integer gated by a categorical
    logit += 0.6 * _gauss(ranks["C6"] % np.uint64(16) * np.uint64(131) + ranks["C14"] % np.uint64(16) + np.uint64(99))
    logit += 0.3 * np.where(ranks["C17"] % np.uint64(3) == 0, 1.0, -1.0) * np.tanh(np.log1p(np.maximum(ints["I7"], 0)) - 1.0)
    logit += rng.normal(0.0, 0.35, n)  # unobserved noise: the oracle is not perfect
    return cols, logit


def iter_day(cfg: GeneratorConfig, day: dt.date, rows: int) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """The chunks of one day in order: (table, true p)."""
    for chunk, n in _chunk_sizes(rows):
        yield generate_chunk(cfg, day, chunk, n)


def _chunk_sizes(rows: int) -> list[tuple[int, int]]:
    return [(i, min(CHUNK_ROWS, rows - start)) for i, start in enumerate(range(0, rows, CHUNK_ROWS))]


def _gz_chunk(cfg: GeneratorConfig, day: dt.date, chunk: int, n: int) -> tuple[bytes, np.ndarray]:
    """One chunk as a complete gzip member (members concatenate into one valid .gz) and its truth."""
    table, p = generate_chunk(cfg, day, chunk, n)
    return zlib.compress(to_tsv_bytes(table), GZIP_LEVEL, wbits=31), p


def write_day(root: Path, day: dt.date, rows: int, cfg: GeneratorConfig) -> Path:
    """Write `root/day=D/part-00000.tsv.gz`, then `root/day=D/_SUCCESS`, and `root/truth/day=D.parquet` (true p per row, same order).

    Constant memory: chunks are generated and compressed (gzip level 1, one member per chunk) on
    worker threads and written in order; at most WORKERS + 1 chunks are alive at a time.
    """
    part_dir = root / f"day={day.isoformat()}"
    part_dir.mkdir(parents=True, exist_ok=True)
    (root / "truth").mkdir(parents=True, exist_ok=True)
    out = part_dir / "part-00000.tsv.gz"
    tmp = out.with_suffix(".gz.tmp")
    truth = root / "truth" / f"day={day.isoformat()}.parquet"
    truth_tmp = truth.with_suffix(".parquet.tmp")
    t0 = time.monotonic()
    # Chunks are generated and gzipped on WORKERS threads (numpy, Arrow and zlib release the GIL),
    # at most WORKERS + 1 in flight, and written in order here: bounded memory, same bytes as serial.
    sizes = _chunk_sizes(rows)
    with open(tmp, "wb") as fh, ThreadPoolExecutor(max_workers=WORKERS) as pool, \
            pq.ParquetWriter(truth_tmp, pa.schema([("p", pa.float64())])) as writer:
        inflight: deque = deque()
        for chunk, n in sizes:
            inflight.append(pool.submit(_gz_chunk, cfg, day, chunk, n))
            if len(inflight) > WORKERS:
                _drain(inflight.popleft(), fh, writer)
        while inflight:
            _drain(inflight.popleft(), fh, writer)
    tmp.replace(out)
    truth_tmp.replace(truth)
    (part_dir / COMPLETION_MARKER).touch()  # the day is complete, as an exporter says it (check_data waits for it)
    secs = time.monotonic() - t0
    log.info("generated day=%s rows=%d path=%s truth=%s rows_per_s=%.0f", day, rows, out, truth, rows / max(secs, 1e-9))
    return out


def _drain(fut, fh, writer: pq.ParquetWriter) -> None:
    data, p = fut.result()
    fh.write(data)
    writer.write_table(pa.table({"p": p}))


def split_rows(total: int, days: int) -> list[int]:
    """`total` rows over `days` days as evenly as possible, earlier days taking the remainder
    (45,840,617 over 7 days: 6,548,660 x 4 then 6,548,659 x 3)."""
    if days < 1 or total < days:
        raise ValueError(f"--rows ({total}) must be at least --days ({days}) and --days at least 1")
    base, extra = divmod(total, days)
    return [base + (1 if i < extra else 0) for i in range(days)]


def generate(root: Path, days: int, rows_per_day: int | list[int], end_date: dt.date,
             cfg: GeneratorConfig) -> list[Path]:
    """Write `days` consecutive days ending at `end_date` (inclusive); `rows_per_day` is one count
    for every day or a list with one count per day (see `split_rows`)."""
    per_day = [rows_per_day] * days if isinstance(rows_per_day, int) else list(rows_per_day)
    if days < 1 or len(per_day) != days or min(per_day) < 1:
        raise ValueError(f"--days ({days}) and --rows-per-day ({rows_per_day}) must be at least 1")
    if not cfg.cardinality_scale > 0:
        raise ValueError(f"--cardinality-scale ({cfg.cardinality_scale}) must be > 0 (1 = the real cardinalities)")
    start = end_date - dt.timedelta(days=days - 1)
    return [write_day(root, start + dt.timedelta(days=i), per_day[i], cfg) for i in range(days)]
