"""Request validation for the scoring API: every client mistake becomes a 4xx naming row and field.

Rows are checked here and then encoded by `FeatureTransform.row`, the same code training-time
scoring uses, so a valid row gets exactly the offline number; unseen categorical values are valid
and get the rare code, as in training.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

from ctr.schema import CAT_COLUMNS, FEATURE_COLUMNS, INT_ABS_MAX, INT_COLUMNS, LABEL

_HEX_CHARS = frozenset("0123456789abcdefABCDEF")
_INT_SET = frozenset(INT_COLUMNS)
_CAT_SET = frozenset(CAT_COLUMNS)
_ALLOWED = frozenset(FEATURE_COLUMNS) | {LABEL}
_SCORE_KEYS = frozenset({"rows"})
_INVOCATION_KEYS = frozenset({"dataframe_split", "dataframe_records", "params"})


class RequestError(ValueError):
    """A client mistake: HTTP status, message, and where (0-based row, field) when known."""

    def __init__(self, status: int, message: str, *, row: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.row = row
        self.field = field

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"error": _printable(str(self), 500)}
        if self.row is not None:
            d["row"] = self.row
        if self.field is not None:
            d["field"] = _printable(self.field, 80)
        return d


def _printable(s: str, limit: int) -> str:
    """Client-supplied text made safe for a JSON error (no lone surrogates, bounded length)."""
    s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s if len(s) <= limit else s[:limit] + "..."


def _shown(v: Any) -> str:
    if isinstance(v, str):
        return repr(v if len(v) <= 24 else v[:24] + "...")
    if isinstance(v, bool | int | float) or v is None:
        return repr(v)
    return type(v).__name__


def parse_json(body: bytes) -> Any:
    """Body -> JSON value; NaN/Infinity/huge numbers parse (and are refused by field later)."""
    if not body.strip():
        raise RequestError(400, "empty body; expected a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as first:
        # orjson refuses NaN/Infinity/1e400 outright; the stdlib parses them so the error can
        # name the row and field. Anything still unparsable is a plain 400.
        try:
            return json.loads(body.decode("utf-8"), parse_constant=float)
        except UnicodeDecodeError:
            raise RequestError(400, "body is not UTF-8 JSON") from None
        except (ValueError, RecursionError):
            raise RequestError(400, f"body is not valid JSON: {first}") from None


def check_row(i: int, row: Any) -> dict[str, Any]:
    """Validate one JSON row; returns it without nulls/label, categorical values lower-cased."""
    if not isinstance(row, dict):
        raise RequestError(422, f"row {i} must be an object of feature -> value, got {_shown(row)}", row=i)
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k in _INT_SET:
            if v is None:
                continue
            if type(v) is not int:
                v = _int_value(i, k, v)
            if not -INT_ABS_MAX <= v <= INT_ABS_MAX:
                raise RequestError(422, f"row {i}: {k}={v} is outside +/-2^53", row=i, field=k)
            out[k] = v
        elif k in _CAT_SET:
            if v is None:
                continue
            if type(v) is not str or len(v) != 8 or not _HEX_CHARS.issuperset(v):
                raise RequestError(422, f"row {i}: {k} must be 8 hex digits or null, got {_shown(v)}", row=i, field=k)
            out[k] = v.lower()
        elif k == LABEL:
            if v is not None and (type(v) is not int or v not in (0, 1)):
                raise RequestError(422, f"row {i}: label must be 0, 1 or null (it is ignored), got {_shown(v)}",
                                   row=i, field=k)
        else:
            raise RequestError(422, f"row {i}: unknown field {_shown(k)}; expected I1..I13, C1..C26 (and label)",
                               row=i, field=str(k))
    return out


def _int_value(i: int, k: str, v: Any) -> int:
    if isinstance(v, float):
        if not math.isfinite(v):
            raise RequestError(422, f"row {i}: {k} must be a finite integer, got {v!r}", row=i, field=k)
        if v != int(v):
            raise RequestError(422, f"row {i}: {k} must be an integer, got {v!r}", row=i, field=k)
        return int(v)
    raise RequestError(422, f"row {i}: {k} must be an integer or null, got {_shown(v)}", row=i, field=k)


def check_rows(rows: list[Any]) -> list[dict[str, Any]]:
    return [check_row(i, r) for i, r in enumerate(rows)]


def score_rows(payload: Any) -> list[Any]:
    """`/v1/score` JSON body -> its list of rows (not yet checked)."""
    if not isinstance(payload, dict) or "rows" not in payload:
        raise RequestError(422, 'body must be {"rows": [{"I1": 3, ..., "C26": "a73ee510"}, ...]}', field="rows")
    extra = payload.keys() - _SCORE_KEYS
    if extra:
        raise RequestError(422, f"unknown top-level field {_shown(sorted(extra)[0])}; the body holds only 'rows'",
                           field=str(sorted(extra)[0]))
    rows = payload["rows"]
    if not isinstance(rows, list):
        raise RequestError(422, f"'rows' must be a list of objects, got {_shown(rows)}", field="rows")
    return rows


def invocation_rows(payload: Any) -> list[Any]:
    """MLflow `/invocations` body (dataframe_split or dataframe_records) -> rows; NaN = missing."""
    if not isinstance(payload, dict):
        raise RequestError(422, "body must be an object with 'dataframe_split' or 'dataframe_records'")
    extra = payload.keys() - _INVOCATION_KEYS
    if extra:
        raise RequestError(422, f"unknown top-level field {_shown(sorted(extra)[0])}; expected 'dataframe_split' "
                                "or 'dataframe_records'", field=str(sorted(extra)[0]))
    if ("dataframe_split" in payload) == ("dataframe_records" in payload):
        raise RequestError(422, "body must hold exactly one of 'dataframe_split' or 'dataframe_records'")
    if "params" in payload and not isinstance(payload["params"], dict):  # MLflow's inference params: an object
        raise RequestError(422, f"'params' must be an object, got {_shown(payload['params'])}", field="params")
    if "dataframe_split" in payload:
        return rows_from_split(payload["dataframe_split"])
    records = payload["dataframe_records"]
    if not isinstance(records, list):
        raise RequestError(422, "dataframe_records must be a list of objects", field="dataframe_records")
    return [{k: (None if _is_nan(v) else v) for k, v in r.items()} if isinstance(r, dict) else r for r in records]


def _is_nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def rows_from_split(split: Any) -> list[Any]:
    """MLflow `dataframe_split` -> list of row dicts (NaN/None = missing)."""
    if not isinstance(split, dict):
        raise RequestError(422, "dataframe_split must be an object with 'columns' and 'data'", field="dataframe_split")
    unknown = split.keys() - {"columns", "data", "index"}
    if unknown:
        raise RequestError(422, f"dataframe_split has unknown field {_shown(sorted(unknown)[0])}",
                           field=str(sorted(unknown)[0]))
    if "index" in split and not isinstance(split["index"], list):  # pandas' split orient: a list of labels
        raise RequestError(422, f"dataframe_split 'index' must be a list, got {_shown(split['index'])}", field="index")
    cols, data = split.get("columns"), split.get("data")
    if not isinstance(cols, list) or not all(isinstance(c, str) for c in cols):
        raise RequestError(422, "dataframe_split needs 'columns': a list of column names", field="columns")
    if len(set(cols)) != len(cols):
        raise RequestError(422, "dataframe_split 'columns' repeats a name", field="columns")
    for c in cols:  # named up front, so an unknown column is refused even with no rows
        if c not in _INT_SET and c not in _CAT_SET and c != LABEL:
            raise RequestError(422, f"dataframe_split has unknown column {_shown(c)}; expected I1..I13, C1..C26 "
                                    "(and label)", field=c)
    if not isinstance(data, list):
        raise RequestError(422, "dataframe_split needs 'data': a list of rows (lists)", field="data")
    rows = []
    for i, r in enumerate(data):
        if not isinstance(r, list) or len(r) != len(cols):
            raise RequestError(422, f"dataframe_split row {i} must be a list of {len(cols)} values", row=i)
        rows.append({c: (None if v.__class__ is float and v != v else v) for c, v in zip(cols, r, strict=True)})
    return rows
