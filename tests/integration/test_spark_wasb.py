"""The Spark job reads the landing zone from Azure Blob storage over `wasb://` (hadoop-azure from
`make jars`), against Azurite on a free loopback port: the same rows, bad-line quarantine, vocabularies,
model and holdout metrics as the same files read from a local folder.

hadoop-azure derives the blob endpoint from the URI's host (`http://<account>.blob.<suffix>`), so
the test addresses Azurite production-style as `devstoreaccount1.blob.localhost:<port>` and gives the
driver JVM a hosts file mapping that name to 127.0.0.1 (`-Djdk.net.hosts.file`); a real account
needs neither (docs/databricks.md has the abfss:// settings).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.azurite import ACCOUNT, KEY, azurite, connection_string
from tests.conftest import REPO
from tests.integration.test_spark_job import BAD_LINES

pytestmark = pytest.mark.integration

HOLDOUT = dt.date(2026, 11, 20)
START, END = HOLDOUT - dt.timedelta(days=2), HOLDOUT - dt.timedelta(days=1)


@pytest.fixture(scope="module")
def azurite_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with azurite(tmp_path_factory.mktemp("azurite-wasb")) as port:
        yield port


@pytest.fixture(scope="module")
def landing(tmp_path_factory: pytest.TempPathFactory, azurite_port: int) -> tuple[Path, str]:
    """3 generated days (one with a file of malformed lines) locally, and the same files in a blob container."""
    from azure.storage.blob import BlobServiceClient
    from ctr.data.generate import GeneratorConfig, generate

    root = tmp_path_factory.mktemp("wasb-landing")
    generate(root, 3, 4000, HOLDOUT, GeneratorConfig(seed=11))
    (root / f"day={END}" / "part-00001.tsv").write_text("\n".join(BAD_LINES) + "\n")
    cs = connection_string(azurite_port)
    container = BlobServiceClient.from_connection_string(cs).create_container("landing")
    for f in sorted(root.rglob("day=*/*")):
        with open(f, "rb") as fh:
            container.upload_blob(f"criteo/{f.relative_to(root).as_posix()}", fh)
    return root, f"wasb://landing@{ACCOUNT}.blob.localhost:{azurite_port}/criteo"


def _job(data: str, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "train_spark.py"), "--data", data, "--from", START.isoformat(),
                        "--to", END.isoformat(), "--holdout", HOLDOUT.isoformat(), "--out", str(out),
                        "--max-bad-fraction", "0.01"], capture_output=True, text=True, env=env, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def test_wasb_landing_zone_gives_the_local_result(landing: tuple[Path, str], azurite_port: int, tmp_path: Path):
    root, wasb = landing
    host = f"{ACCOUNT}.blob.localhost"
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost {socket.gethostname()} {host}\n")
    base = {**os.environ, "CTR_SPARK_MASTER": "local[2]", "CTR_HOME": str(tmp_path / "home")}
    conf = (f"spark.driver.extraJavaOptions=-Djdk.net.hosts.file={hosts};"
            f"spark.hadoop.fs.azure.account.key.{host}:{azurite_port}={KEY}")
    remote = _job(wasb, tmp_path / "wasb", {**base, "CTR_SPARK_CONF": conf})
    _job(str(root), tmp_path / "local", base)
    assert KEY not in remote.stderr

    # the same rows and the same bad lines, quarantined the same way
    reports = [json.loads((tmp_path / d / "data_report.json").read_text()) for d in ("wasb", "local")]
    for rep, prefix in zip(reports, (wasb, root.as_uri().replace("file:///", "file:/")), strict=True):
        for day in rep["days"].values():  # where the files were and the quarantine went differ, nothing else
            assert all(f.startswith(prefix + "/") for f in day.pop("files")), day
            day.pop("quarantine")
    assert reports[0] == reports[1] and reports[0]["days"][END.isoformat()]["rows_quarantined"] == 6
    q = [sorted(p.read_text().splitlines()[1:] for p in (tmp_path / d / "quarantine").rglob("*.csv")) for d in ("wasb", "local")]
    strip = [[sorted(ln.split("\t", 1)[1] for ln in part) for part in side] for side in q]  # drop the file URI column
    assert strip[0] == strip[1] and sum(len(p) for p in strip[0]) == 6
    for name in ("features.json", "model.txt"):
        assert (tmp_path / "wasb" / "model" / name).read_bytes() == (tmp_path / "local" / "model" / name).read_bytes(), name
    m = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("wasb", "local")]
    assert m[0]["candidate"] == m[1]["candidate"] and m[0]["rows"] == m[1]["rows"]
    assert m[0]["drift"] == m[1]["drift"] and len(m[0]["drift"]["features"]) == 39  # feature/score PSI as well
