"""The generator: determinism, the real data's shape, a ~25% click rate, a learnable noisy truth."""

from __future__ import annotations

import datetime as dt
import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from ctr.data import generate as gen
from ctr.data.generate import GeneratorConfig, generate, generate_chunk, write_day
from ctr.data.reader import read_table
from ctr.data.tsv import to_tsv_bytes
from ctr.schema import CAT_COLUMNS, INT_COLUMNS, REAL_CARDINALITY
from sklearn.metrics import roc_auc_score

DAY = dt.date(2026, 11, 20)


@pytest.fixture(scope="module")
def big_chunk() -> tuple[pa.Table, np.ndarray]:
    return generate_chunk(GeneratorConfig(seed=11), DAY, 0, 150_000)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gen, "CHUNK_ROWS", 1_000)  # several chunks through the threaded writer
    a = write_day(tmp_path / "a", DAY, 5_500, GeneratorConfig(seed=5))
    b = write_day(tmp_path / "b", DAY, 5_500, GeneratorConfig(seed=5))
    c = write_day(tmp_path / "c", DAY, 5_500, GeneratorConfig(seed=6))
    assert a.read_bytes() == b.read_bytes()
    assert gzip.decompress(a.read_bytes()) != gzip.decompress(c.read_bytes())
    assert pq.read_table(tmp_path / "a/truth/day=2026-11-20.parquet").equals(
        pq.read_table(tmp_path / "b/truth/day=2026-11-20.parquet"))
    # a day is its chunks, each seeded by (seed, day, chunk): whole chunks do not depend on the day's length
    longer = write_day(tmp_path / "d", DAY, 7_000, GeneratorConfig(seed=5))
    whole = gzip.decompress(a.read_bytes()).splitlines()[:5_000]
    assert gzip.decompress(longer.read_bytes()).splitlines()[:5_000] == whole


def test_written_day_round_trips_through_the_reader_with_its_truth(tmp_path: Path) -> None:
    path = write_day(tmp_path, DAY, 3_000, GeneratorConfig(seed=2))
    table, bad = read_table(str(path))
    assert bad == [] and table.num_rows == 3_000
    expected = pa.concat_tables(t for t, _ in gen.iter_day(GeneratorConfig(seed=2), DAY, 3_000))
    assert table.equals(expected)
    truth = pq.read_table(tmp_path / "truth" / f"day={DAY.isoformat()}.parquet")
    assert truth.num_rows == 3_000 and truth.column_names == ["p"]
    assert not (tmp_path / f"day={DAY.isoformat()}" / "part-00000.gz.tmp").exists()


def test_click_rate_near_25_percent_and_truth_is_calibrated(big_chunk) -> None:
    table, p = big_chunk
    labels = table.column("label").to_numpy()
    assert 0.235 < labels.mean() < 0.265
    assert abs(labels.mean() - p.mean()) < 0.01  # labels are Bernoulli(p)


def test_truth_is_learnable_but_noisy(big_chunk) -> None:
    table, p = big_chunk
    oracle = roc_auc_score(table.column("label").to_numpy(), p)
    assert 0.70 < oracle < 0.90  # real Criteo models reach ~0.80; no feature set gives 1.0


def test_cardinalities_and_heavy_tails_follow_the_real_data(big_chunk) -> None:
    table, _ = big_chunk
    n = table.num_rows
    for c in CAT_COLUMNS:
        distinct = pc.count_distinct(table.column(c)).as_py()
        assert distinct <= REAL_CARDINALITY[c], c
        if REAL_CARDINALITY[c] <= 30:
            assert distinct == REAL_CARDINALITY[c], c  # small vocabularies are fully used
    assert pc.count_distinct(table.column("C3")).as_py() > 40_000  # 10M-value column: mostly unique ids
    counts = np.sort(pc.value_counts(table.column("C3").drop_null()).field("counts").to_numpy())[::-1]
    assert counts[0] > 50 * counts[len(counts) // 2]  # Zipf-like head, long tail
    assert table.column("C9").null_count == 0 and pc.count_distinct(table.column("C9")).as_py() == 3
    assert n > 0


def test_missing_rates_and_value_ranges_like_the_real_data(big_chunk) -> None:
    table, _ = big_chunk
    n = table.num_rows
    for c, rate in zip(INT_COLUMNS, gen.INT_MISSING, strict=True):
        assert abs(table.column(c).null_count / n - rate) < 0.01, c
    for c, rate in zip(CAT_COLUMNS, gen.CAT_MISSING, strict=True):
        assert abs(table.column(c).null_count / n - rate) < 0.01, c
    assert pc.min(table.column("I2")).as_py() < 0  # I2 takes negative values
    assert pc.min(table.column("I5")).as_py() >= 0
    assert set(pc.utf8_length(table.column("C1").drop_null()).unique().to_pylist()) == {8}


def test_drift_moves_the_truth_between_days() -> None:
    d1, d2 = DAY, DAY + dt.timedelta(days=10)
    _, still1 = generate_chunk(GeneratorConfig(seed=4), d1, 0, 20_000)
    _, drift1 = generate_chunk(GeneratorConfig(seed=4, drift=1.0), d1, 0, 20_000)
    _, drift2 = generate_chunk(GeneratorConfig(seed=4, drift=1.0), d2, 0, 20_000)
    assert not np.allclose(still1, drift1)
    assert abs(drift1.mean() - drift2.mean()) < 0.05  # the click rate stays in its band


def test_to_tsv_bytes_writes_missing_as_empty_fields() -> None:
    table, _ = generate_chunk(GeneratorConfig(seed=9), DAY, 0, 50)
    lines = to_tsv_bytes(table).decode().splitlines()
    assert len(lines) == 50 and all(len(ln.split("\t")) == 40 for ln in lines)
    first = table.slice(0, 1).to_pylist()[0]
    assert lines[0].split("\t")[1] == ("" if first["I1"] is None else str(first["I1"]))
    assert to_tsv_bytes(table.slice(0, 0)) == b""


def test_generate_cli_writes_days_and_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ctr.cli import main

    assert main(["generate", "--out", str(tmp_path), "--days", "2", "--rows-per-day", "500",
                 "--end-date", "2026-11-20", "--seed", "3"]) == 0
    assert sorted(p.name for p in tmp_path.glob("day=*")) == ["day=2026-11-19", "day=2026-11-20"]
    assert (tmp_path / "truth" / "day=2026-11-19.parquet").exists()
    assert main(["generate", "--out", str(tmp_path), "--days", "0", "--rows-per-day", "5"]) == 1
    assert "--days (0)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="rows-per-day"):
        generate(tmp_path, 1, 0, DAY, GeneratorConfig())


def test_total_rows_spread_over_days(tmp_path: Path) -> None:
    from ctr.cli import main
    from ctr.data.generate import split_rows

    assert split_rows(45_840_617, 7) == [6_548_660] * 4 + [6_548_659] * 3
    assert sum(split_rows(45_840_617, 7)) == 45_840_617
    with pytest.raises(ValueError, match="--rows"):
        split_rows(3, 7)
    assert main(["generate", "--out", str(tmp_path), "--days", "3", "--rows", "1001", "--end-date", "2026-11-20",
                 "--cardinality-scale", "0.001"]) == 0
    from ctr.data.reader import read_table

    rows = [read_table(str(tmp_path / f"day=2026-11-{d}" / "part-00000.tsv.gz"))[0].num_rows for d in (18, 19, 20)]
    assert rows == [334, 334, 333]
