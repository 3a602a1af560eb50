"""Corrected data, end to end: three `airflow dags test` runs of ctr_retrain for the same logical date D.

run 1: the holdout day D arrives partial (3,000 of its 4,000 rows) -> version 1 registered on it
run 2: the complete file replaces it -> day D re-staged, a new version 2 tagged ctr.supersedes=1, and
       version 1 tagged ctr.superseded_by=2; evaluated on all 4,000 rows
run 3: nothing changed -> day D reused, no third version
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os

import pytest
from ctr.data.generate import GeneratorConfig, generate
from ctr.data.landing import load_report
from ctr.registry import Registry

pytestmark = pytest.mark.e2e

D = dt.date(2026, 11, 20)
CONF = {"min_auc": 0.6, "train_days": 3}


def _versions(reg: Registry) -> list[str]:
    return sorted((str(v.version) for v in reg.client.search_model_versions("name = 'ctr-lightgbm'")), key=int)


def test_corrected_holdout_day_supersedes_its_version(airflow_install, tmp_path_factory):
    landing = tmp_path_factory.mktemp("restage-landing")
    generate(landing, 4, 4000, D, GeneratorConfig(seed=11))
    holdout = landing / f"day={D.isoformat()}" / "part-00000.tsv.gz"
    complete = holdout.read_bytes()
    lines = gzip.decompress(complete).decode().splitlines(keepends=True)
    holdout.write_bytes(gzip.compress("".join(lines[:3000]).encode()))  # the export so far
    inst = airflow_install(landing)
    reg = Registry(f"sqlite:///{inst.ctr_home / 'mlflow.db'}", "ctr-lightgbm")
    staging = inst.ctr_home / "staging"

    inst.dags_test(D.isoformat(), CONF)
    assert _versions(reg) == ["1"]
    assert inst.metrics(D.isoformat())["rows"] == 3000
    partial = load_report(staging, D).digest
    v1 = reg.get("1")
    assert v1.tags["ctr.data_digest"].startswith("sha256:")
    assert json.loads(v1.tags["data_fingerprints"])[D.isoformat()] == partial
    assert "ctr.supersedes" not in v1.tags

    holdout.write_bytes(complete)  # the corrected (complete) re-delivery
    st = holdout.stat()
    os.utime(holdout, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # even within the same second
    r2 = inst.dags_test(D.isoformat(), CONF)
    assert f"day={D.isoformat()} re-staged: part-00000.tsv.gz changed" in (r2.stdout + r2.stderr)
    assert _versions(reg) == ["1", "2"]
    m2 = inst.metrics(D.isoformat())
    assert m2["rows"] == 4000 and m2["baseline_version"] == "1", "the gate compares with the champion as usual"
    corrected = load_report(staging, D).digest
    assert corrected != partial and m2["data_fingerprints"][D.isoformat()] == corrected
    v1, v2 = reg.get("1"), reg.get("2")
    assert v2.tags["ctr.supersedes"] == "1" and v1.tags["ctr.superseded_by"] == "2"
    assert v2.tags["ctr.run_key"] == v1.tags["ctr.run_key"] == f"ctr_retrain/{D.isoformat()}"
    assert v2.tags["ctr.data_digest"] == m2["data_digest"] != v1.tags["ctr.data_digest"]
    assert v1.run_id != v2.run_id, "each version keeps its own MLflow run (and model artifacts)"
    meta = json.loads((inst.ctr_home / "runs" / "ctr_retrain" / D.isoformat() / "candidate" / "metadata.json").read_text())
    assert meta["holdout_fingerprint"] == {D.isoformat(): corrected}
    assert {**meta["data_fingerprints"], **meta["holdout_fingerprint"]} == json.loads(v2.tags["data_fingerprints"])
    assert reg.champion().version == "2"

    r3 = inst.dags_test(D.isoformat(), CONF)
    assert "re-staged" not in (r3.stdout + r3.stderr)
    assert _versions(reg) == ["1", "2"], "an unchanged re-run finds its version"
    assert reg.champion().version == "2"
