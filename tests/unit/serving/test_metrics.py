"""ctr.serving.metrics on prometheus_client: families, types, bounded and escaped labels, bulk histogram."""

from __future__ import annotations

import numpy as np
import pytest
from ctr.serving.metrics import PROB_BUCKETS, Metrics
from prometheus_client import Histogram
from prometheus_client.parser import text_string_to_metric_families

ROUTES = ("/v1/score", "/invocations", "/healthz", "/metrics")


def families(m: Metrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(m.render().decode())}


def samples(fam) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}


def test_families_types_and_labels() -> None:
    m = Metrics(ROUTES)
    m.set_model("v1", 1234.5)
    m.observe_request("/v1/score", 200, 0.0007)
    m.observe_request("/v1/score", 200, 0.003)
    m.observe_request("/v1/score", 422, 0.0001)
    m.observe_request("/nope/" + "x" * 500, 404, 0.0001)
    m.observe_request("(headers)", 431, 0.0)
    m.observe_predictions(np.array([0.1]))
    m.observe_predictions(np.array([0.2, 0.96, 0.0]))
    f = families(m)
    types = {n: f[n].type for n in ("ctr_requests", "ctr_request_seconds", "ctr_rows_scored", "ctr_predicted_probability",
                                    "ctr_model_info", "ctr_model_loaded_timestamp_seconds", "ctr_inflight_requests")}
    assert types == {"ctr_requests": "counter", "ctr_request_seconds": "histogram", "ctr_rows_scored": "counter",
                     "ctr_predicted_probability": "histogram", "ctr_model_info": "gauge",
                     "ctr_model_loaded_timestamp_seconds": "gauge", "ctr_inflight_requests": "gauge"}
    req = samples(f["ctr_requests"])
    assert req == {("ctr_requests_total", (("route", "/v1/score"), ("status", "200"))): 2.0,
                   ("ctr_requests_total", (("route", "/v1/score"), ("status", "422"))): 1.0,
                   ("ctr_requests_total", (("route", "other"), ("status", "404"))): 1.0,
                   ("ctr_requests_total", (("route", "other"), ("status", "431"))): 1.0}
    lat = samples(f["ctr_request_seconds"])
    assert lat[("ctr_request_seconds_count", ())] == 5
    assert lat[("ctr_request_seconds_bucket", (("le", "0.0005"),))] == 3
    assert lat[("ctr_request_seconds_bucket", (("le", "0.001"),))] == 4
    assert lat[("ctr_request_seconds_sum", ())] == pytest.approx(0.0039)
    assert samples(f["ctr_rows_scored"]) == {("ctr_rows_scored_total", ()): 4.0}
    prob = samples(f["ctr_predicted_probability"])
    assert prob[("ctr_predicted_probability_count", ())] == 4
    assert prob[("ctr_predicted_probability_bucket", (("le", "0.1"),))] == 2  # 0.0 and 0.1 (le is inclusive)
    assert prob[("ctr_predicted_probability_bucket", (("le", "0.95"),))] == 3
    assert prob[("ctr_predicted_probability_sum", ())] == pytest.approx(1.26)
    assert samples(f["ctr_model_info"]) == {("ctr_model_info", (("version", "v1"),)): 1.0}
    assert samples(f["ctr_model_loaded_timestamp_seconds"]) == {("ctr_model_loaded_timestamp_seconds", ()): 1234.5}
    assert not any(n.endswith("_created") for fam in f.values() for n in (s.name for s in fam.samples))


def test_default_process_platform_and_gc_collectors() -> None:
    f = families(Metrics(ROUTES))
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds",
                 "python_info", "python_gc_objects_collected", "python_gc_collections"):
        assert name in f, name
    assert f["process_resident_memory_bytes"].samples[0].value > 1e6


def test_swap_replaces_the_model_info_series() -> None:
    m = Metrics(ROUTES)
    m.set_model("a", 1.0)
    m.set_model("b", 2.0)
    f = families(m)
    assert samples(f["ctr_model_info"]) == {("ctr_model_info", (("version", "b"),)): 1.0}
    assert samples(f["ctr_model_loaded_timestamp_seconds"]) == {("ctr_model_loaded_timestamp_seconds", ()): 2.0}


@pytest.mark.parametrize("version", ['a"b', "a\\b", "a\nb", "a\r\nb", "}\n# TYPE x counter\nx 1"])
def test_label_values_are_escaped_by_the_library(version: str) -> None:
    """Versions are strict since issue 21, but whatever reaches a label must come back intact."""
    m = Metrics(ROUTES)
    m.set_model(version, 1.0)
    text = m.render().decode()
    assert "\nx 1" not in text
    got = [s.labels["version"] for s in families(m)["ctr_model_info"].samples]
    assert got == [version]


def test_bulk_observation_equals_observe() -> None:
    rng = np.random.default_rng(22)
    p = np.concatenate([rng.random(5000), np.array(PROB_BUCKETS), np.array([0.0, 1e-12, 0.9999999])])
    m = Metrics(ROUTES)
    m.observe_predictions(p, "7")  # the per-version histogram takes the same counts
    m.observe_predictions(p[:1], "7")
    ref = Histogram("ctr_predicted_probability", "x", buckets=PROB_BUCKETS, registry=None)
    for v in np.concatenate([p, p[:1]]).tolist():
        ref.observe(v)
    got = {s.name + s.labels.get("le", ""): s.value for s in m.prob.collect()[0].samples}
    want = {s.name + s.labels.get("le", ""): s.value for s in ref.collect()[0].samples}
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12), k
    assert got["ctr_predicted_probability_count"] == len(p) + 1
    per_version = {s.name.replace("ctr_model_", "ctr_") + s.labels.get("le", ""): s.value
                   for s in m.version_prob.collect()[0].samples if s.labels.get("version") == "7"}
    assert per_version.keys() == want.keys()
    for k in want:
        assert per_version[k] == pytest.approx(want[k], rel=1e-12), k
    assert samples(families(m)["ctr_rows_scored"]) == {("ctr_rows_scored_total", ()): len(p) + 1.0}


def test_bad_multiprocess_dir_is_named(tmp_path) -> None:
    from ctr.serving.metrics import multiprocess_dir

    assert multiprocess_dir({}) is None
    assert multiprocess_dir({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}) == str(tmp_path)
    with pytest.raises(ValueError, match="PROMETHEUS_MULTIPROC_DIR=.*is not a directory"):
        multiprocess_dir({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "missing")})
