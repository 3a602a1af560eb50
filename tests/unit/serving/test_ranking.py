"""Ranking rules of /v1/rank and `ctr rank` (serving/ranking.py): merging, overrides, ids, k, top-k
order, errors naming the field, and the one-pass encoder equal to check_row + FeatureTransform.row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import orjson
import pytest
from ctr.schema import CAT_COLUMNS, FEATURE_COLUMNS, INT_COLUMNS
from ctr.serving import ranking
from ctr.serving.app import service_limit, service_limits
from ctr.serving.model import ServedModel
from ctr.serving.validation import RequestError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def model(trained_bundle: Path) -> ServedModel:
    m = ServedModel.load(trained_bundle)
    assert m.rows is not None and m.batch is not None  # the fast paths this module's equality tests rely on
    return m


def _vocab_value(model: ServedModel, col: str, i: int) -> str:
    vocab = model.bundle.transform.vocab[col]
    return vocab[i % len(vocab)] if vocab else "0badf00d"


def _request(model: ServedModel, n: int = 6) -> dict:
    ctx = {"I1": 3, "I2": 20, "C1": _vocab_value(model, "C1", 0), "C2": _vocab_value(model, "C2", 1)}
    cands = [{"id": f"item-{j}", "C3": _vocab_value(model, "C3", j), "I5": j * 7} for j in range(n)]
    return {"context": ctx, "candidates": cands}


def _err(model: ServedModel, payload: object, max_candidates: int = 1000) -> RequestError:
    with pytest.raises(RequestError) as e:
        ranking.prepare(model, payload, max_candidates)
    return e.value


# ---- top-k order -------------------------------------------------------------------------------

def test_top_k_is_descending_and_ties_keep_input_order() -> None:
    p = np.array([0.2, 0.5, 0.2, 0.9, 0.5, 0.2])
    assert ranking.top_k(p, 6).tolist() == [3, 1, 4, 0, 2, 5]
    assert ranking.top_k(p, 2).tolist() == [3, 1]
    items = ranking.items(["a", "b", "c", "d", "e", "f"], p, 4)
    assert [i["id"] for i in items] == ["d", "b", "e", "a"]
    assert [i["probability"] for i in items] == [0.9, 0.5, 0.5, 0.2]


@given(st.lists(st.sampled_from([0.1, 0.25, 0.5, 0.75]) | st.floats(0, 1), max_size=40), st.integers(1, 50))
@settings(max_examples=200, deadline=None)
def test_top_k_matches_a_sort_by_probability_then_position(p: list[float], k: int) -> None:
    want = sorted(range(len(p)), key=lambda i: (-p[i], i))[:k]
    assert ranking.top_k(np.array(p, dtype=np.float64), k).tolist() == want


# ---- merging, override, k, ids -------------------------------------------------------------------

def test_rank_scores_the_merged_rows_and_returns_all_by_default(model: ServedModel) -> None:
    req = _request(model)
    merged = [{**req["context"], **{k: v for k, v in c.items() if k != "id"}} for c in req["candidates"]]
    want = model.bundle.predict_rows(merged)
    probs, doc = ranking.rank(model, json.loads(json.dumps(req)))
    assert np.array_equal(probs, want)
    assert doc["model_version"] == model.version
    assert len(doc["items"]) == 6
    order = sorted(range(6), key=lambda j: (-want[j], j))
    assert [it["id"] for it in doc["items"]] == [f"item-{j}" for j in order]
    assert [it["probability"] for it in doc["items"]] == [float(want[j]) for j in order]


def test_k_limits_the_answer(model: ServedModel) -> None:
    req = {**_request(model), "k": 2}
    _, doc = ranking.rank(model, req)
    _, full = ranking.rank(model, _request(model))
    assert doc["items"] == full["items"][:2]
    _, more = ranking.rank(model, {**_request(model), "k": 50})  # more than there are: all of them
    _, as_float = ranking.rank(model, {**_request(model), "k": 2.0})  # 2.0 is an integer to JSON Schema, as documented
    assert as_float == doc
    assert more["items"] == full["items"]


def test_a_field_in_both_is_a_422_naming_it_unless_the_candidate_overrides(model: ServedModel) -> None:
    req = _request(model)
    req["candidates"][2]["I2"] = 5
    e = _err(model, json.loads(json.dumps(req)))
    assert (e.status, e.field, e.row) == (422, "I2", 2)
    assert "'I2'" in str(e) and "both context and candidate" in str(e) and '"override": "candidate"' in str(e)
    probs, _ = ranking.rank(model, {**json.loads(json.dumps(req)), "override": "candidate"})
    cand = {k: v for k, v in req["candidates"][2].items() if k != "id"}
    assert probs[2] == model.bundle.predict_rows([{**req["context"], **cand}])[0]  # the candidate's 5, not 20


def test_override_with_a_candidate_null_clears_the_context_value(model: ServedModel) -> None:
    ctx = {"I1": 3, "C1": _vocab_value(model, "C1", 0)}
    cands = [{"id": 1, "C1": None}, {"id": 2}]
    probs, _ = ranking.rank(model, {"context": dict(ctx), "candidates": [dict(c) for c in cands],
                                    "override": "candidate"})
    want = model.bundle.predict_rows([{"I1": 3}, ctx])
    assert np.array_equal(probs, want)


def test_candidate_value_wins_over_the_context_with_override(model: ServedModel) -> None:
    ctx = {f: 1 for f in INT_COLUMNS} | {c: _vocab_value(model, c, 0) for c in CAT_COLUMNS}
    cands = [{"id": "x", **{f: 1000 + j for j, f in enumerate(INT_COLUMNS)}}]
    probs, _ = ranking.rank(model, {"context": ctx, "candidates": cands, "override": "candidate"})
    want = model.bundle.predict_rows([{**ctx, **{f: 1000 + j for j, f in enumerate(INT_COLUMNS)}}])
    assert np.array_equal(probs, want)


@pytest.mark.parametrize(("payload", "status", "field", "row", "words"), [
    ([], 422, "candidates", None, "body must be"),
    ({"context": {}}, 422, "candidates", None, "required"),
    ({"candidates": {}}, 422, "candidates", None, "list"),
    ({"candidates": [], "user": 1}, 422, "user", None, "unknown top-level field"),
    ({"context": [1], "candidates": []}, 422, "context", None, "object"),
    ({"candidates": [], "k": 0}, 422, "k", None, "positive integer"),
    ({"candidates": [], "k": True}, 422, "k", None, "positive integer"),
    ({"candidates": [], "k": 2.5}, 422, "k", None, "positive integer"),
    ({"candidates": [], "override": "context"}, 422, "override", None, "candidate"),
    ({"candidates": [{"id": "a"}, 5]}, 422, None, 1, "candidate 1 must be an object"),
    ({"candidates": [{"I1": 1}]}, 422, "id", 0, "no 'id'"),
    ({"candidates": [{"id": "a"}, {"id": "b"}, {"id": "a"}]}, 422, "id", 2, "repeats"),
    ({"candidates": [{"id": True}]}, 422, "id", 0, "string or an integer"),
    ({"candidates": [{"id": 2**60}]}, 422, "id", 0, "2^53"),
    ({"candidates": [{"id": ""}]}, 422, "id", 0, "1 to 256"),
    ({"candidates": [{"id": "\ud800"}]}, 422, "id", 0, "surrogate"),
    ({"candidates": [{"id": None}]}, 422, "id", 0, "string or an integer"),
    ({"candidates": [{"id": "a", "I1": "3"}]}, 422, "I1", 0, "candidate 0: I1 must be an integer"),
    ({"candidates": [{"id": "a"}, {"id": "b", "C9": "abc"}]}, 422, "C9", 1, "candidate 1: C9 must be 8 hex"),
    ({"candidates": [{"id": "a", "I14": 1}]}, 422, "I14", 0, "candidate 0: unknown field"),
    ({"context": {"I3": float("nan")}, "candidates": [{"id": "a"}]}, 422, "I3", None, "context: I3 must be a finite"),
    ({"context": {"id": "u1"}, "candidates": [{"id": "a"}]}, 422, "id", None, "context: unknown field 'id'"),
    ({"context": {"label": 2}, "candidates": [{"id": "a"}]}, 422, "label", None, "context: label"),
    ({"candidates": [{"id": j} for j in range(4)]}, 413, "candidates", None, "limit of 3 (CTR_RANK_MAX_CANDIDATES)"),
])
def test_rejected_requests_name_the_field(model: ServedModel, payload: object, status: int, field: str | None,
                                          row: int | None, words: str) -> None:
    e = _err(model, payload, max_candidates=3)
    assert (e.status, e.field, e.row) == (status, field, row), str(e)
    assert words in str(e)
    json.dumps(e.to_json())  # always serialisable


def test_no_candidates_is_an_empty_ranking(model: ServedModel) -> None:
    probs, doc = ranking.rank(model, {"context": {"I1": 1}, "candidates": []})
    assert len(probs) == 0 and doc["items"] == []


def test_integer_ids_are_echoed(model: ServedModel) -> None:
    _, doc = ranking.rank(model, {"candidates": [{"id": 7}, {"id": -(2**53)}]})
    assert sorted(it["id"] for it in doc["items"]) == [-(2**53), 7]


def test_wrong_content_type_is_415() -> None:
    with pytest.raises(RequestError) as e:
        ranking.check_content_type(b"text/tab-separated-values")
    assert e.value.status == 415 and "/v1/rank takes application/json" in str(e.value)


# ---- the one-pass encoder equals the checked path -----------------------------------------------

def _values(model: ServedModel) -> dict[str, st.SearchStrategy]:
    out: dict[str, st.SearchStrategy] = {c: st.none() | st.integers(-50, 10**6) | st.sampled_from([3.0, -0.0])
                                         for c in INT_COLUMNS}
    for c in CAT_COLUMNS:
        known = [_vocab_value(model, c, i) for i in range(3)]
        out[c] = st.none() | st.sampled_from(known + [k.upper() for k in known] + ["0badf00d"])
    return out


@st.composite
def rank_requests(draw: st.DrawFn, model: ServedModel) -> dict:
    vals = _values(model)
    ctx_cols = draw(st.lists(st.sampled_from(FEATURE_COLUMNS), unique=True, max_size=30))
    ctx = {c: draw(vals[c]) for c in ctx_cols}
    override = draw(st.booleans())
    cands = []
    for j in range(draw(st.integers(1, 12))):
        pool = FEATURE_COLUMNS if override else [c for c in FEATURE_COLUMNS if c not in ctx]
        cols = draw(st.lists(st.sampled_from(pool), unique=True, max_size=12)) if pool else []
        cands.append({"id": f"c{j}", **{c: draw(vals[c]) for c in cols}})
    req = {"context": ctx, "candidates": cands}
    if override:
        req["override"] = "candidate"
    return req


def test_one_pass_encoder_equals_check_row_and_transform(model: ServedModel) -> None:
    @given(rank_requests(model))
    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(req: dict) -> None:
        merged = [{**req["context"], **{k: v for k, v in c.items() if k != "id"}} for c in req["candidates"]]
        x = ranking.prepare(model, orjson.loads(json.dumps(req)), 1000).x
        slow = ranking._checked_matrix(model, req["context"],
                                       [{k: v for k, v in c.items() if k != "id"} for c in req["candidates"]])
        from ctr.serving.validation import check_rows
        ref = model.bundle.transform.rows_matrix(check_rows(merged))
        assert np.array_equal(x, ref, equal_nan=True)
        assert np.array_equal(slow, ref, equal_nan=True)
        assert np.array_equal(model.predict_matrix(x), model.bundle.predict_rows(check_rows(merged)))

    check()


# ---- ctr rank: every line answered, bad ones with an error record ---------------------------------

def test_rank_file_answers_every_line_in_order(model: ServedModel, trained_bundle: Path, tmp_path: Path) -> None:
    good = _request(model)
    lines = [
        json.dumps(good).encode(),
        b"",                                               # blank
        b"{not json",
        b'{"candidates": [{"id": "a", "C1": "zz"}]}',      # bad field
        json.dumps({**good, "k": 1}).encode() + b"\r",    # CRLF
        b'\xff\xfe{"candidates": []}',                     # not UTF-8
        json.dumps({"candidates": [{"id": j} for j in range(7)]}).encode(),  # over the limit of 6
        json.dumps({**good, "k": 3}).encode(),             # last line without a newline
    ]
    src = tmp_path / "requests.jsonl"
    src.write_bytes(b"\n".join(lines))
    out = tmp_path / "out" / "ranked.jsonl"
    n_ok, n_bad = ranking.rank_file(trained_bundle, src, out, max_candidates=6)
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in recs] == list(range(1, len(lines) + 1))
    assert (n_ok, n_bad) == (3, 5)
    _, want = ranking.rank(model, json.loads(json.dumps(good)))
    assert recs[0] == {"line": 1, **want}
    assert recs[4]["items"] == want["items"][:1] and recs[7]["items"] == want["items"][:3]
    assert (recs[1]["status"], "empty line" in recs[1]["error"]) == (400, True)
    assert recs[2]["status"] == 400 and "not valid JSON" in recs[2]["error"]
    assert (recs[3]["status"], recs[3]["field"], recs[3]["row"]) == (422, "C1", 0)
    assert recs[5]["status"] == 400 and "UTF-8" in recs[5]["error"]
    assert recs[6]["status"] == 413 and "limit of 6" in recs[6]["error"]


def test_rank_file_refuses_to_overwrite_its_input(trained_bundle: Path, tmp_path: Path) -> None:
    src = tmp_path / "r.jsonl"
    src.write_text("{}\n")
    with pytest.raises(ValueError, match="also the input"):
        ranking.rank_file(trained_bundle, src, src)
    assert src.read_text() == "{}\n"


# ---- the limit is validated at start-up like the others -------------------------------------------

def test_candidate_limit_is_checked_at_start_up() -> None:
    assert service_limits({})["CTR_RANK_MAX_CANDIDATES"] == 1000
    assert service_limit("CTR_RANK_MAX_CANDIDATES", {"CTR_RANK_MAX_CANDIDATES": "25"}) == 25
    for bad, words in [("0", "out of range"), ("lots", "not an integer"), ("2000000", "out of range")]:
        with pytest.raises(ValueError, match=f"CTR_RANK_MAX_CANDIDATES.*{words}"):
            service_limits({"CTR_RANK_MAX_CANDIDATES": bad})


def test_the_demos_printed_rank_example_is_a_valid_request(model: ServedModel) -> None:
    import shlex

    from ctr.demo import rank_example

    lines = rank_example("http://127.0.0.1:8765", ' -H "Authorization: Bearer $CTR_SERVE_TOKEN"')
    argv = shlex.split(" ".join(x.rstrip("\\") for x in lines))
    assert argv[:3] == ["curl", "-s", "http://127.0.0.1:8765/v1/rank"] and "Authorization: Bearer $CTR_SERVE_TOKEN" in argv
    _, doc = ranking.rank(model, json.loads(argv[argv.index("-d") + 1]))
    assert [i["id"] for i in doc["items"]] != [] and len(doc["items"]) == 2


def test_column_encoder_takes_plain_candidates_and_refuses_the_rest(model: ServedModel) -> None:
    from ctr.serving.validation import check_rows

    ctx = {"I1": 4, "C1": _vocab_value(model, "C1", 0)}
    cands = [{"I2": j, "C3": _vocab_value(model, "C3", j)} for j in range(5)]
    cands[1]["C3"] = _vocab_value(model, "C3", 1).upper()   # upper case: a miss, then coded
    cands[2]["C3"] = "0badf00d"                              # unseen: the rare code
    cands[3]["C3"] = None                                    # null: missing
    del cands[4]["I2"]                                       # absent
    cands[0]["label"] = 1                                    # ignored
    base = model.rows.encode([ctx])[0]
    x = ranking._columns_matrix(model.rows, base, [dict(c) for c in cands])
    ref = model.bundle.transform.rows_matrix(check_rows([{**ctx, **c} for c in cands]))
    assert x is not None and np.array_equal(x, ref, equal_nan=True)
    for odd in [{"I2": 3.0}, {"I2": True}, {"I2": 2**53}, {"I2": "3"}, {"C3": "abc"}, {"C3": "zzzzzzzz"},
                {"C3": ""}, {"C3": "0ba\tf00d"}, {"C3": "0badf0\u00e9d"}, {"C3": 12345678}, {"C3": ["0badf00d"]},
                {"C3": True}, {"label": 2}, {"I14": 1}]:
        assert ranking._columns_matrix(model.rows, base, [{"I2": 1}, odd]) is None, odd


def test_column_encoder_equals_the_checked_path_on_mixed_candidates(model: ServedModel) -> None:
    """Seeded random candidates (ints, known/upper-case/unseen categoricals, nulls, labels, absent
    fields) over a context: encode_columns gives exactly check_rows + rows_matrix of the merged rows."""
    from ctr.serving.validation import check_rows

    rng = np.random.default_rng(20)
    ctx = {"I1": 7, "C1": _vocab_value(model, "C1", 2), "C2": None}
    pool = [c for c in FEATURE_COLUMNS if c not in ctx] + ["label"]

    def value(col: str) -> object:
        r = rng.random()
        if r < 0.15:
            return None
        if col == "label":
            return int(rng.integers(0, 2))
        if col in INT_COLUMNS:
            return int(rng.integers(-10**6, 10**12))
        v = _vocab_value(model, col, int(rng.integers(0, 50)))
        return v.upper() if r < 0.3 else f"{int(rng.integers(0, 2**32)):08x}" if r < 0.5 else v

    cands = [{c: value(c) for c in rng.choice(pool, size=int(rng.integers(0, 20)), replace=False).tolist()}
             for _ in range(200)]
    base = model.rows.encode([ctx])[0]
    x = ranking._columns_matrix(model.rows, base, [dict(c) for c in cands])
    ref = model.bundle.transform.rows_matrix(check_rows([{**ctx, **c} for c in cands]))
    assert x is not None and np.array_equal(x, ref, equal_nan=True)


def test_column_encoder_takes_uniform_candidates_a_row_pattern_at_a_time(model: ServedModel) -> None:
    """Candidates that all set the same fields in the same order (the repeated-positions path) and the
    same fields in another order for one of them (the per-field path) both equal the checked path."""
    from ctr.serving.validation import check_rows

    rng = np.random.default_rng(21)
    ctx = {"I1": 7, "C1": _vocab_value(model, "C1", 2)}
    fields = ["C14", "I5", "C20", "label", "C3"]

    def cand(j: int) -> dict:
        return {"C14": _vocab_value(model, "C14", j % 40), "I5": None if j % 7 == 0 else int(rng.integers(0, 99)),
                "C20": f"{int(rng.integers(0, 2**32)):08X}", "label": j % 2, "C3": None if j % 5 == 0 else
                _vocab_value(model, "C3", j % 30)}

    uniform = [cand(j) for j in range(120)]
    assert all(list(c) == fields for c in uniform)
    shuffled = [dict(c) for c in uniform]
    shuffled[57] = dict(reversed(list(shuffled[57].items())))  # same fields, another order
    base = model.rows.encode([ctx])[0]
    for cands in (uniform, shuffled):
        x = model.rows.encode_columns(base, [dict(c) for c in cands])
        ref = model.bundle.transform.rows_matrix(check_rows([{**ctx, **c} for c in cands]))
        assert x is not None and np.array_equal(x, ref, equal_nan=True)
    assert model.rows.encode_columns(base, [{"C14": "0badf00d", "I99": 1}] * 3) is None  # unknown field, uniform
