"""One factory picks the image builder and the rollout target from DeploySettings; every target is a Rollout."""

from __future__ import annotations

from pathlib import Path

import pytest
from ctr.deployment import factory
from ctr.deployment.image import ImageBuilder, LocalImageBuilder
from ctr.deployment.rollout.aks import AksRollout
from ctr.deployment.rollout.base import Release, Rollout
from ctr.deployment.rollout.local import LocalRollout
from ctr.settings import DeploySettings, Settings


class NoCloud:
    """An Access that must not be asked: the local targets need no credentials."""

    def azure(self):
        raise AssertionError("local targets must not ask for Azure credentials")

    def kube_api_client(self, conn_id: str):
        from kubernetes.client import ApiClient, Configuration

        cfg = Configuration()
        cfg.host = "http://127.0.0.1:9"
        self.asked = conn_id
        return ApiClient(cfg)


def test_local_defaults_need_no_credentials(tmp_path: Path) -> None:
    s = Settings(home=tmp_path)
    builder = factory.image_builder(DeploySettings(), NoCloud())
    target = factory.rollout(s, DeploySettings(), NoCloud())
    assert isinstance(builder, LocalImageBuilder) and isinstance(builder, ImageBuilder)
    assert isinstance(target, LocalRollout) and isinstance(target, Rollout) and target.target == "local"
    assert target.url == s.serve_url


def test_aks_from_a_kubeconfig_connection_and_the_names_it_needs(tmp_path: Path) -> None:
    access = NoCloud()
    target = factory.rollout(Settings(home=tmp_path), DeploySettings(deploy_target="aks", kube_conn_id="kube_prod",
                                                                     aks_namespace="scoring"), access)
    assert isinstance(target, AksRollout) and isinstance(target, Rollout) and access.asked == "kube_prod"
    assert target.url.startswith("http://") and "scoring" in target.url
    with pytest.raises(ValueError, match="pulls the image from ACR"):
        target.deploy(Release("3", tmp_path / "model"))  # a locally built image cannot reach AKS
    with pytest.raises(ValueError, match="ctr_aks_cluster and ctr_aks_resource_group"):
        factory.rollout(Settings(home=tmp_path), DeploySettings(deploy_target="aks"), access)
    with pytest.raises(ValueError, match="ctr_acr_registry and ctr_acr_resource_group"):
        factory.image_builder(DeploySettings(image_builder="acr"), access)


def test_unknown_names_are_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"deploy_target='gke': use one of \['aks', 'local'\]"):
        factory.rollout(Settings(), DeploySettings(deploy_target="gke"), NoCloud())
    with pytest.raises(ValueError, match=r"image_builder='kaniko': use one of \['acr', 'local'\]"):
        factory.image_builder(DeploySettings(image_builder="kaniko"), NoCloud())
