"""Bounded-memory building blocks of training: exact spilled vocabulary counts, spilled encoded chunks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from ctr.features.transform import FeatureTransform, VocabCounter, select_vocabulary
from ctr.features.vocab_spill import NotCanonicalHex, SpillingVocabCounter, hex_keys
from ctr.schema import CAT_COLUMNS, INT_COLUMNS
from ctr.training.chunks import EncodedChunks


def _table(n: int, seed: int, distinct: int) -> pa.Table:
    """Heavy-tailed 8-hex-digit categoricals with missing values, integers with missing values."""
    rng = np.random.default_rng(seed)
    cols: dict[str, pa.Array] = {}
    for c in INT_COLUMNS:
        cols[c] = pa.array(rng.integers(-3, 1 << 40, n), mask=rng.random(n) < 0.2)
    for j, c in enumerate(CAT_COLUMNS):
        k = max(2, distinct >> (j % 6))
        r = (np.exp(rng.random(n) * np.log(k + 1.0)) - 1.0).astype(np.int64)
        vals = np.char.mod("%08x", (r * 2654435761 + j * 97) % 2**32)
        cols[c] = pa.array(vals.tolist(), type=pa.string(), mask=rng.random(n) < 0.1)
    return pa.table(cols)


def test_hex_keys_round_trip_and_refuse_other_strings() -> None:
    arr = pa.array(["00000000", None, "ffffffff", "0a1b2c3d"])
    assert hex_keys(arr).tolist() == [0, 0xFFFFFFFF, 0x0A1B2C3D]
    for bad in (["0A1B2C3D"], ["abc"], ["0a1b2c3g"], ["0a1b2c3d0"]):
        with pytest.raises(NotCanonicalHex, match="C9"):
            hex_keys(pa.array(bad), "C9")


def test_spilled_counts_are_exact_and_give_the_same_vocabulary(tmp_path) -> None:
    tables = [_table(3000, s, distinct=5000) for s in range(6)]
    ref = VocabCounter()
    with SpillingVocabCounter(tmp_path, buffer_entries=1024) as counter:
        for t in tables:
            counter.update(t)
            ref.update(t)
        assert counter.spilled_pairs, "the small buffer must have spilled runs to disk"
        assert counter.rows == ref.rows and counter.missing == ref.missing
        for c in CAT_COLUMNS:
            assert counter.counts_at_least(c, 3) == ref.counts_at_least(c, 3), c
            assert counter.distinct(c) == ref.distinct(c), c
            assert counter.counts_at_least(c, 1) == ref.counts_at_least(c, 1), c
        assert counter.vocabulary(3, 50) == ref.vocabulary(3, 50)
        assert counter.vocabulary(3, 50) == select_vocabulary({c: ref.counts_at_least(c, 1) for c in CAT_COLUMNS}, 3, 50)
        assert counter.notes(counter.vocabulary(3, 50)) == ref.notes(ref.vocabulary(3, 50))
        spill_dir = counter.dir
        assert any(spill_dir.iterdir())
    assert not spill_dir.exists()


def test_encoded_chunks_give_back_the_transform_exactly(tmp_path) -> None:
    tables = [_table(700, s, distinct=300) for s in range(3)]
    ft = FeatureTransform.fit(tables, min_count=2, max_vocab=100)
    store = EncodedChunks(tmp_path / "enc")
    for i, t in enumerate(tables):
        store.append(ft.transform_table(t), np.full(t.num_rows, i % 2))
    assert store.rows == 2100 and len(store) == 3
    for t, x in zip(tables, store.matrices(), strict=True):
        np.testing.assert_array_equal(x, ft.transform_table(t))
    seqs = store.sequences()
    assert len(seqs[1]) == 700 and np.array_equal(seqs[1][5], ft.transform_table(tables[1])[5], equal_nan=True)
    assert store.y().tolist() == [0.0] * 700 + [1.0] * 700 + [0.0] * 700
