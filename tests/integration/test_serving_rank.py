"""POST /v1/rank over real HTTP on 127.0.0.1: the offline `ctr rank` answer to 1e-12, on the event loop
and on the batch lane; auth, limits, metrics and the OpenAPI document."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from ctr.data.reader import read_text
from ctr.schema import CAT_COLUMNS, FEATURE_COLUMNS, INT_COLUMNS
from ctr.serving.model import ServedModel
from ctr.serving.process import ServiceProcess

from tests.conftest import END_DAY

TOKEN = "rank-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONTEXT_COLS = INT_COLUMNS + CAT_COLUMNS[:13]  # "the user's and the page's" fields; the rest are the item's


@pytest.fixture(scope="module")
def requests_(tiny_landing: Path) -> list[dict]:
    """Ranking requests built from held-out rows: one context, the other rows' item fields as candidates."""
    path = tiny_landing / f"day={END_DAY.isoformat()}" / "part-00000.tsv.gz"
    lines = gzip.open(path, "rt").read().splitlines()[:600]
    table, bad = read_text("\n".join(lines) + "\n", require_label=False)
    assert not bad
    rows = [{k: v for k, v in r.items() if v is not None} for r in table.select(FEATURE_COLUMNS).to_pylist()]
    out = []
    for start, n, k in [(0, 100, 10), (100, 7, None), (107, 1, 1), (108, 300, 25), (408, 50, 50)]:
        ctx = {c: v for c, v in rows[start].items() if c in CONTEXT_COLS}
        cands = [{"id": f"item-{start + j}", **{c: v for c, v in r.items() if c not in CONTEXT_COLS}}
                 for j, r in enumerate(rows[start:start + n])]
        out.append({"context": ctx, "candidates": cands} | ({} if k is None else {"k": k}))
    # the same item twice with equal fields: a tie, kept in input order
    out.append({"context": {"I1": 2}, "candidates": [{"id": "b", "I2": 5}, {"id": "a", "I2": 5}, {"id": "c"}]})
    out.append({"context": {"I1": 2, "C1": rows[0].get("C1")}, "override": "candidate",
                "candidates": [{"id": 1, "I1": 9}, {"id": 2, "C1": None}, {"id": 3}]})
    return out


@pytest.fixture(scope="module")
def servers(trained_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One service answering rankings on its event loop, one sending every body over 2 KB to the batch lane."""
    d = tmp_path_factory.mktemp("rank")
    base = {"CTR_SERVE_TOKEN": TOKEN, "CTR_RANK_MAX_CANDIDATES": "400"}
    with ServiceProcess(trained_bundle, base, d / "loop.log") as loop, \
            ServiceProcess(trained_bundle, {**base, "CTR_BATCH_LANE_BYTES": "2048", "CTR_BATCH_WORKERS": "1"},
                           d / "lane.log") as lane:
        yield {"loop": loop.url, "lane": lane.url}


def test_service_equals_offline_ctr_rank(servers: dict[str, str], requests_: list[dict], trained_bundle: Path,
                                         tmp_path: Path) -> None:
    src = tmp_path / "requests.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in requests_))
    out = tmp_path / "ranked.jsonl"
    cli = subprocess.run([sys.executable, "-m", "ctr.cli", "rank", "--model", str(trained_bundle), "--input", str(src),
                          "--output", str(out)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "CTR_RANK_MAX_CANDIDATES": "400"})
    assert cli.returncode == 0, cli.stderr
    assert f"ranked {len(requests_)} requests, rejected 0" in cli.stderr
    offline = [json.loads(x) for x in out.read_text().splitlines()]
    assert [o["line"] for o in offline] == list(range(1, len(requests_) + 1))
    model = ServedModel.load(trained_bundle)
    for name, url in servers.items():
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
            for req, off in zip(requests_, offline, strict=True):
                r = c.post("/v1/rank", json=req)
                assert r.status_code == 200, (name, r.text)
                doc = r.json()
                assert doc["model_version"] == off["model_version"] == r.headers["x-model-version"] == model.version
                assert [i["id"] for i in doc["items"]] == [i["id"] for i in off["items"]], name
                got = np.array([i["probability"] for i in doc["items"]])
                want = np.array([i["probability"] for i in off["items"]])
                assert got.shape == want.shape and (len(got) == 0 or np.max(np.abs(got - want)) <= 1e-12), name
    # and both equal the bundle on the merged rows, sorted as specified
    for req, off in zip(requests_, offline, strict=True):
        merged = [{**req["context"], **{k: v for k, v in c.items() if k != "id"}} for c in req["candidates"]]
        p = model.bundle.predict_rows(merged)
        order = sorted(range(len(p)), key=lambda j: (-p[j], j))[:req.get("k", len(p))]
        assert [i["id"] for i in off["items"]] == [req["candidates"][j]["id"] for j in order]
        assert np.max(np.abs(np.array([i["probability"] for i in off["items"]]) - p[order])) <= 1e-12
    assert [i["id"] for i in offline[5]["items"]][:2] == ["b", "a"]  # the tie keeps input order


def test_auth_limits_and_errors(servers: dict[str, str]) -> None:
    for url in servers.values():
        body = {"context": {"I1": 1}, "candidates": [{"id": "a", "I1": 2}]}
        r = httpx.post(url + "/v1/rank", json=body, timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        r = httpx.post(url + "/v1/rank", json=body, headers=AUTH, timeout=30)
        assert (r.status_code, r.json()["field"], r.json()["row"]) == (422, "I1", 0)
        assert "both context and candidate" in r.json()["error"]
        big = {"candidates": [{"id": j, "I1": j} for j in range(401)]}
        r = httpx.post(url + "/v1/rank", json=big, headers=AUTH, timeout=30)
        assert r.status_code == 413 and "limit of 400 (CTR_RANK_MAX_CANDIDATES)" in r.json()["error"]
        bad = {"candidates": [{"id": j, "I1": j} for j in range(300)] + [{"id": "x", "C2": "nothex!!"}]}
        r = httpx.post(url + "/v1/rank", json=bad, headers=AUTH, timeout=30)  # on the lane in the lane service
        assert (r.status_code, r.json()["field"], r.json()["row"]) == (422, "C2", 300), r.text
        r = httpx.post(url + "/v1/rank", content=b"1\t2", headers={**AUTH, "Content-Type": "text/plain"}, timeout=30)
        assert r.status_code == 415
        r = httpx.get(url + "/v1/rank", headers=AUTH, timeout=30)
        assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_rankings_are_counted_in_the_metrics(servers: dict[str, str]) -> None:
    url = servers["loop"]

    def rows_scored() -> float:
        text = httpx.get(url + "/metrics", timeout=30).text
        return float(next(x for x in text.splitlines() if x.startswith("ctr_rows_scored_total")).rsplit(" ", 1)[1])

    before = rows_scored()
    r = httpx.post(url + "/v1/rank", json={"candidates": [{"id": j, "I1": j} for j in range(37)], "k": 3},
                   headers=AUTH, timeout=30)
    assert r.status_code == 200 and len(r.json()["items"]) == 3
    assert rows_scored() == before + 37  # every candidate scored, not only the k returned


def test_openapi_describes_rank(servers: dict[str, str]) -> None:
    doc = httpx.get(servers["loop"] + "/openapi.json", timeout=30).json()
    op = doc["paths"]["/v1/rank"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["properties"]) == {"context", "candidates", "k", "override"}
    assert schema["properties"]["candidates"]["items"]["required"] == ["id"]
    assert {"200", "401", "413", "415", "422"} <= set(op["responses"])
