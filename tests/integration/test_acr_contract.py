"""ACR Tasks builder against a local server speaking the ARM / blob / registry wire formats."""

from __future__ import annotations

import io
import tarfile
import time

import pytest
from azure.core.credentials import AccessToken
from ctr.deployment.acr import AcrBuilder, AcrBuildError, AcrTarget, context_tarball
from ctr.deployment.image import build_context
from ctr.model.bundle import write_manifest

from tests.integration.fake_arm_acr import FakeAcr

pytestmark = pytest.mark.integration


class StaticCredential:
    """A TokenCredential handing out a fixed token (what ClientSecretCredential returns, minus AAD)."""

    def __init__(self) -> None:
        self.scopes: list[str] = []

    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        self.scopes += scopes
        return AccessToken("fake-aad-token", int(time.time()) + 3600)


@pytest.fixture(scope="module")
def image_ctx(tmp_path_factory: pytest.TempPathFactory):
    """A real build context; the bundle's bytes are opaque to ACR, so a small stand-in folder does."""
    bundle = tmp_path_factory.mktemp("bundle")
    (bundle / "model.txt").write_text("tree\nversion=v4\n")
    (bundle / "features.json").write_text("{}\n")
    (bundle / "metadata.json").write_text("{}\n")
    write_manifest(bundle)  # build_context takes only manifest-checked bundles
    return build_context(bundle, "7", "ctr-lightgbm", tmp_path_factory.mktemp("images"))


def _builder(fake: FakeAcr, lines: list[str], timeout: float = 30.0, registry: str = "") -> AcrBuilder:
    target = AcrTarget("00000000-0000-0000-0000-000000000001", "rg-ctr", registry or fake.registry, arm_endpoint=fake.url,
                       registry_url=fake.url)
    return AcrBuilder(StaticCredential(), target, poll_interval=0.01, timeout=timeout, on_log=lines.append)


def test_build_uploads_schedules_streams_log_and_skips_existing_tag(image_ctx) -> None:
    lines: list[str] = []
    with FakeAcr("succeed") as fake:
        b = _builder(fake, lines)
        out = b.build(image_ctx)
        assert out["built"] is True and out["run_id"] == "ca1"
        assert out["image"] == f"{fake.login_server}/{image_ctx.tag}"
        # the uploaded source is the context, and the run request names the tag and pushes it
        (src,) = fake.sources.values()
        names = tarfile.open(fileobj=io.BytesIO(src), mode="r:gz").getnames()
        assert "Dockerfile" in names and "model/registry.json" in names and "ctr/serving/app.py" in names
        body = fake.schedule_bodies[0]
        assert body["imageNames"] == [image_ctx.tag] and body["isPushEnabled"] is True
        assert body["platform"] == {"os": "Linux", "architecture": "amd64"}
        # the log was streamed once, in order, including the last line without a newline
        assert lines[0].endswith("Downloading source code...")
        assert lines[-1] == "Run ID: ca1 was successful after 52s"
        assert len(lines) == len(set(lines))
        # a second build of the same context finds the tag and schedules nothing
        again = b.build(image_ctx)
        assert again["built"] is False and again["reason"] == "tag exists"
        assert fake.calls("POST", r"/scheduleRun$") == 1 and len(fake.sources) == 1
        b.close()


def test_failed_run_surfaces_its_log(image_ctx) -> None:
    lines: list[str] = []
    with FakeAcr("fail") as fake:
        b = _builder(fake, lines)
        with pytest.raises(AcrBuildError) as e:
            b.build(image_ctx)
        msg = str(e.value)
        assert "ca1" in msg and "Failed" in msg and "No matching distribution found for lightgbm==9.9.9" in msg
        assert "exit status 1" in msg
        assert any("No matching distribution" in x for x in lines)
        assert image_ctx.tag not in fake.tags
        b.close()


def test_run_that_never_ends_times_out_and_is_cancelled(image_ctx) -> None:
    with FakeAcr("hang") as fake:
        b = _builder(fake, [], timeout=0.5)
        with pytest.raises(AcrBuildError, match="still Running after"):
            b.build(image_ctx)
        assert fake.runs["ca1"].status == "Canceled"
        assert fake.calls("POST", r"/runs/ca1/cancel$") == 1
        b.close()


def test_wrong_registry_is_an_arm_error(image_ctx) -> None:
    from azure.core.exceptions import ResourceNotFoundError

    with FakeAcr("succeed") as fake:
        b = _builder(fake, [], registry="typo-registry")
        with pytest.raises(ResourceNotFoundError, match="typo-registry"):
            b.build(image_ctx)
        b.close()


def test_context_tarball_is_deterministic(image_ctx) -> None:
    assert context_tarball(image_ctx.path) == context_tarball(image_ctx.path)
