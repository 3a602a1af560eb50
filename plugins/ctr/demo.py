"""`make demo`: sample data, one full DAG run with `airflow dags test`, a live endpoint, a summary.

    python -m ctr.demo [--days 8] [--rows-per-day 50000] [--date YYYY-MM-DD]
    python -m ctr.demo --stop
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from ctr.settings import Settings


def _airflow(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("airflow") or str(Path(sys.executable).with_name("airflow"))
    return subprocess.run([exe, *args], text=True, check=check)


def ensure_landing(s: Settings, day: dt.date, days: int, rows: int) -> None:
    from ctr.data.generate import GeneratorConfig, write_day
    from ctr.data.landing import list_days

    have = set(list_days(s.landing_root))
    wanted = [day - dt.timedelta(days=i) for i in range(days - 1, -1, -1)]
    missing = [d for d in wanted if d not in have]
    for d in missing:
        write_day(Path(s.landing_root), d, rows, GeneratorConfig())
    if missing:
        print(f"demo: generated {len(missing)} day(s) x {rows} rows under {s.landing_root}")


def summary(s: Settings, day: dt.date) -> int:
    from ctr.registry import Registry

    run = s.runs_dir / "ctr_retrain" / day.isoformat()
    metrics_path = run / "metrics.json"
    if not metrics_path.exists():
        print(f"demo: no metrics at {metrics_path}; the DAG run failed before evaluate (see the log above)")
        return 1
    m = json.loads(metrics_path.read_text())
    reg = Registry.from_settings(s)
    mine = reg.find(f"ctr_retrain/{day.isoformat()}")
    champ = reg.champion()
    state_path = s.serving_dir / "state.json"
    live = json.loads(state_path.read_text()) if state_path.exists() else {}
    c, b = m["candidate"], m["baseline"]
    print("\n================ ctr_retrain demo ================")
    print(f"holdout day          {day}  ({m['rows']} rows)")
    print(f"candidate AUC        {c['auc']:.4f}   logloss {c['logloss']:.4f}")
    if b:
        d = m["auc_diff"]
        print(f"champion AUC         {b['auc']:.4f}   logloss {b['logloss']:.4f}  (version {m.get('baseline_version')})")
        print(f"AUC diff             {d['estimate']:+.4f}  95% CI [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] ({d['method']})")
    else:
        print("champion AUC         none (first model)")
    print(f"gate                 {'PASSED' if m['gate']['passed'] else 'REJECTED'}")
    for r in m["gate"]["reasons"]:
        print(f"  - {r}")
    print(f"registered version   {mine.version if mine else 'none (rejected)'}   champion: {champ.version if champ else 'none'}")
    if live.get("url"):
        url = live["url"]
        token = ' -H "Authorization: Bearer $CTR_SERVE_TOKEN"' if s.serve_token else ""
        print(f"scoring endpoint     {url}  (serving version {live.get('version')})")
        print("try it:")
        example = example_request(Path(live["bundle"]) if live.get("bundle") else None)
        item = {k: v for k, v in example["candidates"][0].items() if k != "id"}
        score_body = json.dumps({"rows": [{**example["context"], **item}]}, separators=(",", ":"))
        print(f"  curl -s {url}/v1/score -H 'Content-Type: application/json'{token} \\")
        print(f"    -d '{score_body}'")
        print("rank a user's candidate items (top k, best first):")
        for line in rank_example(url, token, example):
            print(line)
        print(f"reports: {run}   registry: {s.tracking_uri}   stop the service: make stop")
    print("==================================================")
    return 0


RANK_EXAMPLE = {"context": {"I1": 3, "I2": 20, "C1": "05db9164"}, "k": 2,
                "candidates": [{"id": "item-1", "C9": "a73ee510"}, {"id": "item-2", "C9": "7cc72ec2"},
                               {"id": "item-3", "C9": "a18233ea"}]}
# The candidates differ in the column the demo generator weights most (C23), so the ranking has something to rank.
ITEM_COLUMN = "C23"


def example_request(bundle: Path | None) -> dict:
    """A rank request whose values the served model knows: the context's C1 and the three candidates' C23 are the
    most frequent values of the bundle's vocabulary (real Criteo values, unseen in generated data, score alike)."""
    try:
        vocab = json.loads((bundle / "features.json").read_text())["vocab"] if bundle else {}
        items, user = vocab[ITEM_COLUMN][:3], vocab["C1"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return RANK_EXAMPLE
    if len(items) < 3:
        return RANK_EXAMPLE
    return {"context": {"I1": 3, "I2": 20, "C1": user}, "k": 2,
            "candidates": [{"id": f"item-{i + 1}", ITEM_COLUMN: v} for i, v in enumerate(items)]}


def rank_example(url: str, token: str = "", example: dict | None = None) -> list[str]:
    """The demo's `curl` of POST /v1/rank (a user's context, three candidate items, the top 2)."""
    body = json.dumps(example or RANK_EXAMPLE, separators=(",", ":"))
    return [f"  curl -s {url}/v1/rank -H 'Content-Type: application/json'{token} \\", f"    -d '{body}'"]


def spread_rows(table: Any, n: int) -> list[dict[str, Any]]:
    """`n` rows of `table` (all if fewer) at evenly spaced positions, first and last included, as dicts."""
    import numpy as np
    import pyarrow as pa

    if table.num_rows == 0 or n <= 0:
        return []
    at = np.unique(np.linspace(0, table.num_rows - 1, num=min(n, table.num_rows)).round().astype(np.int64))
    return table.take(pa.array(at)).to_pylist()


def send_traffic(s: Settings, day: dt.date, requests: int = 300) -> int:
    """Score `requests` single rows of day `day` on the live endpoint, so the prediction log has something
    for `ctr monitor`; returns how many were answered. The rows are spread evenly over the whole day (the
    first rows of a day are not a sample of it: `ctr monitor` flagged their skew as drift)."""
    import httpx
    import pyarrow as pa

    from ctr.data.landing import read_staged
    from ctr.schema import FEATURE_COLUMNS

    state_path = s.serving_dir / "state.json"
    url = json.loads(state_path.read_text()).get("url") if state_path.exists() else None
    if not url:
        return 0
    tables = list(read_staged(s.staging_dir, day, columns=FEATURE_COLUMNS))
    if not tables:
        return 0
    rows = spread_rows(pa.concat_tables(tables), requests)
    headers = {"Authorization": f"Bearer {s.serve_token}"} if s.serve_token else {}
    ok = 0
    with httpx.Client(base_url=url, timeout=10, headers=headers) as c:
        for r in rows:
            ok += c.post("/v1/score", json={"rows": [{k: v for k, v in r.items() if v is not None}]}).status_code == 200
    return ok


def _logged(root: Path, day: dt.date) -> int:
    """Records in `day`'s closed prediction-log files."""
    from ctr.serving.predlog import read_log

    return sum(1 for _ in read_log(root, day))


def monitor_now(s: Settings, logged_before: int, sent: int) -> dict:
    """`ctr monitor --day <today>` on what the demo just sent (the log is partitioned by UTC date), once the
    service has closed the files holding all `sent` of its requests beyond the `logged_before` records
    already in today's log (or after its rotation time)."""
    import time

    from ctr.monitoring.monitor import monitor_day
    from ctr.registry import Registry

    today = dt.datetime.now(dt.UTC).date()
    wait = min(s.prediction_log_rotate_s, 120) + 5  # the service closes its open file within CTR_PREDICTION_LOG_ROTATE_S
    print(f"demo: waiting up to {wait} s for the service to close the prediction-log file of those {sent} requests ...")
    end = time.monotonic() + wait
    while _logged(s.predictions_dir, today) < logged_before + sent and time.monotonic() < end:
        time.sleep(1)
    return monitor_day(today, s.predictions_dir, s.home / "monitor" / today.isoformat(), registry=Registry.from_settings(s))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--days", type=int, default=8)
    p.add_argument("--rows-per-day", type=int, default=50_000)
    p.add_argument("--date", type=dt.date.fromisoformat, default=None)
    p.add_argument("--stop", action="store_true")
    a = p.parse_args(argv)
    s = Settings.from_env()
    if a.stop:
        from ctr.deployment.rollout.local import LocalRollout

        stopped = LocalRollout(s.serving_dir, s.serve_host, s.serve_port).stop()
        print("demo: scoring service stopped" if stopped else "demo: no scoring service was running")
        return 0
    from ctr.data.landing import list_days

    s.home.mkdir(parents=True, exist_ok=True)
    existing = list_days(s.landing_root)
    day = a.date or (existing[-1] if existing else dt.date.today() - dt.timedelta(days=1))
    ensure_landing(s, day, a.days, a.rows_per_day)
    # the demo's service logs every row (the production default is 0.01) and closes a file every 10 s,
    # so `ctr monitor` has a few hundred rows a moment later
    os.environ.setdefault("CTR_PREDICTION_LOG_RATE", "1.0")
    os.environ.setdefault("CTR_PREDICTION_LOG_ROTATE_S", "10")
    s = Settings.from_env()
    _airflow("db", "migrate")
    print(f"demo: airflow dags test ctr_retrain {day}  (AIRFLOW_HOME={os.environ.get('AIRFLOW_HOME')})")
    # no wait for late days, no marker rule for the days just written (a landing zone from before completion
    # markers still runs), and no human review: `dags test` runs no API server to answer it, so a borderline
    # candidate is decided by the gate alone
    conf = json.dumps({"data_wait_timeout": 0, "completion_marker": "", "review_band": 1})
    r = _airflow("dags", "test", "ctr_retrain", day.isoformat(), "--conf", conf, check=False)
    rc = summary(s, day)
    logged_before = _logged(s.predictions_dir, dt.datetime.now(dt.UTC).date())
    sent = send_traffic(s, day)
    if sent:
        doc = monitor_now(s, logged_before, sent)
        print(f"demo: sent {sent} scoring requests; ctr monitor --day {doc['day']}: {doc['status']}"
              + (f" ({doc.get('rows', 0)} logged rows)" if doc.get("rows") else f" ({doc.get('reason', '')})"))
        for a in doc["alerts"]:
            print(f"  - {a}")
        print(f"monitor page: {doc['outputs']['html']}")
    return r.returncode or rc


if __name__ == "__main__":
    sys.exit(main())
