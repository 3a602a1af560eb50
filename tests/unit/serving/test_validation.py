"""Unit tests of the scoring service's validation and fast paths (no server, no trained bundle)."""

from __future__ import annotations

import math
import random

import lightgbm as lgb
import numpy as np
import orjson
import pytest
from ctr.data.reader import read_text
from ctr.features.transform import CAT_INDEX, FeatureTransform
from ctr.schema import CAT_COLUMNS, INT_COLUMNS
from ctr.serving.predictors import SingleRowPredictor, TsvEncoder, probe_tsv
from ctr.serving.validation import RequestError, check_row, invocation_rows, parse_json, score_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# ---- check_row -------------------------------------------------------------------------


def test_valid_row_is_normalised() -> None:
    row = {"I1": 3, "I2": -7.0, "I3": None, "C1": "ABCDEF12", "C2": None, "label": 1}
    assert check_row(0, row) == {"I1": 3, "I2": -7, "C1": "abcdef12"}


def test_bounds_are_inclusive() -> None:
    assert check_row(0, {"I1": 2**53, "I2": -(2**53)}) == {"I1": 2**53, "I2": -(2**53)}


@pytest.mark.parametrize(("row", "field", "needle"), [
    ({"I1": True}, "I1", "integer"),
    ({"I1": "3"}, "I1", "integer"),
    ({"I1": 1.5}, "I1", "integer"),
    ({"I1": math.nan}, "I1", "finite"),
    ({"I1": math.inf}, "I1", "finite"),
    ({"I1": -math.inf}, "I1", "finite"),
    ({"I1": 2**53 + 1}, "I1", "2^53"),
    ({"I13": -(2**64)}, "I13", "2^53"),
    ({"I1": 1e300}, "I1", "2^53"),
    ({"I1": [1]}, "I1", "list"),
    ({"C1": "xyz12345"}, "C1", "hex"),
    ({"C1": "abcdef1"}, "C1", "hex"),
    ({"C1": "abcdef123"}, "C1", "hex"),
    ({"C1": 12345678}, "C1", "hex"),
    ({"C26": {"a": 1}}, "C26", "hex"),
    ({"C1": "ａｂｃｄｅｆ１２"}, "C1", "hex"),  # full-width look-alikes
    ({"I14": 1}, "I14", "unknown field"),
    ({"c1": "abcdef12"}, "c1", "unknown field"),
    ({"label": 2}, "label", "label"),
    ({"label": "1"}, "label", "label"),
])
def test_bad_values_name_row_and_field(row: dict, field: str, needle: str) -> None:
    with pytest.raises(RequestError) as e:
        check_row(4, row)
    assert e.value.status == 422
    assert e.value.row == 4 and e.value.field == field
    assert needle in str(e.value) and "row 4" in str(e.value)


@pytest.mark.parametrize("row", [[1, 2], "I1=3", 3, None])
def test_row_must_be_an_object(row: object) -> None:
    with pytest.raises(RequestError) as e:
        check_row(2, row)
    assert (e.value.status, e.value.row) == (422, 2)


def test_error_json_is_safe_for_any_client_text() -> None:
    e = RequestError(422, "row 0: unknown field '\ud800'", row=0, field="\ud800" * 200)
    doc = orjson.loads(orjson.dumps(e.to_json()))  # lone surrogates would make orjson raise
    assert doc["row"] == 0 and len(doc["field"]) < 120


# ---- bodies ----------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "status"), [
    (b"", 400), (b"   \n", 400), (b"{", 400), (b"rows", 400), (b"\xff\xfe{}", 400),
    (b"[" * 5000 + b"]" * 5000, 400), (b'{"rows": [}', 400),
])
def test_unparsable_bodies_are_400(body: bytes, status: int) -> None:
    with pytest.raises(RequestError) as e:
        parse_json(body)
    assert e.value.status == status


def test_nan_and_infinity_parse_so_the_field_can_be_named() -> None:
    payload = parse_json(b'{"rows": [{"I1": 1}, {"I2": NaN}]}')
    rows = score_rows(payload)
    check_row(0, rows[0])
    with pytest.raises(RequestError) as e:
        check_row(1, rows[1])
    assert (e.value.row, e.value.field) == (1, "I2")
    assert parse_json(b'{"x": 1e400}')["x"] == math.inf


@pytest.mark.parametrize(("payload", "field"), [
    ({}, "rows"), ([], "rows"), ({"rows": {}}, "rows"), ({"rows": "x"}, "rows"),
    ({"rows": [], "extra": 1}, "extra"),
])
def test_score_body_shape(payload: object, field: str) -> None:
    with pytest.raises(RequestError) as e:
        score_rows(payload)
    assert e.value.status == 422 and e.value.field == field


def test_invocations_formats_agree_and_nan_is_missing() -> None:
    split = {"dataframe_split": {"columns": ["I1", "C1"], "data": [[1, "abcdef12"], [math.nan, None]]}}
    records = {"dataframe_records": [{"I1": 1, "C1": "abcdef12"}, {"I1": math.nan, "C1": None}]}
    assert invocation_rows(split) == invocation_rows(records) == [{"I1": 1, "C1": "abcdef12"}, {"I1": None, "C1": None}]


@pytest.mark.parametrize("payload", [
    {"dataframe_split": {"columns": ["I1"], "data": [[1, 2]]}},
    {"dataframe_split": {"columns": ["I1", "I1"], "data": [[1, 2]]}},
    {"dataframe_split": {"columns": [1], "data": [[1]]}},
    {"dataframe_split": {"columns": ["I1"], "data": {"0": [1]}}},
    {"dataframe_split": [1]},
    {"dataframe_records": {"I1": 1}},
    {"dataframe_split": {"columns": [], "data": []}, "dataframe_records": []},
    {"instances": [[1]]},
    {},
])
def test_invocations_shape_errors(payload: dict) -> None:
    with pytest.raises(RequestError) as e:
        invocation_rows(payload)
    assert e.value.status == 422


# ---- fast paths are bit-identical ----------------------------------------------------------

def _transform(seed: int = 1) -> FeatureTransform:
    rng = np.random.default_rng(seed)
    vocab = {c: sorted({f"{v:08x}" for v in rng.integers(0, 2**32, int(rng.integers(0, 40)))}) for c in CAT_COLUMNS}
    vocab[CAT_COLUMNS[0]] = []  # an empty vocabulary: everything is rare
    return FeatureTransform(vocab=vocab)


TRANSFORM = _transform()
ENCODER = TsvEncoder(TRANSFORM)


_ODD_INTS = ["-0", "007", str(2**53), str(-(2**53)), str(2**53 + 1), "9" * 19, "1.0", "+5", " 5", "1e5", "a"]
_ODD_CATS = ["abcdef1", "ABCDEFGH", "abcdef123", "ab cdef1", "\u00e9bcdef12"]


def _lines(seed: int, n: int, odd: float, short: float) -> list[str]:
    """Random raw Criteo lines; `odd` is the chance of a malformed field, `short` of a cut line."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        fields = [rng.choice(["", "0", "1"]) if rng.random() > odd else rng.choice(["0.0", "2", "x"])]
        for _c in INT_COLUMNS:
            r = rng.random()
            fields.append("" if r < 0.2 else rng.choice(_ODD_INTS) if r < 0.2 + odd else str(rng.randint(-5, 10**6)))
        for c in CAT_COLUMNS:
            vocab, r = TRANSFORM.vocab[c], rng.random()
            if r < 0.2:
                v = ""
            elif r < 0.2 + odd:
                v = rng.choice(_ODD_CATS)
            elif vocab and r < 0.7:
                v = rng.choice(vocab)
            else:
                v = f"{rng.getrandbits(32):08x}"
            fields.append(v.upper() if rng.random() < 0.2 else v)
        if rng.random() < short:
            fields = rng.choice([fields[: rng.randint(1, 39)], [*fields, "1"], [""]])  # cut, extra, blank line
        lines.append("\t".join(fields))
    return lines


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
