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
from ctr.bundle import write_manifest
from ctr.image import build_context
from ctr.rollout.base import RolloutError
from ctr.rollout.local import LocalRollout

from tests.conftest import free_port

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
    first = local.deploy(versions["1"], "1")
    assert first.previous_version is None and local.readyz()["model_version"] == "1"
    load = Load(local.url)
    load.start()
    try:
        while len(load.results) < 50 and load.is_alive():
            load.join(0.05)
        second = local.deploy(versions["2"], "2")  # slow on a busy machine: the load keeps going meanwhile
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
        local.deploy(truncated_copy(versions["2"], tmp_path / "truncated"), "3")
    with pytest.raises(RolloutError, match="pre-flight"):
        local.deploy(altered_leaves_copy(versions["2"], tmp_path / "altered"), "3")
    # and the service itself refuses a bundle failing its probe (HTTP 409) should one reach it
    with pytest.raises(RolloutError, match="409"):
        local._swap(tmp_path / "altered")
    assert local.readyz()["model_version"] == "2"
    assert local.state_path.read_text() == json_before
    assert json.loads(local.state_path.read_text())["pid"] == pid

    # same version again: nothing to do; rollback returns to version 1
    assert local.deploy(versions["2"], "2").changed is False
    # a rollback for a version that is no longer live leaves the live one alone
    kept = local.rollback(failed_version="7")
    assert kept is not None and kept.changed is False and kept.version == "2" and local.readyz()["model_version"] == "2"
    back = local.rollback(failed_version="2")
    assert back is not None and back.version == "1" and local.readyz()["model_version"] == "1"
    assert json.loads(local.state_path.read_text())["version"] == "1"
    # nothing older than the first model: a further rollback stops the service
    assert local.rollback() is None and local.readyz(timeout=0.5) is None
