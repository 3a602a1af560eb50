"""A local HTTP server speaking the Kubernetes API calls AksRollout makes, plus AKS's credential call.

Kubernetes (JSON, bearer auth): server-side apply (PATCH application/apply-patch+yaml with
fieldManager) of apps/v1 Deployments, core/v1 Services, policy/v1 PodDisruptionBudgets and
autoscaling/v2 HorizontalPodAutoscalers; GET of a Deployment and its /status; lists of
ReplicaSets and Pods by label selector; GET of Secrets; the `/scale` subresource of a Deployment
(merge patch) and DELETE of a Deployment (a V1DeleteOptions body; answers a Status). A small deployment controller runs one
step per /status read: a new ReplicaSet surges pods in, honouring the applied
`maxUnavailable`/`maxSurge`, and the old one scales down. Images in `crashing` never become
ready (their pods go CrashLoopBackOff and the Deployment reports ProgressDeadlineExceeded
after `deadline_reads`); images in `stuck` never become ready and report nothing.
ARM: POST .../managedClusters/{name}/listClusterUserCredential returns a kubeconfig for this server.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

from tests.loopback import LoopbackServer

TOKEN = "fake-kube-token"
KINDS = {  # path segment -> (apiVersion, kind)
    ("apis/apps/v1", "deployments"): "Deployment",
    ("api/v1", "services"): "Service",
    ("apis/policy/v1", "poddisruptionbudgets"): "PodDisruptionBudget",
    ("apis/autoscaling/v2", "horizontalpodautoscalers"): "HorizontalPodAutoscaler",
}


@dataclass
class ReplicaSet:
    name: str
    image: str
    revision: int
    ready: int = 0
    starting: int = 0
    restarts: int = 0


@dataclass
class DeploymentSim:
    generation: int = 1
    observed: int = 0
    reads_since_change: int = 0
    sets: list[ReplicaSet] = field(default_factory=list)
    min_available_during_rollout: int | None = None
    deadline_exceeded: bool = False


class FakeKube(LoopbackServer):
    def __init__(self, *, crashing: set[str] | None = None, stuck: set[str] | None = None, deadline_reads: int = 6,
                 secrets: dict[tuple[str, str], dict[str, str]] | None = None) -> None:
        self.crashing, self.stuck = crashing or set(), stuck or set()
        self.deadline_reads = deadline_reads
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}   # (kind, ns, name) -> object
        self.sims: dict[tuple[str, str], DeploymentSim] = {}
        self.secrets = secrets if secrets is not None else {("ctr", "ctr-scorer-token"): {"token": "czNjcjN0"}}
        self.requests: list[tuple[str, str, str]] = []                  # (method, path, content-type)
        self.lock = threading.Lock()
        self._serve(self._handler())

    def kubeconfig(self, token: str = TOKEN) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Config", "current-context": "aks",
                "clusters": [{"name": "aks", "cluster": {"server": self.url}}],
                "users": [{"name": "clusterUser", "user": {"token": token}}],
                "contexts": [{"name": "aks", "context": {"cluster": "aks", "user": "clusterUser"}}]}

    def image_of(self, ns: str, name: str) -> str:
        return self.objects[("Deployment", ns, name)]["spec"]["template"]["spec"]["containers"][0]["image"]

    # ---- the deployment controller ---------------------------------------------------------
    def _step(self, ns: str, name: str) -> None:
        dep = self.objects[("Deployment", ns, name)]
        sim = self.sims[(ns, name)]
        want = dep["spec"]["replicas"]
        ru = dep["spec"].get("strategy", {}).get("rollingUpdate", {})
        max_unavail, max_surge = int(ru.get("maxUnavailable", 1)), int(ru.get("maxSurge", 1))
        sim.reads_since_change += 1
        if sim.reads_since_change == 1:
            return  # the controller has not observed the new generation yet
        sim.observed = sim.generation
        new, olds = sim.sets[-1], sim.sets[:-1]
        broken = new.image in self.crashing or new.image in self.stuck
        if broken:
            new.starting = max(new.starting, min(max_surge, want))
            if new.image in self.crashing:
                new.restarts += 1
            # pods an unavailability budget lets go are terminated even though new ones are not ready
            for rs in olds:
                cut = min(rs.ready, max(0, max_unavail - 0))
                rs.ready -= cut
                max_unavail -= cut
            if new.image in self.crashing and sim.reads_since_change > self.deadline_reads:
                sim.deadline_exceeded = True
        else:
            # pods started last step are ready now; unready pods of older sets go first
            new.ready, new.starting = new.ready + new.starting, 0
            for rs in olds:
                rs.starting = 0
            old_ready = sum(rs.ready for rs in olds)
            excess = new.ready + old_ready - want
            for rs in olds:  # scale old down by what is now surplus plus the unavailability budget
                cut = min(rs.ready, max(0, excess) + max_unavail)
                rs.ready -= cut
                excess -= cut
                max_unavail = 0
            room = want + max_surge - (new.ready + sum(rs.ready for rs in olds))
            new.starting = max(0, min(room, want - new.ready))
        available = sum(rs.ready for rs in sim.sets)
        if sim.min_available_during_rollout is None or available < sim.min_available_during_rollout:
            sim.min_available_during_rollout = available

    def _status(self, ns: str, name: str) -> dict[str, Any]:
        sim, dep = self.sims[(ns, name)], self.objects[("Deployment", ns, name)]
        new = sim.sets[-1]
        total = sum(rs.ready + rs.starting for rs in sim.sets)
        available = sum(rs.ready for rs in sim.sets)
        cond = [{"type": "Available", "status": "True" if available >= dep["spec"]["replicas"] else "False",
                 "reason": "MinimumReplicasAvailable", "message": "Deployment has minimum availability."}]
        if sim.deadline_exceeded:
            cond.append({"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                         "message": f'ReplicaSet "{new.name}" has timed out progressing.'})
        else:
            cond.append({"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
                         "message": f'ReplicaSet "{new.name}" is progressing.'})
        st = {"observedGeneration": sim.observed, "replicas": total, "updatedReplicas": new.ready + new.starting,
              "readyReplicas": available, "availableReplicas": available, "conditions": cond}
        if total - available:
            st["unavailableReplicas"] = total - available
        return st

    def _apply_deployment(self, ns: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        key = ("Deployment", ns, name)
        old = self.objects.get(key)
        obj = copy.deepcopy(body)
        if old is not None and "replicas" not in obj["spec"]:
            obj["spec"]["replicas"] = old["spec"]["replicas"]
        obj["spec"].setdefault("replicas", 1)
        image = obj["spec"]["template"]["spec"]["containers"][0]["image"]
        sim = self.sims.setdefault((ns, name), DeploymentSim())
        if old is None:
            sim.sets.append(ReplicaSet(self._rs_name(name, obj), image, 1, starting=0))
            sim.sets[-1].ready = 0 if (image in self.crashing or image in self.stuck) else obj["spec"]["replicas"]
            sim.observed = 0
        elif old["spec"]["template"] != obj["spec"]["template"]:
            sim.generation += 1
            sim.reads_since_change = 0
            sim.deadline_exceeded = False
            sim.min_available_during_rollout = None
            sim.sets.append(ReplicaSet(self._rs_name(name, obj), image, len(sim.sets) + 1))
        elif old["spec"] != obj["spec"]:
            sim.generation += 1
        meta = obj.setdefault("metadata", {})
        meta.update(generation=sim.generation, uid=(old or {}).get("metadata", {}).get("uid", str(uuid.uuid4())),
                    resourceVersion=str(len(self.requests)), creationTimestamp="2026-11-26T02:00:00Z")
        self.objects[key] = obj
        return {**obj, "status": self._status(ns, name)}

    def _scale(self, ns: str, name: str, replicas: int) -> None:
        """The scale subresource: the desired count changes; surplus pods go at once (no template change)."""
        self.objects[("Deployment", ns, name)]["spec"]["replicas"] = replicas
        sim = self.sims[(ns, name)]
        sim.generation += 1
        for rs in sim.sets:
            rs.ready, rs.starting = min(rs.ready, replicas), 0

    @staticmethod
    def _rs_name(name: str, obj: dict[str, Any]) -> str:
        return f"{name}-{hashlib.sha256(json.dumps(obj['spec']['template'], sort_keys=True).encode()).hexdigest()[:10]}"

    def _pods(self, ns: str, name: str) -> list[dict[str, Any]]:
        dep = self.objects[("Deployment", ns, name)]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        pods = []
        for rs in self.sims[(ns, name)].sets:
            for i in range(rs.ready + rs.starting):
                ready = i < rs.ready
                if ready:
                    state: dict[str, Any] = {"running": {"startedAt": "2026-11-26T02:00:00Z"}}
                elif rs.image in self.crashing and rs.restarts > 1:
                    state = {"waiting": {"reason": "CrashLoopBackOff",
                                         "message": "back-off 40s restarting failed container=scorer"}}
                else:
                    state = {"waiting": {"reason": "ContainerCreating"}}
                pods.append({"apiVersion": "v1", "kind": "Pod",
                             "metadata": {"name": f"{rs.name}-{i:05d}", "namespace": ns,
                                          "labels": {**labels, "pod-template-hash": rs.name.rsplit("-", 1)[1]},
                                          "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                                               "name": rs.name, "uid": rs.name, "controller": True}]},
                             "spec": {"containers": [{"name": "scorer", "image": rs.image}]},
                             "status": {"phase": "Running" if ready or rs.image in self.crashing else "Pending",
                                        "containerStatuses": [{"name": "scorer", "image": rs.image, "imageID": "",
                                                               "ready": ready, "restartCount": rs.restarts if not ready else 0,
                                                               "state": state}]}})
        return pods

    # ---- HTTP --------------------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _json(self, code: int, doc: Any) -> None:
                body = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._json(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                  "message": message, "reason": reason, "code": code})

            def _route(self) -> None:
                u = urlparse(self.path)
                q = {k: v[0] for k, v in parse_qs(u.query).items()}
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                with fake.lock:
                    fake.requests.append((self.command, u.path, self.headers.get("Content-Type", "")))
                    if u.path.startswith("/subscriptions/"):
                        return self._arm(u.path)
                    if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                        return self._status(401, "Unauthorized", "Unauthorized")
                    return self._kube(u.path, q, body)

            do_GET = do_PATCH = do_POST = do_PUT = do_DELETE = _route

            def _arm(self, path: str) -> None:
                if not re.fullmatch(r"/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft.ContainerService/"
                                    r"managedClusters/[^/]+/listClusterUserCredential", path) or self.command != "POST":
                    return self._json(404, {"error": {"code": "NotFound", "message": path}})
                if not self.headers.get("Authorization", "").startswith("Bearer "):
                    return self._json(401, {"error": {"code": "AuthenticationFailed", "message": "no token"}})
                kc = fake.kubeconfig()
                kc["users"][0]["user"] = {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1",
                                                   "command": "kubelogin", "args": ["get-token", "--server-id",
                                                                                    "6dae42f8-4368-4678-94ff-3960e28e3630"]}}
                value = base64.b64encode(yaml.safe_dump(kc).encode()).decode()
                self._json(200, {"kubeconfigs": [{"name": "clusterUser", "value": value}]})

            def _kube(self, path: str, q: dict[str, str], body: bytes) -> None:
                m = re.fullmatch(r"/(?P<gv>api/v1|apis/[^/]+/[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<res>[a-z]+)"
                                 r"(?:/(?P<name>[^/]+))?(?P<sub>/status|/scale)?", path)
                if not m:
                    return self._status(404, "NotFound", f"the server could not find the requested resource ({path})")
                gv, ns, res, name, sub = m["gv"], m["ns"], m["res"], m["name"], m["sub"]
                if res == "secrets" and self.command == "GET" and name:
                    data = fake.secrets.get((ns, name))
                    if data is None:
                        return self._status(404, "NotFound", f'secrets "{name}" not found')
                    return self._json(200, {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                            "metadata": {"name": name, "namespace": ns}, "data": data})
                if res in ("pods", "replicasets") and self.command == "GET" and not name:
                    return self._list(gv, ns, res, q.get("labelSelector", ""))
                kind = KINDS.get((gv, res))
                if kind is None or not name:
                    return self._status(404, "NotFound", f"{self.command} {path} is not served by the fake")
                if kind == "Deployment" and (sub == "/scale" or self.command == "DELETE"):
                    if (kind, ns, name) not in fake.objects:
                        return self._status(404, "NotFound", f'deployments.apps "{name}" not found')
                    if self.command == "DELETE":
                        json.loads(body or b"{}")  # V1DeleteOptions
                        del fake.objects[(kind, ns, name)]
                        del fake.sims[(ns, name)]
                        return self._json(200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                                "details": {"name": name, "group": "apps", "kind": "deployments"}})
                    if self.command == "PATCH":
                        if self.headers.get("Content-Type") != "application/merge-patch+json":
                            return self._status(415, "UnsupportedMediaType", "scale takes a merge patch here")
                        fake._scale(ns, name, int(json.loads(body)["spec"]["replicas"]))
                    n = fake.objects[(kind, ns, name)]["spec"]["replicas"]
                    return self._json(200, {"kind": "Scale", "apiVersion": "autoscaling/v1",
                                            "metadata": {"name": name, "namespace": ns},
                                            "spec": {"replicas": n}, "status": {"replicas": n}})
                if self.command == "PATCH":
                    return self._apply(kind, ns, name, q, body)
                if self.command == "GET":
                    obj = fake.objects.get((kind, ns, name))
                    if obj is None:
                        return self._status(404, "NotFound", f'{res}.{gv.split("/")[-2]} "{name}" not found')
                    if kind == "Deployment":
                        if sub:
                            fake._step(ns, name)
                        return self._json(200, {**obj, "status": fake._status(ns, name)})
                    return self._json(200, obj)
                self._status(405, "MethodNotAllowed", f"{self.command} not allowed")

            def _apply(self, kind: str, ns: str, name: str, q: dict[str, str], body: bytes) -> None:
                if self.headers.get("Content-Type") != "application/apply-patch+yaml":
                    return self._status(415, "UnsupportedMediaType", "the fake only serves server-side apply")
                if not q.get("fieldManager"):
                    return self._status(422, "Invalid", "fieldManager is required for apply patch")
                doc = yaml.safe_load(body)
                if doc.get("kind") != kind or doc.get("metadata", {}).get("name") != name:
                    return self._status(400, "BadRequest", "body kind/name do not match the URL")
                if kind == "Deployment":
                    return self._json(200, fake._apply_deployment(ns, name, doc))
                obj = copy.deepcopy(doc)
                if kind == "Service":
                    prev = fake.objects.get((kind, ns, name))
                    obj["spec"]["clusterIP"] = prev["spec"]["clusterIP"] if prev else "10.0.113.7"
                fake.objects[(kind, ns, name)] = obj
                self._json(200, obj)

            def _list(self, gv: str, ns: str, res: str, selector: str) -> None:
                want = dict(kv.split("=", 1) for kv in selector.split(",") if kv)
                items: list[dict[str, Any]] = []
                for (kind, ons, name), dep in fake.objects.items():
                    if kind != "Deployment" or ons != ns:
                        continue
                    pods = fake._pods(ns, name)
                    if res == "pods":
                        items += [p for p in pods if want.items() <= p["metadata"]["labels"].items()]
                    else:
                        for rs in fake.sims[(ns, name)].sets:
                            labels = {**dep["spec"]["template"]["metadata"]["labels"],
                                      "pod-template-hash": rs.name.rsplit("-", 1)[1]}
                            if want.items() <= labels.items():
                                items.append({"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                              "metadata": {"name": rs.name, "namespace": ns, "labels": labels,
                                                           "annotations": {"deployment.kubernetes.io/revision": str(rs.revision)}},
                                              "spec": {"replicas": rs.ready + rs.starting, "selector": {"matchLabels": labels},
                                                       "template": {"metadata": {"labels": labels},
                                                                    "spec": {"containers": [{"name": "scorer", "image": rs.image}]}}},
                                              "status": {"replicas": rs.ready + rs.starting, "readyReplicas": rs.ready,
                                                         "availableReplicas": rs.ready}})
                kind = "PodList" if res == "pods" else "ReplicaSetList"
                self._json(200, {"apiVersion": gv.removeprefix("apis/").removeprefix("api/"), "kind": kind,
                                 "metadata": {"resourceVersion": "1"}, "items": items})

        return H
