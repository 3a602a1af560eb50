"""The service's batch path: numpy TSV encoder and one-call batch predictor, bit-identical to the
reader + `FeatureTransform.transform_table` and to `Booster.predict` (no server, no trained bundle)."""

from __future__ import annotations

import random

import lightgbm as lgb
import numpy as np
import pytest
from ctr.data.reader import read_text
from ctr.features.transform import CAT_INDEX, FeatureTransform
from ctr.schema import CAT_COLUMNS, INT_COLUMNS
from ctr.serving.encoders import NumpyTsvEncoder, TsvEncoder
from ctr.serving.predictors import BatchPredictor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.criteo_lines import ODD_CATS, ODD_INTS, random_lines, random_transform

TRANSFORM = random_transform(2, extremes=True)
ENCODER = NumpyTsvEncoder(TRANSFORM)
_ODD_INTS, _ODD_CATS = ODD_INTS, ODD_CATS


def _lines(seed: int, n: int, odd: float, short: float) -> list[str]:
    return random_lines(TRANSFORM, seed, n, odd, short, wide_ints=True)


def _reference(body: bytes, transform: FeatureTransform = TRANSFORM) -> np.ndarray | None:
    table, bad = read_text(body.decode("utf-8", errors="replace"), require_label=False)
    return None if bad else transform.transform_table(table)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), n=st.integers(1, 12), odd=st.sampled_from([0.0, 0.0, 0.02, 0.1, 0.3]),
       short=st.sampled_from([0.0, 0.0, 0.1]), ending=st.sampled_from(["\n", "\n", "", "\r\n", "\n\n"]))
def test_numpy_tsv_encoder_equals_reader_and_transform(seed: int, n: int, odd: float, short: float,
                                                       ending: str) -> None:
    sep = "\r\n" if ending == "\r\n" else "\n"
    body = (sep.join(_lines(seed, n, odd, short)) + ending).encode()
    fast = ENCODER.encode(body)
    ref = _reference(body)
    if ref is None:
        assert fast is None, "the numpy path accepted a body the reader refuses"
        return
    if odd == 0.0 and short == 0.0 and ending in ("\n", ""):
        assert fast is not None, "a well-formed body missed the numpy path"
    if fast is not None:
        assert fast.shape == ref.shape
        assert np.array_equal(fast, ref, equal_nan=True)


@pytest.mark.parametrize("value", sorted(set(_ODD_INTS + _ODD_CATS)))
def test_every_odd_value_in_every_field_is_exact_or_refused(value: str) -> None:
    base = _lines(11, 3, 0.0, 0.0)
    for field in range(40):
        fields = base[1].split("\t")
        fields[field] = value
        body = "\n".join([base[0], "\t".join(fields), base[2]]).encode() + b"\n"
        fast = ENCODER.encode(body)
        ref = _reference(body)
        if fast is not None:
            assert ref is not None, f"numpy path accepted {value!r} in field {field}; the reader refuses it"
            assert np.array_equal(fast, ref, equal_nan=True), (value, field)


def test_numpy_tsv_encoder_takes_well_formed_batches_and_agrees_with_the_arrow_encoder() -> None:
    body = ("\n".join(_lines(4, 2000, 0.0, 0.0)) + "\n").encode()
    fast = ENCODER.encode(body)
    assert fast is not None and fast.flags.c_contiguous and fast.dtype == np.float64
    ref = _reference(body)
    assert ref is not None
    assert np.array_equal(fast, ref, equal_nan=True)
    assert np.array_equal(fast, TsvEncoder(TRANSFORM).encode(body), equal_nan=True)
    assert np.isnan(fast).any()


def test_numpy_tsv_encoder_edge_bodies() -> None:
    line = "\t".join(["", *[""] * 13, *[""] * 26])  # every field empty, ending the body on an empty field
    fast = ENCODER.encode(line.encode())
    ref = _reference(line.encode())
    assert fast is not None and ref is not None and np.array_equal(fast, ref, equal_nan=True)
    assert np.isnan(fast[0, : len(INT_COLUMNS)]).all()
    for body in (b"", b"\n", b"\n" + line.encode(), line.encode() + b"\r\n", b"1,2,3\n", b"\t" * 38, b"\t" * 40):
        assert ENCODER.encode(body) is None, body[:20]


def test_numpy_tsv_encoder_reads_integers_exactly() -> None:
    values = ["0", "-0", "7", "-7", "00000012", "12345678", "123456789", "-123456789012345", "999999999999999",
              "-999999999999999", "100000000", "10000000000000"]
    for v in values:
        line = "\t".join(["1", v, *["3"] * 12, *["abcdef12"] * 26]) + "\n"
        fast = ENCODER.encode(line.encode())
        assert fast is not None, v
        assert fast[0, 0] == float(int(v)) and np.signbit(fast[0, 0]) == (int(v) < 0), v


def test_numpy_tsv_encoder_follows_the_missing_code_mode() -> None:
    coded = random_transform(2, missing="code", extremes=True)
    body = ("\n".join(_lines(5, 300, 0.0, 0.0)) + "\n").encode()
    fast = NumpyTsvEncoder(coded).encode(body)
    ref = _reference(body, coded)
    assert fast is not None and ref is not None
    assert np.array_equal(fast, ref, equal_nan=True) and not np.isnan(ref[:, CAT_INDEX]).any()


def test_numpy_tsv_encoder_refuses_vocabularies_it_cannot_represent() -> None:
    vocab = {c: [] for c in CAT_COLUMNS}
    vocab["C3"] = ["ABCDEF12"]
    with pytest.raises(ValueError, match="C3"):
        NumpyTsvEncoder(FeatureTransform(vocab=vocab))


def _booster(seed: int = 0) -> tuple[lgb.Booster, np.random.Generator]:
    rng = np.random.default_rng(seed)
    n = 3000
    x = rng.normal(size=(n, 39))
    x[:, CAT_INDEX] = rng.integers(0, 30, size=(n, len(CAT_INDEX)))
    x[rng.random(x.shape) < 0.1] = np.nan
    y = (np.nan_to_num(x[:, 0]) + (x[:, CAT_INDEX[0]] % 3 == 0) + rng.normal(size=n) > 0.5).astype(int)
    ds = lgb.Dataset(x, y, categorical_feature=CAT_INDEX, params={"verbose": -1})
    valid = lgb.Dataset(x[:500], y[:500], reference=ds)
    booster = lgb.train({"objective": "binary", "num_leaves": 15, "verbose": -1, "num_threads": 1}, ds,
                        num_boost_round=40, valid_sets=[valid], callbacks=[lgb.early_stopping(5, verbose=False)])
    return booster, rng


def test_batch_predictor_is_bit_identical_to_booster_predict() -> None:
    booster, rng = _booster()
    test = rng.normal(size=(1000, 39)) * 3
    test[:, CAT_INDEX] = rng.integers(0, 40, size=(1000, len(CAT_INDEX)))  # includes unseen categories
    test[rng.random(test.shape) < 0.2] = np.nan
    batch = BatchPredictor(booster)
    want = booster.predict(test, num_threads=1)
    assert np.array_equal(batch.predict(test), want)
    assert np.array_equal(batch.predict(np.asfortranarray(test)), want)
    assert np.array_equal(batch.predict(test[:1]), want[:1])
    assert np.array_equal(booster.predict(test), want)  # default threads: the same numbers
    assert batch.predict(np.empty((0, 39))).shape == (0,)
    with pytest.raises(ValueError, match="shape"):
        batch.predict(np.zeros((3, 38)))


# ---- JSON rows: one pass == check_rows + FeatureTransform.row ---------------------------------

_ODD_JSON = [None, True, False, 3.0, 3.5, float("nan"), "3", 2**53, -(2**53), 2**53 + 1, [], {}, "abcdef12",
             "ABCDEF12", "abcdefgh", "abc", "", 0, 1, 2, -1]


def _json_rows(seed: int, n: int, odd: float) -> list:
    rng = random.Random(seed)
    rows: list = []
    for _ in range(n):
        if rng.random() < odd / 4:
            rows.append(rng.choice([[1], "row", 7, None]))
            continue
        row: dict = {}
        if rng.random() < 0.3:
            row["label"] = rng.choice([0, 1, None]) if rng.random() > odd else rng.choice(_ODD_JSON)
        for c in INT_COLUMNS:
            r = rng.random()
            if r < 0.2:
                continue
            row[c] = None if r < 0.3 else rng.choice(_ODD_JSON) if r < 0.3 + odd else rng.randint(-5, 10**6)
        for c in CAT_COLUMNS:
            vocab, r = TRANSFORM.vocab[c], rng.random()
            if r < 0.2:
                continue
            if r < 0.3:
                row[c] = None
            elif r < 0.3 + odd:
                row[c] = rng.choice(_ODD_JSON)
            else:
                v = rng.choice(vocab) if vocab and r < 0.7 else f"{rng.getrandbits(32):08x}"
                row[c] = v.upper() if rng.random() < 0.2 else v
        if rng.random() < odd / 4:
            row[rng.choice(["I14", "c1", "id"])] = 1
        items = list(row.items())
        rng.shuffle(items)
        rows.append(dict(items))
    return rows


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), n=st.integers(0, 20), odd=st.sampled_from([0.0, 0.0, 0.02, 0.2]))
def test_json_rows_encoder_equals_check_rows_and_transform(seed: int, n: int, odd: float) -> None:
    from ctr.serving.encoders import JsonRowsEncoder
    from ctr.serving.validation import RequestError, check_rows

    rows = _json_rows(seed, n, odd)
    fast = JsonRowsEncoder(TRANSFORM).encode(rows)
    try:
        ref = TRANSFORM.rows_matrix(check_rows(rows))
    except RequestError:
        assert fast is None, "the one-pass encoder accepted rows check_rows refuses"
        return
    if odd == 0.0:
        assert fast is not None, "plain rows missed the one-pass encoder"
    if fast is not None:
        assert fast.shape == ref.shape == (n, 39)
        assert np.array_equal(fast, ref, equal_nan=True)
