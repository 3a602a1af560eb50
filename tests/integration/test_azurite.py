"""The Azure Blob landing zone for real: Azurite (npm, pinned in package.json) on a free loopback port,
days uploaded with the Azure SDK, then read -> validate -> stage through adlfs and compared with the
same files read from a local folder."""

from __future__ import annotations

import datetime as dt
import gzip
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ctr.data.azure_storage import env_from_connection, storage_options
from ctr.data.generate import GeneratorConfig, generate
from ctr.data.landing import LandingZoneError, list_day_files, list_days, stage_day
from ctr.data.reader import read_table

from tests.azurite import azurite as start_azurite
from tests.azurite import connection_string
from tests.conftest import CSV_SAMPLE, RAW_SAMPLE

pytestmark = pytest.mark.integration

END = dt.date(2026, 11, 20)


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Azurite's blob service on 127.0.0.1:<free port>; yields its connection string; stopped afterwards."""
    with start_azurite(tmp_path_factory.mktemp("azurite")) as port:
        yield connection_string(port)


@pytest.fixture(scope="module")
def local_landing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two generated days, a day mixing the real samples with malformed lines, under a local root."""
    root = tmp_path_factory.mktemp("landing")
    generate(root, 2, 5_000, END, GeneratorConfig(seed=21, cardinality_scale=0.01))
    mixed = root / "day=2026-11-21"
    mixed.mkdir()
    (mixed / "part-00000.tsv").write_bytes(RAW_SAMPLE.read_bytes())
    (mixed / "part-00001.csv").write_bytes(CSV_SAMPLE.read_bytes())
    lines = RAW_SAMPLE.read_bytes().splitlines()[:20]
    lines[3] = b"2" + lines[3][1:]
    lines[7] = lines[7] + b"\textra"
    lines[11] = b""
    (mixed / "part-00002.tsv.gz").write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    return root


@pytest.fixture(scope="module")
def blob_landing(azurite: str, local_landing: Path) -> str:
    """The same files uploaded to container `landing` under prefix `criteo/` with the Azure SDK."""
    from azure.storage.blob import BlobServiceClient

    svc = BlobServiceClient.from_connection_string(azurite)
    container = svc.create_container("landing")
    for f in sorted(local_landing.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                container.upload_blob(f"criteo/{f.relative_to(local_landing).as_posix()}", fh)
    return "abfs://landing/criteo"


@pytest.fixture
def azure_env(azurite: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for k in ("CTR_AZURE_ACCOUNT_NAME", "CTR_AZURE_ACCOUNT_KEY", "CTR_AZURE_SAS_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("CTR_AZURE_CONNECTION_STRING", azurite)
    return azurite


def test_samples_and_generated_day_read_identically_from_blob(azure_env: str, blob_landing: str,
                                                              local_landing: Path) -> None:
    files = list_day_files(blob_landing, dt.date(2026, 11, 21)) + list_day_files(blob_landing, END)
    assert [f.rsplit("/", 1)[-1] for f in files] == ["part-00000.tsv", "part-00001.csv", "part-00002.tsv.gz",
                                                     "part-00000.tsv.gz"]
    assert all(f.startswith("abfs://landing/criteo/day=") for f in files)
    for f in files:
        remote_table, remote_bad = read_table(f)
        local_table, local_bad = read_table(str(local_landing / f.split("criteo/", 1)[1]))
        assert remote_table.equals(local_table), f
        assert remote_bad == local_bad, f
    raw, _ = read_table(files[0])
    assert raw.num_rows == 100 and read_table(files[1])[0].num_rows == 200


def test_read_validate_stage_over_blob_equals_local(azure_env: str, blob_landing: str, local_landing: Path,
                                                    tmp_path: Path) -> None:
    assert list_days(blob_landing) == [END - dt.timedelta(days=1), END, dt.date(2026, 11, 21)]
    assert list_days(blob_landing) == list_days(str(local_landing))
    for day in list_days(blob_landing):
        remote = stage_day(blob_landing, tmp_path / "rs", tmp_path / "rq", day)
        local = stage_day(str(local_landing), tmp_path / "ls", tmp_path / "lq", day)
        assert (remote.rows_in, remote.rows_ok, remote.rows_quarantined, remote.clicks, remote.reasons) == \
               (local.rows_in, local.rows_ok, local.rows_quarantined, local.clicks, local.reasons)
        assert remote.rows_in == remote.rows_ok + remote.rows_quarantined
        for part in sorted(Path(local.staged).glob("part-*.parquet")):
            assert pq.read_table(Path(remote.staged) / part.name).equals(pq.read_table(part))
        if local.quarantine:
            strip = [ln.split("\t", 1)[1] for ln in Path(local.quarantine).read_text().splitlines()[1:]]
            assert [ln.split("\t", 1)[1] for ln in Path(remote.quarantine).read_text().splitlines()[1:]] == strip
    mixed = stage_day(blob_landing, tmp_path / "rs", tmp_path / "rq", dt.date(2026, 11, 21))
    assert (mixed.rows_in, mixed.rows_quarantined) == (320, 3)
    q = Path(mixed.quarantine).read_text().splitlines()[1:]
    assert [ln.split("\t")[1:3] for ln in q] == [
        ["4", "label: expected 0 or 1, found '2'"], ["8", "expected 40 fields, found 41"], ["12", "empty line"]]
    assert all(ln.startswith("abfs://landing/criteo/day=2026-11-21/part-00002.tsv.gz\t") for ln in q)


def test_missing_container_and_missing_day_name_what_was_looked_for(azure_env: str, blob_landing: str) -> None:
    with pytest.raises(LandingZoneError, match=r"container 'nosuch' does not exist in storage account 'devstoreaccount1'"):
        list_day_files("abfs://nosuch/criteo", END)
    with pytest.raises(LandingZoneError, match="container 'nosuch' does not exist"):
        list_days("az://nosuch")
    with pytest.raises(LandingZoneError,
                       match=r"day=2026-11-01 has 0 files under abfs://landing/criteo/day=2026-11-01; is the export late"):
        list_day_files(blob_landing, dt.date(2026, 11, 1))


def test_airflow_wasb_connection_reaches_the_landing_zone(azurite: str, blob_landing: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.models.connection import Connection

    conn = Connection(conn_id="wasb_default", conn_type="wasb", extra={"connection_string": azurite})
    env = env_from_connection(conn.host, conn.login, conn.password, conn.extra_dejson)
    assert env == {"CTR_AZURE_CONNECTION_STRING": azurite}
    for k in list(env) + ["CTR_AZURE_ACCOUNT_NAME"]:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert len(list_days(blob_landing)) == 3


def test_without_credentials_the_error_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("CTR_AZURE_CONNECTION_STRING", "CTR_AZURE_ACCOUNT_NAME"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="CTR_AZURE_CONNECTION_STRING"):
        list_days("abfs://landing/criteo")


@pytest.mark.parametrize("host,login,password,extra,expected", [
    (None, "acct", "k3y", {}, {"CTR_AZURE_ACCOUNT_NAME": "acct", "CTR_AZURE_ACCOUNT_KEY": "k3y"}),
    ("https://acct.blob.core.windows.net", "app-id", "s3cret", {"tenant_id": "t-1"},
     {"CTR_AZURE_ACCOUNT_NAME": "acct", "CTR_AZURE_TENANT_ID": "t-1", "CTR_AZURE_CLIENT_ID": "app-id",
      "CTR_AZURE_CLIENT_SECRET": "s3cret"}),
    (None, "acct", None, {"extra__wasb__sas_token": "sv=x&sig=y"},
     {"CTR_AZURE_ACCOUNT_NAME": "acct", "CTR_AZURE_SAS_TOKEN": "sv=x&sig=y"}),
    (None, "acct", None, {"shared_access_key": "k"}, {"CTR_AZURE_ACCOUNT_NAME": "acct", "CTR_AZURE_ACCOUNT_KEY": "k"}),
    ("acct", None, None, {}, {"CTR_AZURE_ACCOUNT_NAME": "acct"}),
    (None, "app-id", "s3cret", {"tenantId": "t-1", "account_name": "acct"},  # an `azure` connection
     {"CTR_AZURE_ACCOUNT_NAME": "acct", "CTR_AZURE_TENANT_ID": "t-1", "CTR_AZURE_CLIENT_ID": "app-id",
      "CTR_AZURE_CLIENT_SECRET": "s3cret"}),
])
def test_wasb_connection_shapes_map_to_adlfs_options(host, login, password, extra, expected) -> None:
    env = env_from_connection(host, login, password, extra)
    assert env == expected
    opts = storage_options("abfs", env)
    assert opts["account_name"] == "acct"
    if "CTR_AZURE_TENANT_ID" in env:
        assert (opts["tenant_id"], opts["client_id"], opts["client_secret"]) == ("t-1", "app-id", "s3cret")
    if env == {"CTR_AZURE_ACCOUNT_NAME": "acct"}:
        assert opts == {"account_name": "acct", "anon": False}  # DefaultAzureCredential
    assert storage_options("file", env) == {}


def test_blob_fingerprint_has_etag_and_a_rewritten_blob_is_restaged(azure_env: str, azurite: str, tmp_path: Path,
                                                                   caplog) -> None:
    """adlfs lists size, last_modified and ETag per blob: a re-upload of a day's blob re-stages it."""
    import logging

    from azure.storage.blob import BlobServiceClient
    from ctr.data.landing import fingerprint_day

    container = BlobServiceClient.from_connection_string(azurite).get_container_client("landing")
    day, name = dt.date(2026, 11, 22), "criteo-restage/day=2026-11-22/part-00000.tsv"
    lines = RAW_SAMPLE.read_bytes().splitlines(keepends=True)
    container.upload_blob(name, b"".join(lines[:40]))
    root = "abfs://landing/criteo-restage"
    first = stage_day(root, tmp_path / "s", tmp_path / "q", day)
    (f,) = first.fingerprint["files"]
    assert first.fingerprint["root"] == root and f["name"] == "part-00000.tsv" and f["size"] == len(b"".join(lines[:40]))
    assert f["etag"].startswith('"') and f["mtime_ms"] > 1_700_000_000_000
    assert stage_day(root, tmp_path / "s", tmp_path / "q", day).to_json() == first.to_json()
    container.upload_blob(name, b"".join(lines[:40]).replace(b"\t", b"\t", 1), overwrite=True)  # same bytes, new ETag
    with caplog.at_level(logging.INFO, logger="ctr.data.landing"):
        again = stage_day(root, tmp_path / "s", tmp_path / "q", day)
    assert "day=2026-11-22 re-staged: part-00000.tsv changed (" in caplog.text and "ETag" in caplog.text
    assert again.fingerprint["files"][0]["etag"] != f["etag"] and again.rows_ok == 40
    assert fingerprint_day(root, day).digest == again.digest


def test_prediction_log_files_are_uploaded_whole_to_blob(azure_env: str, tmp_path: Path) -> None:
    """Closed prediction-log files go to the container as date=D/<name>, byte for byte the local file (issue 17)."""
    import numpy as np
    import orjson
    from azure.storage.blob import BlobServiceClient
    from ctr.serving.predlog import PredictionLog, blob_uploader, log_files

    svc = BlobServiceClient.from_connection_string(azure_env)
    container = svc.create_container("predictions")
    plog = PredictionLog(tmp_path, rate=1.0, rotate_rows=5, uploader=blob_uploader("az://predictions/live")).start()
    for i in range(3):
        plog.log("/v1/score", b"application/json", orjson.dumps({"rows": [{"I1": i}] * 4}), np.full(4, 0.25), "v1")
        plog.flush()
    plog.close()
    today = dt.datetime.now(dt.UTC).date()
    local = {f.name: f.read_bytes() for f in log_files(tmp_path, today)}
    blobs = {b.name: container.download_blob(b.name).readall() for b in container.list_blobs(name_starts_with="live/")}
    assert len(local) >= 2 and blobs == {f"live/date={today.isoformat()}/{n}": data for n, data in local.items()}
    with pytest.raises(ValueError, match="CTR_PREDICTION_LOG_URL"):
        blob_uploader("/local/path")

    # the monitor reads the container's copy (the service's disk is not the monitor's): the same records
    import json

    import pyarrow as pa
    from ctr.monitoring.drift import build_reference
    from ctr.monitoring.monitor import NOTHING, monitor_day
    from ctr.schema import CAT_COLUMNS, FEATURE_COLUMNS
    from ctr.serving.predlog import read_log

    assert list(read_log("az://predictions/live", today)) == list(read_log(tmp_path, today))
    ref = build_reference([pa.table({c: pa.array(list(range(50)) if c == "I1" else [None] * 50,
                                                 pa.int64() if c not in CAT_COLUMNS else pa.string())
                                     for c in FEATURE_COLUMNS})], {c: [] for c in CAT_COLUMNS}, source="test")
    (tmp_path / "ref.json").write_text(json.dumps(ref.to_json()))
    doc = monitor_day(today, "az://predictions/live", tmp_path / "out", reference=tmp_path / "ref.json")
    assert doc["log"] == f"az://predictions/live/date={today.isoformat()}" and doc["files"] == len(local)
    assert doc["rows"] == 12 and doc["versions"]["v1"]["drift"]["rows"] == 12
    empty = monitor_day(today - dt.timedelta(days=1), "az://predictions/live", tmp_path / "out2", reference=tmp_path / "ref.json")
    assert empty["status"] == NOTHING and "az://predictions/live/date=" in empty["reason"]
