"""Credentials for Azure Blob / ADLS Gen2 landing zones, as fsspec (adlfs) storage options.

Resolution order (first match wins), all from the environment so nothing secret lives in code:
  1. CTR_AZURE_CONNECTION_STRING                      (also how tests reach Azurite)
  2. CTR_AZURE_ACCOUNT_NAME + CTR_AZURE_ACCOUNT_KEY
  3. CTR_AZURE_ACCOUNT_NAME + CTR_AZURE_SAS_TOKEN
  4. CTR_AZURE_ACCOUNT_NAME + a service principal: CTR_AZURE_TENANT_ID / CTR_AZURE_CLIENT_ID /
     CTR_AZURE_CLIENT_SECRET (or the standard AZURE_TENANT_ID / AZURE_CLIENT_ID / AZURE_CLIENT_SECRET)
  5. CTR_AZURE_ACCOUNT_NAME alone: DefaultAzureCredential (managed identity, workload identity, az login)
In the DAG, `ctr.airflow_tasks` fills these from the Airflow WASB/Azure connection first
(`env_from_connection`, which follows the WasbHook's reading of a connection).
"""

from __future__ import annotations

import os
import time
from typing import Any
from urllib.parse import urlparse

import httpx

AZURE_PROTOCOLS = ("abfs", "abfss", "az", "adl")
ENV_KEYS = (
    "CTR_AZURE_CONNECTION_STRING", "CTR_AZURE_ACCOUNT_NAME", "CTR_AZURE_ACCOUNT_KEY", "CTR_AZURE_SAS_TOKEN",
    "CTR_AZURE_TENANT_ID", "CTR_AZURE_CLIENT_ID", "CTR_AZURE_CLIENT_SECRET",
)


CONNECT_TIMEOUT_ENV = "CTR_AZURE_CONNECT_TIMEOUT_S"
DEFAULT_CONNECT_TIMEOUT_S = 20.0
_PROBE_ATTEMPTS = 3


class StorageUnreachable(OSError):
    """The storage account's endpoint did not answer within the configured time; the message says where."""


def is_azure_url(path: str) -> bool:
    return "://" in path and path.split("://", 1)[0] in AZURE_PROTOCOLS


def storage_options(protocol: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """adlfs keyword arguments for `protocol` from CTR_AZURE_* (and AZURE_*) variables; {} if not Azure."""
    if protocol not in AZURE_PROTOCOLS:
        return {}
    env = dict(os.environ if env is None else env)
    conn = env.get("CTR_AZURE_CONNECTION_STRING")
    if conn:
        return {"connection_string": conn}
    account = env.get("CTR_AZURE_ACCOUNT_NAME")
    if not account:
        raise ValueError(
            f"{protocol}:// landing zone needs credentials: set CTR_AZURE_CONNECTION_STRING, or "
            "CTR_AZURE_ACCOUNT_NAME with CTR_AZURE_ACCOUNT_KEY / CTR_AZURE_SAS_TOKEN / a service principal "
            "(CTR_AZURE_TENANT_ID, CTR_AZURE_CLIENT_ID, CTR_AZURE_CLIENT_SECRET) / a managed identity, "
            "or configure the Airflow connection named by CTR_AZURE_CONN_ID (default wasb_default)"
        )
    key = env.get("CTR_AZURE_ACCOUNT_KEY")
    if key:
        return {"account_name": account, "account_key": key}
    sas = env.get("CTR_AZURE_SAS_TOKEN")
    if sas:
        return {"account_name": account, "sas_token": sas}
    secret = env.get("CTR_AZURE_CLIENT_SECRET") or env.get("AZURE_CLIENT_SECRET")
    if secret:
        tenant = env.get("CTR_AZURE_TENANT_ID") or env.get("AZURE_TENANT_ID")
        client = env.get("CTR_AZURE_CLIENT_ID") or env.get("AZURE_CLIENT_ID")
        if not (tenant and client):
            raise ValueError("a service principal needs CTR_AZURE_TENANT_ID and CTR_AZURE_CLIENT_ID "
                             "besides CTR_AZURE_CLIENT_SECRET")
        return {"account_name": account, "tenant_id": tenant, "client_id": client, "client_secret": secret}
    return {"account_name": account, "anon": False}


def _account_name(host: str | None, login: str | None, use_login: bool) -> str | None:
    """The storage account from a connection's host (name or https://NAME.blob.core.windows.net)."""
    if host:
        netloc = urlparse(host).netloc if "://" in host else host
        return netloc.split(".", 1)[0] or None
    return login if use_login else None


def env_from_connection(
    host: str | None, login: str | None, password: str | None, extra: dict[str, Any] | None
) -> dict[str, str]:
    """CTR_AZURE_* variables equivalent to an Airflow `wasb` connection, read as the WasbHook reads it.

    connection_string in extra; else tenant_id in extra = service principal (login = client id,
    password = secret, host = account); else shared_access_key / sas_token / account_key in extra or
    password = account key with login = account; else the account alone (DefaultAzureCredential).
    """
    extra = {k.removeprefix("extra__wasb__"): v for k, v in (extra or {}).items() if v not in (None, "")}
    if extra.get("connection_string"):
        return {"CTR_AZURE_CONNECTION_STRING": str(extra["connection_string"])}
    tenant = extra.get("tenant_id") or extra.get("tenantId")  # wasb / azure (Azure Resource Manager) connections
    account = extra.get("account_name") or _account_name(host, login, use_login=not tenant)
    out: dict[str, str] = {"CTR_AZURE_ACCOUNT_NAME": account} if account else {}
    if tenant:
        out.update(CTR_AZURE_TENANT_ID=str(tenant), CTR_AZURE_CLIENT_ID=str(login or extra.get("client_id", "")),
                   CTR_AZURE_CLIENT_SECRET=str(password or extra.get("client_secret", "")))
    elif extra.get("shared_access_key") or extra.get("account_key") or password:
        out["CTR_AZURE_ACCOUNT_KEY"] = str(extra.get("shared_access_key") or extra.get("account_key") or password)
    elif extra.get("sas_token"):
        out["CTR_AZURE_SAS_TOKEN"] = str(extra["sas_token"])
    return out


def blob_endpoint(options: dict[str, Any]) -> str:
    """The Blob service URL that adlfs will talk to for these storage options."""
    conn = options.get("connection_string")
    if conn:
        parts = dict(p.split("=", 1) for p in conn.split(";") if "=" in p)
        if parts.get("BlobEndpoint"):
            return parts["BlobEndpoint"].rstrip("/")
        scheme = parts.get("DefaultEndpointsProtocol", "https")
        return f"{scheme}://{parts.get('AccountName', '')}.blob.{parts.get('EndpointSuffix', 'core.windows.net')}"
    return f"https://{options.get('account_name', '')}.blob.core.windows.net"


def connect_timeout_s(env: dict[str, str] | None = None) -> float:
    """CTR_AZURE_CONNECT_TIMEOUT_S: how long the landing zone's endpoint may take to answer at all."""
    raw = (os.environ if env is None else env).get(CONNECT_TIMEOUT_ENV, "")
    if raw == "":
        return DEFAULT_CONNECT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{CONNECT_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not 0 < value <= 600:
        raise ValueError(f"{CONNECT_TIMEOUT_ENV}={raw!r} is out of range: between 0 (exclusive) and 600 seconds")
    return value


def check_reachable(options: dict[str, Any], timeout_s: float | None = None) -> None:
    """Fail fast, within `timeout_s` in all, when the Blob endpoint does not answer.

    adlfs builds its Azure client with the SDK's default retry policy and no way to pass another, so
    an unreachable account (wrong host, firewall, private endpoint from outside its network) used to
    surface only after ~170 s of retries. Any HTTP answer, even 400 or 403, means the endpoint is
    reachable; only connection failures and time-outs count against it.
    """
    url = blob_endpoint(options)
    budget = connect_timeout_s() if timeout_s is None else timeout_s
    per_try = httpx.Timeout(budget / _PROBE_ATTEMPTS)
    t0 = time.monotonic()
    last: Exception | None = None
    with httpx.Client(timeout=per_try, follow_redirects=False) as client:
        for _ in range(_PROBE_ATTEMPTS):
            try:
                client.get(url, params={"comp": "properties", "restype": "service"})
                return
            except httpx.TransportError as e:
                last = e
            if time.monotonic() - t0 >= budget:
                break
            time.sleep(min(0.5, max(0.0, budget - (time.monotonic() - t0))))
    raise StorageUnreachable(
        f"storage endpoint {url} did not answer ({type(last).__name__}: {last}) in {_PROBE_ATTEMPTS} attempts "
        f"over {time.monotonic() - t0:.1f} s (bound {budget:g} s, {CONNECT_TIMEOUT_ENV}); check the account name "
        "or connection string, the network route and the account's firewall / private endpoint"
    )
