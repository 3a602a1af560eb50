"""Hot swap under load: 3 swaps (and a refused corrupt bundle) while clients keep scoring.

Each response must be 200, name one version in body and header, and carry exactly the numbers that
version computes offline: a response computed by a mix of versions (one transform, another booster;
or half a batch each) would not match either.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from ctr.bundle import Bundle, write_manifest
from ctr.data.reader import read_text
from ctr.schema import FEATURE_COLUMNS
from ctr.serving.process import ServiceProcess

from tests.conftest import END_DAY


@pytest.fixture(scope="module")
def second_bundle(staged: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ctr.train import TrainConfig, train

    out = tmp_path_factory.mktemp("bundle_b") / "model"
    train(staged, out, TrainConfig(start=END_DAY - dt.timedelta(days=7), end=END_DAY - dt.timedelta(days=1), rounds=12))
    return out


def _corrupt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    probe = json.loads((dst / "probe.json").read_text())
    probe["probabilities"][0] += 1e-6  # the model no longer gives its recorded output
    (dst / "probe.json").write_text(json.dumps(probe))
    write_manifest(dst)  # consistent manifest, so the probe check is what refuses it
    return dst


def test_three_swaps_under_load_fail_nothing_and_mix_nothing(
        trained_bundle: Path, second_bundle: Path, tiny_landing: Path, tmp_path: Path) -> None:
    lines = gzip.open(tiny_landing / f"day={END_DAY.isoformat()}" / "part-00000.tsv.gz", "rt").read().splitlines()[:40]
    table, bad = read_text("\n".join(lines) + "\n", require_label=False)
    assert not bad
    rows = [{k: v for k, v in r.items() if v is not None} for r in table.select(FEATURE_COLUMNS).to_pylist()]
    a, b = Bundle.load(trained_bundle), Bundle.load(second_bundle)
    assert a.version != b.version
    expected = {m.version: {"single": m.predict_rows(rows[:1]).tolist(), "batch": m.predict_rows(rows[:20]).tolist(),
                            "tsv": m.predict_table(table).tolist()} for m in (a, b)}
    assert expected[a.version] != expected[b.version]
    tsv_body = ("\n".join(lines) + "\n").encode()
    requests = {"single": {"json": {"rows": rows[:1]}}, "batch": {"json": {"rows": rows[:20]}},
                "tsv": {"content": tsv_body, "headers": {"Content-Type": "text/tab-separated-values"}}}

    stop = threading.Event()
    results: list[tuple[str, int, str, str, list[float]]] = []
    errors: list[str] = []

    def client(worker: int) -> None:
        kinds = list(requests)
        with httpx.Client(timeout=30) as c:
            i = worker
            while not stop.is_set():
                kind = kinds[i % len(kinds)]
                i += 1
                try:
                    r = c.post(svc.url + "/v1/score", **requests[kind])
                    doc = r.json()
                    results.append((kind, r.status_code, r.headers.get("x-model-version", ""),
                                    doc.get("model_version", ""), doc.get("probabilities", [])))
                except Exception as e:  # any transport failure is a failed request
                    errors.append(f"{kind}: {type(e).__name__}: {e}")

    admin_log = []
    with ServiceProcess(trained_bundle, log_path=tmp_path / "serve.log") as svc:
        threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        try:
            marks = []
            plan = [second_bundle, _corrupt(second_bundle, tmp_path / "corrupt"), trained_bundle, second_bundle]
            for target in plan:
                time.sleep(1.5)
                marks.append(len(results))
                r = httpx.post(svc.url + "/admin/load", json={"bundle": str(target)}, timeout=120)
                admin_log.append((target.name, r.status_code, r.json()))
            time.sleep(1.5)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        final = httpx.get(svc.url + "/readyz", timeout=30).json()

    assert [s for _, s, _ in admin_log] == [200, 409, 200, 200], admin_log
    assert admin_log[0][2] == {"model_version": b.version, "previous": a.version}
    assert admin_log[2][2] == {"model_version": a.version, "previous": b.version}
    assert final["model_version"] == b.version
    assert not errors, errors[:5]
    assert len(results) > 100
    failed = [r for r in results if r[1] != 200]
    assert not failed, failed[:3]
    mixed = [r for r in results if r[2] != r[3] or r[3] not in expected or r[4] != expected[r[3]][r[0]]]
    assert not mixed, mixed[:3]
    # traffic really crossed every swap: each version answered between the swaps
    seen = [{r[3] for r in results[lo:hi]} for lo, hi in zip(marks, [*marks[1:], len(results)], strict=True)]
    assert b.version in seen[0] and a.version in seen[2] and b.version in seen[3]
    assert np.isfinite([p for r in results for p in r[4]]).all()
