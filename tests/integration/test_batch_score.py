"""ctr_batch_score's tasks on a real MLflow registry and `ctr score` subprocesses: the champion asset event's extras
in, a folder of request files scored with that version, outputs next to a manifest; bad events fail naming the key.
(The promotion in a live ctr_retrain triggering this DAG: tests/e2e/test_live_airflow.py.)"""

from __future__ import annotations

import csv
import datetime as dt
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException
from ctr.airflow import batch
from ctr.airflow.assets import CHAMPION, LANDING, champion_extra
from ctr.model.batch_scoring import score_files
from ctr.registry import LOGICAL_DATE_TAG, Registry
from ctr.settings import Settings

from tests.conftest import END_DAY, RAW_SAMPLE


def _event(extra: dict, minutes: int = 0) -> SimpleNamespace:
    return SimpleNamespace(extra=extra, source_dag_id="ctr_retrain", source_run_id=f"scheduled__{minutes}",
                           timestamp=dt.datetime(2026, 11, 21, 2, minutes, tzinfo=dt.UTC))


def _context(events: dict, **params) -> dict:
    return {"params": {"requests": "", "output": "", **params}, "dag": SimpleNamespace(dag_id="ctr_batch_score"),
            "run_id": "asset_triggered__1", "triggering_asset_events": events}


@pytest.fixture
def champion(trained_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CTR_HOME", str(tmp_path / "home"))
    reg = Registry.from_settings(Settings.from_env())
    v = reg.register(trained_bundle, f"ctr_retrain/{END_DAY}", {LOGICAL_DATE_TAG: END_DAY.isoformat(),
                     "metrics": {"auc": 0.7512}}, {})
    champ = reg.promote(v.version)
    return champion_extra(champ, v.version, f"ctr-scorer:{v.version}-abc", "ctr-lightgbm")


def test_a_folder_is_scored_with_the_events_version_next_to_a_manifest(champion, trained_bundle: Path,
                                                                        tiny_landing: Path, tmp_path: Path):
    assert champion["champion_changed"] and champion["auc"] == 0.7512 and champion["logical_date"] == END_DAY.isoformat()
    req = tmp_path / "home" / "batch" / "requests"
    req.mkdir(parents=True)
    shutil.copy(tiny_landing / f"day={END_DAY}" / "part-00000.tsv.gz", req / "day1.tsv.gz")
    lines = RAW_SAMPLE.read_text().splitlines()[:20]
    (req / "sample.tsv").write_text("\n".join([*lines[:10], "not\ta\tcriteo\tline", *lines[10:]]) + "\n")
    (req / "_SUCCESS").touch()
    (req / ".partial.tsv").write_text("x\n")
    older = _event({**champion, "version": "0"}, minutes=0)
    ctx = _context({CHAMPION: [older, _event(champion, minutes=5)], LANDING: [_event({}, 1)]})
    champ = batch.champion(ctx)
    assert champ["version"] == champion["version"] and champ["source_run_id"] == "scheduled__5"  # the newest event
    out = batch.score(ctx, champ)
    folder = tmp_path / "home" / "batch" / "scores" / champion["version"]
    assert out == {"version": champion["version"], "output": str(folder), "manifest": str(folder / "manifest.json"),
                   "rows_scored": 6_000 + 20, "reused": False}
    assert sorted(p.name for p in folder.iterdir()) == ["day1.scores.csv", "manifest.json", "sample.scores.csv"]
    m = json.loads((folder / "manifest.json").read_text())
    assert (m["version"], m["auc"], m["logical_date"], m["image"]) == (
        champion["version"], 0.7512, END_DAY.isoformat(), f"ctr-scorer:{champion['version']}-abc")
    assert m["source"]["run_id"] == "scheduled__5" and m["scored_by"]["dag_id"] == "ctr_batch_score"
    by_name = {Path(f["input"]).name: f for f in m["files"]}
    assert (by_name["day1.tsv.gz"]["rows_scored"], by_name["day1.tsv.gz"]["rows_rejected"]) == (6_000, 0)
    assert (by_name["sample.tsv"]["rows"], by_name["sample.tsv"]["rows_rejected"]) == (21, 1)
    # the same numbers `ctr score` gives with the bundle itself (the registry's copy is that bundle)
    score_files(trained_bundle, [str(req / "sample.tsv")], tmp_path / "direct.csv")
    assert (folder / "sample.scores.csv").read_text() == (tmp_path / "direct.csv").read_text()
    with open(folder / "sample.scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[10]["probability"] == "" and rows[10]["reason"] and all(r["probability"] for r in rows[:10])
    # the same version over the same inputs is not scored again
    assert batch.score(ctx, champ)["reused"] is True


def test_an_event_without_an_expected_extra_fails_naming_the_key(champion):
    for key in ("version", "auc", "logical_date", "image"):
        bad = {k: v for k, v in champion.items() if k != key}
        with pytest.raises(AirflowFailException, match=rf"has no '{key}' in its extra \(has: \[.*\]\); cannot score"):
            batch.champion(_context({CHAMPION: [_event(bad)]}))
    with pytest.raises(AirflowFailException, match=r"no ctr://models/ctr-lightgbm/champion asset event triggered this run"):
        batch.champion(_context({}))


def test_an_absent_or_empty_request_folder_is_named(champion, tmp_path: Path):
    ctx = _context({CHAMPION: [_event(champion)]}, requests=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=rf"request folder {tmp_path}/nowhere does not exist"):
        batch.score(ctx, batch.champion(ctx))
    (tmp_path / "empty").mkdir()
    ctx = _context({CHAMPION: [_event(champion)]}, requests=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=rf"no request files \(.tsv, .*\) under {tmp_path}/empty"):
        batch.score(ctx, batch.champion(ctx))
