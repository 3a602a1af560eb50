"""The service's single-row paths: the Arrow TSV encoder and the one-row predictor, bit-identical to the
reader + `FeatureTransform` and to `Booster.predict` (no server, no trained bundle)."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pytest
from ctr.data.reader import read_text
from ctr.features.transform import CAT_INDEX, FeatureTransform
from ctr.schema import CAT_COLUMNS, INT_COLUMNS
from ctr.serving.encoders import TsvEncoder, probe_tsv
from ctr.serving.predictors import SingleRowPredictor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.criteo_lines import random_lines, random_transform

# ---- fast paths are bit-identical ----------------------------------------------------------

TRANSFORM = random_transform(1)
ENCODER = TsvEncoder(TRANSFORM)
_ODD_INTS = ["-0", "007", str(2**53), str(-(2**53)), str(2**53 + 1), "9" * 19, "1.0", "+5", " 5", "1e5", "a"]
_ODD_CATS = ["abcdef1", "ABCDEFGH", "abcdef123", "ab cdef1", "\u00e9bcdef12"]


def _lines(seed: int, n: int, odd: float, short: float) -> list[str]:
    return random_lines(TRANSFORM, seed, n, odd, short, odd_ints=_ODD_INTS, odd_cats=_ODD_CATS)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), n=st.integers(1, 12), odd=st.sampled_from([0.0, 0.0, 0.01, 0.1]),
       short=st.sampled_from([0.0, 0.0, 0.1]), crlf=st.booleans())
def test_tsv_fast_path_equals_reader_and_transform(seed: int, n: int, odd: float, short: float, crlf: bool) -> None:
    body = ("\r\n" if crlf else "\n").join(_lines(seed, n, odd, short)).encode() + b"\n"
    fast = ENCODER.encode(body)
    table, bad = read_text(body.decode(), require_label=False)
    if bad:
        assert fast is None, "the fast path accepted a body the reader refuses"
        return
    ref = TRANSFORM.transform_table(table)
    if odd == 0.0 and short == 0.0:
        assert fast is not None, "a well-formed body missed the fast path"
    if fast is not None:
        assert fast.shape == ref.shape
        assert np.array_equal(fast, ref, equal_nan=True)


def test_tsv_fast_path_takes_well_formed_bodies() -> None:
    rng = np.random.default_rng(3)
    lines = []
    for i in range(500):
        ints = ["" if rng.random() < 0.2 else str(int(rng.integers(-3, 10**5))) for _ in INT_COLUMNS]
        cats = []
        for c in CAT_COLUMNS:
            vocab = TRANSFORM.vocab[c]
            r = rng.random()
            cats.append("" if r < 0.2 else (vocab[int(rng.integers(len(vocab)))].upper() if vocab and r < 0.7
                                            else f"{int(rng.integers(2**32)):08x}"))
        lines.append("\t".join([str(i % 2), *ints, *cats]))
    body = ("\n".join(lines) + "\n").encode()
    fast = ENCODER.encode(body)
    assert fast is not None
    table, bad = read_text(body.decode(), require_label=False)
    assert not bad
    assert np.array_equal(fast, TRANSFORM.transform_table(table), equal_nan=True)
    assert np.isnan(fast[:, CAT_INDEX]).any() and (fast[:, CAT_INDEX[0]][~np.isnan(fast[:, CAT_INDEX[0]])] == 0).all()


def test_tsv_fast_path_follows_the_missing_code_mode() -> None:
    coded = FeatureTransform(vocab=TRANSFORM.vocab, missing="code")
    body = ("\n".join(_lines(5, 200, 0.0, 0.0)) + "\n").encode()
    fast = TsvEncoder(coded).encode(body)
    table, bad = read_text(body.decode(), require_label=False)
    assert fast is not None and not bad
    ref = coded.transform_table(table)
    assert np.array_equal(fast, ref, equal_nan=True) and not np.isnan(ref[:, CAT_INDEX]).any()


def test_probe_rows_round_trip_through_tsv() -> None:
    rows = [{"I1": 1, "I5": -2, "C2": "ABCDEF12"}, {}]
    table, bad = read_text(probe_tsv(rows).decode(), require_label=False)
    assert not bad and table.num_rows == 2
    x = np.array([TRANSFORM.row(r) for r in rows])
    assert np.array_equal(TRANSFORM.transform_table(table), x, equal_nan=True)


def test_encoder_refuses_vocabularies_it_cannot_represent() -> None:
    vocab = {c: [] for c in CAT_COLUMNS}
    vocab["C3"] = ["ABCDEF12"]  # the reader lower-cases input, so this entry can never match
    with pytest.raises(ValueError, match="C3"):
        TsvEncoder(FeatureTransform(vocab=vocab))


def test_single_row_fast_predict_is_bit_identical_to_booster_predict() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    x = rng.normal(size=(n, 39))
    x[:, CAT_INDEX] = rng.integers(0, 30, size=(n, len(CAT_INDEX)))
    x[rng.random(x.shape) < 0.1] = np.nan
    y = (np.nan_to_num(x[:, 0]) + (x[:, CAT_INDEX[0]] % 3 == 0) + rng.normal(size=n) > 0.5).astype(int)
    ds = lgb.Dataset(x, y, categorical_feature=CAT_INDEX, params={"verbose": -1})
    booster = lgb.train({"objective": "binary", "num_leaves": 15, "verbose": -1, "num_threads": 1}, ds,
                        num_boost_round=30)
    fast = SingleRowPredictor(booster)
    test = rng.normal(size=(400, 39)) * 3
    test[:, CAT_INDEX] = rng.integers(0, 40, size=(400, len(CAT_INDEX)))  # includes unseen categories
    test[rng.random(test.shape) < 0.2] = np.nan
    want = booster.predict(test)
    got = np.array([fast.predict(row.tolist()) for row in test])
    assert np.array_equal(got, want)
