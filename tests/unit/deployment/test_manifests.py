"""The AKS manifests: valid for the pinned Kubernetes version, and saying what the rollout relies on."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest
from ctr.deployment.rollout.aks import KUBE_VERSION, AksConfig, render_manifests

IMAGE = "ctrprod.azurecr.io/ctr-scorer:7-0123456789ab"


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    return {d["kind"]: d for d in render_manifests(IMAGE, "7", AksConfig(namespace="ctr-prod", replicas=3))}


def test_every_manifest_validates_strictly_against_pinned_kubernetes(docs) -> None:
    assert set(docs) == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    for d in docs.values():
        assert kubernetes_validate.validate(d, KUBE_VERSION, strict=True) == "1.33"


def test_validation_rejects_a_broken_manifest(docs) -> None:
    bad = copy.deepcopy(docs["Deployment"])
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)


def test_deployment_probes_resources_and_zero_downtime_strategy(docs) -> None:
    dep = docs["Deployment"]
    assert dep["metadata"]["namespace"] == "ctr-prod" and dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"] == IMAGE
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert set(c["resources"]) == {"requests", "limits"} and set(c["resources"]["limits"]) == {"cpu", "memory"}
    token = next(e for e in c["env"] if e["name"] == "CTR_SERVE_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "ctr-scorer-token", "key": "token"}
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    # a read-only root: CTR_HOME (compiled-predictor cache, prediction log files) is the pod's emptyDir
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    home = next(e["value"] for e in c["env"] if e["name"] == "CTR_HOME")
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == home]
    (vol,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in vol and not mount.get("readOnly")
    assert dep["metadata"]["annotations"]["ctr/model-version"] == "7"
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_service_pdb_hpa_point_at_the_deployment(docs) -> None:
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert docs["Service"]["spec"]["selector"].items() <= pod_labels.items()
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ctr-scorer"}
    assert hpa["minReplicas"] == 3 and hpa["maxReplicas"] >= hpa["minReplicas"]


def test_no_secret_value_is_rendered(docs) -> None:
    assert "Secret" not in docs
    (c,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert all("value" not in e for e in c["env"] if "TOKEN" in e["name"])
