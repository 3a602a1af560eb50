"""AksRollout against a local server speaking the Kubernetes API (and AKS's credential call)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from azure.core.credentials import AccessToken
from ctr.deployment.rollout.aks import AksConfig, AksRollout, api_client_from_kubeconfig, kubeconfig_from_aks
from ctr.deployment.rollout.base import Release, RolloutError
from kubernetes import client

from tests.integration.fake_kube_api import TOKEN, FakeKube

pytestmark = pytest.mark.integration

V1 = "ctrprod.azurecr.io/ctr-scorer:1-aaaaaaaaaaaa"
V2 = "ctrprod.azurecr.io/ctr-scorer:2-bbbbbbbbbbbb"
BAD = "ctrprod.azurecr.io/ctr-scorer:3-cccccccccccc"
BUNDLE = Path("/unused/bundle")  # AKS pulls the image; the bundle path only matters to verify


def _api(fake: FakeKube, token: str = TOKEN) -> client.ApiClient:
    cfg = client.Configuration()
    cfg.host = fake.url
    cfg.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(cfg)


def _rollout(fake: FakeKube, timeout: float = 20.0, **cfg: object) -> AksRollout:
    return AksRollout(_api(fake), AksConfig(replicas=2, **cfg), timeout=timeout, poll_interval=0.01)


def test_rolling_update_waits_for_generation_and_replicas(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="ctr.deployment.rollout.aks")
    with FakeKube() as fake:
        r = _rollout(fake)
        first = r.deploy(Release("1", BUNDLE, V1))
        assert first.previous_ref is None and fake.image_of("ctr", "ctr-scorer") == V1
        second = r.deploy(Release("2", BUNDLE, V2))
        assert (second.version, second.previous_version, second.previous_ref) == ("2", "1", V1)
        assert second.url == "http://ctr-scorer.ctr.svc.cluster.local"
        assert fake.image_of("ctr", "ctr-scorer") == V2
        sim = fake.sims[("ctr", "ctr-scorer")]
        assert sim.min_available_during_rollout == 2  # maxUnavailable: 0 held throughout
        # every object went through server-side apply; the wait read the status subresource
        applied = {p for m, p, ct in fake.requests if m == "PATCH" and ct == "application/apply-patch+yaml"}
        assert applied == {"/apis/apps/v1/namespaces/ctr/deployments/ctr-scorer", "/api/v1/namespaces/ctr/services/ctr-scorer",
                           "/apis/policy/v1/namespaces/ctr/poddisruptionbudgets/ctr-scorer",
                           "/apis/autoscaling/v2/namespaces/ctr/horizontalpodautoscalers/ctr-scorer"}
        assert any(p.endswith("/deployments/ctr-scorer/status") for _, p, _ in fake.requests)
        # the wait did not stop before the controller observed the new generation
        assert "observedGeneration 1/2" in caplog.text and "updated 2/2, available 2/2, total 2" in caplog.text
        # same image again: nothing applied
        n = len([1 for m, *_ in fake.requests if m == "PATCH"])
        assert r.deploy(Release("2", BUNDLE, V2)).changed is False
        assert len([1 for m, *_ in fake.requests if m == "PATCH"]) == n


def test_replica_count_left_to_the_hpa_after_creation() -> None:
    with FakeKube() as fake:
        r = _rollout(fake)
        r.deploy(Release("1", BUNDLE, V1))
        fake.objects[("Deployment", "ctr", "ctr-scorer")]["spec"]["replicas"] = 4  # the HPA scaled out
        r.deploy(Release("2", BUNDLE, V2))
        assert fake.objects[("Deployment", "ctr", "ctr-scorer")]["spec"]["replicas"] == 4


def test_crash_looping_new_replicaset_is_rolled_back() -> None:
    with FakeKube(crashing={BAD}) as fake:
        r = _rollout(fake)
        r.deploy(Release("1", BUNDLE, V1))
        with pytest.raises(RolloutError) as e:
            r.deploy(Release("3", BUNDLE, BAD))
        assert "CrashLoopBackOff" in str(e.value) and f"rolled back to {V1}" in str(e.value)
        assert fake.image_of("ctr", "ctr-scorer") == V1
        assert r.current()["version"] == "1"
        assert fake.sims[("ctr", "ctr-scorer")].min_available_during_rollout == 2


def test_progress_deadline_is_a_failure() -> None:
    with FakeKube(crashing={BAD}, deadline_reads=2) as fake:
        r = _rollout(fake)
        r.deploy(Release("1", BUNDLE, V1))
        r._crashing_pod = lambda image: None  # type: ignore[method-assign]  # only the Deployment condition speaks
        with pytest.raises(RolloutError, match="exceeded its progress deadline.*rolled back"):
            r.deploy(Release("3", BUNDLE, BAD))
        assert fake.image_of("ctr", "ctr-scorer") == V1


def test_rollout_that_never_becomes_ready_times_out_and_rolls_back() -> None:
    with FakeKube(stuck={BAD}) as fake:
        r = _rollout(fake, timeout=0.5)
        r.deploy(Release("1", BUNDLE, V1))
        r.timeout = 0.5
        t0 = time.monotonic()
        with pytest.raises(RolloutError, match="not rolled out within 0s"):
            r.deploy(Release("3", BUNDLE, BAD))
        assert time.monotonic() - t0 < 15
        assert fake.image_of("ctr", "ctr-scorer") == V1


def test_verify_failure_rollback_restores_previous_image() -> None:
    with FakeKube() as fake:
        r = _rollout(fake)
        r.deploy(Release("1", BUNDLE, V1))
        res = r.deploy(Release("2", BUNDLE, V2))
        back = r.rollback(Release("2", BUNDLE, V2), res)
        assert back is not None and back.version == "1"
        assert fake.image_of("ctr", "ctr-scorer") == V1 and r.current()["version"] == "1"


def test_missing_token_secret_is_named_and_nothing_applied() -> None:
    with FakeKube(secrets={}) as fake:
        with pytest.raises(RolloutError, match="secret ctr/ctr-scorer-token is missing.*kubectl -n ctr create secret"):
            _rollout(fake).deploy(Release("1", BUNDLE, V1))
        assert not [m for m, *_ in fake.requests if m == "PATCH"]


def test_wrong_token_is_refused() -> None:
    from kubernetes.client.exceptions import ApiException

    with FakeKube() as fake:
        r = AksRollout(_api(fake, token="wrong"), AksConfig())
        with pytest.raises((ApiException, RolloutError), match="401|Unauthorized"):
            r.deploy(Release("1", BUNDLE, V1))


class AadCredential:
    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        # the AKS AAD server app scope gets the cluster token; ARM gets another
        tok = TOKEN if scopes == ("6dae42f8-4368-4678-94ff-3960e28e3630/.default",) else "arm-token"
        return AccessToken(tok, int(time.time()) + 3600)


def test_credentials_fetched_from_aks_drive_the_rollout() -> None:
    with FakeKube() as fake:
        kc = kubeconfig_from_aks(AadCredential(), "sub-1", "rg-ctr", "aks-ctr", arm_endpoint=fake.url)
        assert kc["users"][0]["user"] == {"token": TOKEN}  # kubelogin exec replaced by an AAD token
        r = AksRollout(api_client_from_kubeconfig(kc), AksConfig(replicas=2), timeout=20, poll_interval=0.01)
        assert r.deploy(Release("1", BUNDLE, V1)).version == "1"
        assert ("POST", "/subscriptions/sub-1/resourceGroups/rg-ctr/providers/Microsoft.ContainerService/managedClusters/"
                "aks-ctr/listClusterUserCredential", "") in [(m, p, "") for m, p, _ in fake.requests]


def test_canary_deployment_beside_the_stable_one_is_promoted_or_removed_on_breach(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import ctr.deployment.rollout.aks as aks
    from ctr.deployment.rollout.progressive import Strategy

    monkeypatch.setattr(aks, "scrape", lambda url: {})  # no pods to scrape in the fake: `judge` is replaced below
    with FakeKube() as fake:
        r = AksRollout(_api(fake), AksConfig(replicas=4), timeout=20, poll_interval=0.01)
        r.deploy(Release("1", BUNDLE, V1))
        r.strategy = Strategy("canary", canary_percent=20, bake_seconds=0.01)
        res = r.deploy(Release("2", BUNDLE, V2))
        assert (res.version, res.previous_version, res.previous_ref) == ("2", "1", V1)
        can = fake.objects[("Deployment", "ctr", "ctr-scorer-canary")]
        svc = fake.objects[("Service", "ctr", "ctr-scorer")]["spec"]["selector"]
        assert fake.image_of("ctr", "ctr-scorer") == V1 and fake.image_of("ctr", "ctr-scorer-canary") == V2
        assert can["spec"]["replicas"] == 1 and AksRollout.canary_replicas(4, 20) == 1  # 1 of 5 pods = 20%
        assert svc.items() <= can["spec"]["template"]["metadata"]["labels"].items()  # the same Service sends it traffic
        assert can["spec"]["selector"]["matchLabels"]["ctr/track"] == "canary"
        assert fake.sims[("ctr", "ctr-scorer")].min_available_during_rollout in (None, 4)  # stable untouched

        # pass: the stable Deployment rolls to V2 and the canary is scaled to 0 and deleted
        r.judge = lambda release, champion, before: ([], {"candidate": {"version": release.version}})  # type: ignore[method-assign]
        assert r.bake(Release("2", BUNDLE, V2))["strategy"] == "canary"
        assert fake.image_of("ctr", "ctr-scorer") == V2 and ("Deployment", "ctr", "ctr-scorer-canary") not in fake.objects
        scaled = [p for m, p, ct in fake.requests if m == "PATCH" and p.endswith("/ctr-scorer-canary/scale")]
        deleted = [p for m, p, _ in fake.requests if m == "DELETE"]
        assert scaled and deleted == ["/apis/apps/v1/namespaces/ctr/deployments/ctr-scorer-canary"]

        # breach: the canary is removed, the stable keeps V2, the error names the limit
        r.deploy(Release("3", BUNDLE, BAD))
        assert fake.image_of("ctr", "ctr-scorer-canary") == BAD
        r.judge = lambda release, champion, before: (["max_p99_increase_ms=50: candidate p99 260.0 ms vs champion 4.0 ms"], {})  # type: ignore[method-assign]
        with pytest.raises(RolloutError, match=r"breached max_p99_increase_ms=50.*canary removed \(0%\).*version 2"):
            r.bake(Release("3", BUNDLE, BAD))
        assert fake.image_of("ctr", "ctr-scorer") == V2 and ("Deployment", "ctr", "ctr-scorer-canary") not in fake.objects
        # rollback with no canary left re-applies the image before (nothing to do: V2 is already there)
        assert r.canary() is None
