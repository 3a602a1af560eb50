"""The scoring service over real HTTP on 127.0.0.1: numbers, malformed requests, auth, metrics, drain."""

from __future__ import annotations

import gzip
import json
import math
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from ctr.data.reader import read_text
from ctr.model.bundle import Bundle
from ctr.schema import FEATURE_COLUMNS
from ctr.serving.process import ServiceProcess

from tests.conftest import END_DAY

pytestmark = pytest.mark.integration

TOKEN = "t0ken-for-tests"
ADMIN = "adm1n-for-tests"
MAX_ROWS = 100
MAX_BODY = 200_000
MAX_CANDIDATES = 5
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def strict(trained_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A service with a bearer token, an admin token and small limits."""
    env = {"CTR_SERVE_TOKEN": TOKEN, "CTR_ADMIN_TOKEN": ADMIN, "CTR_MAX_ROWS": str(MAX_ROWS),
           "CTR_MAX_BODY_BYTES": str(MAX_BODY), "CTR_BODY_TIMEOUT_S": "2", "CTR_RANK_MAX_CANDIDATES": str(MAX_CANDIDATES)}
    with ServiceProcess(trained_bundle, env, tmp_path_factory.mktemp("strict") / "serve.log") as svc:
        yield svc.url


@pytest.fixture(scope="module")
def holdout_lines(tiny_landing: Path) -> list[str]:
    path = tiny_landing / f"day={END_DAY.isoformat()}" / "part-00000.tsv.gz"
    return gzip.open(path, "rt").read().splitlines()[:400]


def _rows(lines: list[str]) -> list[dict]:
    table, bad = read_text("\n".join(lines) + "\n", require_label=False)
    assert not bad
    return [{k: v for k, v in r.items() if v is not None} for r in table.select(FEATURE_COLUMNS).to_pylist()]


# ---- numbers -------------------------------------------------------------------------------


def test_every_format_returns_the_offline_numbers(strict: str, trained_bundle: Path, holdout_lines: list[str]) -> None:
    bundle = Bundle.load(trained_bundle)
    lines = holdout_lines[:90]
    rows = _rows(lines)
    rows[0] = {**rows[0], "C1": "0badf00d", "C2": "FFFFFFFF"}  # unseen values: the rare code, as in training
    rows[1] = {}  # everything missing
    want = bundle.predict_rows(rows)
    table, _ = read_text("\n".join(lines) + "\n", require_label=False)
    want_tsv = bundle.predict_table(table)
    with httpx.Client(base_url=strict, headers=AUTH, timeout=30) as c:
        version = c.get("/readyz").json()["model_version"]
        answers = {
            "json": c.post("/v1/score", json={"rows": rows}),
            "split": c.post("/invocations", json={"dataframe_split": {
                "columns": FEATURE_COLUMNS, "data": [[r.get(k) for k in FEATURE_COLUMNS] for r in rows]}}),
            "records": c.post("/invocations", json={"dataframe_records": rows}),
        }
        singles = [c.post("/v1/score", json={"rows": [r]}) for r in rows[:20]]
        tsv = c.post("/v1/score", content="\n".join(lines) + "\n", headers={"Content-Type": "text/tab-separated-values"})
        tsv_padded = c.post("/v1/score", content="\n".join(x.rstrip("\t") for x in lines),
                            headers={"Content-Type": "text/tab-separated-values"})  # reader path: pads short lines
    for name, r in answers.items():
        assert r.status_code == 200, (name, r.text)
        assert r.headers["x-model-version"] == version
        got = r.json()["probabilities" if name == "json" else "predictions"]
        assert np.array_equal(np.array(got), want), name
    assert [s.json()["probabilities"][0] for s in singles] == want[:20].tolist()
    for r in (tsv, tsv_padded):
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == version
        assert np.array_equal(np.array(r.json()["probabilities"]), want_tsv)


# ---- malformed requests: 4xx JSON naming the field and row, never 5xx -----------------------

J = {"Content-Type": "application/json"}
T = {"Content-Type": "text/tab-separated-values"}
GOOD_LINE = "\t".join(["1", *["1"] * 13, *["abcdef12"] * 26])


def _tsv(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def _big_rows(n: int) -> bytes:
    return json.dumps({"rows": [{"I1": 1}] * n}).encode()


MALFORMED = [
    # id, method, path, headers, body, status, field, row
    ("empty body", "POST", "/v1/score", J, b"", 400, None, None),
    ("blank body", "POST", "/v1/score", J, b"  \n ", 400, None, None),
    ("not json", "POST", "/v1/score", J, b"{rows:", 400, None, None),
    ("invalid utf-8", "POST", "/v1/score", J, b'{"rows": ["\xff"]}', 400, None, None),
    ("deep nesting", "POST", "/v1/score", J, b"[" * 3000 + b"]" * 3000, 400, None, None),
    ("top-level array", "POST", "/v1/score", J, b"[]", 422, "rows", None),
    ("rows not a list", "POST", "/v1/score", J, b'{"rows": {"I1": 1}}', 422, "rows", None),
    ("unknown top-level key", "POST", "/v1/score", J, b'{"rows": [], "debug": true}', 422, "debug", None),
    ("row not an object", "POST", "/v1/score", J, b'{"rows": [{}, 7]}', 422, None, 1),
    ("int as string", "POST", "/v1/score", J, b'{"rows": [{"I1": "3"}]}', 422, "I1", 0),
    ("bool", "POST", "/v1/score", J, b'{"rows": [{"I4": true}]}', 422, "I4", 0),
    ("fraction", "POST", "/v1/score", J, b'{"rows": [{"I2": 1.5}]}', 422, "I2", 0),
    ("NaN", "POST", "/v1/score", J, b'{"rows": [{}, {"I2": NaN}]}', 422, "I2", 1),
    ("Infinity", "POST", "/v1/score", J, b'{"rows": [{"I3": Infinity}]}', 422, "I3", 0),
    ("-Infinity", "POST", "/v1/score", J, b'{"rows": [{"I3": -Infinity}]}', 422, "I3", 0),
    ("1e400", "POST", "/v1/score", J, b'{"rows": [{"I5": 1e400}]}', 422, "I5", 0),
    ("int above 2^53", "POST", "/v1/score", J, b'{"rows": [{"I6": 9007199254740993}]}', 422, "I6", 0),
    ("int beyond 64 bits", "POST", "/v1/score", J, b'{"rows": [{"I7": -100000000000000000000000}]}', 422, "I7", 0),
    ("non-hex categorical", "POST", "/v1/score", J, b'{"rows": [{"C1": "zzzzzzzz"}]}', 422, "C1", 0),
    ("short categorical", "POST", "/v1/score", J, b'{"rows": [{}, {}, {"C9": "abc"}]}', 422, "C9", 2),
    ("categorical as int", "POST", "/v1/score", J, b'{"rows": [{"C2": 12345678}]}', 422, "C2", 0),
    ("unknown feature", "POST", "/v1/score", J, b'{"rows": [{"I14": 1}]}', 422, "I14", 0),
    ("bad label", "POST", "/v1/score", J, b'{"rows": [{"label": "yes"}]}', 422, "label", 0),
    ("too many rows", "POST", "/v1/score", J, _big_rows(MAX_ROWS + 1), 413, None, None),
    ("body over the limit", "POST", "/v1/score", J, b'{"rows": [' + b"{}," * (MAX_BODY // 3) + b"{}]}", 413, None, None),
    ("text/csv", "POST", "/v1/score", {"Content-Type": "text/csv"}, b"1,2", 415, None, None),
    ("xml", "POST", "/v1/score", {"Content-Type": "application/xml"}, b"<rows/>", 415, None, None),
    ("tsv empty", "POST", "/v1/score", T, b"", 400, None, None),
    ("tsv non-hex", "POST", "/v1/score", T, _tsv(GOOD_LINE, GOOD_LINE.replace("abcdef12", "abcdefgh", 3)), 422, "C1", 1),
    ("tsv bad int", "POST", "/v1/score", T, _tsv(GOOD_LINE.replace("\t1\t", "\tone\t", 1)), 422, "I1", 0),
    ("tsv int above 2^53", "POST", "/v1/score", T, _tsv(GOOD_LINE.replace("\t1\t", "\t9007199254740993\t", 1)), 422, "I1", 0),
    ("tsv too many fields", "POST", "/v1/score", T, _tsv(GOOD_LINE + "\t1"), 422, None, 0),
    ("tsv blank line", "POST", "/v1/score", T, _tsv(GOOD_LINE, "", GOOD_LINE), 422, None, 1),
    ("tsv comma-separated", "POST", "/v1/score", T, b"1,2,3\n", 422, None, None),
    ("tsv too many lines", "POST", "/v1/score", T, _tsv(*[GOOD_LINE] * (MAX_ROWS + 1)), 413, None, None),
    ("invocations text/csv", "POST", "/invocations", {"Content-Type": "text/csv"}, b"I1\n1\n", 415, None, None),
    ("invocations instances", "POST", "/invocations", J, b'{"instances": [[1]]}', 422, "instances", None),
    ("invocations split ragged", "POST", "/invocations", J,
     b'{"dataframe_split": {"columns": ["I1", "C1"], "data": [[1]]}}', 422, None, 0),
    ("invocations records bad", "POST", "/invocations", J,
     b'{"dataframe_records": [{"I1": 1}, {"C4": "nothex!!"}]}', 422, "C4", 1),
    ("rank not json", "POST", "/v1/rank", J, b'{"candidates": [', 400, None, None),
    ("rank no candidates", "POST", "/v1/rank", J, b'{"context": {"I1": 1}}', 422, "candidates", None),
    ("rank unknown top-level key", "POST", "/v1/rank", J, b'{"candidates": [], "user": "u1"}', 422, "user", None),
    ("rank context not an object", "POST", "/v1/rank", J, b'{"context": [1], "candidates": []}', 422, "context", None),
    ("rank bad context field", "POST", "/v1/rank", J, b'{"context": {"C3": "xyz"}, "candidates": [{"id": 1}]}',
     422, "C3", None),
    ("rank field in both", "POST", "/v1/rank", J,
     b'{"context": {"I1": 1}, "candidates": [{"id": "a"}, {"id": "b", "I1": 2}]}', 422, "I1", 1),
    ("rank bad override", "POST", "/v1/rank", J, b'{"candidates": [], "override": "context"}', 422, "override", None),
    ("rank candidate no id", "POST", "/v1/rank", J, b'{"candidates": [{"I1": 1}]}', 422, "id", 0),
    ("rank duplicate id", "POST", "/v1/rank", J, b'{"candidates": [{"id": 1}, {"id": 1}]}', 422, "id", 1),
    ("rank bad candidate field", "POST", "/v1/rank", J, b'{"candidates": [{"id": 1}, {"id": 2, "I4": true}]}',
     422, "I4", 1),
    ("rank NaN", "POST", "/v1/rank", J, b'{"candidates": [{"id": 1, "I2": NaN}]}', 422, "I2", 0),
    ("rank k zero", "POST", "/v1/rank", J, b'{"candidates": [{"id": 1}], "k": 0}', 422, "k", None),
    ("rank too many candidates", "POST", "/v1/rank", J,
     json.dumps({"candidates": [{"id": j} for j in range(MAX_CANDIDATES + 1)]}).encode(), 413, "candidates", None),
    ("rank tsv", "POST", "/v1/rank", T, _tsv(GOOD_LINE), 415, None, None),
    ("rank wrong method", "GET", "/v1/rank", {}, b"", 405, None, None),
    ("wrong method", "GET", "/v1/score", {}, b"", 405, None, None),
    ("unknown route", "POST", "/v2/score", J, b"{}", 404, None, None),
    ("admin not json", "POST", "/admin/load", {"Authorization": f"Bearer {ADMIN}"}, b"bundle", 400, None, None),
    ("admin no bundle", "POST", "/admin/load", {"Authorization": f"Bearer {ADMIN}"}, b'{"path": "/x"}', 422, "bundle", None),
]


@pytest.mark.parametrize(("method", "path", "headers", "body", "status", "field", "row"),
                         [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_request(strict: str, method: str, path: str, headers: dict, body: bytes, status: int,
                           field: str | None, row: int | None) -> None:
    h = {**AUTH, **headers}
    r = httpx.request(method, strict + path, content=body, headers=h, timeout=30)
    assert r.status_code == status, r.text
    doc = r.json()
    assert isinstance(doc["error"], str) and doc["error"]
    assert doc.get("field") == field
    assert doc.get("row") == row
    if row is not None and path != "/admin/load":
        assert (f"row {row}" in doc["error"]) or (f"line {row + 1}" in doc["error"]) \
            or (path == "/v1/rank" and f"candidate {row}" in doc["error"]), doc["error"]


def test_malformed_table_is_large_enough() -> None:
    assert len(MALFORMED) >= 25


def test_service_still_scores_after_the_table(strict: str) -> None:
    r = httpx.post(strict + "/v1/score", json={"rows": [{"I1": 1}]}, headers=AUTH, timeout=30)
    assert r.status_code == 200 and 0.0 < r.json()["probabilities"][0] < 1.0


def test_a_stalled_body_gets_408_not_a_hung_request(strict: str) -> None:
    host, port = strict.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(f"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"rows\": [".encode())
        t0 = time.monotonic()
        reply = s.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 408"), reply
    assert "not received within 2 s" in reply and time.monotonic() - t0 < 15


# ---- auth ------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x", TOKEN])
def test_scoring_needs_the_token(strict: str, auth: str | None) -> None:
    headers = {} if auth is None else {"Authorization": auth}
    for path in ("/v1/score", "/invocations"):
        r = httpx.post(strict + path, json={"rows": [{}]}, headers=headers, timeout=30)
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert TOKEN not in r.text


def test_scheme_is_case_insensitive(strict: str) -> None:
    r = httpx.post(strict + "/v1/score", json={"rows": [{}]}, headers={"Authorization": f"bearer {TOKEN}"}, timeout=30)
    assert r.status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json"])
def test_health_endpoints_are_open(strict: str, path: str) -> None:
    assert httpx.get(strict + path, timeout=30).status_code == 200


def test_admin_needs_the_admin_token_and_refuses_bad_bundles(strict: str, tmp_path: Path) -> None:
    before = httpx.get(strict + "/readyz", timeout=30).json()["model_version"]
    r = httpx.post(strict + "/admin/load", json={"bundle": str(tmp_path)}, headers=AUTH, timeout=30)
    assert r.status_code == 401  # the scoring token is not the admin token
    r = httpx.post(strict + "/admin/load", json={"bundle": str(tmp_path / "nope")},
                   headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    assert r.status_code == 409 and before in r.json()["error"]
    assert httpx.get(strict + "/readyz", timeout=30).json()["model_version"] == before


# ---- metrics, readiness, OpenAPI ------------------------------------------------------------


def test_metrics_count_requests_rows_and_probabilities(strict: str) -> None:
    with httpx.Client(base_url=strict, headers=AUTH, timeout=30) as c:
        c.post("/v1/score", json={"rows": [{}, {"I1": 5}, {"C1": "abcdef12"}]})
        c.post("/v1/score", json={"rows": [{"I1": "x"}]})
        text = c.get("/metrics").text
        ready = c.get("/readyz").json()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, v = line.rpartition(" ")
            values[name] = float(v)
    assert values['ctr_requests_total{route="/v1/score",status="200"}'] >= 1
    assert values['ctr_requests_total{route="/v1/score",status="422"}'] >= 1
    assert values["ctr_rows_scored_total"] >= 3
    assert values['ctr_predicted_probability_bucket{le="+Inf"}'] == values["ctr_predicted_probability_count"] >= 3
    assert values['ctr_request_seconds_bucket{le="+Inf"}'] == values["ctr_request_seconds_count"] > 0
    assert values[f'ctr_model_info{{version="{ready["model_version"]}"}}'] == 1
    assert math.isclose(values["ctr_model_loaded_timestamp_seconds"], ready["loaded_at"], rel_tol=1e-9)
    assert ready["fast_paths"] == {"single_row": True, "tsv": True, "tsv_numpy": True, "batch": True, "json_rows": True}


def test_openapi_document_describes_the_api(strict: str) -> None:
    doc = httpx.get(strict + "/openapi.json", timeout=30).json()
    assert doc["openapi"].startswith("3.")
    assert {"/v1/score", "/invocations", "/healthz", "/readyz", "/metrics"} <= set(doc["paths"])
    row = doc["paths"]["/v1/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]["rows"]
    assert len(row["items"]["properties"]) == 40


# ---- graceful shutdown ----------------------------------------------------------------------


def test_sigterm_drains_a_request_in_flight(trained_bundle: Path, tmp_path: Path) -> None:
    svc = ServiceProcess(trained_bundle, log_path=tmp_path / "serve.log").start()
    release = threading.Event()
    result: dict = {}

    def body() -> Iterator[bytes]:
        yield b'{"rows": [{"I1": 1}, '
        release.wait(30)
        yield b'{"I2": 2}]}'

    def post() -> None:
        try:
            result["r"] = httpx.post(svc.url + "/v1/score", content=body(), headers=J, timeout=60)
        except httpx.HTTPError as e:
            result["e"] = e

    t = threading.Thread(target=post)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the request is in the app once the gauge counts it (+ this scrape)
            if "ctr_inflight_requests 2" in httpx.get(svc.url + "/metrics", timeout=10).text:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the streamed request never reached the app")
        assert svc.proc is not None
        svc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no new connections while draining
            httpx.get(svc.url + "/healthz", timeout=5)
        release.set()
        t.join(60)
        assert "e" not in result, result.get("e")
        assert result["r"].status_code == 200 and len(result["r"].json()["probabilities"]) == 2
        assert svc.proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        release.set()
        svc.stop()
