"""An unreachable Azure landing zone fails within CTR_AZURE_CONNECT_TIMEOUT_S, naming the endpoint and the bound.

Before, adlfs's default retry policy made `list_days` on a dead endpoint take ~165 s to fail. The
endpoints here are loopback sockets: a closed port, one that accepts and never answers, and a
server that answers 403 (reachable: any HTTP answer counts).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from ctr.data.azure_storage import StorageUnreachable, blob_endpoint, check_reachable, connect_timeout_s
from ctr.data.landing import LandingZoneError, list_days

KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="  # Azurite's public key


def _conn(port: int) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={KEY};"
            f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """Accepts connections (kernel backlog) and never answers a byte."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@pytest.fixture
def forbidding_server() -> Iterator[int]:
    class H(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def test_closed_port_fails_fast_naming_endpoint_and_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    port = _closed_port()
    monkeypatch.setenv("CTR_AZURE_CONNECTION_STRING", _conn(port))
    monkeypatch.setenv("CTR_AZURE_CONNECT_TIMEOUT_S", "3")
    t0 = time.monotonic()
    with pytest.raises(LandingZoneError) as e:
        list_days("abfs://landing/criteo")
    assert time.monotonic() - t0 < 3 + 5  # the bound holds (it took ~165 s before)
    msg = str(e.value)
    assert f"http://127.0.0.1:{port}/devstoreaccount1 did not answer" in msg
    assert "bound 3 s, CTR_AZURE_CONNECT_TIMEOUT_S" in msg and "abfs://landing/criteo" in msg


def test_endpoint_that_never_answers_times_out_within_the_bound(silent_port: int) -> None:
    t0 = time.monotonic()
    with pytest.raises(StorageUnreachable, match="ReadTimeout"):
        check_reachable({"connection_string": _conn(silent_port)}, timeout_s=1.5)
    assert time.monotonic() - t0 < 1.5 + 3


def test_any_http_answer_counts_as_reachable(forbidding_server: int) -> None:
    check_reachable({"connection_string": _conn(forbidding_server)}, timeout_s=5)


def test_endpoint_from_each_kind_of_options() -> None:
    assert blob_endpoint({"connection_string": _conn(10000)}) == "http://127.0.0.1:10000/devstoreaccount1"
    assert blob_endpoint({"connection_string": "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=k;"
                                               "EndpointSuffix=core.chinacloudapi.cn"}) == \
        "https://acct.blob.core.chinacloudapi.cn"
    assert blob_endpoint({"account_name": "acct", "account_key": "k"}) == "https://acct.blob.core.windows.net"


@pytest.mark.parametrize("raw,ok", [("", True), ("2.5", True), ("abc", False), ("-1", False), ("0", False),
                                    ("601", False)])
def test_timeout_setting_is_validated_naming_the_variable(raw: str, ok: bool) -> None:
    env = {"CTR_AZURE_CONNECT_TIMEOUT_S": raw}
    if ok:
        assert connect_timeout_s(env) > 0
    else:
        with pytest.raises(ValueError, match="CTR_AZURE_CONNECT_TIMEOUT_S"):
            connect_timeout_s(env)
