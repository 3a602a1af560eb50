"""Hooks: each external system's Airflow connection turned into a client here, and only here.

* `AzureCredentialHook`: the provider's Azure connection (`conn_type` azure) -> an azure-identity
  credential and subscription for ACR Tasks and AKS (`CloudAccess` hands them to the deployment factory).
* `azure_storage_env`: the WASB connection -> `CTR_AZURE_*` for an `abfs://` landing zone.
* `WebhookHook`: the `ctr_alerts` HTTP connection -> the webhook URL and headers (notify.py posts).
The Databricks hook stays with its operator in databricks.py; Kubernetes uses the cncf provider's hook.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from airflow.providers.microsoft.azure.hooks.base_azure import AzureBaseHook
from airflow.sdk import BaseHook

from ctr.settings import DeploySettings

log = logging.getLogger("ctr.dag")

DEFAULT_ALERTS_CONN_ID = "ctr_alerts"


class AzureCredentialHook(AzureBaseHook):
    """The provider's Azure connection as an azure-identity credential: service principal (login = client
    id, password = secret, extra tenantId) or, without them, the worker's managed identity.

    `AzureBaseHook.get_credential` returns msrest adapters unless the connection sets
    `use_azure_identity_object`; the ACR and AKS clients need azure-identity credentials, so this
    hook always builds those, from the same connection fields.
    """

    def __init__(self, conn_id: str = "azure_default", subscription_id: str = "") -> None:
        super().__init__(conn_id=conn_id)
        self.fallback_subscription = subscription_id

    def extras(self, conn: Any = None) -> dict[str, str]:
        conn = conn or self.get_connection(self.conn_id)
        return {k.removeprefix("extra__azure__"): str(v) for k, v in (conn.extra_dejson or {}).items()}

    def get_credential(self, *, conn: Any = None) -> Any:
        from azure.identity import ClientSecretCredential, DefaultAzureCredential

        conn = conn or self.get_connection(self.conn_id)
        extras = self.extras(conn)
        if conn.login and conn.password and extras.get("tenantId"):
            log.info("azure connection %s: service principal %s", self.conn_id, conn.login)
            return ClientSecretCredential(extras["tenantId"], conn.login, conn.password)
        log.info("azure connection %s: managed identity (DefaultAzureCredential)", self.conn_id)
        return DefaultAzureCredential(managed_identity_client_id=extras.get("managed_identity_client_id") or None)

    def credential_and_subscription(self) -> tuple[Any, str]:
        conn = self.get_connection(self.conn_id)
        sub = self.extras(conn).get("subscriptionId") or self.fallback_subscription
        if not sub:
            raise ValueError(f"no subscription: set extra subscriptionId on connection {self.conn_id} "
                             "or Variable ctr_azure_subscription_id")
        return self.get_credential(conn=conn), sub


class CloudAccess:
    """What the deployment factory needs from Airflow: Azure credentials and a Kubernetes API client."""

    def __init__(self, deploy: DeploySettings) -> None:
        self.deploy = deploy

    def azure(self) -> tuple[Any, str]:
        return AzureCredentialHook(self.deploy.azure_conn_id, self.deploy.azure_subscription_id).credential_and_subscription()

    def kube_api_client(self, conn_id: str) -> Any:
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        return KubernetesHook(conn_id=conn_id).get_conn()


def azure_storage_env(env: Mapping[str, str]) -> dict[str, str]:
    """For an Azure landing zone, `CTR_AZURE_*` from the WASB connection `CTR_AZURE_CONN_ID` (default
    wasb_default), unless `CTR_AZURE_*` are already set; {} otherwise (DefaultAzureCredential then)."""
    from ctr.data.azure_storage import ENV_KEYS, env_from_connection, is_azure_url

    landing = env.get("CTR_LANDING", "")
    if not is_azure_url(landing) or any(env.get(k) for k in ENV_KEYS):
        return {}
    conn_id = env.get("CTR_AZURE_CONN_ID", "wasb_default")
    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception as e:
        log.warning("landing %s: Airflow connection %r not readable (%s); falling back to DefaultAzureCredential",
                    landing, conn_id, e)
        return {}
    values = env_from_connection(conn.host, conn.login, conn.password, conn.extra_dejson)
    log.info("landing %s: Azure credentials from Airflow connection %r (%s)", landing, conn_id, ", ".join(sorted(values)))
    return values


def alerts_conn_id() -> str:
    """The alerts connection id: `CTR_ALERTS_CONN_ID`, default `ctr_alerts`."""
    return os.environ.get("CTR_ALERTS_CONN_ID", DEFAULT_ALERTS_CONN_ID)


def webhook_url(conn: Any) -> str:
    """The webhook URL an HTTP connection describes (see notify.py's doc for the accepted forms)."""
    host = (conn.host or "").strip()
    extra = conn.extra_dejson or {}
    endpoint = str(extra.get("endpoint") or "")
    if host.startswith(("http://", "https://")):
        base = host.rstrip("/")
        if conn.port and ":" not in base.split("://", 1)[1].split("/", 1)[0]:
            scheme, rest = base.split("://", 1)
            netloc, _, path = rest.partition("/")
            base = f"{scheme}://{netloc}:{conn.port}" + (f"/{path}" if path else "")
    else:
        if not host:
            raise ValueError(f"connection {conn.conn_id!r} has no host; set host (and schema/port/extra.endpoint) "
                             "or a full URL in host")
        schema = (conn.schema or "").strip()
        scheme = schema if schema in ("http", "https") else "http"
        if schema and schema not in ("http", "https") and not endpoint:
            endpoint = schema  # URI form: http://host:port/path puts the path in `schema`
        base = f"{scheme}://{host}" + (f":{conn.port}" if conn.port else "")
    if endpoint:
        base = base.rstrip("/") + "/" + endpoint.lstrip("/")
    return base


class WebhookHook(BaseHook):
    """The alerts webhook behind an HTTP connection: its URL and headers (bearer token from the password)."""

    conn_name_attr = "conn_id"
    default_conn_name = DEFAULT_ALERTS_CONN_ID
    conn_type = "http"
    hook_name = "ctr alerts webhook"

    def __init__(self, conn_id: str | None = None) -> None:
        super().__init__()
        self.conn_id = conn_id or alerts_conn_id()

    def get_conn(self) -> Any:
        """The connection (AirflowNotFoundException when it does not exist)."""
        return self.get_connection(self.conn_id)

    def endpoint(self, conn: Any = None) -> tuple[str, dict[str, str]]:
        """(URL, headers) to POST a JSON alert to; never log them (a webhook URL often is a secret)."""
        conn = conn or self.get_conn()
        headers = {"Content-Type": "application/json"}
        extra_headers = (conn.extra_dejson or {}).get("headers") or {}
        headers.update({str(k): str(v) for k, v in extra_headers.items()})
        if conn.password:
            headers["Authorization"] = f"Bearer {conn.password}"
        return webhook_url(conn), headers
