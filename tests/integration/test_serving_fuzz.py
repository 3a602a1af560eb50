"""Hypothesis-generated requests (>= 1,000) against a real service: no 5xx, no hang, no crash.

Bodies range from almost-valid rows with one bad value to arbitrary JSON, raw bytes and TSV noise,
over every route, method and a spread of content types; the service runs with small limits so
413s are reachable. A 200 must carry one probability in [0, 1] per row. `/v1/rank` gets its own
>= 1,000 cases (contexts, candidates, ids, k and override, valid and not); a 200 there must be a
ranking: unique ids, probabilities in [0, 1], descending.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ctr.schema import CAT_COLUMNS, FEATURE_COLUMNS, INT_COLUMNS
from ctr.serving.process import ServiceProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.integration

MAX_ROWS = 50
MAX_BODY = 64 * 1024
FUZZ_CASES = 1200
RANK_CASES = 1100
MAX_CANDIDATES = 20
LOG_RATE, LOG_SEED = 0.5, 11  # the prediction log runs under the fuzz too


@pytest.fixture(scope="module")
def fuzz_server(trained_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    home = tmp_path_factory.mktemp("fuzz")
    env = {"CTR_MAX_ROWS": str(MAX_ROWS), "CTR_MAX_BODY_BYTES": str(MAX_BODY),
           "CTR_RANK_MAX_CANDIDATES": str(MAX_CANDIDATES), "CTR_HOME": str(home),
           "CTR_PREDICTION_LOG_RATE": str(LOG_RATE), "CTR_PREDICTION_LOG_SEED": str(LOG_SEED)}
    with ServiceProcess(trained_bundle, env, home / "serve.log") as svc:
        yield svc


@pytest.fixture(scope="module")
def client(fuzz_server: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fuzz_server.url, timeout=15) as c:
        yield c


hexes = st.text(alphabet="0123456789abcdefABCDEF", min_size=8, max_size=8)
values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-1000, 10**6),
    st.floats(allow_nan=True, allow_infinity=True), hexes, st.text(max_size=12),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
good_value = {**{c: st.one_of(st.none(), st.integers(-1000, 10**6)) for c in INT_COLUMNS},
              **{c: st.one_of(st.none(), hexes) for c in CAT_COLUMNS}}
keys = st.one_of(st.sampled_from(FEATURE_COLUMNS + ["label"]), st.text(max_size=6))


@st.composite
def row(draw: st.DrawFn) -> object:
    kind = draw(st.sampled_from(["good", "one_bad", "wild", "not_object"]))
    if kind == "not_object":
        return draw(values)
    cols = draw(st.lists(st.sampled_from(FEATURE_COLUMNS), unique=True, max_size=39))
    r = {c: draw(good_value[c]) for c in cols}
    if kind == "one_bad":
        r[draw(keys)] = draw(values)
    elif kind == "wild":
        r.update(draw(st.dictionaries(keys, values, max_size=5)))
    return r


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                           lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                   st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=12)
rows_lists = st.lists(row(), max_size=8) | st.lists(st.just({"I1": 1}), min_size=MAX_ROWS - 1, max_size=MAX_ROWS + 2)


def _dumps(doc: object) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


def _tsv_line(fields: list[str]) -> str:
    return "\t".join(fields)


tsv_field = st.one_of(st.just(""), st.integers(-10, 10**6).map(str), hexes, st.text(max_size=10))
tsv_bodies = st.lists(st.lists(tsv_field, min_size=0, max_size=42).map(_tsv_line), max_size=MAX_ROWS + 2).map(
    lambda ls: ("\n".join(ls) + "\n").encode())

bodies = st.one_of(
    st.builds(lambda r: _dumps({"rows": r}), rows_lists),
    st.builds(lambda r, extra: _dumps({"rows": r, **extra}), rows_lists, st.dictionaries(st.text(max_size=5), json_values, max_size=2)),
    st.builds(lambda r: _dumps({"dataframe_records": r}), rows_lists),
    st.builds(lambda cols, data: _dumps({"dataframe_split": {"columns": cols, "data": data}}),
              st.lists(keys, max_size=5), st.lists(st.lists(values, max_size=5), max_size=5)),
    json_values.map(_dumps),
    st.binary(max_size=300),
    tsv_bodies,
    st.just(b"x" * (MAX_BODY + 1)),
)
content_types = st.sampled_from(["application/json", "application/json; charset=utf-8", "APPLICATION/JSON",
                                 "text/tab-separated-values", "text/plain", "text/csv", "application/octet-stream",
                                 "", "multipart/form-data; boundary=x", None])
routes = st.sampled_from([("POST", "/v1/score")] * 6 + [("POST", "/invocations")] * 3 + [("POST", "/v1/rank")] * 2 + [
    ("GET", "/v1/rank"), ("POST", "/v1/rank/"),
    ("GET", "/v1/score"), ("PUT", "/invocations"), ("POST", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"),
    ("POST", "/admin/load"), ("GET", "/openapi.json"), ("POST", "/v1/score/"), ("POST", "/%00")])


@settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(route=routes, body=bodies, ctype=content_types)
def test_fuzzed_requests_never_5xx(client: httpx.Client, route: tuple[str, str], body: bytes, ctype: str | None) -> None:
    method, path = route
    headers = {} if ctype is None else {"Content-Type": ctype}
    r = client.request(method, path, content=body, headers=headers)
    assert r.status_code < 500, (r.status_code, r.text[:300], body[:200])
    if path == "/metrics" and r.status_code == 200:
        return
    doc = r.json()
    if r.status_code == 200 and path in ("/v1/score", "/invocations"):
        probs = doc["probabilities" if path == "/v1/score" else "predictions"]
        assert all(0.0 <= p <= 1.0 for p in probs)
        assert r.headers["x-model-version"] == doc["model_version"]
    elif r.status_code == 200 and path == "/v1/rank":
        _check_ranking(r, doc)
    elif r.status_code >= 400:
        assert isinstance(doc["error"], str) and doc["error"]


def _check_ranking(r: httpx.Response, doc: dict) -> None:
    probs = [i["probability"] for i in doc["items"]]
    assert all(0.0 <= p <= 1.0 for p in probs) and probs == sorted(probs, reverse=True)
    ids = [json.dumps(i["id"]) for i in doc["items"]]
    assert len(set(ids)) == len(ids)
    assert r.headers["x-model-version"] == doc["model_version"]


# ---- /v1/rank: contexts, candidates, ids, k, override ------------------------------------------
ids = st.one_of(st.text(min_size=1, max_size=10), st.integers(-(2**54), 2**54), st.integers(0, 5).map(str),
                st.sampled_from([None, True, 1.5, "", "x" * 300, [1], {"a": 1}]))


@st.composite
def candidate(draw: st.DrawFn) -> object:
    c = draw(row())
    if isinstance(c, dict) and draw(st.integers(0, 9)) > 0:  # now and then without an id
        c["id"] = draw(ids)
    return c


@st.composite
def rank_doc(draw: st.DrawFn) -> dict:
    doc: dict = {}
    if draw(st.booleans()):
        doc["context"] = draw(st.one_of(row(), st.none()))
    shared = draw(st.lists(st.sampled_from(FEATURE_COLUMNS), unique=True, max_size=6))
    if draw(st.integers(0, 3)) == 0:
        doc["candidates"] = draw(st.one_of(values, json_values))
    else:
        n = draw(st.one_of(st.integers(0, 6), st.integers(MAX_CANDIDATES - 1, MAX_CANDIDATES + 2)))
        cands = []
        for j in range(n):
            c = draw(candidate()) if j < 8 else {"id": j, "I1": j}
            if isinstance(c, dict) and shared and draw(st.booleans()):
                c.pop(draw(st.sampled_from(shared)), None)  # candidates that share no field with the context
            cands.append(c)
        doc["candidates"] = cands
    if draw(st.booleans()):
        doc["k"] = draw(st.one_of(st.integers(-2, 30), st.none(), st.booleans(), st.floats(), st.text(max_size=3)))
    if draw(st.booleans()):
        doc["override"] = draw(st.sampled_from(["candidate", "context", None, 1, ""]))
    if draw(st.integers(0, 9)) == 0:
        doc.update(draw(st.dictionaries(st.text(max_size=5), json_values, max_size=2)))
    return doc


rank_bodies = st.one_of(
    rank_doc().map(_dumps), rank_doc().map(_dumps), rank_doc().map(_dumps),
    json_values.map(_dumps), st.binary(max_size=200),
    st.sampled_from([b'{"candidates": [{"id": "\\ud800"}]}', b'{"candidates": [{"id": "a", "I1": NaN}]}',
                     b'{"candidates": [{"id": "\\udfff", "I2": Infinity}]}', b'{"candidates": [], "k": 1e400}',
                     b'{"context": {"I1": 1e400}, "candidates": [{"id": 1}]}', b'{"candidates": [{"id": 1e400}]}',
                     b'{"candidates": [{"id": 123456789012345678901234567890}]}']),
    st.just(b'{"candidates": [' + b'{"id": 1},' * (MAX_BODY // 10) + b'{"id": 2}]}'),
)
rank_types = st.sampled_from(["application/json"] * 6 + ["application/json; charset=utf-8", "text/plain", None])


@settings(max_examples=RANK_CASES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(body=rank_bodies, ctype=rank_types)
def test_fuzzed_rank_requests_never_5xx(client: httpx.Client, body: bytes, ctype: str | None) -> None:
    headers = {} if ctype is None else {"Content-Type": ctype}
    r = client.post("/v1/rank", content=body, headers=headers)
    assert r.status_code < 500, (r.status_code, r.text[:300], body[:200])
    doc = r.json()
    if r.status_code == 200:
        _check_ranking(r, doc)
    else:
        assert isinstance(doc["error"], str) and doc["error"]
        assert r.status_code in (400, 413, 415, 422), (r.status_code, doc)


def test_after_fuzzing_the_service_is_alive_and_logged_no_5xx(client: httpx.Client, fuzz_server: ServiceProcess) -> None:
    assert fuzz_server.proc is not None and fuzz_server.proc.poll() is None
    assert client.get("/healthz").status_code == 200
    text = client.get("/metrics").text
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("ctr_requests_total"))
    assert counted >= FUZZ_CASES + RANK_CASES
    assert 'status="5' not in text


def test_the_prediction_log_holds_exactly_what_the_seeded_sampling_chose(client: httpx.Client,
                                                                         fuzz_server: ServiceProcess) -> None:
    """Every row answered 200 during the fuzz drew once; the log (after a graceful stop) holds exactly the
    rows whose draw was < rate, nothing dropped, no .tmp left, and every file reads whole."""
    import gzip

    import numpy as np
    from ctr.serving.predlog import complete_members

    text = client.get("/metrics").text
    rows = int(float(next(ln for ln in text.splitlines() if ln.startswith("ctr_rows_scored_total")).split()[1]))
    fuzz_server.stop()
    home = Path(fuzz_server.env["CTR_HOME"]) / "predictions"
    files = sorted(home.rglob("part-*.jsonl.gz"))
    logged = sum(len(gzip.decompress(f.read_bytes()).splitlines()) for f in files)
    want = int((np.random.default_rng(LOG_SEED).random(rows) < LOG_RATE).sum())
    assert rows > 100 and 0 < logged == want < rows, (rows, logged, want)
    assert not list(home.rglob("*.tmp")) and all(complete_members(f.read_bytes())[1] for f in files)
