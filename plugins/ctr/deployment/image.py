"""The scoring image: a content-addressed Docker build context, the `ImageBuilder` interface, the local builder.

The context holds a Dockerfile (slim Python base, non-root user, HEALTHCHECK on /healthz),
pinned serving requirements, the `ctr` package source and the model bundle stamped with its
registry version (`model/registry.json`). Its digest is sha256 over every (path, content)
pair in sorted order, so the same inputs give the same tag: `ctr-scorer:<version>-<digest12>`.
The folder is named by the digest, so a re-run finds its earlier build instead of making another.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ctr.model.bundle import MANIFEST, check_version, read_bundle_files, write_manifest

log = logging.getLogger(__name__)

IMAGE_NAME = "ctr-scorer"
SERVING_PACKAGES = ["lightgbm", "numpy", "scipy", "pyarrow", "orjson", "uvicorn", "uvloop", "httptools"]
# the compiled tree predictor (ctr.serving.predictors); pinned in the image when installed here, else the
# image's service serves with LightGBM (and logs that lleaves is missing)
COMPILED_PACKAGES = ["lleaves", "llvmlite"]
PORT = 8080

DOCKERFILE = f"""\
# Scoring image for the ctr model. Built by the ctr_retrain DAG (build_image task).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONPATH=/app
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 \\
    && rm -rf /var/lib/apt/lists/* \\
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin scorer
WORKDIR /app
COPY requirements.txt /app/requirements.txt
RUN pip install --no-cache-dir -r /app/requirements.txt
COPY ctr/ /app/ctr/
COPY model/ /app/model/
USER 10001
EXPOSE {PORT}
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \\
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:{PORT}/healthz', timeout=2)"]
ENTRYPOINT ["python", "-m", "ctr.cli", "serve", "--model", "/app/model", "--host", "0.0.0.0", "--port", "{PORT}"]
"""


@dataclass(frozen=True)
class ImageContext:
    path: Path
    digest: str
    tag: str
    version: str

    def to_json(self) -> dict[str, str]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def serving_requirements() -> str:
    from importlib.metadata import PackageNotFoundError

    lines = [f"{n}=={pkg_version(n)}\n" for n in SERVING_PACKAGES]
    try:
        lines += [f"{n}=={pkg_version(n)}\n" for n in COMPILED_PACKAGES]
    except PackageNotFoundError:
        log.warning("image without the compiled predictor: %s not installed (make venv installs them)",
                    " and ".join(COMPILED_PACKAGES))
    return "".join(lines)


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        rel = p.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _copy_package(dest: Path) -> None:
    src = Path(__file__).resolve().parents[1]  # the ctr package; its Airflow edge stays out of the image
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "airflow"))


def build_context(bundle_dir: Path, version: str, model_name: str, out_root: Path) -> ImageContext:
    """Assemble the context for `bundle_dir` served as `version`; reuse an identical earlier one."""
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ctx-", dir=out_root))
    try:
        (tmp / "Dockerfile").write_text(DOCKERFILE)
        (tmp / "requirements.txt").write_text(serving_requirements())
        (tmp / ".dockerignore").write_text("**/__pycache__\n")
        _copy_package(tmp / "ctr")
        model = tmp / "model"
        model.mkdir()
        # the bundle's manifest-checked bytes (a damaged bundle is refused here, not laundered into an
        # image with a fresh manifest); the registry stamp joins the manifest
        check_version(str(version), "registry version")
        for name, data in read_bundle_files(bundle_dir).items():
            if name not in ("registry.json", MANIFEST):
                (model / name).write_bytes(data)
        (model / "registry.json").write_text(json.dumps({"name": model_name, "version": str(version)}, sort_keys=True) + "\n")
        write_manifest(model)
        digest = tree_digest(tmp)
        final = out_root / digest[:12]
        if final.exists():
            log.info("build context %s already exists (same digest); reusing it", final)
        else:
            tmp.rename(final)
        return ImageContext(final, digest, f"{IMAGE_NAME}:{version}-{digest[:12]}", str(version))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def docker_engine_available(timeout: float = 10.0) -> tuple[bool, str]:
    if shutil.which("docker") is None:
        return False, "no docker client on PATH"
    try:
        r = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"docker info failed: {e}"
    if r.returncode != 0:
        return False, (r.stderr.strip().splitlines() or ["docker info failed"])[-1]
    return True, r.stdout.strip()


def local_build(ctx: ImageContext) -> dict[str, object]:
    """`docker build` the context when an engine answers; otherwise say so plainly and go on."""
    ok, detail = docker_engine_available()
    if not ok:
        log.warning("no Docker engine reachable (%s): image %s not built; build context is at %s", detail, ctx.tag, ctx.path)
        return {"built": False, "reason": detail, **ctx.to_json()}
    log.info("docker build -t %s %s (engine %s)", ctx.tag, ctx.path, detail)
    r = subprocess.run(["docker", "build", "-t", ctx.tag, str(ctx.path)], capture_output=True, text=True)
    for line in (r.stdout + r.stderr).splitlines()[-40:]:
        log.info("docker: %s", line)
    if r.returncode != 0:
        raise RuntimeError(f"docker build of {ctx.tag} failed (exit {r.returncode}); see the log above")
    return {"built": True, **ctx.to_json()}


@runtime_checkable
class ImageBuilder(Protocol):
    """Builds the image of a build context: `LocalImageBuilder` (docker, when an engine answers) or
    `ctr.deployment.acr.AcrBuilder` (ACR Tasks, pushed). `ctr.deployment.factory.image_builder` picks one."""

    def build(self, ctx: ImageContext) -> dict[str, Any]:
        """Build (or find) the image; the dict holds the context's fields, "built", and "image" once pushed."""
        ...

    def close(self) -> None:
        """Release clients the builder holds."""
        ...


class LocalImageBuilder:
    """`docker build` on this machine when an engine answers; otherwise the context is left for later."""

    def build(self, ctx: ImageContext) -> dict[str, Any]:
        return local_build(ctx)

    def close(self) -> None:
        return None
