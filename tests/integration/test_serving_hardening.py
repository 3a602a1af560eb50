"""Hard to break, part two: damaged bundles, header floods, upgrades and big batches on a real `ctr serve`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from ctr.bundle import MANIFEST, Bundle, write_manifest
from ctr.rollout.base import RolloutError
from ctr.rollout.local import LocalRollout
from ctr.serving.process import ServiceProcess

from tests.conftest import RAW_SAMPLE

pytestmark = pytest.mark.integration

ROW = {"I1": 3, "I2": 20, "C1": "05db9164", "C9": "a73ee510"}


def _load(url: str, bundle: Path, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}/admin/load", json={"bundle": str(bundle)}, timeout=timeout)


def _stamped(src: Path, dst: Path, version: str) -> Path:
    shutil.copytree(src, dst)
    (dst / "registry.json").write_text(json.dumps({"name": "ctr-lightgbm", "version": version}) + "\n")
    write_manifest(dst)
    return dst


def test_damaged_bundles_are_409_and_the_old_version_serves_on(trained_bundle: Path, tmp_path: Path) -> None:
    with ServiceProcess(trained_bundle, log_path=tmp_path / "serve.log") as svc:
        before = httpx.get(svc.url + "/readyz").json()
        size = (trained_bundle / "model.txt").stat().st_size
        cuts = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999]
        for i, frac in enumerate(cuts):  # the truncation sweep: 12 cut points
            b = shutil.copytree(trained_bundle, tmp_path / f"cut{i}")
            (b / "model.txt").write_bytes((trained_bundle / "model.txt").read_bytes()[: int(size * frac)])
            r = _load(svc.url, b)
            assert r.status_code == 409 and "truncated" in r.json()["error"], (frac, r.text)
            assert svc.proc.poll() is None, f"server died loading a model.txt cut at {frac:.1%}"
            ready = httpx.get(svc.url + "/readyz").json()
            assert (ready["model_version"], ready["digest"]) == (before["model_version"], before["digest"])
            scored = httpx.post(svc.url + "/v1/score", json={"rows": [ROW]})
            assert scored.status_code == 200 and scored.headers["x-model-version"] == before["model_version"]

        # a named pipe in place of probe.json: refused at once, and the next load is not stuck behind it
        fifo = shutil.copytree(trained_bundle, tmp_path / "fifo")
        (fifo / "probe.json").unlink()
        os.mkfifo(fifo / "probe.json")
        t0 = time.monotonic()
        r = _load(svc.url, fifo, timeout=20)
        assert r.status_code == 409 and "not a regular file" in r.json()["error"]
        assert time.monotonic() - t0 < 10

        # a control character (header injection) or a 200 KB version is refused; every route still answers
        for name, version in (("cr", "v1\r\nX-Injected: yes"), ("huge", "v" * 200_000)):
            b = shutil.copytree(trained_bundle, tmp_path / name)
            md = json.loads((b / "metadata.json").read_text())
            (b / "metadata.json").write_text(json.dumps({**md, "model_version": version}))
            write_manifest(b)
            r = _load(svc.url, b)
            assert r.status_code == 409 and "is not 1-64 characters" in r.json()["error"]
        for path in ("/readyz", "/metrics", "/healthz"):
            r = httpx.get(svc.url + path)
            assert r.status_code == 200 and "\r" not in r.text and "X-Injected" not in r.text
        assert httpx.post(svc.url + "/invocations", json={"dataframe_records": [ROW]}).status_code == 200

        # a bundle from before manifests: refused, saying how to re-finalise it
        old = shutil.copytree(trained_bundle, tmp_path / "old")
        (old / MANIFEST).unlink()
        r = _load(svc.url, old)
        assert r.status_code == 409 and "ctr bundle finalize" in r.json()["error"]

        # a good bundle still loads after all that
        good = _stamped(trained_bundle, tmp_path / "good", "5")
        r = _load(svc.url, good)
        assert r.status_code == 200 and r.json() == {"model_version": "5", "previous": before["model_version"]}
        assert svc.proc.poll() is None


def test_copying_over_a_bundle_while_it_loads_never_confuses_or_kills(trained_bundle: Path, tmp_path: Path) -> None:
    a = _stamped(trained_bundle, tmp_path / "a", "1")
    b = shutil.copytree(a, tmp_path / "b")
    b_model = (b / "model.txt").read_text().replace("\n\n", "\n\n\n", 1)  # same trees, other bytes, other digest
    (b / "model.txt").write_text(b_model)
    (b / "registry.json").write_text(json.dumps({"name": "ctr-lightgbm", "version": "2"}) + "\n")
    write_manifest(b)
    digests = {"1": Bundle.load(a).digest, "2": Bundle.load(b).digest}
    target = shutil.copytree(a, tmp_path / "target")
    stop = threading.Event()

    def copier() -> None:
        i = 0
        while not stop.is_set():
            src = (a, b)[i % 2]
            for p in sorted(src.iterdir()):
                shutil.copyfile(p, target / p.name)  # rewrites in place: readers see partial files
            i += 1

    with ServiceProcess(a, log_path=tmp_path / "serve.log") as svc:
        t = threading.Thread(target=copier, daemon=True)
        t.start()
        statuses = []
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                r = _load(svc.url, target)
                statuses.append(r.status_code)
                assert r.status_code in (200, 409), r.text
                ready = httpx.get(svc.url + "/readyz").json()
                assert ready["model_version"] in digests and ready["digest"] == digests[ready["model_version"]], ready
                assert svc.proc.poll() is None
        finally:
            stop.set()
            t.join(10)
        assert len(statuses) >= 20
        assert svc.stop(timeout=15) is not None and svc.proc.returncode is not None


def _flood(port: int, stop: threading.Event, answers: list[bytes]) -> None:
    """One client streaming a never-ending header as fast as it can, reconnecting when cut off."""
    chunk = b"a" * 65536
    while not stop.is_set():
        s = socket.create_connection(("127.0.0.1", port))
        try:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Flood: ")
            while not stop.is_set():
                s.sendall(chunk)
        except OSError:
            try:
                answers.append(s.recv(200))
            except OSError:
                pass
        finally:
            s.close()


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and out.startswith(b"HTTP/1.1 431"):
                    break
        except OSError:
            pass
        return out


def test_header_limits_and_a_header_flood_leave_healthz_fast(trained_bundle: Path, tmp_path: Path) -> None:
    with ServiceProcess(trained_bundle, log_path=tmp_path / "serve.log") as svc:
        big = _raw(svc.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
        assert big.startswith(b"HTTP/1.1 431"), big[:100]
        many = _raw(svc.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(10_000))
                    + b"\r\n")
        assert many.startswith(b"HTTP/1.1 431"), many[:200]
        counted = _raw(svc.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150))
                       + b"\r\n")  # 1.3 KB, but more than 100 headers
        assert counted.startswith(b"HTTP/1.1 431") and b"more than 100 request headers" in counted, counted[:200]
        some = _raw(svc.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    + b"".join(b"X-%d: 1\r\n" % i for i in range(50)) + b"\r\n")
        assert some.startswith(b"HTTP/1.1 200"), some[:100]

        stop, answers = threading.Event(), []
        flooder = threading.Thread(target=_flood, args=(svc.port, stop, answers), daemon=True)
        flooder.start()
        try:
            time.sleep(1.0)
            lat = []
            with httpx.Client(timeout=5) as c:
                for _ in range(300):
                    t0 = time.perf_counter()
                    assert c.get(svc.url + "/healthz").status_code == 200
                    lat.append(time.perf_counter() - t0)
        finally:
            stop.set()
            flooder.join(10)
        p99 = float(np.percentile(lat, 99))
        assert p99 < 0.050, f"/healthz p99 {p99 * 1e3:.1f} ms while a client floods headers"
        assert any(a.startswith(b"HTTP/1.1 431") for a in answers), answers[:3]
        metrics = httpx.get(svc.url + "/metrics").text
        assert 'ctr_requests_total{route="other",status="431"}' in metrics


def test_websocket_upgrade_is_400_and_counted(trained_bundle: Path, tmp_path: Path) -> None:
    with ServiceProcess(trained_bundle, log_path=tmp_path / "serve.log") as svc:
        r = httpx.get(svc.url + "/healthz", headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                                     "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                                     "Sec-WebSocket-Version": "13"})
        assert r.status_code == 400 and "not supported" in r.json()["error"]
        assert httpx.get(svc.url + "/healthz").status_code == 200
        assert 'ctr_requests_total{route="/healthz",status="400"} 1' in httpx.get(svc.url + "/metrics").text


def test_bad_settings_stop_the_service_at_start_naming_the_variable(trained_bundle: Path) -> None:
    env = {**os.environ, "CTR_MAX_ROWS": "-5"}
    r = subprocess.run([sys.executable, "-m", "ctr.cli", "serve", "--model", str(trained_bundle), "--port", "1"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and "CTR_MAX_ROWS=-5 is out of range" in r.stderr


def test_big_batches_do_not_stall_single_rows(trained_bundle: Path, tmp_path: Path) -> None:
    lines = RAW_SAMPLE.read_text().splitlines()
    rows = []
    from ctr.data.reader import read_text
    from ctr.schema import FEATURE_COLUMNS

    table, _ = read_text("\n".join(lines) + "\n", require_label=False)
    base = [{k: v for k, v in r.items() if v is not None} for r in table.select(FEATURE_COLUMNS).to_pylist()]
    rows = (base * (10_000 // len(base) + 1))[:10_000]
    body = json.dumps({"rows": rows}).encode()
    with ServiceProcess(trained_bundle, log_path=tmp_path / "serve.log") as svc:
        stop = threading.Event()
        done = [0, 0]

        def batches(i: int) -> None:
            with httpx.Client(timeout=60) as c:
                while not stop.is_set():
                    r = c.post(svc.url + "/v1/score", content=body, headers={"Content-Type": "application/json"})
                    assert r.status_code == 200 and len(r.json()["probabilities"]) == 10_000
                    done[i] += 1

        ts = [threading.Thread(target=batches, args=(i,), daemon=True) for i in range(2)]
        for t in ts:
            t.start()
        time.sleep(1.0)
        lat = []
        try:
            with httpx.Client(timeout=10) as c:
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline:
                    t0 = time.perf_counter()
                    assert c.post(svc.url + "/v1/score", json={"rows": [ROW]}).status_code == 200
                    lat.append(time.perf_counter() - t0)
        finally:
            stop.set()
            for t in ts:
                t.join(60)
        assert sum(done) >= 4, done
        p99 = float(np.percentile(lat, 99))
        print(f"single-row p99 {p99 * 1e3:.1f} ms over {len(lat)} requests; batches {done}")
        # the benchmark's goal is 20 ms with wrk; these clients (httpx, one process, same 2 cores) get slack
        assert p99 < 0.050, f"single-row p99 {p99 * 1e3:.1f} ms while 2 clients stream 10k-row batches"


def test_rollback_pre_checks_the_previous_bundle(trained_bundle: Path, tmp_path: Path) -> None:
    prev = shutil.copytree(trained_bundle, tmp_path / "prev")
    data = (prev / "model.txt").read_bytes()
    (prev / "model.txt").write_bytes(data[: len(data) // 2])
    roll = LocalRollout(tmp_path / "serving", port=1)  # nothing listens: a swap would fail differently
    roll._save({"bundle": str(trained_bundle), "version": "2", "previous_bundle": str(prev), "previous_version": "1"})
    before = roll.state_path.read_text()
    with pytest.raises(RolloutError, match="pre-flight.*truncated"):
        roll.rollback()
    assert roll.state_path.read_text() == before
