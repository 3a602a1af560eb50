"""A local HTTP server speaking the wire formats our ACR builder uses.

ARM (Microsoft.ContainerRegistry, JSON bodies, `api-version` query, bearer auth, ARM error
envelopes): registries GET, listBuildSourceUploadUrl, scheduleRun, runs/{id} GET,
runs/{id}/listLogSasUrl, runs/{id}/cancel. Blob storage: PUT of the uploaded source (BlockBlob)
and ranged GETs of the run log (206 / 416). Registry data plane: /oauth2/exchange,
/oauth2/token and HEAD /v2/<repo>/manifests/<tag>.

A run moves Queued -> Running -> Succeeded/Failed as it is polled, appending log lines on each
poll; `scenario` picks how it ends ("succeed", "fail", "hang").
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlparse

from tests.loopback import LoopbackServer

PREFIX = r"/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft.ContainerRegistry/registries/(?P<reg>[^/?]+)"


@dataclass
class FakeRun:
    run_id: str
    image_names: list[str]
    scenario: str
    polls: int = 0
    status: str = "Queued"
    log: bytearray = field(default_factory=bytearray)
    error: str | None = None

    def advance(self) -> None:
        self.polls += 1
        if self.status in ("Succeeded", "Failed", "Canceled"):
            return
        if self.polls == 1:
            self.status = "Running"
            self.log += b"2026/11/26 02:00:01 Downloading source code...\nStep 1/12 : FROM python:3.11-slim\n"
        elif self.scenario == "fail" and self.polls >= 3:
            self.log += b"Step 6/12 : RUN pip install --no-cache-dir -r /app/requirements.txt\n"
            self.log += b"ERROR: No matching distribution found for lightgbm==9.9.9\n"
            self.log += b"The command '/bin/sh -c pip install' returned a non-zero code: 1\n"
            self.log += b"Run ID: " + self.run_id.encode() + b" failed after 41s. Error: failed during run, err: exit status 1"
            self.status, self.error = "Failed", "failed during run, err: exit status 1"
        elif self.scenario == "succeed" and self.polls >= 3:
            self.log += b"Successfully tagged " + self.image_names[0].encode() + b"\npushing manifest\n"
            self.log += b"Run ID: " + self.run_id.encode() + b" was successful after 52s"  # no trailing newline
            self.status = "Succeeded"
        else:
            self.log += f"Step {self.polls}/12 : working\n".encode()


class FakeAcr(LoopbackServer):
    def __init__(self, scenario: str = "succeed", registry: str = "ctrprod") -> None:
        self.scenario = scenario
        self.registry = registry
        self.sources: dict[str, bytes] = {}
        self.runs: dict[str, FakeRun] = {}
        self.tags: set[str] = set()          # "repo:tag" present in the registry
        self.requests: list[tuple[str, str]] = []
        self.schedule_bodies: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._serve(self._handler())
        self.login_server = f"127.0.0.1:{self.port}"

    def calls(self, method: str, pattern: str) -> int:
        return sum(1 for m, p in self.requests if m == method and re.search(pattern, p))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, code: int, body: bytes = b"", ctype: str = "application/json", headers: dict | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("x-ms-request-id", str(uuid.uuid4()))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, code: int, doc: Any) -> None:
                self._send(code, json.dumps(doc).encode())

            def _arm_error(self, code: int, err: str, msg: str) -> None:
                self._json(code, {"error": {"code": err, "message": msg}})

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _route(self) -> None:
                u = urlparse(self.path)
                with fake.lock:
                    fake.requests.append((self.command, u.path))
                body = self._body()
                if u.path.startswith("/subscriptions/"):
                    return self._arm(u.path, parse_qs(u.query), body)
                if u.path.startswith("/blob/"):
                    return self._blob(u.path, body)
                if u.path.startswith("/logs/"):
                    return self._log(u.path)
                if u.path.startswith("/oauth2/") or u.path.startswith("/v2/"):
                    return self._registry(u.path, body)
                self._send(404, b"not found", "text/plain")

            do_GET = do_POST = do_PUT = do_HEAD = _route

            # ---- ARM ----------------------------------------------------------------------
            def _arm(self, path: str, query: dict[str, list[str]], body: bytes) -> None:
                if not self.headers.get("Authorization", "").startswith("Bearer "):
                    return self._arm_error(401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing.")
                if "api-version" not in query:
                    return self._arm_error(400, "MissingApiVersionParameter", "The api-version query parameter is required.")
                m = re.fullmatch(PREFIX + r"(?P<rest>/.*)?", path)
                if not m or m["reg"] != fake.registry:
                    return self._arm_error(404, "ResourceNotFound", f"The Resource '{path}' was not found.")
                rid = path.split("/runs/")[0] if "/runs/" in path else re.match(PREFIX, path).group(0)
                rest = m["rest"] or ""
                if self.command == "GET" and rest == "":
                    return self._json(200, {"id": rid, "name": fake.registry, "type": "Microsoft.ContainerRegistry/registries",
                                            "location": "westeurope", "sku": {"name": "Standard", "tier": "Standard"},
                                            "properties": {"loginServer": fake.login_server, "provisioningState": "Succeeded",
                                                           "adminUserEnabled": False}})
                if self.command == "POST" and rest == "/listBuildSourceUploadUrl":
                    rel = f"source/20261126000000/{uuid.uuid4()}.tar.gz"
                    return self._json(200, {"uploadUrl": f"{fake.url}/blob/{rel}?sv=2024-05-04&sr=b&sig=fake", "relativePath": rel})
                if self.command == "POST" and rest == "/scheduleRun":
                    return self._schedule(rid, json.loads(body or b"{}"))
                rm = re.fullmatch(r"/runs/(?P<id>[^/]+)(?P<op>/listLogSasUrl|/cancel)?", rest)
                if rm:
                    run = fake.runs.get(rm["id"])
                    if run is None:
                        return self._arm_error(404, "RunNotFound", f"run {rm['id']} not found")
                    if self.command == "GET" and not rm["op"]:
                        with fake.lock:
                            run.advance()
                        return self._json(200, self._run_doc(rid, run))
                    if self.command == "POST" and rm["op"] == "/listLogSasUrl":
                        return self._json(200, {"logLink": f"{fake.url}/logs/{run.run_id}/rawtext.log?sv=2024-05-04&sig=fake"})
                    if self.command == "POST" and rm["op"] == "/cancel":
                        run.status = "Canceled"
                        return self._send(200)
                self._arm_error(404, "NotFound", f"{self.command} {path} is not implemented by the fake")

            def _schedule(self, rid: str, doc: dict[str, Any]) -> None:
                if doc.get("type") != "DockerBuildRequest":
                    return self._arm_error(400, "InvalidRequest", f"unsupported run request type {doc.get('type')!r}")
                if not 300 <= int(doc.get("timeout", 3600)) <= 28800:
                    return self._arm_error(400, "InvalidParameter", "timeout must be between 300 and 28800 seconds")
                src = doc.get("sourceLocation")
                if src not in fake.sources:
                    return self._arm_error(400, "InvalidSourceLocation", f"source location {src!r} was not uploaded")
                names = tarfile.open(fileobj=io.BytesIO(fake.sources[src]), mode="r:gz").getnames()
                if doc.get("dockerFilePath", "Dockerfile") not in names:
                    return self._arm_error(400, "InvalidDockerfile", "Dockerfile not found in the source")
                fake.schedule_bodies.append(doc)
                run = FakeRun(f"ca{len(fake.runs) + 1}", list(doc.get("imageNames") or []), fake.scenario)
                fake.runs[run.run_id] = run
                self._json(200, self._run_doc(rid, run))

            def _run_doc(self, rid: str, run: FakeRun) -> dict[str, Any]:
                props: dict[str, Any] = {"runId": run.run_id, "status": run.status, "runType": "QuickRun",
                                         "createTime": "2026-11-26T02:00:00Z", "provisioningState": "Succeeded",
                                         "platform": {"os": "Linux", "architecture": "amd64"}}
                if run.status == "Succeeded":
                    repo, tag = run.image_names[0].split(":", 1)
                    props["outputImages"] = [{"registry": fake.login_server, "repository": repo, "tag": tag,
                                              "digest": "sha256:" + "ab" * 32}]
                    with fake.lock:
                        fake.tags.add(run.image_names[0])
                if run.error:
                    props["runErrorMessage"] = run.error
                return {"id": f"{rid}/runs/{run.run_id}", "name": run.run_id,
                        "type": "Microsoft.ContainerRegistry/registries/runs", "properties": props}

            # ---- blob storage -------------------------------------------------------------
            def _blob(self, path: str, body: bytes) -> None:
                if self.command != "PUT" or self.headers.get("x-ms-blob-type") != "BlockBlob":
                    return self._send(400, b"<Error><Code>MissingRequiredHeader</Code></Error>", "application/xml")
                fake.sources[path.removeprefix("/blob/")] = body
                self._send(201, headers={"ETag": '"0x1"'})

            def _log(self, path: str) -> None:
                run = fake.runs.get(path.split("/")[2])
                if run is None:
                    return self._send(404, b"<Error><Code>BlobNotFound</Code></Error>", "application/xml")
                data = bytes(run.log)
                rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if not rng:
                    return self._send(200, data, "text/plain")
                start = int(rng.group(1))
                if start >= len(data):
                    return self._send(416, b"<Error><Code>InvalidRange</Code></Error>", "application/xml",
                                      {"Content-Range": f"bytes */{len(data)}"})
                self._send(206, data[start:], "text/plain", {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})

            # ---- registry data plane ------------------------------------------------------
            def _registry(self, path: str, body: bytes) -> None:
                form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
                if path == "/oauth2/exchange":
                    if form.get("grant_type") != "access_token" or not form.get("access_token"):
                        return self._json(400, {"errors": [{"code": "UNSUPPORTED", "message": "bad grant"}]})
                    return self._json(200, {"refresh_token": "fake-refresh"})
                if path == "/oauth2/token":
                    if form.get("refresh_token") != "fake-refresh":
                        return self._json(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad refresh token"}]})
                    return self._json(200, {"access_token": "fake-access"})
                m = re.fullmatch(r"/v2/(?P<repo>.+)/manifests/(?P<tag>[^/]+)", path)
                if not m:
                    return self._send(404)
                if self.headers.get("Authorization") != "Bearer fake-access":
                    return self._json(401, {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]})
                if f"{m['repo']}:{m['tag']}" in fake.tags:
                    return self._send(200, b"", "application/vnd.oci.image.manifest.v1+json",
                                      {"Docker-Content-Digest": "sha256:" + "ab" * 32})
                self._json(404, {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest tagged by tag is not found"}]})

        return H
