"""LocalRollout against a real `ctr serve` on a free loopback port: swap under load, refuse, roll back."""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest
from ctr.deployment.image import build_context
from ctr.deployment.rollout.base import Release, RolloutError
from ctr.deployment.rollout.local import LocalRollout
from ctr.model.bundle import write_manifest

from tests.conftest import free_port

pytestmark = pytest.mark.integration

ROW = {"I1": 3, "I2": 20, "C1": "05db9164", "C9": "a73ee510"}


def truncated_copy(src: Path, dst: Path) -> Path:
    """A half-copied model.txt (LightGBM aborts a process that parses it): the manifest refuses it first."""
    shutil.copytree(src, dst)
    data = (dst / "model.txt").read_bytes()
    (dst / "model.txt").write_bytes(data[: len(data) // 2])
    return dst


def altered_leaves_copy(src: Path, dst: Path) -> Path:
    """Same byte length, different leaf values (every digit shifted), re-manifested: only the probe can tell."""
    shutil.copytree(src, dst)
    shift = str.maketrans("0123456789", "5678901234")
    text = re.sub(r"^leaf_value=.*$", lambda m: m[0].translate(shift), (dst / "model.txt").read_text(), flags=re.M)
    (dst / "model.txt").write_text(text)
    write_manifest(dst)  # a consistent manifest: only the probe can tell
    return dst


@pytest.fixture
def versions(trained_bundle: Path, tmp_path: Path) -> dict[str, Path]:
    """The same trained model stamped as registry versions 1 and 2 (what build_image produces)."""
    return {v: build_context(trained_bundle, v, "ctr-lightgbm", tmp_path / "images").path / "model" for v in ("1", "2")}


@pytest.fixture
def local(tmp_path: Path):
    r = LocalRollout(tmp_path / "serving", "127.0.0.1", free_port(), start_timeout=90)
    yield r
    r.stop()


class Load(threading.Thread):
    """Bounded background traffic: at most `limit` requests, recording status and version of each."""

    def __init__(self, url: str, limit: int = 200_000) -> None:
        super().__init__(daemon=True)
        self.url, self.limit = url, limit
        self.stop = threading.Event()
        self.results: list[tuple[int, str | None, str | None]] = []

    def run(self) -> None:
        with httpx.Client(timeout=10) as c:
            while not self.stop.is_set() and len(self.results) < self.limit:
                try:
                    r = c.post(f"{self.url}/v1/score", json={"rows": [ROW]})
                    body = r.json() if r.status_code == 200 else {}
                    self.results.append((r.status_code, r.headers.get("x-model-version"), body.get("model_version")))
                except httpx.HTTPError as e:
                    self.results.append((0, None, type(e).__name__))


def test_hot_swap_under_load_then_refuse_corrupt_then_roll_back(local: LocalRollout, versions, tmp_path: Path) -> None:
    first = local.deploy(Release("1", versions["1"]))
    assert first.previous_version is None and local.readyz()["model_version"] == "1"
    load = Load(local.url)
    load.start()
    try:
        while len(load.results) < 50 and load.is_alive():
            load.join(0.05)
        second = local.deploy(Release("2", versions["2"]))  # slow on a busy machine: the load keeps going meanwhile
        n_at_swap = len(load.results)
        while len(load.results) < n_at_swap + 50 and load.is_alive():
            load.join(0.05)
        assert len(load.results) >= n_at_swap + 50, f"the load thread stopped after {len(load.results)} requests"
    finally:
        load.stop.set()
        load.join(30)
    assert (second.version, second.previous_version, second.previous_ref) == ("2", "1", str(versions["1"]))
    statuses = Counter(s for s, _, _ in load.results)
    assert statuses == {200: len(load.results)}, statuses
    assert all(h == b for _, h, b in load.results)          # one version per response
    seen = [b for _, _, b in load.results]
    assert set(seen) == {"1", "2"}
    assert seen == sorted(seen)                               # never back to 1 once 2 answered
    assert all(v == "2" for v in seen[n_at_swap:])           # every request after the swap returned gets 2

    # a truncated bundle is refused before the live service sees it (it would crash it)
    json_before = local.state_path.read_text()
    pid = json.loads(json_before)["pid"]
    with pytest.raises(RolloutError, match="pre-flight"):
        local.deploy(Release("3", truncated_copy(versions["2"], tmp_path / "truncated")))
    with pytest.raises(RolloutError, match="pre-flight"):
        local.deploy(Release("3", altered_leaves_copy(versions["2"], tmp_path / "altered")))
    # and the service itself refuses a bundle failing its probe (HTTP 409) should one reach it
    with pytest.raises(RolloutError, match="409"):
        local.swap(tmp_path / "altered")
    assert local.readyz()["model_version"] == "2"
    assert local.state_path.read_text() == json_before
    assert json.loads(local.state_path.read_text())["pid"] == pid

    # same version again: nothing to do; rollback returns to version 1
    assert local.deploy(Release("2", versions["2"])).changed is False
    # a rollback for a version that is no longer live leaves the live one alone
    kept = local.rollback(Release("7", versions["2"]))
    assert kept is not None and kept.changed is False and kept.version == "2" and local.readyz()["model_version"] == "2"
    back = local.rollback(Release("2", versions["2"]))
    assert back is not None and back.version == "1" and local.readyz()["model_version"] == "1"
    assert json.loads(local.state_path.read_text())["version"] == "1"
    # nothing older than the first model: a further rollback stops the service
    assert local.rollback() is None and local.readyz(timeout=0.5) is None


# ---- progressive delivery (canary / shadow beside the champion; serving/traffic.py, rollout/progressive.py) ----
@pytest.fixture(scope="module")
def other_bundle(staged: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, really different model (other seed, a slice of the rows, fewer trees)."""
    import datetime as dt

    from ctr.training.trainer import TrainConfig, train

    from tests.conftest import END_DAY

    out = tmp_path_factory.mktemp("other") / "model"
    train(staged, out, TrainConfig(start=END_DAY - dt.timedelta(days=7), end=END_DAY - dt.timedelta(days=1), seed=3,
                                   rounds=15, early_stopping=0, sample_fraction=0.3))
    return out


@pytest.fixture
def holdout(staged: Path):
    from ctr.data.landing import read_staged

    from tests.conftest import END_DAY

    return next(read_staged(staged, END_DAY)).slice(0, 40)


def _records(rows) -> list[dict]:
    from ctr.schema import FEATURE_COLUMNS

    return [{k: v for k, v in r.items() if v is not None and k in FEATURE_COLUMNS} for r in rows.to_pylist()]


def test_canary_routes_by_request_id_promotes_then_a_latency_drill_rolls_back(
        tmp_path: Path, versions, holdout, trained_bundle: Path) -> None:
    from ctr.deployment.rollout.progressive import Limits, Strategy
    from ctr.serving.traffic import routes_to_candidate

    canary = Strategy("canary", canary_percent=30, bake_seconds=20, bake_requests=30)
    local = LocalRollout(tmp_path / "serving", "127.0.0.1", free_port(), start_timeout=90, strategy=canary)
    try:
        local.deploy(Release("1", versions["1"]))               # nothing to canary against: started plainly
        v2 = local.deploy(Release("2", versions["2"]))
        assert (v2.version, v2.previous_version) == ("2", "1") and local.readyz()["model_version"] == "1"
        got = {}
        with httpx.Client(base_url=local.url, timeout=10) as c:
            for i in [*range(200), 7, 8, 9]:                     # three retries of earlier ids
                r = c.post("/v1/score", json={"rows": [ROW]}, headers={"X-Request-Id": f"req-{i}"})
                assert r.status_code == 200 and r.headers["x-request-id"] == f"req-{i}"
                want = "2" if routes_to_candidate(f"req-{i}", 30) else "1"
                assert r.json()["model_version"] == r.headers["x-model-version"] == want
                got.setdefault(i, set()).add(want)
        assert 40 <= sum("2" in v for v in got.values()) <= 80  # ~30% of 200 ids
        res = local.verify(Release("2", versions["2"]), holdout)
        bake = res["bake"]
        assert bake["candidate"]["requests"] >= 30 and bake["candidate"]["errors"] == 0
        assert bake["champion"]["requests"] > 0 and bake["candidate"]["p99_ms"] is not None
        assert local.readyz()["model_version"] == "2" and local.state()["previous_version"] == "1"

        # the drill: 250 ms injected in the candidate only -> p99 breach -> 0%, dropped, the champion answers all
        local.strategy = Strategy("canary", canary_percent=30, bake_seconds=20, bake_requests=10,
                                  limits=Limits(max_p99_increase_ms=100), drill={"latency_ms": 250})
        v3 = Release("3", build_context(trained_bundle, "3", "ctr-lightgbm", tmp_path / "images").path / "model")
        deployed = local.deploy(v3)
        with pytest.raises(RolloutError, match=r"max_p99_increase_ms=100: candidate p99 \d+.*version 2 serves all"):
            local.verify(v3, holdout)
        assert httpx.get(f"{local.url}/admin/traffic").json()["candidate"] is None
        assert {httpx.post(f"{local.url}/v1/score", json={"rows": [ROW]}, headers={"X-Request-Id": f"after-{i}"}
                           ).json()["model_version"] for i in range(30)} == {"2"}
        back = local.rollback(v3, deployed)
        assert back is not None and back.version == "2" and "candidate" not in local.state()
    finally:
        local.stop()


def test_shadow_returns_champion_scores_and_compares_like_offline(tmp_path: Path, trained_bundle: Path,
                                                                 other_bundle: Path, holdout) -> None:
    from ctr.deployment.rollout.progressive import Limits, Strategy
    from ctr.model.bundle import Bundle
    from ctr.serving.traffic import compare

    champ_b = build_context(trained_bundle, "1", "ctr-lightgbm", tmp_path / "images").path / "model"
    cand_b = build_context(other_bundle, "2", "ctr-lightgbm", tmp_path / "images").path / "model"
    # bake_requests=1: verify's own traffic stops at once; the comparison is then over the requests below
    shadow = Strategy("shadow", bake_seconds=5, bake_requests=1, limits=Limits(max_psi=1e-6))
    local = LocalRollout(tmp_path / "serving", "127.0.0.1", free_port(), start_timeout=90, strategy=shadow)
    try:
        local.deploy(Release("1", champ_b))
        local.deploy(Release("2", cand_b))
        recs = _records(holdout)
        served = []
        with httpx.Client(base_url=local.url, timeout=10) as c:
            for i in range(0, len(recs), 4):
                r = c.post("/v1/score", json={"rows": recs[i:i + 4]})
                assert r.status_code == 200 and r.json()["model_version"] == "1"
                served += r.json()["probabilities"]
        champ_off, cand_off = Bundle.load(champ_b).predict_rows(recs), Bundle.load(cand_b).predict_rows(recs)
        assert served == pytest.approx(champ_off.tolist(), abs=1e-12)  # only the champion's scores come back
        import time

        time.sleep(0.5)
        live = httpx.get(f"{local.url}/admin/traffic").json()["shadow"]
        offline = compare(champ_off, cand_off)
        assert live["rows"] == offline["rows"] == len(recs) and live["requests"] == 10 and live["errors"] == 0
        for k in ("champion_mean", "candidate_mean", "mean_shift", "psi", "max_abs_diff"):
            assert live[k] == pytest.approx(offline[k], abs=1e-12), k
        assert offline["psi"] > 1e-6 and abs(offline["mean_shift"]) > 0
        with pytest.raises(RolloutError, match=r"shadow of version 2 breached .*max_psi=1e-06: PSI"):
            local.verify(Release("2", cand_b), holdout)
        assert local.readyz()["model_version"] == "1"
        assert httpx.get(f"{local.url}/admin/traffic").json()["candidate"] is None
    finally:
        local.stop()
