"""Rollout strategies: params checked and in step with the DAG's trigger form, the router's share, the judgements."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from ctr.deployment.rollout.progressive import (
    Limits,
    Strategy,
    canary_breaches,
    canary_window,
    quantile,
    shadow_breaches,
)
from ctr.serving.traffic import compare, psi, routes_to_candidate

from tests.conftest import REPO


def test_params_default_to_rolling_and_bad_values_are_named() -> None:
    assert Strategy.from_params({}) == Strategy() and not Strategy().progressive
    s = Strategy.from_params({"rollout_strategy": "canary", "canary_percent": 5, "rollout_drill": "latency",
                              "rollout_limits": {"max_psi": 0.2, "max_candidate_errors": 2}})
    assert (s.name, s.canary_percent, s.drill, s.limits.max_psi, s.limits.max_candidate_errors) == \
        ("canary", 5.0, {"latency_ms": 250.0}, 0.2, 2)
    for bad, msg in [({"rollout_strategy": "blue"}, "rollout_strategy='blue'"), ({"canary_percent": 0}, "canary_percent=0"),
                     ({"bake_requests": 0}, "bake_requests=0"), ({"rollout_drill": "fire"}, "rollout_drill='fire'"),
                     ({"rollout_limits": {"max_psy": 1}}, r"unknown limit\(s\) \['max_psy'\]"),
                     ({"rollout_limits": {"max_psi": -1}}, "rollout_limits.max_psi=-1")]:
        with pytest.raises(ValueError, match=msg):
            Strategy.from_params(bad)


def test_dag_trigger_form_matches_the_code_defaults() -> None:
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(REPO / "dags")).dags["ctr_retrain"]
    p = {k: dag.params[k] for k in dag.params}
    assert Strategy.from_params(p) == Strategy()
    desc = dag.params.get_param("rollout_limits").description
    for f in dataclasses.fields(Limits):  # every limit and its default named in the form
        assert f"{f.name} ({f.default:g})" in desc, f.name
    assert set(dag.params.get_param("rollout_strategy").schema["enum"]) == {"rolling", "canary", "shadow"}


def test_router_share_is_deterministic_and_close_to_the_percent() -> None:
    ids = [f"req-{i}" for i in range(50_000)]
    for pct in (1, 10, 33.3, 50):
        share = sum(routes_to_candidate(i, pct) for i in ids) / len(ids) * 100
        assert abs(share - pct) < 0.6, (pct, share)
    assert [routes_to_candidate(i, 10) for i in ids[:200]] == [routes_to_candidate(i.encode(), 10) for i in ids[:200]]
    assert not any(routes_to_candidate(i, 0) for i in ids[:1000]) and all(routes_to_candidate(i, 100) for i in ids[:1000])


def test_histogram_quantile_and_canary_judgement() -> None:
    # 100 requests: 90 under 1 ms, 10 in (0.1, 0.25] s -> p99 interpolated inside that bucket
    assert quantile({0.001: 90, 0.1: 90, 0.25: 100, float("inf"): 100}, 0.99) == pytest.approx(0.1 + 0.15 * 9 / 10)
    assert quantile({0.001: 0, float("inf"): 0}, 0.99) is None
    before = {("2", "canary"): {"requests": 10, "errors": 0, "buckets": {0.001: 10, 0.25: 10, float("inf"): 10}}}
    after = {("2", "canary"): {"requests": 110, "errors": 5, "buckets": {0.001: 100, 0.25: 110, float("inf"): 110}},
             ("1", "champion"): {"requests": 400, "errors": 0, "buckets": {0.001: 400, 0.25: 400, float("inf"): 400}}}
    cand, champ = canary_window(before, after, "2", "canary"), canary_window({}, after, "1", "champion")
    assert (cand["requests"], cand["errors"], cand["error_rate"]) == (100, 5, 0.05)
    breaches = canary_breaches(cand, champ, Limits())
    assert len(breaches) == 2 and "candidate error rate 0.0500 (5/100)" in breaches[0] and "max_p99_increase_ms=50" in breaches[1]
    assert canary_breaches(cand, champ, Limits(max_error_rate_increase=0.1, max_p99_increase_ms=500)) == []
    assert "answered no requests" in canary_breaches(canary_window({}, {}, "3", "canary"), champ, Limits())[0]


def test_shadow_comparison_and_limits() -> None:
    rng = np.random.default_rng(5)
    a = rng.beta(2, 20, 5000)
    assert psi(a, a) == 0.0 and psi(a, a + 0.05) > 0.1 > psi(a, rng.beta(2, 20, 5000))
    doc = compare(a, a + 0.03)
    assert doc["mean_shift"] == pytest.approx(0.03) and doc["rows"] == 5000
    summary = {**doc, "requests": 10, "errors": 1, "last_error": "boom", "candidate_p99_ms": 80.0}
    names = [b.split("=")[0] for b in shadow_breaches(summary, Limits())]
    assert names == ["max_candidate_errors", "max_mean_shift", "max_psi", "max_candidate_p99_ms"]
    ok = {**compare(a, a), "requests": 10, "errors": 0, "last_error": None, "candidate_p99_ms": 1.0}
    assert shadow_breaches(ok, Limits()) == []
