"""Parity: one bundle gives the same probabilities (to 1e-12) through every scoring path.

Paths: `Booster.predict` on the transformed matrix (the reference), `mlflow.pyfunc.load_model`,
`ctr score` (a subprocess), the scoring service (`ctr serve` on a loopback port) and the
single-row fast path `Bundle.predict_rows`. Inputs: the real samples in tests/data and
10,000 generated rows in which some values are replaced by unseen codes or made missing.
"""

from __future__ import annotations

import csv
import datetime as dt
import subprocess
import sys
from pathlib import Path

import httpx
import lightgbm as lgb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from ctr.data.reader import read_table
from ctr.features.transform import FeatureTransform
from ctr.model.bundle import Bundle
from ctr.schema import CAT_COLUMNS, FEATURE_COLUMNS, INT_COLUMNS, LABEL

from tests.conftest import CSV_SAMPLE, RAW_SAMPLE

pytestmark = pytest.mark.integration

TOL = 1e-12


def _perturbed_generated_rows(tmp: Path, n: int = 10_000) -> pa.Table:
    """n generated rows; ~10% of each categorical unseen, ~10% of every column missing (seeded)."""
    from ctr.data.generate import GeneratorConfig, generate

    day = dt.date(2026, 12, 1)
    generate(tmp, 1, n, day, GeneratorConfig(seed=99))
    table, bad = read_table(str(tmp / f"day={day.isoformat()}" / "part-00000.tsv.gz"))
    assert not bad and table.num_rows == n
    rng = np.random.default_rng(2026)
    cols = {}
    for c in FEATURE_COLUMNS:
        col = table.column(c).combine_chunks()
        if c in CAT_COLUMNS:
            unseen = pa.array([f"{v:08x}" for v in rng.integers(0, 2**32, n, dtype=np.uint64)], pa.string())
            col = pc.if_else(pa.array(rng.random(n) < 0.1), unseen, col)
        col = pc.if_else(pa.array(rng.random(n) < 0.1), pa.scalar(None, col.type), col)
        cols[c] = col
    return pa.table({LABEL: table.column(LABEL), **cols})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pa.Table]:
    raw, bad_raw = read_table(str(RAW_SAMPLE))
    csv_t, bad_csv = read_table(str(CSV_SAMPLE))
    assert raw.num_rows > 0 and csv_t.num_rows > 0
    assert not bad_raw and not bad_csv
    return {"raw_sample": raw, "csv_sample": csv_t,
            "generated": _perturbed_generated_rows(tmp_path_factory.mktemp("parity-gen"))}


def _records(table: pa.Table) -> list[dict]:
    return [{k: v for k, v in r.items() if k != LABEL and v is not None} for r in table.to_pylist()]


def _reference(bundle_dir: Path, table: pa.Table) -> np.ndarray:
    """Booster.predict on the vectorised transform and its derived features, built from the files alone."""
    booster = lgb.Booster(model_file=str(bundle_dir / "model.txt"))
    transform = FeatureTransform.load(bundle_dir / "features.json")
    assert transform.derived, "the default bundle carries derived features (counts, click rates per code)"
    return booster.predict(transform.derive(transform.transform_table(table)))


def _to_tsv(table: pa.Table, path: Path) -> None:
    strings = [pc.fill_null(pc.cast(table.column(c), pa.string()), "") for c in [LABEL, *FEATURE_COLUMNS]]
    path.write_text("\n".join(pc.binary_join_element_wise(*strings, "\t").to_pylist()) + "\n")


def test_inputs_exercise_unseen_and_missing(trained_bundle: Path, inputs: dict[str, pa.Table]) -> None:
    x = Bundle.load(trained_bundle).transform.transform_table(inputs["generated"])
    cats = x[:, len(INT_COLUMNS):]
    sizes = np.array([len(v) for v in Bundle.load(trained_bundle).transform.vocab.values()], dtype=np.float64)
    assert np.isnan(x).any(axis=0).all(), "every column should have missing values"
    assert (cats == sizes).sum() > 1000, "unseen values should map to the rare code"


@pytest.mark.parametrize("name", ["raw_sample", "csv_sample", "generated"])
def test_all_paths_agree(name: str, trained_bundle: Path, scoring_server: str, inputs: dict[str, pa.Table],
                         tmp_path: Path) -> None:
    import mlflow.pyfunc

    table = inputs[name]
    ref = _reference(trained_bundle, table)
    assert ref.shape == (table.num_rows,) and np.all((ref > 0) & (ref < 1))

    # single-row fast path and the vectorised Bundle path
    b = Bundle.load(trained_bundle)
    records = _records(table)
    np.testing.assert_allclose(b.predict_rows(records), ref, rtol=0, atol=TOL)
    np.testing.assert_allclose(b.predict_table(table), ref, rtol=0, atol=TOL)

    # MLflow pyfunc (loader module, no pickles)
    model = mlflow.pyfunc.load_model(str(trained_bundle))
    df = table.drop_columns([LABEL]).to_pandas()
    np.testing.assert_allclose(np.asarray(model.predict(df), dtype=np.float64), ref, rtol=0, atol=TOL)

    # `ctr score` on a raw TSV file
    src, out = tmp_path / "in.tsv", tmp_path / "out.csv"
    _to_tsv(table, src)
    proc = subprocess.run([sys.executable, "-m", "ctr.cli", "score", "--model", str(trained_bundle), "--input", str(src),
                           "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(out) as fh:
        scored = list(csv.DictReader(fh))
    assert [int(r["row"]) for r in scored] == list(range(1, table.num_rows + 1))
    np.testing.assert_allclose(np.array([float(r["probability"]) for r in scored]), ref, rtol=0, atol=TOL)

    # the scoring service, JSON rows with absent keys for missing values
    got: list[float] = []
    with httpx.Client(base_url=scoring_server, timeout=120) as client:
        for i in range(0, len(records), 2500):
            r = client.post("/v1/score", json={"rows": records[i:i + 2500]})
            assert r.status_code == 200, r.text
            got.extend(r.json()["probabilities"])
    np.testing.assert_allclose(np.array(got), ref, rtol=0, atol=TOL)
