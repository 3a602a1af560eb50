"""benchmarks/scale.py runs the DAG's task functions outside Airflow: its context must offer what they read."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import scale  # noqa: E402


def test_every_context_key_the_tasks_read_is_in_the_benchmarks_context(tmp_path: Path) -> None:
    source = (REPO / "plugins" / "ctr" / "airflow" / "tasks.py").read_text()
    read = set(re.findall(r"""context\[["'](\w+)["']\]""", source))
    assert {"params", "ti", "outlet_events"} <= read  # the pattern sees the tasks' reads
    ctx = scale._context("promote", "scale__1", {}, tmp_path)
    assert read <= ctx.keys(), sorted(read - ctx.keys())
    ctx["outlet_events"]["any asset"].extra = {"version": "1"}  # as promote sets it


def test_xcom_pull_gives_an_earlier_tasks_result_and_none_for_a_task_that_never_ran(tmp_path: Path) -> None:
    (tmp_path / "build_image.result.json").write_text(json.dumps({"result": {"tag": "t:1"}, "xcom": {"k": 2}}))
    ti = scale._context("promote", "scale__1", {}, tmp_path)["ti"]
    assert ti.xcom_pull(task_ids="build_image") == {"tag": "t:1"}
    assert ti.xcom_pull(task_ids="build_image", key="k") == 2
    assert ti.xcom_pull(task_ids="review") is None
