"""The one place an image builder and a rollout target are chosen: by `DeploySettings`, never by the caller.

`image_builder(deploy, access)` and `rollout(settings, deploy, access)` look the configured name up in
`BUILDERS` / `ROLLOUTS`; `access` supplies credentials (in Airflow, `ctr.airflow.hooks.CloudAccess`,
which turns the connections into an Azure credential and a Kubernetes client). Adding a target is one
entry here and one class implementing `Rollout` (or `ImageBuilder`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ctr.deployment.image import ImageBuilder, LocalImageBuilder
from ctr.deployment.rollout.base import Rollout
from ctr.deployment.rollout.progressive import Strategy
from ctr.settings import DeploySettings, Settings


class Access(Protocol):
    """Credentials the cloud targets need, supplied by the caller (hooks in Airflow, fakes in tests)."""

    def azure(self) -> tuple[Any, str]:
        """(azure-identity credential, subscription id)."""
        ...

    def kube_api_client(self, conn_id: str) -> Any:
        """A kubernetes ApiClient for a kubeconfig connection."""
        ...


def _local_builder(d: DeploySettings, access: Access) -> ImageBuilder:
    return LocalImageBuilder()


def _acr_builder(d: DeploySettings, access: Access) -> ImageBuilder:
    from ctr.deployment.acr import AcrBuilder, AcrTarget

    if not d.acr_registry or not d.acr_resource_group:
        raise ValueError("image_builder=acr needs Variables ctr_acr_registry and ctr_acr_resource_group")
    credential, subscription = access.azure()
    return AcrBuilder(credential, AcrTarget(subscription, d.acr_resource_group, d.acr_registry))


def _local_rollout(s: Settings, d: DeploySettings, access: Access) -> Rollout:
    from ctr.deployment.rollout.local import LocalRollout

    return LocalRollout(s.serving_dir, s.serve_host, s.serve_port, admin_token=s.admin_token, serve_token=s.serve_token)


def _aks_rollout(s: Settings, d: DeploySettings, access: Access) -> Rollout:
    from ctr.deployment.rollout.aks import (
        AksConfig,
        AksRollout,
        api_client_from_kubeconfig,
        kubeconfig_from_aks,
    )

    cfg = AksConfig(namespace=d.aks_namespace, url=d.aks_url, metrics_url=d.aks_metrics_url)
    if d.kube_conn_id:  # a cncf-kubernetes connection holding a kubeconfig (or in-cluster)
        return AksRollout(access.kube_api_client(d.kube_conn_id), cfg)
    if not d.aks_cluster or not d.aks_resource_group:
        raise ValueError("deploy_target=aks needs Variable ctr_kube_conn_id, or ctr_aks_cluster and ctr_aks_resource_group")
    credential, subscription = access.azure()
    return AksRollout(api_client_from_kubeconfig(kubeconfig_from_aks(credential, subscription, d.aks_resource_group,
                                                                     d.aks_cluster)), cfg)


BUILDERS: dict[str, Callable[[DeploySettings, Access], ImageBuilder]] = {"local": _local_builder, "acr": _acr_builder}
ROLLOUTS: dict[str, Callable[[Settings, DeploySettings, Access], Rollout]] = {"local": _local_rollout, "aks": _aks_rollout}


def image_builder(d: DeploySettings, access: Access) -> ImageBuilder:
    """The builder `d.image_builder` names (local | acr)."""
    try:
        make = BUILDERS[d.image_builder]
    except KeyError:
        raise ValueError(f"image_builder={d.image_builder!r}: use one of {sorted(BUILDERS)}") from None
    return make(d, access)


def rollout(s: Settings, d: DeploySettings, access: Access, strategy: Strategy | None = None) -> Rollout:
    """The rollout target `d.deploy_target` names (local | aks), rolling out by `strategy` (default rolling)."""
    try:
        make = ROLLOUTS[d.deploy_target]
    except KeyError:
        raise ValueError(f"deploy_target={d.deploy_target!r}: use one of {sorted(ROLLOUTS)}") from None
    target = make(s, d, access)
    if strategy is not None:
        target.strategy = strategy  # type: ignore[attr-defined]  # every target has one (rollout/progressive.py)
    return target
