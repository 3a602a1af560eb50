"""What ship_to_databricks uploads: the job script and a wheel made from the package (or given), content-addressed."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from ctr.settings import DatabricksConfigError, DatabricksSettings
from ctr.training.databricks import JOB_SCRIPT, PACKAGE_DIR, artifact_digest, build_wheel


def test_wheel_from_the_package_itself_is_content_addressed(tmp_path: Path) -> None:
    a, b = build_wheel(tmp_path / "a"), build_wheel(tmp_path / "b")
    names = zipfile.ZipFile(a).namelist()
    assert {"ctr/training/spark_entry.py", "ctr/deployment/rollout/templates/scorer.yaml.j2"} <= set(names)
    assert artifact_digest(a) == artifact_digest(b)  # two builds, one address: nothing is re-shipped
    given = build_wheel(tmp_path / "given", DatabricksSettings(wheel=str(a)))
    assert given.read_bytes() == a.read_bytes()
    same_source = build_wheel(tmp_path / "src", DatabricksSettings(source_dir=str(PACKAGE_DIR)))
    assert artifact_digest(same_source) == artifact_digest(a)
    assert b"from ctr.training.spark_entry import main" in JOB_SCRIPT


def test_bad_wheel_settings_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(DatabricksConfigError, match="CTR_DATABRICKS_WHEEL='.*nope.whl' does not exist"):
        build_wheel(tmp_path, DatabricksSettings(wheel=str(tmp_path / "nope.whl")))
    (tmp_path / "fake.whl").write_text("not a zip")
    with pytest.raises(DatabricksConfigError, match="is not a wheel"):
        build_wheel(tmp_path / "out", DatabricksSettings(wheel=str(tmp_path / "fake.whl")))
    with pytest.raises(DatabricksConfigError, match="is not a ctr package folder"):
        build_wheel(tmp_path / "out", DatabricksSettings(source_dir=str(tmp_path)))
