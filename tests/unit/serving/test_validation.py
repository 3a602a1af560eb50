"""The scoring service's request validation: rows, bodies, error documents (no server, no trained bundle)."""

from __future__ import annotations

import math

import orjson
import pytest
from ctr.serving.validation import RequestError, check_row, invocation_rows, parse_json, score_rows

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
