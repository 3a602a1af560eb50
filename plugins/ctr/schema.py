"""Criteo columns and types, in one place."""

from __future__ import annotations

import pyarrow as pa

LABEL = "label"
INT_COLUMNS: list[str] = [f"I{i}" for i in range(1, 14)]
CAT_COLUMNS: list[str] = [f"C{i}" for i in range(1, 27)]
FEATURE_COLUMNS: list[str] = INT_COLUMNS + CAT_COLUMNS
ALL_COLUMNS: list[str] = [LABEL] + FEATURE_COLUMNS
N_FIELDS = len(ALL_COLUMNS)  # 40

# Integer features are stored as int64; values beyond this magnitude are refused as implausible.
INT_ABS_MAX = 2**53  # exactly representable as float64, the type the model sees

ARROW_SCHEMA = pa.schema(
    [pa.field(LABEL, pa.int8())]
    + [pa.field(c, pa.int64()) for c in INT_COLUMNS]
    + [pa.field(c, pa.string()) for c in CAT_COLUMNS]
)

# Cardinalities of the full Criteo Display Advertising Challenge training set (45,840,617 rows).
REAL_CARDINALITY: dict[str, int] = {
    "C1": 1460, "C2": 583, "C3": 10131227, "C4": 2202608, "C5": 305, "C6": 24, "C7": 12517,
    "C8": 633, "C9": 3, "C10": 93145, "C11": 5683, "C12": 8351593, "C13": 3194, "C14": 27,
    "C15": 14992, "C16": 5461306, "C17": 10, "C18": 5652, "C19": 2173, "C20": 4, "C21": 7046547,
    "C22": 18, "C23": 15, "C24": 286181, "C25": 105, "C26": 142572,
}
FULL_CRITEO_ROWS = 45_840_617
