"""The feature transform: the vocabulary rule, exact counting, codes for rare/unseen/missing,
bit-identical batch and single-row paths, deterministic features.json, degenerate columns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from ctr.features.transform import (
    CAT_INDEX,
    N_FEATURES,
    FeatureTransform,
    VocabCounter,
    select_vocabulary,
)
from ctr.schema import CAT_COLUMNS, INT_COLUMNS


def _table(n: int, seed: int, distinct: int = 40, missing: float = 0.1) -> pa.Table:
    """Random rows: Zipf-ish categorical codes, integers with negatives, missing values everywhere."""
    rng = np.random.default_rng(seed)
    cols: dict[str, pa.Array] = {}
    for c in INT_COLUMNS:
        v = rng.integers(-3, 10_000, n)
        cols[c] = pa.array(v, mask=rng.random(n) < missing)
    for c in CAT_COLUMNS:
        r = np.minimum(rng.zipf(1.5, n), distinct) - 1
        vals = np.array([f"{x * 2654435761 % 2**32:08x}" for x in range(distinct)])[r]
        cols[c] = pa.array(vals.tolist(), type=pa.string(), mask=rng.random(n) < missing)
    return pa.table(cols)


def _naive_counts(tables: list[pa.Table]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {c: {} for c in CAT_COLUMNS}
    for t in tables:
        for c in CAT_COLUMNS:
            for v in t.column(c).to_pylist():
                if v is not None:
                    out[c][v] = out[c].get(v, 0) + 1
    return out


def test_select_vocabulary_rule() -> None:
    counts = {c: {} for c in CAT_COLUMNS}
    counts["C1"] = {"b": 5, "a": 5, "c": 9, "d": 2, "e": 3}
    vocab = select_vocabulary(counts, min_count=3, max_vocab=3)
    assert vocab["C1"] == ["c", "a", "b"]  # most frequent first, ties by value, capped, >= min_count
    assert vocab["C2"] == []
    assert select_vocabulary(counts, 3, 10)["C1"] == ["c", "a", "b", "e"]


def test_counter_matches_naive_counts_across_compactions() -> None:
    tables = [_table(200, s) for s in range(7)]
    counter = VocabCounter(compact_every=3)
    for t in tables:
        counter.update(t)
    naive = _naive_counts(tables)
    assert {c: dict(counter.counts[c]) for c in CAT_COLUMNS} == naive
    assert counter.rows == 1400
    assert counter.missing["C5"] == sum(t.column("C5").null_count for t in tables)
    assert counter.vocabulary(5, 7) == select_vocabulary(naive, 5, 7)


def test_counter_with_explicit_counts_behaves_like_counted() -> None:
    """The Spark job fills rows/missing/counts itself; the result must equal the local path's."""
    tables = [_table(500, 1), _table(500, 2)]
    local = FeatureTransform.fit(tables, min_count=4, max_vocab=20)
    counter = VocabCounter()
    counter.rows = 1000
    counter.missing = {c: sum(t.column(c).null_count for t in tables) for c in CAT_COLUMNS}
    counter.counts = _naive_counts(tables)
    other = FeatureTransform.from_counter(counter, 4, 20)
    assert json.dumps(other.to_json(), sort_keys=True) == json.dumps(local.to_json(), sort_keys=True)


def test_codes_for_known_rare_unseen_and_missing() -> None:
    t = FeatureTransform(vocab={c: ["0000000a", "0000000b"] for c in CAT_COLUMNS})
    rows = pa.table({"C1": pa.array(["0000000b", "0000000a", "ffffffff", None]),
                     "I1": pa.array([1, None, -2, 2**53])})
    full = {c: rows.column(c) if c in rows.column_names else pa.nulls(4, pa.string() if c in CAT_COLUMNS else pa.int64())
            for c in INT_COLUMNS + CAT_COLUMNS}
    x = t.transform_table(pa.table(full))
    c1 = CAT_INDEX[0]
    assert x[:3, c1].tolist() == [1.0, 0.0, 2.0] and math.isnan(x[3, c1])
    assert x[0, 0] == 1.0 and math.isnan(x[1, 0]) and x[2, 0] == -2.0 and x[3, 0] == float(2**53)
    coded = FeatureTransform(vocab=t.vocab, missing="code")
    assert coded.transform_table(pa.table(full))[3, c1] == 3.0
    assert coded.row({})[c1] == 3.0 and math.isnan(t.row({})[c1])
    with pytest.raises(ValueError, match="missing='zero'"):
        FeatureTransform(vocab=t.vocab, missing="zero")


@pytest.mark.parametrize("missing", ["nan", "code"])
def test_batch_and_single_row_paths_are_bit_identical(missing: str) -> None:
    fit_t, score_t = _table(2000, 3), _table(1500, 4, distinct=80)  # score rows hold unseen values
    t = FeatureTransform.fit([fit_t], min_count=5, max_vocab=30, missing=missing)
    batch = t.transform_table(score_t)
    rows = [{k: v for k, v in r.items() if v is not None} for r in score_t.to_pylist()]
    single = t.rows_matrix(rows)
    assert batch.shape == single.shape == (1500, N_FEATURES)
    assert batch.tobytes() == single.tobytes()  # NaN payloads included
    upper = [{k: (v.upper() if isinstance(v, str) else v) for k, v in r.items()} for r in rows[:50]]
    assert t.rows_matrix(upper).tobytes() == single[:50].tobytes()
    out = np.zeros_like(batch)
    assert t.transform_table(score_t, out=out) is out and out.tobytes() == batch.tobytes()


def test_features_json_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    tables = [_table(1000, 5), _table(1000, 6)]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    FeatureTransform.fit(tables, 3, 25).save(a)
    FeatureTransform.fit(list(reversed(tables)), 3, 25).save(b)  # chunk order must not matter
    assert a.read_bytes() == b.read_bytes()
    loaded = FeatureTransform.load(a)
    loaded.save(tmp_path / "c.json")
    assert (tmp_path / "c.json").read_bytes() == a.read_bytes()


def test_load_refuses_wrong_schema_version(tmp_path: Path) -> None:
    p = tmp_path / "features.json"
    FeatureTransform(vocab={c: [] for c in CAT_COLUMNS}).save(p)
    d = json.loads(p.read_text())
    d["schema_version"] = 99
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="schema_version 99"):
        FeatureTransform.load(p)


def test_degenerate_columns_are_reported() -> None:
    n = 400
    t = _table(n, 7)
    t = t.set_column(t.schema.get_field_index("C3"), "C3", pa.nulls(n, pa.string()))
    t = t.set_column(t.schema.get_field_index("C4"), "C4", pa.array([f"{i:08x}" for i in range(n)]))
    ft = FeatureTransform.fit([t.slice(0, 200), t.slice(200)], min_count=2, max_vocab=100)
    assert ft.vocab["C3"] == [] and ft.vocab["C4"] == []
    assert any(n.startswith("C3: entirely missing") for n in ft.notes)
    assert any(n.startswith("C4: every value is unique (400)") for n in ft.notes)
    x = ft.transform_table(t)
    assert np.isnan(x[:, CAT_INDEX[2]]).all() and (x[:, CAT_INDEX[3]] == 0.0).all()


def _with_stats(seed: int = 0, missing: str = "nan") -> tuple[FeatureTransform, np.ndarray, np.ndarray]:
    tables = [_table(400, seed + s) for s in range(3)]
    t = FeatureTransform.fit(tables, min_count=5, missing=missing)
    x = np.vstack([t.transform_table(tb) for tb in tables])
    y = np.random.default_rng(seed).integers(0, 2, len(x))
    rows, clicks = t.count_slots(x, y)
    return t.with_stats(rows, clicks), x, y


@pytest.mark.parametrize("missing", ["nan", "code"])
def test_derived_features_are_lookups_identical_on_both_paths(missing: str) -> None:
    full, x, y = _with_stats(3, missing)
    assert full.n_features == N_FEATURES + 2 * len(CAT_COLUMNS) and len(full.feature_names) == full.n_features
    d = full.derive(x)
    np.testing.assert_array_equal(d[:, :N_FEATURES], x)
    rows = np.array([full.derive_row(v) for v in x.tolist()])
    assert np.array_equal(d, rows, equal_nan=True) and np.isfinite(d[:, N_FEATURES:]).all()
    # by hand for one column: count and smoothed click rate of each row's code (missing rows: their own slot)
    j = CAT_INDEX[4]
    codes = np.where(np.isnan(x[:, j]), len(full.vocab["C5"]) + 1, x[:, j]).astype(int)
    n = np.bincount(codes, minlength=len(full.vocab["C5"]) + 2)
    k = np.bincount(codes, weights=y, minlength=len(full.vocab["C5"]) + 2)
    prior = y.mean()
    np.testing.assert_array_equal(d[:, N_FEATURES + 4], n[codes].astype(float))
    np.testing.assert_allclose(d[:, N_FEATURES + 26 + 4], ((k + full.smoothing * prior) / (n + full.smoothing))[codes],
                               rtol=1e-12)


def test_out_of_fold_statistics_leave_a_rows_own_fold_out() -> None:
    t = FeatureTransform(vocab={c: ["0000000a"] for c in CAT_COLUMNS})
    x = t.transform_table(pa.table({**{c: pa.array([1, 2, 3, 4], pa.int64()) for c in INT_COLUMNS},
                                    **{c: pa.array(["0000000a"] * 4) for c in CAT_COLUMNS}}))
    y, folds = np.array([1, 1, 0, 0]), np.array([0, 0, 1, 1])
    rows, clicks = zip(*(t.count_slots(x[folds == f], y[folds == f]) for f in (0, 1)), strict=True)
    full = t.with_stats(sum(rows), sum(clicks), smoothing=2.0)
    oof = full.oof_tables(np.array(rows), np.array(clicks))
    d = full.derive(x, oof, folds)
    te = d[:, N_FEATURES + 26]  # C1's click rate: fold 0 sees only fold 1's clicks (0 of 2), and vice versa
    np.testing.assert_allclose(te, [(0 + 2 * 0.5) / (2 + 2)] * 2 + [(2 + 2 * 0.5) / (2 + 2)] * 2)
    assert (d[:, N_FEATURES] == 4).all()  # counts use no label: every row counts
    np.testing.assert_allclose(full.derive(x)[:, N_FEATURES + 26], (2 + 1) / (4 + 2))  # served: all rows


def test_derived_tables_round_trip_and_old_files_load(tmp_path: Path) -> None:
    full, x, _ = _with_stats(5)
    full.save(tmp_path / "f.json")
    again = FeatureTransform.load(tmp_path / "f.json")
    assert again.derived == ("count", "target") and json.loads((tmp_path / "f.json").read_text())["schema_version"] == 2
    np.testing.assert_array_equal(again.derive(x), full.derive(x))
    full.save(tmp_path / "g.json")
    assert (tmp_path / "f.json").read_bytes() == (tmp_path / "g.json").read_bytes()
    plain = full.without_stats()  # a codes-only transform writes schema 1, as before
    plain.save(tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["schema_version"] == 1
    assert FeatureTransform.load(tmp_path / "p.json").derive(x) is x  # no derived features: the codes as they are
    bad = json.loads((tmp_path / "f.json").read_text())
    bad["code_stats"]["rows"]["C3"] = bad["code_stats"]["rows"]["C3"][:-1]
    with pytest.raises(ValueError, match="C3 has .* slots"):
        FeatureTransform.from_json(bad)
