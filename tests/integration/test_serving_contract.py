"""The API contract from the live service's own /openapi.json, checked by schemathesis (issue 22).

Every operation the document lists (it is read from the running service, so a route added to the
document is covered without touching this file) is called with schemathesis-generated requests,
valid and invalid, with and without the bearer token; each answer must carry a documented status
code, content type, headers and body, and never a 5xx. Bounded: a fixed number of examples per
operation, derandomised (same cases every run), and a time limit for the whole module.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import free_port, wait_http
from tests.loopback import stop_process

pytestmark = pytest.mark.integration

TOKEN = "contract-test-token"  # scoring and admin routes need it; health, metrics and the document do not
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 40


@pytest.fixture(scope="module")
def contract_server(trained_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`ctr serve` with tokens on a free loopback port (as conftest's scoring_server), for the module."""
    port = free_port()
    env = {**os.environ, "CTR_SERVE_TOKEN": TOKEN, "CTR_ADMIN_TOKEN": TOKEN, "CTR_LOAD_TIMEOUT_S": "10"}
    log = open(tmp_path_factory.mktemp("contract") / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "ctr.cli", "serve", "--model", str(trained_bundle),
                             "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc=proc)
        yield url
    finally:
        stop_process(proc)
        log.close()


@pytest.fixture(scope="module")
def api_schema(contract_server: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{contract_server}/openapi.json", timeout=10)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@pytest.mark.timeout(300)
def test_every_documented_operation_keeps_the_contract(case: schemathesis.Case, contract_server: str) -> None:
    """All of schemathesis's checks (5xx, status codes, content types, headers, bodies, auth, invalid
    data refused, valid data accepted), except one where JSON Schema cannot say what is valid: a
    `dataframe_split` row's values must match its `columns` one by one, so a schema-valid split body
    may still be (rightly) refused with 422; the other checks still run on it."""
    excluded = [positive_data_acceptance] if case.operation.path == "/invocations" else []
    case.call_and_validate(base_url=contract_server, headers=AUTH, timeout=30, excluded_checks=excluded)


def test_the_run_saw_no_server_error(contract_server: str) -> None:
    """After the schemathesis run (same module, same server): no 5xx was ever counted."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{contract_server}/metrics", timeout=10).text
    fam = next(f for f in text_string_to_metric_families(text) if f.name == "ctr_requests")
    statuses = {s.labels["status"] for s in fam.samples if s.name == "ctr_requests_total"}
    assert statuses and not {s for s in statuses if s.startswith("5")}, statuses
    doc = httpx.get(f"{contract_server}/openapi.json", timeout=10).json()
    routes = {s.labels["route"] for s in fam.samples if s.name == "ctr_requests_total"}
    assert set(doc["paths"]) <= routes, set(doc["paths"]) - routes  # every documented route was exercised
