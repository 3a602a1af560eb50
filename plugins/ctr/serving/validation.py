"""Request validation for the scoring API: every client mistake becomes a 4xx naming row and field."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from ctr.schema import CAT_COLUMNS, FEATURE_COLUMNS, INT_ABS_MAX, INT_COLUMNS, LABEL

_HEX = re.compile(r"[0-9a-fA-F]{8}")
_INT_SET = frozenset(INT_COLUMNS)
_CAT_SET = frozenset(CAT_COLUMNS)
_ALLOWED = frozenset(FEATURE_COLUMNS) | {LABEL}


class RequestError(ValueError):
    def __init__(self, status: int, message: str, *, row: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.row = row
        self.field = field

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"error": str(self)}
        if self.row is not None:
            d["row"] = self.row
        if self.field is not None:
            d["field"] = self.field
        return d


def check_row(i: int, row: Any) -> dict[str, Any]:
    """Validate one JSON row; returns it with categorical values lower-cased."""
    if not isinstance(row, Mapping):
        raise RequestError(422, f"row {i} must be an object of feature -> value", row=i)
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k not in _ALLOWED:
            raise RequestError(422, f"row {i}: unknown field {k!r}; expected I1..I13, C1..C26", row=i, field=str(k))
        if v is None or k == LABEL:
            continue
        if k in _INT_SET:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise RequestError(422, f"row {i}: {k} must be an integer or null, got {type(v).__name__}", row=i, field=k)
            if isinstance(v, float):
                if not math.isfinite(v) or v != int(v):
                    raise RequestError(422, f"row {i}: {k} must be a finite integer, got {v!r}", row=i, field=k)
                v = int(v)
            if abs(v) > INT_ABS_MAX:
                raise RequestError(422, f"row {i}: {k}={v} is outside +/-2^53", row=i, field=k)
            out[k] = v
        else:
            if not isinstance(v, str) or not _HEX.fullmatch(v):
                shown = v if isinstance(v, str) and len(v) <= 20 else type(v).__name__
                raise RequestError(422, f"row {i}: {k} must be 8 hex digits or null, got {shown!r}", row=i, field=k)
            out[k] = v.lower()
    return out


def rows_from_split(payload: Mapping[str, Any]) -> list[Any]:
    """MLflow `dataframe_split` -> list of row dicts (NaN/None = missing)."""
    cols = payload.get("columns")
    data = payload.get("data")
    if not isinstance(cols, list) or not isinstance(data, list):
        raise RequestError(422, "dataframe_split needs 'columns' (list) and 'data' (list of lists)")
    rows = []
    for i, r in enumerate(data):
        if not isinstance(r, list) or len(r) != len(cols):
            raise RequestError(422, f"dataframe_split row {i} must be a list of {len(cols)} values", row=i)
        rows.append({c: (None if isinstance(v, float) and math.isnan(v) else v) for c, v in zip(cols, r, strict=True)})
    return rows
