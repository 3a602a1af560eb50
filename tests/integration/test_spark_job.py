"""The Spark training job on pyspark's bundled local Spark, against the local (non-Spark) path.

* `ctr train --engine spark` and `ctr train --engine lightgbm` on the same days: byte-identical
  features.json, holdout AUCs within 0.002, the job's metrics.json in the gate's format, and the
  same metadata.json keys (one builder) apart from the Spark job's own lineage, and the same drift
  section (feature and score PSI, `ctr.monitoring.drift`) as the local evaluate;
* the holdout profile counted on the executors equals the local count, and names exactly the
  drifted features of a drifted day;
* validation on Spark partitions gives check_data's counts and reasons, line by line;
* the SynapseML parameter mapping uses LightGBMClassifier's real parameter names.
"""

from __future__ import annotations

import collections
import datetime as dt
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import END_DAY

pytestmark = pytest.mark.integration

HOLDOUT = END_DAY
START, END = END_DAY - dt.timedelta(days=7), END_DAY - dt.timedelta(days=1)


@pytest.fixture(scope="session")
def spark():
    from ctr.training.spark_job import spark_session

    s = spark_session("ctr-tests", master="local[2]")
    yield s
    s.stop()


def _ctr(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "ctr.cli", *args], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, f"ctr {' '.join(args)} failed:\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def small_landing(tmp_path_factory) -> Path:
    """4 days x 2,500 rows: three training days and the holdout day."""
    from ctr.data.generate import GeneratorConfig, generate

    root = tmp_path_factory.mktemp("spark-landing")
    generate(root, 4, 2500, HOLDOUT, GeneratorConfig(seed=3))
    return root


def test_cli_spark_and_lightgbm_engines_agree(small_landing: Path, tmp_path: Path):
    from ctr.data.landing import stage_day
    from ctr.model.bundle import Bundle
    from ctr.validation.holdout import evaluate_day

    start = HOLDOUT - dt.timedelta(days=3)
    env = {**os.environ, "CTR_HOME": str(tmp_path / "home"), "CTR_NUM_THREADS": "2", "CTR_SPARK_MASTER": "local[2]"}
    common = ["--data", str(small_landing), "--from", start.isoformat(), "--to", END.isoformat(), "--seed", "42"]
    _ctr("train", *common, "--engine", "lightgbm", "--out", str(tmp_path / "local"), env=env)
    _ctr("train", *common, "--engine", "spark", "--out", str(tmp_path / "spark"), env=env)

    local_features = (tmp_path / "local" / "features.json").read_bytes()
    assert (tmp_path / "spark" / "features.json").read_bytes() == local_features
    # ... including the derived features' tables (rows and clicks per code, counted by Spark on every training row)
    doc_features = json.loads(local_features)
    assert doc_features["derived"] == ["count", "target"]
    stats = doc_features["code_stats"]
    assert sum(stats["rows"]["C1"]) == sum(stats["rows"]["C26"]) > 0 and sum(stats["clicks"]["C1"]) > 0

    staging = tmp_path / "home" / "staging"
    from ctr.data.landing import daterange

    for d in daterange(start, HOLDOUT):  # the training range too: evaluate's drift reference reads it
        stage_day(str(small_landing), staging, tmp_path / "home" / "quarantine", d)
    doc = evaluate_day(staging, HOLDOUT, tmp_path / "spark", tmp_path / "local")
    aucs = {"spark": doc["candidate"]["auc"], "local": doc["baseline"]["auc"]}
    assert abs(aucs["spark"] - aucs["local"]) <= 0.002, aucs

    # the job evaluated the holdout day itself (scored on the executors) in the gate's format
    m = json.loads((tmp_path / "spark.spark" / "metrics.json").read_text())
    assert m["day"] == HOLDOUT.isoformat() and m["rows"] == doc["rows"] and m["baseline"] is None
    assert {"passed", "forced", "reasons", "checks"} <= set(m["gate"])
    assert m["candidate"]["auc"] == pytest.approx(aucs["spark"], abs=1e-9)
    # ... with the same drift section: the same rows in the same bins, so the very same PSI per feature
    # (holdout vs training range) and of the score (holdout vs the validation day)
    assert doc["drift"]["reference"].startswith(f"training range {start}..{END}, every 1 row(s) of ")
    assert m["drift"] == doc["drift"]
    psi_rule = [[c for c in g["checks"] if c["rule"] == "max_feature_psi"] for g in (m["gate"], doc["gate"])]
    assert psi_rule[0] == psi_rule[1] and len(psi_rule[0]) == 1  # the gate's drift rule reads the same numbers
    assert len(m["drift"]["features"]) == 39 and m["drift"]["score_psi"] is not None and m["drift"]["rows"] == doc["rows"]
    from ctr.monitoring.drift import REFERENCE_FILE, Reference
    from ctr.validation.holdout import drift_reference

    spark_ref = Reference.from_json(json.loads((tmp_path / "spark.spark" / REFERENCE_FILE).read_text())).to_json()
    local_ref = drift_reference(staging, Bundle.load(tmp_path / "spark"), daterange(start, END)).to_json()
    assert {k: spark_ref[k] for k in local_ref if not k.startswith("score")} == \
        {k: v for k, v in local_ref.items() if not k.startswith("score")}
    assert sum(spark_ref["score_counts"]) == doc["rows"]  # binned candidate holdout scores, for `ctr monitor`
    meta = json.loads((tmp_path / "spark" / "metadata.json").read_text())
    assert meta["engine"] == "spark-lightgbm" and meta["data_interval"] == {"start": start.isoformat(), "end": END.isoformat()}
    # lineage: the Spark job lists the landing zone through Hadoop, yet records the digests stage_day recorded
    from ctr.data.landing import daterange, staged_fingerprints

    local_meta = json.loads((tmp_path / "local" / "metadata.json").read_text())
    staged = staged_fingerprints(staging, daterange(start, HOLDOUT))
    assert len(staged) == 4 and all(v.startswith("sha256:") for v in staged.values())
    assert meta["data_fingerprints"] == local_meta["data_fingerprints"] == {k: staged[k] for k in sorted(staged)[:-1]}
    assert meta["holdout_fingerprint"] == {HOLDOUT.isoformat(): staged[HOLDOUT.isoformat()]}
    Bundle.load(tmp_path / "spark")  # probe.json and MLmodel written by finalize_bundle

    # one metadata builder: both bundles carry the same keys; only the Spark job's own lineage is extra
    from ctr.model.bundle import METADATA_KEYS

    assert set(METADATA_KEYS) <= set(local_meta) and set(METADATA_KEYS) <= set(meta)
    assert set(meta) - set(local_meta) == {"ctr_location", "spark_master", "data_report", "holdout_fingerprint"}
    assert set(local_meta) <= set(meta)
    for key in ("validation", "min_count", "max_vocab", "missing", "rounds", "seed", "sample_fraction",
                "lightgbm_version", "vocab_sizes"):
        assert meta[key] == local_meta[key], key
    assert 0 < meta["best_iteration"] <= meta["trees_built"] <= meta["rounds"]


BAD_LINES = [
    "1\tabc" + "\t" * 38,                              # I1 not an integer
    "",                                                # empty line
    "2" + "\t" * 39,                                   # label not 0/1
    "0" + "\t1" * 13 + "\tzzzzzzzz" + "\t" * 25,       # C1 not hex
    "0" + "\t" * 45,                                   # too many fields
    "1\t5\t6",                                         # short: padded, valid
    "0\t1\t2\t3\r",                                    # CRLF ending: valid
    "1\t" + "9" * 20 + "\t" * 38,                      # integer out of range
]


def test_validation_matches_check_data(spark, small_landing: Path, tmp_path: Path):
    from ctr.data.landing import stage_day
    from ctr.data.reader import read_table
    from ctr.training.spark_job import day_reports, list_day_files, read_days

    day = END_DAY - dt.timedelta(days=3)
    land = tmp_path / "landing"
    (land / f"day={day}").mkdir(parents=True)
    src = sorted((small_landing / f"day={day}").glob("*.tsv.gz"))[0]
    (land / f"day={day}" / src.name).write_bytes(src.read_bytes())
    extra = land / f"day={day}" / "part-00001.tsv"
    extra.write_bytes(("\n".join(BAD_LINES) + "\n").encode())

    local = stage_day(str(land), tmp_path / "staging", tmp_path / "quarantine", day)
    parsed = read_days(spark, str(land), [day])
    (rep,) = day_reports(parsed, [day], {day.isoformat(): list_day_files(spark, str(land), day)})
    for k in ("rows_in", "rows_ok", "rows_quarantined", "clicks", "reasons"):
        assert getattr(rep, k) == getattr(local, k), k
    from ctr.training.spark_job import day_fingerprint_digest

    assert day_fingerprint_digest(spark, str(land), day) == local.digest  # Hadoop's listing, stage_day's digest
    assert local.rows_quarantined == 6

    want = collections.Counter((b.reason, b.text) for b in read_table(str(extra))[1])
    got = collections.Counter((r["bad_reason"], r["raw"]) for r in parsed.where("bad_reason is not null").collect())
    assert got == want


def test_holdout_profile_on_the_executors_finds_the_drifted_features(spark, small_landing: Path, tmp_path: Path):
    """The job's holdout profile (executors, `Reference.add_table` per partition) equals the local
    count of the same rows, and on a drifted day (I5 shifted, C6's top values replaced) the PSI
    names exactly those two features; the undrifted day names none."""
    import gzip

    import pyarrow as pa
    import pyarrow.compute as pc
    from ctr.data.landing import daterange, read_staged, stage_day
    from ctr.data.tsv import to_tsv_bytes
    from ctr.monitoring.drift import MAX_PSI, over, reference_from_staging
    from ctr.schema import ALL_COLUMNS
    from ctr.training.spark_job import holdout_profile, read_days

    train = daterange(HOLDOUT - dt.timedelta(days=3), END)
    staging = tmp_path / "staging"
    for d in [*train, HOLDOUT]:
        stage_day(str(small_landing), staging, tmp_path / "q", d)
    ref = reference_from_staging(staging, train)
    day = pa.concat_tables(read_staged(staging, HOLDOUT)).select(ALL_COLUMNS)
    top = set(ref.cat_top["C6"])
    new = {v: f"{int(v, 16) ^ 0xA5A5A5A5:08x}" for v in top}  # valid 8-hex values, none of them a top value
    assert not set(new.values()) & top
    drifted = day.set_column(ALL_COLUMNS.index("I5"), "I5", pc.add(pc.multiply(day.column("I5"), 20), 1000))
    drifted = drifted.set_column(ALL_COLUMNS.index("C6"), "C6", pa.array(
        [new.get(v, v) if v is not None else None for v in drifted.column("C6").to_pylist()], pa.string()))
    land = tmp_path / "drifted"
    (land / f"day={HOLDOUT}").mkdir(parents=True)
    (land / f"day={HOLDOUT}" / "part-00000.tsv.gz").write_bytes(gzip.compress(to_tsv_bytes(drifted)))
    for root, local_rows, want in ((small_landing, day, []), (land, drifted, ["I5", "C6"])):
        good = read_days(spark, str(root), [HOLDOUT]).where("bad_reason is null").repartition(3)
        prof = holdout_profile(good, ref)
        local = ref.profile([local_rows])
        assert prof.rows == local.rows == day.num_rows
        assert {c: v.tolist() for c, v in prof.counts.items()} == {c: v.tolist() for c, v in local.counts.items()}
        assert sorted(c for c, _ in over(ref.feature_psi(prof), MAX_PSI)) == sorted(want)


def test_synapseml_parameter_mapping():
    from ctr.features.transform import CAT_INDEX
    from ctr.training.synapseml import synapseml_params
    from ctr.training.trainer import TrainConfig
    from synapse.ml.lightgbm import LightGBMClassifier

    cfg = TrainConfig(start=START, end=END, seed=123, params={"num_leaves": 31, "min_data_in_bin": 7})
    kw = synapseml_params(cfg, executor_cores=8)
    accepted = set(inspect.signature(LightGBMClassifier.__init__).parameters) - {"self", "java_obj"}
    assert set(kw) <= accepted, set(kw) - accepted
    assert kw["numThreads"] == 7 and kw["useBarrierExecutionMode"] is True and kw["seed"] == 123
    assert kw["categoricalSlotIndexes"] == CAT_INDEX and kw["numLeaves"] == 31
    assert kw["numIterations"] == cfg.rounds and kw["earlyStoppingRound"] == cfg.early_stopping
    # every LightGBM parameter of ctr.training.trainer reaches the cluster: mapped, or passed through verbatim
    passthrough = dict(x.split("=", 1) for x in kw.get("passThroughArgs", "").split())
    assert passthrough["min_data_in_bin"] == "7" and passthrough["force_row_wise"] == "true"
    assert synapseml_params(cfg, executor_cores=1)["numThreads"] == 1
