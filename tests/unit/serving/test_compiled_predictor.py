"""The compiled tree predictor (lleaves): within 1e-12 of Booster.predict, cached per model and CPU, and a
clean fallback to LightGBM when it cannot be had (CTR_PREDICTOR, ctr.serving.predictors)."""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from ctr.features.transform import CAT_INDEX
from ctr.schema import CAT_COLUMNS
from ctr.serving import model as served
from ctr.serving import predictors, ranking
from ctr.serving.model import ServedModel, check_matrix
from ctr.settings import Settings


def _codes(model: ServedModel, n: int, seed: int) -> np.ndarray:
    """Random codes rows: vocabulary codes, the rare/unseen code, missing values, odd integers."""
    rng = np.random.default_rng(seed)
    t = model.bundle.transform
    x = rng.integers(-3, 5000, size=(n, 39)).astype(np.float64)
    sizes = np.array([len(t.vocab[c]) for c in CAT_COLUMNS])
    x[:, CAT_INDEX] = rng.integers(0, sizes + 1, size=(n, len(CAT_INDEX)))  # size = the rare code
    x[rng.random(x.shape) < 0.25] = np.nan
    return x


def _ready(m: ServedModel) -> ServedModel:
    assert m.compiled.done.wait(300), "compile did not finish"
    return m


def test_compiled_predictor_agrees_with_booster_predict_and_is_cached_per_model_and_cpu(
        trained_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("lleaves")
    monkeypatch.setenv("CTR_PREDICTOR", "auto")
    monkeypatch.setenv("CTR_PREDICTOR_CACHE", str(tmp_path / "cache"))
    import lleaves.compiler

    def no_ir_here(*a, **k):  # building the IR holds the GIL for seconds: never in the serving process
        raise AssertionError("the service's process built the LLVM IR itself")

    monkeypatch.setattr(lleaves.compiler, "compile_to_module", no_ir_here)
    m = _ready(ServedModel.load(trained_bundle))
    assert m.compiled.state == "ready" and m.compiled.predictor is not None, m.compiled.state
    x = np.vstack([check_matrix(m.bundle), _codes(m, 2000, 1)])
    got, want = m.predict_matrix(x), m.bundle.predict_matrix(x, num_threads=1)
    assert np.max(np.abs(got - want)) <= predictors.COMPILED_TOLERANCE
    assert m.predict_matrix(x[:1]).shape == (1,) and m.predict_matrix(x[:0]).shape == (0,)

    entries = sorted((tmp_path / "cache").glob("*.o"))
    text = m.bundle.booster.model_to_string()
    assert [e.name for e in entries] == [predictors.cache_key(text) + ".o"]
    assert entries[0].name.startswith(hashlib.sha256(text.encode()).hexdigest() + "-")

    # `ctr rank`'s load: the cache entry, right away (no thread), the same numbers as the service's
    offline = ServedModel.load(trained_bundle, compiled="cached")
    assert offline.compiled.state == "ready" and np.array_equal(offline.predict_matrix(x), got)
    req = {"context": {}, "candidates": [{"id": i, **r} for i, r in enumerate(m.bundle.probe["rows"])]}
    _, doc = ranking.rank(offline, {**req, "candidates": [dict(c) for c in req["candidates"]]})
    _, ref = ranking.rank(ServedModel.load(trained_bundle, compiled="off"), req)
    assert [i["id"] for i in doc["items"]] == [i["id"] for i in ref["items"]]
    assert max(abs(a["probability"] - b["probability"]) for a, b in zip(doc["items"], ref["items"], strict=True)) \
        <= predictors.COMPILED_TOLERANCE

    # another CPU's key is another entry: machine code for one CPU is never read back on another
    with monkeypatch.context() as other:
        other.setattr(predictors, "host_cpu", lambda: "other-cpu;+avx512f")
        assert predictors.cache_key(text) != entries[0].stem
        assert ServedModel.load(trained_bundle, compiled="cached").compiled.state == "off"
    assert ServedModel.load(trained_bundle, compiled="cached").compiled.state == "ready"

    # a compiled predictor that disagrees with LightGBM never serves (here: any difference at all)
    monkeypatch.setattr(served, "COMPILED_TOLERANCE", -1.0)
    with caplog.at_level(logging.WARNING, logger="ctr.serving"):
        bad = _ready(ServedModel.load(trained_bundle))
    assert bad.compiled.state == "failed" and bad.compiled.predictor is None
    assert any("differs from Booster.predict" in r.message for r in caplog.records)
    assert np.array_equal(bad.predict_matrix(x), want)
    assert not entries[0].exists()  # the entry that disagreed is never read again


def test_without_lleaves_lightgbm_serves_and_says_why(
        trained_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CTR_PREDICTOR", "auto")
    monkeypatch.setenv("CTR_PREDICTOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "lleaves", None)  # `import lleaves` raises ImportError
    with caplog.at_level(logging.WARNING, logger="ctr.serving"):
        m = _ready(ServedModel.load(trained_bundle))
    assert m.compiled.state == "failed" and m.compiled.predictor is None
    assert any("compiled predictor off" in r.message and "lleaves" in r.message for r in caplog.records)
    x = _codes(m, 300, 2)
    assert np.array_equal(m.predict_matrix(x), m.bundle.predict_matrix(x, num_threads=1))
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.o"))

    monkeypatch.setenv("CTR_PREDICTOR", "lightgbm")
    m = ServedModel.load(trained_bundle)
    assert m.compiled.state == "off" and m.compiled.done.is_set()
    monkeypatch.setenv("CTR_PREDICTOR", "llvm")
    with pytest.raises(ValueError, match="CTR_PREDICTOR='llvm' is not one of auto, lightgbm"):
        Settings.from_env()


def test_the_cache_keeps_only_the_most_recently_used_entries(tmp_path: Path) -> None:
    import os

    for i in range(10):
        (tmp_path / f"{i:064x}-cpu.o").write_bytes(b"x")
        (tmp_path / f"{i:064x}-cpu.lock").write_bytes(b"")
        os.utime(tmp_path / f"{i:064x}-cpu.o", (1_000_000 + i, 1_000_000 + i))
    os.utime(tmp_path / f"{0:064x}-cpu.o")  # the oldest was just used again
    gone = predictors.prune_cache(tmp_path, keep=8)
    assert sorted(p.name for p in gone) == [f"{1:064x}-cpu.o", f"{2:064x}-cpu.o"]
    assert sorted(p.name[:64] for p in tmp_path.glob("*.o")) == sorted(f"{i:064x}" for i in (0, *range(3, 10)))
    assert len(list(tmp_path.glob("*.lock"))) == 8
