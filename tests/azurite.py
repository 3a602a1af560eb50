"""Azurite's blob service for tests: started on 127.0.0.1 at a free port, stopped afterwards."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, wait_http
from tests.loopback import stop_process

AZURITE = REPO / "node_modules" / ".bin" / "azurite-blob"
# Azurite's well-known development account (public, documented; not a secret)
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def connection_string(port: int) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};")


@contextmanager
def azurite(work: Path) -> Iterator[int]:
    """Azurite (npm, pinned in package.json) storing under `work`; yields its blob port once it answers."""
    if not AZURITE.exists():
        pytest.fail(f"{AZURITE} not found; run `make node-deps` (npm ci installs the pinned azurite)")
    port = free_port()
    log = open(work / "azurite.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(work),
                             "--silent", "--skipApiVersionCheck", "--loose", "--disableTelemetry"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/{ACCOUNT}?comp=list", timeout=60, proc=proc)
        yield port
    finally:
        stop_process(proc)
        log.close()
