"""The scoring image's build context: content-addressed, reproducible, and what the Dockerfile promises."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from ctr.bundle import write_manifest
from ctr.image import IMAGE_NAME, build_context, local_build, tree_digest


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    b = tmp_path / "bundle"
    b.mkdir()
    (b / "model.txt").write_text("tree\nversion=v4\n")
    (b / "features.json").write_text('{"schema": 1}\n')
    (b / "metadata.json").write_text("{}\n")
    write_manifest(b)  # what finalize_bundle ends with
    return b


def test_same_inputs_same_digest_and_folder(bundle: Path, tmp_path: Path) -> None:
    a = build_context(bundle, "3", "ctr-lightgbm", tmp_path / "images")
    b = build_context(bundle, "3", "ctr-lightgbm", tmp_path / "images")
    assert a == b and a.tag == f"{IMAGE_NAME}:3-{a.digest[:12]}" and a.path.name == a.digest[:12]
    assert tree_digest(a.path) == a.digest
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [a.digest[:12]]  # no temp folders left
    # a fresh output root rebuilds the identical context
    c = build_context(bundle, "3", "ctr-lightgbm", tmp_path / "elsewhere")
    assert c.digest == a.digest


def test_version_or_content_change_changes_the_digest(bundle: Path, tmp_path: Path) -> None:
    a = build_context(bundle, "3", "ctr-lightgbm", tmp_path / "images")
    assert build_context(bundle, "4", "ctr-lightgbm", tmp_path / "images").digest != a.digest
    (bundle / "model.txt").write_text("tree\nversion=v4\nchanged\n")
    write_manifest(bundle)
    assert build_context(bundle, "3", "ctr-lightgbm", tmp_path / "images").digest != a.digest


def test_context_contents(bundle: Path, tmp_path: Path) -> None:
    ctx = build_context(bundle, "3", "ctr-lightgbm", tmp_path / "images")
    df = (ctx.path / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in df and "USER 10001" in df
    assert "HEALTHCHECK" in df and "/healthz" in df
    reqs = (ctx.path / "requirements.txt").read_text().split()
    assert reqs and all("==" in r for r in reqs) and any(r.startswith("lightgbm==") for r in reqs)
    assert json.loads((ctx.path / "model" / "registry.json").read_text()) == {"name": "ctr-lightgbm", "version": "3"}
    assert (ctx.path / "model" / "model.txt").read_text() == "tree\nversion=v4\n"
    assert (ctx.path / "ctr" / "serving" / "app.py").is_file()
    assert not list(ctx.path.rglob("__pycache__")) and not list((ctx.path / "ctr").glob("airflow_*.py"))


def test_no_docker_client_is_said_plainly(bundle: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    ctx = build_context(bundle, "3", "ctr-lightgbm", tmp_path / "images")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with caplog.at_level(logging.WARNING, logger="ctr.image"):
        out = local_build(ctx)
    assert out["built"] is False and out["reason"] == "no docker client on PATH" and out["tag"] == ctx.tag
    assert "no Docker engine reachable" in caplog.text and str(ctx.path) in caplog.text


def test_docker_client_without_engine_is_said_plainly(bundle: Path, tmp_path: Path, monkeypatch) -> None:
    ctx = build_context(bundle, "3", "ctr-lightgbm", tmp_path / "images")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "docker"
    fake.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock.' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    out = local_build(ctx)
    assert out["built"] is False and "Cannot connect to the Docker daemon" in out["reason"]
