"""/metrics from prometheus_client on a live service: one process, and two processes summed (issue 22)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from ctr.serving.process import ServiceProcess
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RAW_SAMPLE

pytestmark = pytest.mark.integration

ROW = {"I1": 3, "I5": 120, "C1": "68fd1e64", "C3": "deadbeef"}


def scrape(url: str) -> tuple[dict, str]:
    r = httpx.get(url + "/metrics", timeout=30)
    assert r.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(r.text)}, r.headers["content-type"]


def value(fams: dict, family: str, sample: str, **labels: str) -> float:
    got = [s.value for s in fams[family].samples if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
    assert got, (family, sample, labels)
    return sum(got)


def big_json_body(n: int = 300) -> bytes:
    return json.dumps({"rows": [ROW] * n}).encode()


def test_single_process_metrics_parse_with_the_library(trained_bundle: Path, tmp_path: Path) -> None:
    lines = RAW_SAMPLE.read_text().splitlines()[:50]
    with ServiceProcess(trained_bundle, {"CTR_BATCH_LANE_BYTES": "4096"}, tmp_path / "serve.log") as svc, \
            httpx.Client(base_url=svc.url, timeout=60) as c:
        assert c.post("/v1/score", json={"rows": [ROW, {}]}).status_code == 200
        assert c.post("/v1/score", content=big_json_body(), headers={"Content-Type": "application/json"}).status_code == 200
        assert c.post("/v1/score", content="\n".join(lines).encode(),
                      headers={"Content-Type": "text/tab-separated-values"}).status_code == 200
        assert c.post("/v1/score", json={"rows": [{"I1": "x"}]}).status_code == 422
        for path in ("/nope", "/v1/score/../../etc/passwd", "/" + "x" * 3000, "/%0d%0aevil"):
            assert c.get(path).status_code == 404
        version = c.get("/readyz").json()["model_version"]
        fams, ctype = scrape(svc.url)
    assert ctype.startswith("text/plain; version=0.0.4")
    assert value(fams, "ctr_requests", "ctr_requests_total", route="/v1/score", status="200") == 3
    assert value(fams, "ctr_requests", "ctr_requests_total", route="/v1/score", status="422") == 1
    assert value(fams, "ctr_requests", "ctr_requests_total", route="other", status="404") == 4
    routes = {s.labels["route"] for s in fams["ctr_requests"].samples}
    assert routes <= {"/v1/score", "/invocations", "/healthz", "/readyz", "/metrics", "/openapi.json", "/admin/load",
                      "other"} | {p for p in routes if p.startswith("/v1/")}  # router names only, never raw paths
    assert not any("etc" in r or "evil" in r or "xxx" in r for r in routes)
    rows = 2 + 300 + len(lines)  # the batch went through the lane: counted by the serving process all the same
    assert value(fams, "ctr_rows_scored", "ctr_rows_scored_total") == rows
    assert value(fams, "ctr_predicted_probability", "ctr_predicted_probability_count") == rows
    assert value(fams, "ctr_predicted_probability", "ctr_predicted_probability_bucket", le="+Inf") == rows
    assert value(fams, "ctr_request_seconds", "ctr_request_seconds_count") >= 9
    assert value(fams, "ctr_model_info", "ctr_model_info", version=version) == 1
    assert value(fams, "ctr_inflight_requests", "ctr_inflight_requests") == 1  # the scrape itself
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds", "python_info",
                 "python_gc_collections"):
        assert name in fams, name
    assert {f.type for n, f in fams.items() if n.startswith("ctr_")} == {"counter", "histogram", "gauge"}


def test_two_worker_processes_are_summed(trained_bundle: Path, tmp_path: Path) -> None:
    """Two serving processes share PROMETHEUS_MULTIPROC_DIR: either one's /metrics reports the sum.
    Their lane workers (batches here go through the lane) record nothing and leave no files."""
    mp = tmp_path / "prom"
    mp.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(mp), "CTR_BATCH_LANE_BYTES": "4096"}
    a = ServiceProcess(trained_bundle, env, tmp_path / "a.log").start()
    b = ServiceProcess(trained_bundle, env, tmp_path / "b.log").start()
    try:
        for svc, n in ((a, 3), (b, 2)):
            for _ in range(n):
                assert httpx.post(svc.url + "/v1/score", json={"rows": [ROW]}, timeout=30).status_code == 200
        assert httpx.post(b.url + "/v1/score", content=big_json_body(), headers={"Content-Type": "application/json"},
                          timeout=60).status_code == 200
        assert httpx.get(a.url + "/nope", timeout=30).status_code == 404
        pids = {a.proc.pid, b.proc.pid}  # type: ignore[union-attr]
        for svc in (a, b):
            fams, _ = scrape(svc.url)
            assert value(fams, "ctr_requests", "ctr_requests_total", route="/v1/score", status="200") == 6
            assert value(fams, "ctr_requests", "ctr_requests_total", route="other", status="404") == 1
            assert value(fams, "ctr_rows_scored", "ctr_rows_scored_total") == 5 + 300
            assert value(fams, "ctr_predicted_probability", "ctr_predicted_probability_count") == 305
            info = [s for s in fams["ctr_model_info"].samples if s.value == 1]
            assert {int(s.labels["pid"]) for s in info} == pids  # each live worker names its model
        files = {p.name for p in mp.iterdir()}
        assert {int(m.group(1)) for f in files if (m := re.search(r"_(\d+)\.db$", f))} == pids, files
    finally:
        b.stop()
    try:
        fams, _ = scrape(a.url)
        assert value(fams, "ctr_requests", "ctr_requests_total", route="/v1/score", status="200") == 6  # b's stay
        assert {int(s.labels["pid"]) for s in fams["ctr_model_info"].samples} == {a.proc.pid}  # type: ignore[union-attr]
    finally:
        a.stop()


def test_a_bad_multiprocess_dir_stops_the_service(trained_bundle: Path, tmp_path: Path) -> None:
    svc = ServiceProcess(trained_bundle, {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "missing")}, tmp_path / "s.log",
                         start_timeout=60)
    with pytest.raises(RuntimeError, match="exited with 1"):
        svc.start()
    assert "PROMETHEUS_MULTIPROC_DIR=" in (tmp_path / "s.log").read_text()
