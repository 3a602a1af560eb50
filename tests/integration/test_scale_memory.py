"""Bounded memory at scale: ingestion (validate + stage) and vocabulary counting hold a working set
set by the chunk sizes, not by the number of rows.

Two landing zones of one day at the real Criteo cardinalities (millions of distinct values in
C3, C4, C12, C16, C21): 1M rows and 2M rows. Each stage runs in its own process per data size
and reports its peak RSS (VmHWM) above its RSS after imports:

  * doubling the rows may add at most GROWTH_MIB[stage]: an ingestion that concatenated the day
    (the raw Arrow of 1M more rows is about 420 MiB) or a vocabulary pass that kept every
    distinct value in RAM (1.2 million more values) grows by far more and fails;
  * each peak stays under the bound derived from the chunk sizes (`_bound_mib`);
  * the control, the same vocabulary pass with the in-memory `VocabCounter`, must grow by more
    than GROWTH_MIB["vocabulary"] on the same data: the measurement can see the defect it guards against.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ctr.data.generate import GeneratorConfig, generate
from ctr.data.landing import READ_BATCH_ROWS, read_staged
from ctr.data.reader import DEFAULT_CHUNK_BYTES, PARSE_WORKERS
from ctr.features.vocab_spill import DEFAULT_BUFFER_ENTRIES

pytestmark = pytest.mark.integration

END = dt.date(2026, 7, 2)
SIZES = (1_000_000, 2_000_000)   # rows of the one-day landing zones
GROWTH_MIB = {"ingest": 128, "vocabulary": 32}  # measured: ingest +1..+73, vocabulary -19..+9, control +77..+86
STAGED_ROW_BYTES = 430          # Arrow bytes of one staged row: 26 x (8 + 4) strings, 13 x 8 ints, label, validity

CHILD = r"""
import datetime as dt, json, sys
from pathlib import Path
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
stage, land, work, days = sys.argv[1], sys.argv[2], Path(sys.argv[3]), [dt.date.fromisoformat(d) for d in sys.argv[4:]]
from ctr.data.landing import read_staged, stage_day
from ctr.features.transform import VocabCounter
from ctr.features.vocab_spill import SpillingVocabCounter
import pyarrow, numpy
base = hwm()
out = {}
if stage == "ingest":
    for d in days:
        rep = stage_day(land, work / "staging", work / "quarantine", d)
        out[d.isoformat()] = rep.rows_ok
else:
    c = SpillingVocabCounter(work) if stage == "vocabulary" else VocabCounter()
    for d in days:
        for t in read_staged(work / "staging", d):
            c.update(t)
    vocab = c.vocabulary(10, 10_000)
    out = {"rows": c.rows, "distinct": sum(c.distinct(k) for k in vocab),
           "spilled": sum(getattr(c, "spilled_pairs", {}).values()), "kept": sum(len(v) for v in vocab.values())}
print(json.dumps({"base_mib": base, "peak_mib": hwm(), **out}))
"""


def _bound_mib(stage: str) -> float:
    """The working set each stage may hold, from its chunk sizes (MiB, above the RSS after imports).

    ingest: the reader keeps PARSE_WORKERS + 1 text blocks of DEFAULT_CHUNK_BYTES in flight; each
    is decompressed, parsed into Arrow strings, validated (a typed copy) and handed to the Parquet
    writer, and the allocator keeps freed pages for a while: allow 8 times the bytes of the blocks
    in flight (measured: about 400 MiB). vocabulary: one staged batch of READ_BATCH_ROWS rows (and its
    decoded copy) plus, per categorical column, a buffer of DEFAULT_BUFFER_ENTRIES (key, count)
    pairs of 12 bytes, doubled while it is sorted; plus 128 MiB for Arrow's and numpy's pools.
    """
    mib = 1 << 20
    if stage == "ingest":
        return 8 * (PARSE_WORKERS + 1) * DEFAULT_CHUNK_BYTES / mib + 128
    return (2 * READ_BATCH_ROWS * STAGED_ROW_BYTES + 26 * 2 * 2 * DEFAULT_BUFFER_ENTRIES * 12) / mib + 128


@pytest.fixture(scope="module")
def landings(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    out = {}
    for rows in SIZES:
        out[rows] = tmp_path_factory.mktemp(f"scale-landing-{rows}")
        generate(out[rows], 1, rows, END, GeneratorConfig(seed=3))
    return out


def _run(stage: str, landing: Path, work: Path, days: list[dt.date]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", CHILD, stage, str(landing), str(work), *[d.isoformat() for d in days]],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_ingestion_and_vocabulary_memory_do_not_grow_with_rows(landings: dict[int, Path], tmp_path: Path) -> None:
    days = [END]
    measured: dict[str, dict[int, dict]] = {"ingest": {}, "vocabulary": {}, "control": {}}
    for rows in SIZES:
        for stage in measured:
            measured[stage][rows] = _run(stage, landings[rows], tmp_path / str(rows), days)
    small, big = (measured["vocabulary"][n] for n in SIZES)
    assert (small["rows"], big["rows"]) == SIZES
    assert big["distinct"] > small["distinct"] + 1_000_000 and big["spilled"] > 0, (small, big)  # counts had to spill
    report = {stage: {n: round(m[n]["peak_mib"] - m[n]["base_mib"], 1) for n in m} for stage, m in measured.items()}
    print("peak RSS above imports (MiB) by rows:", report, "bounds:", {s: round(_bound_mib(s)) for s in ("ingest", "vocabulary")},
          "distinct values:", small["distinct"], big["distinct"])
    for stage in ("ingest", "vocabulary"):
        by_size = report[stage]
        assert by_size[SIZES[1]] - by_size[SIZES[0]] <= GROWTH_MIB[stage], (stage, report)
        assert max(by_size.values()) <= _bound_mib(stage), (stage, report, _bound_mib(stage))
    control = report["control"]
    assert control[SIZES[1]] - control[SIZES[0]] > GROWTH_MIB["vocabulary"], ("the in-memory counter should grow", report)
    assert sum(t.num_rows for t in read_staged(tmp_path / str(SIZES[1]) / "staging", END)) == SIZES[1]
