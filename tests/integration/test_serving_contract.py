"""The API contract from the live service's own /openapi.json, checked by schemathesis (issue 22).

Every operation the document lists (it is read from the running service, so a route added to the
document is covered without touching this file) is called with schemathesis-generated requests,
valid and invalid (`GenerationMode.POSITIVE` and `NEGATIVE`), with and without the bearer token; each answer must carry a documented status
code, content type, headers and body, and never a 5xx. Bounded: a fixed number of examples per
operation, derandomised (same cases every run), and a time limit for the whole module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from ctr.serving.openapi import OPENAPI
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import serving

pytestmark = pytest.mark.integration

TOKEN = "contract-test-token"  # scoring and admin routes need it; health, metrics and the document do not
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 40
# operations whose validity has rules across fields that JSON Schema cannot state (see the test below)
CROSS_FIELD_RULES = {"/invocations", "/v1/rank", "/admin/candidate"}


@pytest.fixture(scope="module")
def contract_server(trained_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`ctr serve` with tokens on a free loopback port (conftest's `serving`), for the module."""
    with serving(trained_bundle, tmp_path_factory.mktemp("contract"), CTR_SERVE_TOKEN=TOKEN, CTR_ADMIN_TOKEN=TOKEN,
                 CTR_LOAD_TIMEOUT_S="10") as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(contract_server: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{contract_server}/openapi.json", timeout=10)


# One test per (operation, generation mode) of the document the service serves. The ids come from the
# same module's copy (ctr.serving.openapi) at collection time; the test checks that the live document
# lists exactly these, then generates from the live one. (schemathesis.pytest.from_fixture would read
# the live document only at run time, but it sets `request.node._nodeid`, which pytest 9 no longer has.)
# Operations without parameters or body have nothing to make invalid: positive mode only.
OPERATIONS = [(method.upper(), path) for path, ops in OPENAPI["paths"].items() for method in ops]
CASES = [(m, p, mode) for m, p in OPERATIONS for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if mode is GenerationMode.POSITIVE or {"requestBody", "parameters"} & OPENAPI["paths"][p][m.lower()].keys()]


def test_the_live_document_is_the_one_tested(api_schema: schemathesis.BaseSchema) -> None:
    live = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert live <= set(OPERATIONS) and len(live) >= 6, live  # (schemathesis leaves out the document's own path)
    for method, path in OPERATIONS:
        assert api_schema[path][method].path == path


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {mode}" for m, p, mode in CASES])
@pytest.mark.timeout(300)
def test_every_documented_operation_keeps_the_contract(api_schema: schemathesis.BaseSchema, contract_server: str,
                                                       method: str, path: str, mode: GenerationMode) -> None:
    """All of schemathesis's checks (5xx, status codes, content types, headers, bodies, auth, invalid
    data refused, valid data accepted), except "valid data accepted" where JSON Schema cannot say what
    is valid: a `dataframe_split` row's values must match its `columns` one by one (/invocations), and a
    /v1/rank field may not stand in both the context and a candidate, nor an id twice, unless the
    request says so; a canary loaded without `canary_percent` (/admin/candidate). Such schema-valid bodies
    are (rightly) refused with a 422 naming the field. The other checks still run on them.

    The admin routes (/admin/load, /admin/candidate, /admin/promote, /admin/drop, /admin/traffic) run too:
    generated bundle paths are never loadable bundles, so nothing changes state (409, bundle refused; no
    candidate to promote; drop with nothing loaded is a no-op), and the token checks are exercised."""
    excluded = [positive_data_acceptance] if path in CROSS_FIELD_RULES else []

    @given(case=api_schema[path][method].as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=contract_server, headers=AUTH, timeout=30, excluded_checks=excluded)

    run()


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
