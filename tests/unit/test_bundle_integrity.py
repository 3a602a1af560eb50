"""The bundle as a checked artefact: manifest, one loader, strict versions, and the smaller CLI/settings guards."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from ctr.bundle import (
    MANIFEST,
    Bundle,
    BundleError,
    clean_metadata,
    read_bundle_files,
    refinalize,
    write_manifest,
)
from ctr.cli import main
from ctr.data.generate import GeneratorConfig, generate
from ctr.data.landing import stage_day
from ctr.serving.app import service_limits
from ctr.settings import Settings

from tests.conftest import RAW_SAMPLE

END = dt.date(2026, 11, 20)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few-tree model on two small generated days, written by train (so through finalize_bundle)."""
    from ctr.train import TrainConfig, train

    root = tmp_path_factory.mktemp("integrity")
    generate(root, 2, 3000, END, GeneratorConfig(seed=3, cardinality_scale=0.001))
    for d in (END - dt.timedelta(days=1), END):
        stage_day(str(root), root / "staging", root / "quarantine", d)
    out = root / "model"
    train(root / "staging", out, TrainConfig(start=END - dt.timedelta(days=1), end=END, rounds=8, num_threads=1))
    return out


def copy_of(bundle: Path, dst: Path) -> Path:
    shutil.copytree(bundle, dst)
    return dst


def test_finalize_writes_a_manifest_of_every_file(bundle: Path) -> None:
    doc = json.loads((bundle / MANIFEST).read_text())
    names = sorted(p.name for p in bundle.iterdir() if p.name != MANIFEST)
    assert sorted(doc["files"]) == names and {"model.txt", "features.json", "metadata.json", "probe.json",
                                               "MLmodel"} <= set(names)
    for name, entry in doc["files"].items():
        data = (bundle / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert Bundle.load(bundle).probe is not None


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.2, 0.33, 0.5, 0.66, 0.8, 0.9, 0.99, 0.999])
def test_truncated_model_is_refused_before_lightgbm_parses_it(bundle: Path, tmp_path: Path, fraction: float) -> None:
    b = copy_of(bundle, tmp_path / "b")
    data = (b / "model.txt").read_bytes()
    (b / "model.txt").write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(BundleError, match=r"model.txt is \d+ bytes, its manifest says \d+: truncated"):
        Bundle.load(b)


def test_same_size_damage_is_refused_by_the_hash(bundle: Path, tmp_path: Path) -> None:
    b = copy_of(bundle, tmp_path / "b")
    data = bytearray((b / "features.json").read_bytes())
    data[len(data) // 2] ^= 1
    (b / "features.json").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="features.json does not match its SHA-256"):
        Bundle.load(b)


def test_a_named_pipe_is_refused_and_never_blocks(bundle: Path, tmp_path: Path) -> None:
    b = copy_of(bundle, tmp_path / "b")
    (b / "probe.json").unlink()
    os.mkfifo(b / "probe.json")
    box: list[BaseException] = []
    t = threading.Thread(target=lambda: _catch(box, Bundle.load, b), daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(10)
    assert not t.is_alive(), "Bundle.load blocked on a named pipe"
    assert time.monotonic() - t0 < 10
    assert len(box) == 1 and isinstance(box[0], BundleError) and "not a regular file" in str(box[0])


def test_a_symlink_to_a_device_is_refused(bundle: Path, tmp_path: Path) -> None:
    b = copy_of(bundle, tmp_path / "b")
    (b / "metadata.json").unlink()
    (b / "metadata.json").symlink_to("/dev/zero")
    with pytest.raises(BundleError, match="metadata.json is not a regular file"):
        Bundle.load(b)


def test_a_bundle_without_manifest_is_refused_with_how_to_refinalise(bundle: Path, tmp_path: Path) -> None:
    b = copy_of(bundle, tmp_path / "b")
    (b / MANIFEST).unlink()
    with pytest.raises(BundleError, match=r"has no manifest.json .*ctr bundle finalize"):
        Bundle.load(b)
    assert main(["bundle", "finalize", str(b)]) == 0
    assert Bundle.load(b).version == Bundle.load(bundle).version


def test_refinalise_refuses_a_damaged_old_bundle_without_crashing(bundle: Path, tmp_path: Path) -> None:
    b = copy_of(bundle, tmp_path / "b")
    (b / MANIFEST).unlink()
    data = (b / "model.txt").read_bytes()
    (b / "model.txt").write_bytes(data[: len(data) // 2])  # LightGBM aborts the (child) process parsing this
    with pytest.raises(BundleError, match="failed its load/probe check.*not finalised"):
        refinalize(b)
    assert not (b / MANIFEST).exists()


def test_registry_json_outside_the_manifest_is_refused(bundle: Path, tmp_path: Path) -> None:
    b = copy_of(bundle, tmp_path / "b")
    (b / "registry.json").write_text('{"name": "x", "version": "9"}\n')
    with pytest.raises(BundleError, match="registry.json is not in manifest.json"):
        Bundle.load(b)


@pytest.mark.parametrize("version", ["v1\r\nX-Injected: yes", "a" * 200_000, "", " 1", "1/2", "é"])
def test_versions_must_match_the_strict_pattern(bundle: Path, tmp_path: Path, version: str) -> None:
    b = copy_of(bundle, tmp_path / "b")
    md = json.loads((b / "metadata.json").read_text())
    (b / "metadata.json").write_text(json.dumps({**md, "model_version": version}))
    write_manifest(b)
    if version == "":  # empty: no registry version, so the content digest names it
        assert Bundle.load(b).version == Bundle.load(bundle).digest[:12]
        return
    with pytest.raises(BundleError, match="is not 1-64 characters"):
        Bundle.load(b)


def test_good_versions_pass(bundle: Path, tmp_path: Path) -> None:
    b = copy_of(bundle, tmp_path / "b")
    (b / "registry.json").write_text('{"name": "ctr-lightgbm", "version": "12"}\n')
    write_manifest(b)
    assert Bundle.load(b).version == "12"


def test_version_and_digest_come_from_the_checked_bytes(bundle: Path) -> None:
    files = read_bundle_files(bundle)
    b = Bundle.load(bundle)
    h = hashlib.sha256()
    for name in ("model.txt", "features.json"):
        h.update(name.encode())
        h.update(hashlib.sha256(files[name]).digest())
    assert b.digest == h.hexdigest() and b.version == b.digest[:12]


def test_nan_valid_auc_becomes_null_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "metadata.json").write_text(json.dumps({"valid_auc": float("nan"), "rows": {"x": float("inf")},
                                                        "ok": 1.5}))
    with caplog.at_level("WARNING"):
        assert clean_metadata(tmp_path) == ["valid_auc", "rows.x"]
    text = (tmp_path / "metadata.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == \
        {"valid_auc": None, "rows": {"x": None}, "ok": 1.5}
    assert "valid_auc" in caplog.text and "only one label" in caplog.text


def test_score_output_equal_to_an_input_is_refused(bundle: Path, tmp_path: Path, capsys) -> None:
    inp = tmp_path / "rows.tsv"
    shutil.copy(RAW_SAMPLE, inp)
    before = inp.read_bytes()
    assert main(["score", "--model", str(bundle), "--input", str(inp), "--output", str(tmp_path / "." / "rows.tsv")]) == 1
    assert "is also an input" in capsys.readouterr().err and inp.read_bytes() == before


def test_score_on_a_truncated_bundle_is_a_one_line_error(bundle: Path, tmp_path: Path) -> None:
    b = copy_of(bundle, tmp_path / "b")
    data = (b / "model.txt").read_bytes()
    (b / "model.txt").write_bytes(data[: len(data) // 3])
    r = subprocess.run([sys.executable, "-m", "ctr.cli", "score", "--model", str(b), "--input", str(RAW_SAMPLE),
                        "--output", str(tmp_path / "out.csv")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    err = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(err) == 1 and "truncated" in err[0] and "model.txt" in err[0]


def test_port_out_of_range_is_refused(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", "x", "--port", "99999"])
    assert e.value.code == 2 and "port 99999 is out of range" in capsys.readouterr().err


def test_settings_name_the_bad_variable() -> None:
    with pytest.raises(ValueError, match="CTR_SERVE_PORT=99999 is out of range"):
        Settings.from_env({"CTR_SERVE_PORT": "99999"})
    with pytest.raises(ValueError, match="CTR_MAX_ROWS=-5 is out of range"):
        service_limits({"CTR_MAX_ROWS": "-5"})
    with pytest.raises(ValueError, match="CTR_MAX_HEADERS='lots' is not an integer"):
        service_limits({"CTR_MAX_HEADERS": "lots"})
    assert service_limits({})["CTR_MAX_ROWS"] == 10_000


def test_invalid_utf8_on_a_wrong_width_line_prints_no_traceback(tmp_path: Path) -> None:
    f = tmp_path / "in.tsv"
    f.write_bytes(RAW_SAMPLE.read_bytes().splitlines(keepends=True)[0] + b"0\t1\t\xff\xfe\tbad\n")
    code = ("import sys; from ctr.data.reader import iter_chunks\n"
            "for c in iter_chunks(sys.argv[1], require_label=False): print(c.table.num_rows, len(c.bad))")
    r = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["1", "1"], r
    assert "Exception ignored" not in r.stderr and "UnicodeDecodeError" not in r.stderr, r.stderr


def test_a_load_past_its_time_limit_fails_and_the_old_model_serves_on(bundle: Path, monkeypatch) -> None:
    from ctr.serving import model as served

    old = served.ServedModel.load(bundle)
    holder = served.ModelHolder(old, load_timeout=0.5)
    release = threading.Event()
    monkeypatch.setattr(served.ServedModel, "load", classmethod(lambda cls, path: release.wait(30) and old))

    async def go() -> None:
        t0 = time.monotonic()
        with pytest.raises(served.LoadTimeout, match="over 0.5 s"):
            await holder.load("anything")
        assert time.monotonic() - t0 < 5
        assert holder.current is old

    asyncio.run(go())
    release.set()


def _catch(box: list[BaseException], fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as e:  # noqa: BLE001 - the test inspects it
        box.append(e)
