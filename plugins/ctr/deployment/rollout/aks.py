"""AKS rollout: render the manifests, server-side apply them, wait for the rolling update.

One Jinja template (templates/scorer.yaml.j2) renders the Deployment (readiness /readyz,
liveness /healthz, requests/limits, RollingUpdate with maxUnavailable 0), Service,
PodDisruptionBudget and HorizontalPodAutoscaler; the token Secret is referenced, never rendered.
The rollout is done when the Deployment's status has observed the new generation and all
replicas are updated and available. A rollout that crash-loops, exceeds its progress deadline
or our timeout is rolled back to the previous image, and RolloutError says why.

Credentials: a kubeconfig (the cncf-kubernetes provider's connection, or a file), or the AKS
cluster user credentials fetched with azure-mgmt-containerservice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from ctr.deployment.rollout.base import Release, RolloutError, RolloutResult, verify_endpoint
from ctr.deployment.rollout.progressive import Strategy, canary_breaches, canary_window, scrape

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("templates") / "scorer.yaml.j2"
KUBE_VERSION = "1.33.0"          # manifests are validated against this Kubernetes version's schemas
FIELD_MANAGER = "ctr-rollout"
AKS_AAD_SERVER_APP = "6dae42f8-4368-4678-94ff-3960e28e3630"  # the AKS AAD server application (kubelogin's)


@dataclass(frozen=True)
class AksConfig:
    namespace: str = "ctr"
    name: str = "ctr-scorer"
    replicas: int = 2
    max_replicas: int = 6
    port: int = 8080
    service_type: str = "ClusterIP"
    token_secret: str = "ctr-scorer-token"
    token_key: str = "token"
    cpu_request: str = "500m"
    cpu_limit: str = "1"
    memory_request: str = "512Mi"
    memory_limit: str = "1Gi"
    pdb_min_available: int = 1
    cpu_target_percent: int = 70
    progress_deadline_seconds: int = 300
    url: str = ""                  # how verify reaches the Service; default the in-cluster DNS name
    metrics_url: str = ""          # canary bake: every pod's metrics summed (e.g. Prometheus /federate); default url/metrics

    @property
    def service_url(self) -> str:
        return self.url or f"http://{self.name}.{self.namespace}.svc.cluster.local"


def render_manifests(image: str, version: str, cfg: AksConfig) -> list[dict[str, Any]]:
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
    text = env.from_string(TEMPLATE.read_text()).render(image=image, version=str(version), kube_version=KUBE_VERSION,
                                                        **asdict(cfg))
    return [d for d in yaml.safe_load_all(text) if d]


# ---- credentials -----------------------------------------------------------------------------
def api_client_from_kubeconfig(kubeconfig: dict[str, Any], context: str | None = None) -> Any:
    from kubernetes import config

    return config.new_client_from_config_dict(kubeconfig, context=context)


def kubeconfig_from_aks(credential: Any, subscription_id: str, resource_group: str, cluster: str,
                        arm_endpoint: str = "https://management.azure.com") -> dict[str, Any]:
    """Cluster user credentials; an AAD cluster's exec (kubelogin) user gets a token from `credential` instead."""
    from azure.mgmt.containerservice import ContainerServiceClient

    kw: dict[str, Any] = {"base_url": arm_endpoint}
    call: dict[str, Any] = {}
    if arm_endpoint.startswith(("http://127.0.0.1", "http://localhost")):  # loopback contract server only
        kw["credential_scopes"] = ["https://management.azure.com/.default"]
        call["enforce_https"] = False
    with ContainerServiceClient(credential, subscription_id, **kw) as cs:
        res = cs.managed_clusters.list_cluster_user_credentials(resource_group, cluster, **call)
    if not res.kubeconfigs:
        raise RolloutError(f"AKS {resource_group}/{cluster} returned no kubeconfig; does the identity have the "
                           "'Azure Kubernetes Service Cluster User Role'?")
    raw = res.kubeconfigs[0].value
    kc = yaml.safe_load(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)
    for u in kc.get("users", []):
        if "exec" in (u.get("user") or {}):  # AAD-integrated cluster: no kubelogin binary needed
            tok = credential.get_token(f"{AKS_AAD_SERVER_APP}/.default").token
            u["user"] = {"token": tok}
    return kc


# ---- rollout ---------------------------------------------------------------------------------
class AksRollout:
    """The `Rollout` of an AKS Deployment: apply the rendered manifests, wait, re-apply the previous image."""

    target = "aks"

    def __init__(self, api_client: Any, cfg: AksConfig | None = None, *, timeout: float = 600.0,
                 poll_interval: float = 2.0) -> None:
        from kubernetes import client

        self.cfg = cfg or AksConfig()
        self.api = api_client
        self.apps = client.AppsV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.policy = client.PolicyV1Api(api_client)
        self.autoscaling = client.AutoscalingV2Api(api_client)
        self.timeout, self.poll_interval = timeout, poll_interval
        self.strategy = Strategy()

    # ---- reads -------------------------------------------------------------------------------
    def current(self) -> dict[str, Any] | None:
        """{"image", "version", "generation"} of the live Deployment, or None when there is none."""
        from kubernetes.client.exceptions import ApiException

        try:
            d = self.apps.read_namespaced_deployment(self.cfg.name, self.cfg.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise RolloutError(f"reading deployment {self.cfg.namespace}/{self.cfg.name}: HTTP {e.status} {e.reason}") from None
        ann = d.metadata.annotations or {}
        return {"image": d.spec.template.spec.containers[0].image, "version": ann.get("ctr/model-version"),
                "generation": d.metadata.generation}

    def _check_secret(self) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            s = self.core.read_namespaced_secret(self.cfg.token_secret, self.cfg.namespace)
        except ApiException as e:
            if e.status == 404:
                raise RolloutError(f"secret {self.cfg.namespace}/{self.cfg.token_secret} is missing; create it with "
                                   f"`kubectl -n {self.cfg.namespace} create secret generic {self.cfg.token_secret} "
                                   f"--from-literal={self.cfg.token_key}=<token>`") from None
            raise
        if self.cfg.token_key not in (s.data or {}):
            raise RolloutError(f"secret {self.cfg.namespace}/{self.cfg.token_secret} has no key {self.cfg.token_key!r}")

    # ---- apply -------------------------------------------------------------------------------
    def apply(self, docs: list[dict[str, Any]], *, keep_replicas: bool) -> int:
        """Server-side apply every document; returns the Deployment's new metadata.generation."""
        ns, name = self.cfg.namespace, self.cfg.name
        kw = {"field_manager": FIELD_MANAGER, "force": True, "_content_type": "application/apply-patch+yaml"}
        generation = 0
        for doc in docs:
            kind = doc["kind"]
            if kind == "Deployment":
                if keep_replicas:  # the HPA owns the replica count once the Deployment exists
                    doc = {**doc, "spec": {k: v for k, v in doc["spec"].items() if k != "replicas"}}
                d = self.apps.patch_namespaced_deployment(name, ns, doc, **kw)
                generation = int(d.metadata.generation)
            elif kind == "Service":
                self.core.patch_namespaced_service(name, ns, doc, **kw)
            elif kind == "PodDisruptionBudget":
                self.policy.patch_namespaced_pod_disruption_budget(name, ns, doc, **kw)
            elif kind == "HorizontalPodAutoscaler":
                self.autoscaling.patch_namespaced_horizontal_pod_autoscaler(name, ns, doc, **kw)
            else:
                raise RolloutError(f"template rendered an unexpected kind {kind}")
            log.info("aks: applied %s %s/%s", kind, ns, name)
        return generation

    @property
    def url(self) -> str:
        return self.cfg.service_url

    def verify(self, release: Release, rows: pa.Table, token: str = "") -> dict[str, Any]:
        """A canary of `release` is baked and judged first (promoted, or removed + RolloutError)."""
        can = self.canary() if self.strategy.name == "canary" else None
        bake = self.bake(release) if can is not None and can["version"] == str(release.version) else None
        out = verify_endpoint(self.url, release.version, Path(release.bundle), rows, token=token)
        return {**out, "bake": bake} if bake is not None else out

    def deploy(self, release: Release) -> RolloutResult:
        if not release.image:
            raise ValueError("deploy_target=aks pulls the image from ACR: run with image_builder=acr")
        if self.strategy.name == "shadow":
            raise RolloutError("rollout_strategy=shadow runs on deploy_target=local only; on aks use canary or rolling")
        image, version = release.image, str(release.version)
        before = self.current()
        if self.strategy.name == "canary" and before and before["image"] != image:
            return self._deploy_canary(release, before)
        if before and before["image"] == image and before["version"] == str(version):
            try:
                self.wait(before["generation"], image)
                log.info("aks: %s/%s already runs %s", self.cfg.namespace, self.cfg.name, image)
                return RolloutResult(self.cfg.service_url, str(version), None, None, changed=False)
            except RolloutError:
                log.warning("aks: %s is applied but not healthy; re-applying", image)
        self._check_secret()
        gen = self.apply(render_manifests(image, version, self.cfg), keep_replicas=before is not None)
        log.info("aks: rolling %s/%s to %s (version %s, generation %d; previous %s)", self.cfg.namespace, self.cfg.name,
                 image, version, gen, before and before["image"])
        try:
            self.wait(gen, image)
        except RolloutError as e:
            if before and before["image"] != image:
                log.error("aks: rollout of %s failed (%s); rolling back to %s", image, e, before["image"])
                self._reapply(before["image"], before["version"])
                raise RolloutError(f"{e}; rolled back to {before['image']} (version {before['version']})") from None
            raise
        return RolloutResult(self.cfg.service_url, str(version), before and before["version"], before and before["image"])

    # ---- canary: a second Deployment behind the same Service -------------------------------------
    @property
    def canary_name(self) -> str:
        return f"{self.cfg.name}-canary"

    @staticmethod
    def canary_replicas(stable: int, percent: float) -> int:
        """Canary pods beside `stable` ones so that canary/(stable+canary) approximates `percent` (at least 1,
        at most `stable`: the stable Deployment, which the HPA and the PDB count on, is never scaled down)."""
        if percent >= 50:
            return max(1, stable)
        return max(1, min(stable, round(stable * percent / (100 - percent))))

    def canary_doc(self, image: str, version: str, replicas: int) -> dict[str, Any]:
        """The rendered Deployment renamed `<name>-canary`, its pods labelled `ctr/track: canary` besides
        the Service's selector label (so the Service sends them their share, and the PDB counts them)."""
        import copy

        dep = copy.deepcopy(next(d for d in render_manifests(image, version, self.cfg) if d["kind"] == "Deployment"))
        track = {"ctr/track": "canary"}
        dep["metadata"]["name"] = self.canary_name
        dep["metadata"]["labels"].update(track)
        dep["spec"]["replicas"] = replicas
        dep["spec"]["selector"]["matchLabels"].update(track)
        dep["spec"]["template"]["metadata"]["labels"].update(track)
        return dep

    def canary(self) -> dict[str, Any] | None:
        """{"image", "version", "replicas"} of the canary Deployment, or None."""
        from kubernetes.client.exceptions import ApiException

        try:
            d = self.apps.read_namespaced_deployment(self.canary_name, self.cfg.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return {"image": d.spec.template.spec.containers[0].image, "replicas": d.spec.replicas,
                "version": (d.metadata.annotations or {}).get("ctr/model-version")}

    def _deploy_canary(self, release: Release, before: dict[str, Any]) -> RolloutResult:
        image, version = str(release.image), str(release.version)
        stable = int(self.apps.read_namespaced_deployment(self.cfg.name, self.cfg.namespace).spec.replicas or 1)
        n = self.canary_replicas(stable, self.strategy.canary_percent)
        self._check_secret()
        kw = {"field_manager": FIELD_MANAGER, "force": True, "_content_type": "application/apply-patch+yaml"}
        d = self.apps.patch_namespaced_deployment(self.canary_name, self.cfg.namespace,
                                                  self.canary_doc(image, version, n), **kw)
        log.info("aks: canary %s/%s of %s with %d pod(s) beside %d stable (%.1f%% of pods for canary_percent %g)",
                 self.cfg.namespace, self.canary_name, image, n, stable, 100 * n / (n + stable),
                 self.strategy.canary_percent)
        try:
            self.wait(int(d.metadata.generation), image, name=self.canary_name)
        except RolloutError as e:
            self.remove_canary()
            raise RolloutError(f"{e}; canary removed, {before['image']} serves all traffic") from None
        return RolloutResult(self.cfg.service_url, version, before["version"], before["image"])

    def scale_canary(self, replicas: int) -> None:
        self.apps.patch_namespaced_deployment_scale(self.canary_name, self.cfg.namespace, {"spec": {"replicas": replicas}},
                                                    _content_type="application/merge-patch+json")

    def remove_canary(self) -> None:
        """Scale the canary to 0 (its share goes back to the stable pods), then delete it."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            self.scale_canary(0)
            self.apps.delete_namespaced_deployment(self.canary_name, self.cfg.namespace,
                                                   body=client.V1DeleteOptions(propagation_policy="Foreground"))
        except ApiException as e:
            if e.status != 404:
                raise
        log.warning("aks: canary %s/%s removed", self.cfg.namespace, self.canary_name)

    def judge(self, release: Release, champion: str, before: Any) -> tuple[list[str], dict[str, Any]]:
        """The canary's window from `metrics_url` (an endpoint summing every pod's /metrics, e.g. Prometheus
        federation; each pod reports its own model as role champion, so versions tell the two apart)."""
        after = scrape(self.metrics_url)
        cand = canary_window(before, after, str(release.version), "champion")
        champ = canary_window(before, after, champion, "champion")
        return canary_breaches(cand, champ, self.strategy.limits), {"candidate": cand, "champion": champ}

    @property
    def metrics_url(self) -> str:
        return self.cfg.metrics_url or f"{self.cfg.service_url}/metrics"

    def bake(self, release: Release) -> dict[str, Any]:
        """Watch the canary for bake_seconds; breach -> remove it (0%) and raise; pass -> roll the stable
        Deployment to the candidate image (the usual rolling update) and remove the canary."""
        cur = self.current() or {}
        champion = str(cur.get("version"))
        before = scrape(self.metrics_url)
        time.sleep(self.strategy.bake_seconds)
        breaches, numbers = self.judge(release, champion, before)
        if breaches:
            self.remove_canary()
            raise RolloutError(f"canary of version {release.version} breached {'; '.join(breaches)}; canary removed "
                               f"(0%), {cur.get('image')} (version {champion}) serves all traffic")
        gen = self.apply([d for d in render_manifests(str(release.image), str(release.version), self.cfg)
                          if d["kind"] == "Deployment"], keep_replicas=True)
        self.wait(gen, str(release.image))
        self.remove_canary()
        log.info("aks: canary of version %s within limits (%s); promoted to 100%%", release.version, numbers)
        return {"strategy": "canary", **numbers}

    def rollback(self, failed: Release | None, deployed: RolloutResult | None = None) -> RolloutResult | None:
        """Re-apply the image that ran before `failed` (`deployed.previous_ref`, as deploy reported it)."""
        can = self.canary()
        if can is not None and (failed is None or can["version"] == str(failed.version)):
            self.remove_canary()
            cur = self.current() or {}
            if cur.get("image") != (failed.image if failed else None):
                return RolloutResult(self.cfg.service_url, str(cur.get("version")), None, None)
        return self._reapply(deployed.previous_ref if deployed else None, deployed.previous_version if deployed else None)

    def _reapply(self, image: str | None, version: str | None) -> RolloutResult | None:
        if not image:
            log.warning("aks: no previous image recorded; leaving %s/%s as it is", self.cfg.namespace, self.cfg.name)
            return None
        gen = self.apply([d for d in render_manifests(image, str(version), self.cfg) if d["kind"] == "Deployment"],
                         keep_replicas=True)
        self.wait(gen, image)
        log.warning("aks: %s/%s serves %s (version %s) again", self.cfg.namespace, self.cfg.name, image, version)
        return RolloutResult(self.cfg.service_url, str(version), None, None)

    # ---- wait --------------------------------------------------------------------------------
    def wait(self, generation: int, image: str, name: str | None = None) -> dict[str, Any]:
        """Until observedGeneration >= generation and updated == available == replicas, like `kubectl rollout status`."""
        ns, name = self.cfg.namespace, name or self.cfg.name
        deadline = time.monotonic() + self.timeout
        last = ""
        while True:
            d = self.apps.read_namespaced_deployment_status(name, ns)
            st, want = d.status, d.spec.replicas or 0
            observed = st.observed_generation or 0
            updated, available, total = st.updated_replicas or 0, st.available_replicas or 0, st.replicas or 0
            progress = f"observedGeneration {observed}/{generation}, updated {updated}/{want}, available {available}/{want}, total {total}"
            if progress != last:
                log.info("aks: %s/%s %s", ns, name, progress)
                last = progress
            if observed >= generation:
                for c in st.conditions or []:
                    if c.type == "Progressing" and c.status == "False" and c.reason == "ProgressDeadlineExceeded":
                        raise RolloutError(f"deployment {ns}/{name} exceeded its progress deadline: {c.message}")
                if updated == want and available == want and total == want:
                    return {"generation": observed, "replicas": want}
                crash = self._crashing_pod(image)
                if crash:
                    raise RolloutError(f"new pods of {ns}/{name} are failing: {crash}")
            if time.monotonic() > deadline:
                raise RolloutError(f"deployment {ns}/{name} not rolled out within {self.timeout:.0f}s ({progress})")
            time.sleep(self.poll_interval)

    def _crashing_pod(self, image: str) -> str | None:
        """A pod of the new ReplicaSet in CrashLoopBackOff / image pull failure, described; else None."""
        sel = f"app.kubernetes.io/name={self.cfg.name}"
        for p in self.core.list_namespaced_pod(self.cfg.namespace, label_selector=sel).items:
            for cs in (p.status.container_statuses or []) if p.status else []:
                waiting = cs.state.waiting if cs.state else None
                if cs.image == image and waiting and waiting.reason in ("CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull",
                                                                        "CreateContainerConfigError"):
                    return f"pod {p.metadata.name} {waiting.reason} (restarts {cs.restart_count}): {waiting.message or ''}".strip()
        return None
