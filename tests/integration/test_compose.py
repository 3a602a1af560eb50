"""docker-compose.yaml against the Compose Specification, and against what the DAG connects to.

These machines have the Docker client but neither the compose plugin nor an engine, so the stack is
validated, not started: variables are interpolated from .env.example the way `docker compose`
does it, then the file is parsed by the `compose-spec` package (a strict Compose Specification
parser: unknown keys and wrongly typed values are errors), its cross-references are checked, and
it is validated into the Specification's schema model. Every host that a connection or CTR_*
setting of the Airflow services names must be a service of the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from compose_spec import PyCompose, PyOptions
from ctr.airflow import notify

from tests.conftest import REPO

pytestmark = pytest.mark.integration

COMPOSE = REPO / "docker-compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"
AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")
# connection ids the DAG reads on the local path (landing on Azure/Azurite, alerts); databricks_default
# and azure_default only matter for compute=databricks / deploy_target=aks, which a laptop stack does not use.
DAG_CONNECTIONS = ("wasb_default", notify.DEFAULT_CONN_ID)
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ${V}, ${V:-default}, ${V-default}, ${V:?error}, ${V?error}, $$ -> $."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        value = env.get(name)
        unset_or_empty = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":-", "-") and unset_or_empty:
            return arg
        if op in (":?", "?") and unset_or_empty:
            raise KeyError(f"{name}: {arg or 'required variable is missing'} (compose would refuse to start)")
        return value or ""

    return _VAR.sub(sub, text)


def interpolate_doc(obj: Any, env: dict[str, str]) -> Any:
    """Like compose: parse the YAML first, then interpolate each string value (so JSON values stay strings)."""
    if isinstance(obj, dict):
        return {k: interpolate_doc(v, env) for k, v in obj.items()}
    if isinstance(obj, list):
        return [interpolate_doc(v, env) for v in obj]
    return interpolate(obj, env) if isinstance(obj, str) else obj


def resolved(env: dict[str, str], text: str | None = None) -> dict:
    return interpolate_doc(yaml.safe_load(COMPOSE.read_text() if text is None else text), env)


def load(doc: dict | str) -> PyCompose:
    """Strict Compose Specification parse of a resolved document (a dict, or raw YAML with anchors/merges)."""
    c = PyOptions(apply_merge=True).from_yaml(doc) if isinstance(doc, str) else PyCompose.from_json(json.dumps(doc))
    c.validate()  # networks/volumes/configs/secrets used by services are defined
    c.to_spec()  # and the whole document validates into the Specification's schema model
    return c


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(env) -> dict:
    doc = resolved(env)
    load(doc)
    return doc


def test_validates_against_the_compose_specification(compose):
    assert compose["name"] == "ctr"
    assert set(compose["services"]) >= {"postgres", "airflow-init", *AIRFLOW_SERVICES, "mlflow", "azurite", "scorer"}


def test_the_validator_rejects_what_compose_would(env):
    text = COMPOSE.read_text()
    with pytest.raises(ValueError, match="restartt"):
        load(resolved(env, text.replace("    restart: always\n", "    restartt: always\n", 1)))
    with pytest.raises(ValueError):
        load(resolved(env, text.replace('"127.0.0.1:8080:8080"', "{not: a port}", 1)))
    broken = resolved(env)
    broken["services"]["scorer"]["networks"] = ["undeclared_net"]
    with pytest.raises(ValueError, match="undeclared_net"):
        load(broken)


def test_named_volumes_are_declared(compose):
    for name, s in compose["services"].items():
        for v in s.get("volumes", []):
            source = str(v).split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"service {name} mounts undeclared volume {source}"


def test_env_example_supplies_every_required_variable():
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", COMPOSE.read_text()))
    assert required, "expected ${VAR:?...} guards for the secrets"
    env = read_env_file(ENV_EXAMPLE)
    assert required <= set(env), f"missing from .env.example: {sorted(required - set(env))}"
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        resolved({k: v for k, v in env.items() if k != "POSTGRES_PASSWORD"})


def test_official_airflow_layout(compose):
    services = compose["services"]
    for name in AIRFLOW_SERVICES:
        s = services[name]
        assert s["environment"]["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor", name
        assert s["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully", name
        assert s["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert "healthcheck" in s, name
        assert s["environment"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    assert "airflow db migrate" in services["airflow-init"]["command"][-1]
    assert [c for c in (s["command"] for s in (services[n] for n in AIRFLOW_SERVICES))] == [
        "api-server", "scheduler", "dag-processor", "triggerer"]
    # published ports only on loopback
    for name, s in services.items():
        for p in s.get("ports", []):
            assert str(p).startswith("127.0.0.1:"), (name, p)


def _hosts_of(value: str) -> set[str]:
    """Hosts named by a connection (JSON or URI form, incl. an Azure connection string) or a URL."""
    hosts: set[str] = set()
    try:
        doc = json.loads(value)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        if doc.get("host"):
            h = str(doc["host"])
            hosts.add(urlparse(h).hostname if "://" in h else h)
        for v in (doc.get("extra") or {}).values():
            hosts |= {urlparse(u).hostname for u in re.findall(r"https?://[^;\s\"]+", str(v))}
    elif "://" in value:
        hosts.add(urlparse(value).hostname)
    return {h for h in hosts if h}


def test_every_service_the_connections_name_exists(compose):
    services = set(compose["services"])
    for name in AIRFLOW_SERVICES:
        env = compose["services"][name]["environment"]
        for conn_id in DAG_CONNECTIONS:
            value = env.get(f"AIRFLOW_CONN_{conn_id.upper()}")
            assert value, f"{name}: connection {conn_id} is not defined (AIRFLOW_CONN_{conn_id.upper()})"
            hosts = _hosts_of(value)
            assert hosts, f"{name}: connection {conn_id} names no host: {value[:80]}"
            assert hosts <= services, f"{name}: connection {conn_id} names {hosts - services}, not services"
        urls = [env["CTR_REGISTRY_URI"], env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"],
                env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], f"http://{env['CTR_SERVE_HOST']}:{env['CTR_SERVE_PORT']}"]
        for url in urls:
            assert urlparse(url).hostname in services, (name, url)
    # the scorer the rollout hot-swaps shares the model volume with the workers, at the same path
    assert "ctr-home:/opt/ctr" in compose["services"]["scorer"]["volumes"]
    assert "ctr-home:/opt/ctr" in compose["services"]["airflow-scheduler"]["volumes"]
