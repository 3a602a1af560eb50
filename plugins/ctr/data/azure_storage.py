"""Credentials for Azure Blob / ADLS Gen2 landing zones, as fsspec (adlfs) storage options.

Resolution order (first match wins), all from the environment so nothing secret lives in code:
  1. CTR_AZURE_CONNECTION_STRING                      (also how tests reach Azurite)
  2. CTR_AZURE_ACCOUNT_NAME + CTR_AZURE_ACCOUNT_KEY
  3. CTR_AZURE_ACCOUNT_NAME + AZURE_TENANT_ID/AZURE_CLIENT_ID/AZURE_CLIENT_SECRET (service principal)
  4. CTR_AZURE_ACCOUNT_NAME alone: DefaultAzureCredential (managed identity, az login, ...)
In the DAG, `ctr.airflow_tasks` fills these from the Airflow WASB/Azure connection first.
"""

from __future__ import annotations

import os
from typing import Any


def storage_options(protocol: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    if protocol not in ("abfs", "abfss", "az", "adl"):
        return {}
    env = dict(os.environ if env is None else env)
    conn = env.get("CTR_AZURE_CONNECTION_STRING")
    if conn:
        return {"connection_string": conn}
    account = env.get("CTR_AZURE_ACCOUNT_NAME")
    if not account:
        raise ValueError(
            f"{protocol}:// landing zone needs credentials: set CTR_AZURE_CONNECTION_STRING, or "
            "CTR_AZURE_ACCOUNT_NAME with CTR_AZURE_ACCOUNT_KEY / a service principal / a managed identity"
        )
    key = env.get("CTR_AZURE_ACCOUNT_KEY")
    if key:
        return {"account_name": account, "account_key": key}
    if env.get("AZURE_CLIENT_SECRET"):
        return {
            "account_name": account,
            "tenant_id": env["AZURE_TENANT_ID"],
            "client_id": env["AZURE_CLIENT_ID"],
            "client_secret": env["AZURE_CLIENT_SECRET"],
        }
    return {"account_name": account, "anon": False}
