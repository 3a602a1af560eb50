"""Build the scoring image in Azure Container Registry with ACR Tasks.

The flow is the one `az acr build` follows, through the management SDKs:
1. `registries.get` (azure-mgmt-containerregistry) gives the login server;
2. the tag is looked up on the registry (OCI distribution API, ACR token exchange): an existing
   tag is never rebuilt, since the tag is content-addressed;
3. `registries.get_build_source_upload_url` (azure-mgmt-containerregistrytasks) gives a blob SAS
   URL; the context goes there as a deterministic tar.gz;
4. `registries.schedule_run` queues a `DockerBuildRequest` that pushes the tag;
5. `runs.get` is polled until the run ends, and the log behind `runs.get_log_sas_url` is streamed
   into our log as it grows; a failed run raises with the tail of its log.
"""

from __future__ import annotations

import gzip
import io
import logging
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from ctr.deployment.image import ImageContext

log = logging.getLogger(__name__)

ARM_ENDPOINT = "https://management.azure.com"
ARM_SCOPE = "https://management.azure.com/.default"
TERMINAL = {"Succeeded", "Failed", "Canceled", "Error", "Timeout"}
MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json", "application/vnd.docker.distribution.manifest.v2+json",
])


class AcrBuildError(RuntimeError):
    """An ACR run that did not succeed; the message carries its id, status and the tail of its log."""


@dataclass(frozen=True)
class AcrTarget:
    subscription_id: str
    resource_group: str
    registry: str
    arm_endpoint: str = ARM_ENDPOINT     # another cloud, or a local contract-test server
    registry_url: str = ""               # data-plane base URL; default https://<loginServer>


def context_tarball(root: Path) -> bytes:
    """tar.gz of the build context with fixed mtimes/owners: the same folder gives the same bytes."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for p in sorted(root.rglob("*")):
            if not p.is_file():
                continue
            info = tarfile.TarInfo(p.relative_to(root).as_posix())
            data = p.read_bytes()
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class AcrBuilder:
    """Owns the ARM clients and the HTTP client for one registry."""

    def __init__(self, credential: Any, target: AcrTarget, *, poll_interval: float = 5.0, timeout: float = 3600.0,
                 on_log: Callable[[str], None] | None = None) -> None:
        from azure.mgmt.containerregistry import ContainerRegistryManagementClient
        from azure.mgmt.containerregistrytasks import ContainerRegistryTasksMgmtClient

        self.credential = credential
        self.t = target
        self.poll_interval, self.timeout = poll_interval, timeout
        self.on_log = on_log or (lambda line: log.info("acr: %s", line))
        kw: dict[str, Any] = {"base_url": target.arm_endpoint}
        if target.arm_endpoint != ARM_ENDPOINT:
            kw["credential_scopes"] = [ARM_SCOPE]
        self.registries = ContainerRegistryManagementClient(credential, target.subscription_id, **kw)
        self.tasks = ContainerRegistryTasksMgmtClient(credential, target.subscription_id, **kw)
        # azure-core refuses bearer tokens over plain http; allowed only for a loopback contract server
        host = urlparse(target.arm_endpoint).hostname
        self._call: dict[str, Any] = {"enforce_https": False} if target.arm_endpoint.startswith("http://") and host in (
            "127.0.0.1", "localhost") else {}
        self.http = httpx.Client(timeout=60)

    def close(self) -> None:
        self.http.close()
        self.registries.close()
        self.tasks.close()

    # ---- registry --------------------------------------------------------------------------
    def login_server(self) -> str:
        reg = self.registries.registries.get(self.t.resource_group, self.t.registry, **self._call)
        if not reg.properties or not reg.properties.login_server:
            raise AcrBuildError(f"registry {self.t.registry} in {self.t.resource_group} reports no login server")
        return str(reg.properties.login_server)

    def _registry_url(self, login_server: str) -> str:
        return self.t.registry_url.rstrip("/") or f"https://{login_server}"

    def tag_exists(self, login_server: str, repository: str, tag: str) -> bool:
        """HEAD the manifest with an ACR access token from the AAD token exchange."""
        base = self._registry_url(login_server)
        aad = self.credential.get_token(ARM_SCOPE).token
        r = self.http.post(f"{base}/oauth2/exchange", data={"grant_type": "access_token", "service": login_server,
                                                              "access_token": aad})
        _raise_for(r, f"ACR token exchange at {base}/oauth2/exchange (does the identity have AcrPull on {self.t.registry}?)")
        refresh = r.json()["refresh_token"]
        r = self.http.post(f"{base}/oauth2/token", data={"grant_type": "refresh_token", "service": login_server,
                                                           "scope": f"repository:{repository}:pull", "refresh_token": refresh})
        _raise_for(r, f"ACR access token for repository {repository}")
        token = r.json()["access_token"]
        r = self.http.head(f"{base}/v2/{repository}/manifests/{tag}",
                           headers={"Authorization": f"Bearer {token}", "Accept": MANIFEST_TYPES})
        if r.status_code == 404:
            return False
        _raise_for(r, f"manifest lookup {repository}:{tag}")
        return True

    # ---- build -----------------------------------------------------------------------------
    def upload_context(self, root: Path) -> str:
        src = self.tasks.registries.get_build_source_upload_url(self.t.resource_group, self.t.registry, **self._call)
        body = context_tarball(root)
        r = self.http.put(src.upload_url, content=body, headers={"x-ms-blob-type": "BlockBlob",
                                                                   "Content-Type": "application/gzip"})
        _raise_for(r, "upload of the build context to the ACR build-source URL")
        log.info("acr: uploaded build context %s (%d bytes) as %s", root, len(body), src.relative_path)
        return str(src.relative_path)

    def build(self, ctx: ImageContext) -> dict[str, Any]:
        repository, tag = ctx.tag.split(":", 1)
        login = self.login_server()
        image = f"{login}/{ctx.tag}"
        if self.tag_exists(login, repository, tag):
            log.info("acr: %s already exists; not rebuilding (the tag is content-addressed)", image)
            return {"built": False, "reason": "tag exists", "image": image, "run_id": None, **ctx.to_json()}
        from azure.mgmt.containerregistrytasks.models import DockerBuildRequest, PlatformProperties

        source = self.upload_context(ctx.path)
        req = DockerBuildRequest(image_names=[ctx.tag], is_push_enabled=True, no_cache=False, docker_file_path="Dockerfile",
                                 source_location=source, timeout=max(300, min(28800, int(self.timeout))),  # ACR's bounds
                                 platform=PlatformProperties(os="Linux", architecture="amd64"))
        run = self.tasks.registries.schedule_run(self.t.resource_group, self.t.registry, req, **self._call)
        run_id = str(run.properties.run_id)
        log.info("acr: scheduled run %s on %s building %s", run_id, self.t.registry, image)
        status, lines = self.wait(run_id)
        if status != "Succeeded":
            final = self.tasks.runs.get(self.t.resource_group, self.t.registry, run_id, **self._call)
            msg = getattr(final.properties, "run_error_message", None) or "no error message"
            tail = " | ".join(lines[-15:])
            raise AcrBuildError(f"ACR run {run_id} for {image} ended {status}: {msg}. Log tail: {tail}. "
                                f"Fix the Dockerfile/requirements or see the full log with `az acr task logs --registry "
                                f"{self.t.registry} --run-id {run_id}`")
        return {"built": True, "image": image, "run_id": run_id, **ctx.to_json()}

    def wait(self, run_id: str) -> tuple[str, list[str]]:
        """Poll `runs.get` until the run ends, streaming its log; returns (status, log lines)."""
        deadline = time.monotonic() + self.timeout
        offset, lines, pending, log_url = 0, [], "", ""
        status = "Queued"
        while True:
            run = self.tasks.runs.get(self.t.resource_group, self.t.registry, run_id, **self._call)
            status = _enum(run.properties.status)
            if status not in ("Queued",):
                if not log_url:
                    res = self.tasks.runs.get_log_sas_url(self.t.resource_group, self.t.registry, run_id, **self._call)
                    log_url = str(res.log_link or "")
                if log_url:
                    chunk = self._read_log(log_url, offset)
                    offset += len(chunk)
                    pending += chunk.decode(errors="replace")
                    *done, pending = pending.split("\n")
                    for line in done:
                        lines.append(line.rstrip("\r"))
                        self.on_log(line.rstrip("\r"))
            if status in TERMINAL:
                if pending:
                    lines.append(pending)
                    self.on_log(pending)
                log.info("acr: run %s ended %s", run_id, status)
                return status, lines
            if time.monotonic() > deadline:
                self.tasks.runs.cancel(self.t.resource_group, self.t.registry, run_id, **self._call)
                raise AcrBuildError(f"ACR run {run_id} still {status} after {self.timeout:.0f}s; cancelled it. "
                                    "Raise the timeout or look at the registry's agent queue.")
            time.sleep(self.poll_interval)

    def _read_log(self, url: str, offset: int) -> bytes:
        r = self.http.get(url, headers={"Range": f"bytes={offset}-"})
        if r.status_code == 416 or r.status_code == 404:  # nothing new yet / log blob not created yet
            return b""
        _raise_for(r, "reading the ACR run log")
        return r.content if r.status_code == 206 else r.content[offset:]


def _enum(v: Any) -> str:
    return str(getattr(v, "value", v))


def _raise_for(r: httpx.Response, what: str) -> None:
    if r.status_code >= 400:
        raise AcrBuildError(f"{what} failed: HTTP {r.status_code} {r.text[:300]}")
