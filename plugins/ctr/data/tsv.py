"""Writing raw Criteo TSV: a table of label/I/C columns back to the lines the reader reads."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.csv as pcsv


def to_tsv_bytes(table: pa.Table) -> bytes:
    """Raw Criteo TSV lines for a table of label/I/C columns (missing = empty field), Arrow-native."""
    if table.num_rows == 0:
        return b""
    sink = pa.BufferOutputStream()
    pcsv.write_csv(table, sink, pcsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none"))
    return sink.getvalue().to_pybytes()
