"""Live gauges per model version, and the Prometheus alert rules in deploy/: valid rule-file shape, and every
metric they use is one the service exports."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import yaml
from ctr.serving.metrics import Metrics
from prometheus_client.parser import text_string_to_metric_families

RULES = Path(__file__).resolve().parents[3] / "deploy" / "prometheus" / "ctr-alerts.yaml"


def _exported() -> set[str]:
    m = Metrics(["/v1/score"])
    m.observe_request("/v1/score", 200, 0.001)
    m.observe_predictions(np.array([0.2, 0.3]), "7")
    m.set_model("7", 0.0)
    return {s.name for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}


def test_rules_parse_and_name_only_exported_metrics() -> None:
    doc = yaml.safe_load(RULES.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"CtrScoringErrorRate", "CtrScoringLatencyP99", "CtrMeanScoreShift",
                                           "CtrPredictionLogDropping"}
    exported = _exported()
    for r in rules:
        assert set(r) >= {"alert", "expr", "for", "labels", "annotations"} and r["labels"]["severity"]
        assert re.fullmatch(r"\d+[smhd]", r["for"]) and r["annotations"]["summary"]
        expr = r["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), r["alert"]
        names = set(re.findall(r"\b(ctr_[a-z_]+)\b", expr))
        assert names and names <= exported, (r["alert"], names - exported)
        labels = set(re.findall(r"by \(([a-z_, ]+)\)", expr)) | set(re.findall(r"\{([a-z_]+)=", expr))
        assert {x.strip() for lab in labels for x in lab.split(",")} <= {"le", "version", "reason", "status", "route"}


def test_count_mean_and_histogram_per_model_version() -> None:
    m = Metrics(["/v1/score"])
    m.observe_predictions(np.array([0.1, 0.3, 0.5]), "7")
    m.observe_predictions(np.array([0.9]), "8")
    m.observe_predictions(np.array([0.2]), "7")
    got = {(s.name, s.labels.get("version"), s.labels.get("le")): s.value
           for f in text_string_to_metric_families(m.render().decode()) for s in f.samples
           if s.name.startswith("ctr_model_predicted_probability")}
    assert got[("ctr_model_predicted_probability_count", "7", None)] == 4
    assert abs(got[("ctr_model_predicted_probability_sum", "7", None)] / 4 - np.mean([0.1, 0.3, 0.5, 0.2])) < 1e-12
    assert got[("ctr_model_predicted_probability_count", "8", None)] == 1
    assert got[("ctr_model_predicted_probability_bucket", "7", "0.25")] == 2  # 0.1, 0.2
    assert got[("ctr_model_predicted_probability_bucket", "8", "0.85")] == 0
