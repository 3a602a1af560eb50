"""Reliability of the local rollout under load -> benchmarks/results/rollout.json

    python benchmarks/rollout.py [--strategy rolling|canary|shadow] [--rate 300] [--rollouts 5] [--out FILE]

Trains two small models on generated data, stamps them as registry versions 1..N+1 (alternating,
so consecutive versions really predict differently), starts `ctr serve` through LocalRollout on a
free loopback port, and starts a separate load-generator process (this script's `loadgen` mode)
sending single-row POST /v1/score at a fixed open-loop rate. While it runs: N consecutive
rollouts, then one rollout of a corrupted bundle (model.txt truncated, stamped as the next
version). Reported: requests sent, failed, responses by model version, mixed-version responses
(header and body disagree, an unknown version, or an older version answering a request sent
after a newer one was switched in), latency p50/p99 overall and during rollouts, and whether the
corrupted bundle ever answered and the previous version stayed live.

`--strategy canary|shadow` (rollout/progressive.py): each of the N rollouts loads the new version beside
the champion, holds it for `--pause` s, bakes and judges it (LocalRollout.verify) and promotes it; the
last rollout is a drill (canary: +250 ms in the candidate only, breaching max_p99_increase_ms; shadow:
half the shadow scorings fail, breaching max_candidate_errors) that must be dropped. Every request
carries its own X-Request-Id, so each answer's version is checked against the router's choice for that
id (traffic.routes_to_candidate) at its send and receive times; reported besides: the canary's share
while it ran, the time from the drill's rollback to the last candidate answer, and (shadow) the p99
with a shadow beside the champion against the p99 with none, in the same run. Without --out, a
canary/shadow run is stored under "strategies" in benchmarks/results/rollout.json (rolling stays top level).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "rollout.json"
ROW = {"I1": 3, "I2": 20, "I5": 1200, "C1": "05db9164", "C9": "a73ee510", "C14": "b28479f6"}


# ---- load generator (a separate process) ----------------------------------------------------
# Plain asyncio HTTP/1.1 over keep-alive connections: an HTTP client library costs more CPU per
# request than the scoring service on a 2-core machine. Requests are scheduled open-loop at
# `rate`; a request waits for a free connection, and its latency is measured from its scheduled
# time (queueing included, no coordinated omission) as well as from when it was written.
async def _connection(host: str, port: int, requests: list[bytes], q: asyncio.Queue, records: list) -> None:
    reader = writer = None
    while True:
        item = await q.get()
        if item is None:
            break
        due, i = item
        request = requests[i % len(requests)] % str(i).encode()
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        t_wall, t0 = time.time(), time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:] if ln)}
            body = await reader.readexactly(int(hdrs.get(b"content-length", b"0")))
            t1 = time.perf_counter()
            v_body = json.loads(body).get("model_version") if status == 200 else None
            v_head = hdrs.get(b"x-model-version", b"").decode() or None
            records.append((t_wall, t1 - due, t1 - t0, status, v_head, v_body, None if status == 200 else body[:200].decode(),
                            i))
            if hdrs.get(b"connection", b"").lower() == b"close":
                writer.close()
                reader = writer = None
        except Exception as e:  # a failed request is data, not a crash of the generator
            t1 = time.perf_counter()
            records.append((t_wall, t1 - due, t1 - t0, 0, None, None, f"{type(e).__name__}: {e}"[:200], i))
            if writer is not None:
                writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def _loadgen(url: str, rate: float, stop_file: Path, max_seconds: float, out: Path, connections: int,
                   rows_file: Path | None = None) -> None:
    u = urlparse(url)
    rows = json.loads(rows_file.read_text()) if rows_file else [ROW]
    requests = []
    for row in rows:  # request i sends row i % len(rows) with X-Request-Id bench-i (filled in per request)
        body = json.dumps({"rows": [row]}).encode()
        requests.append((f"POST /v1/score HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
                         f"X-Request-Id: bench-%s\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                        + body.replace(b"%", b"%%"))
    q: asyncio.Queue = asyncio.Queue()
    records: list = []
    workers = [asyncio.create_task(_connection(u.hostname or "127.0.0.1", u.port or 80, requests, q, records))
               for _ in range(connections)]
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < max_seconds and not (i % 50 == 0 and stop_file.exists()):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        q.put_nowait((due, i))
        i += 1
    for _ in workers:
        q.put_nowait(None)
    await asyncio.gather(*workers)
    out.write_text("\n".join(json.dumps(r) for r in records) + "\n")


# ---- orchestration ---------------------------------------------------------------------------
def _stop_load(gen: subprocess.Popen, stop_file: Path, records_file: Path) -> list[dict]:
    """Tell the load generator to stop, wait for it, and read the records it wrote (one JSON per request)."""
    stop_file.touch()
    gen.wait(timeout=120)
    return [json.loads(line) for line in records_file.read_text().splitlines() if line.strip()]


def _teardown(gen: subprocess.Popen | None, roll, work: Path, keep: bool) -> None:
    if gen is not None and gen.poll() is None:
        gen.kill()
    if roll is not None:
        roll.stop()
    if not keep:
        shutil.rmtree(work, ignore_errors=True)


def _train_bundles(work: Path, rows: int) -> list[Path]:
    from ctr.data.generate import GeneratorConfig, generate
    from ctr.data.landing import daterange, stage_day
    from ctr.training.trainer import TrainConfig, train

    end = dt.date(2026, 11, 20)
    generate(work / "landing", 4, rows, end, GeneratorConfig(seed=11))
    for d in daterange(end - dt.timedelta(days=3), end):
        stage_day(str(work / "landing"), work / "staging", work / "quarantine", d)
    out = []
    for seed in (1, 2):
        b = work / f"model-{seed}"
        train(work / "staging", b, TrainConfig(start=end - dt.timedelta(days=3), end=end - dt.timedelta(days=1), seed=seed,
                                                rounds=40, early_stopping=0, sample_fraction=0.7 if seed == 2 else 1.0))
        out.append(b)
    return out


def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def run(rate: float, n_rollouts: int, rows: int, out: Path, pause: float, keep: bool = False) -> dict:
    from ctr.deployment.image import build_context
    from ctr.deployment.rollout.base import Release, RolloutError
    from ctr.deployment.rollout.local import LocalRollout

    work = Path(tempfile.mkdtemp(prefix="ctr-bench-rollout-"))
    roll = None
    gen = None
    try:
        t0 = time.monotonic()
        models = _train_bundles(work, rows)
        print(f"bench rollout: trained 2 models in {time.monotonic() - t0:.0f}s", flush=True)
        versions = [str(v) for v in range(1, n_rollouts + 2)]
        bundles = {v: build_context(models[i % 2], v, "ctr-lightgbm", work / "images").path / "model"
                   for i, v in enumerate(versions)}
        bad_version = str(n_rollouts + 2)
        bad = build_context(models[0], bad_version, "ctr-lightgbm", work / "images").path / "model"
        bad_copy = work / "corrupt-model"
        shutil.copytree(bad, bad_copy)
        data = (bad_copy / "model.txt").read_bytes()
        (bad_copy / "model.txt").write_bytes(data[: len(data) // 2])  # a half-copied model file

        from socket import socket

        with socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        roll = LocalRollout(work / "serving", "127.0.0.1", port, start_timeout=120)
        roll.deploy(Release(versions[0], bundles[versions[0]]))
        stop_file, records_file = work / "stop", work / "records.jsonl"
        gen = subprocess.Popen([sys.executable, __file__, "loadgen", "--url", roll.url, "--rate", str(rate),
                                "--stop-file", str(stop_file), "--out", str(records_file), "--max-seconds", "300"])
        time.sleep(pause)
        events = []
        for v in versions[1:]:
            a = time.time()
            res = roll.deploy(Release(v, bundles[v]))
            b = time.time()
            events.append({"version": v, "start": a, "end": b, "seconds": round(b - a, 3), "ok": res.version == v})
            print(f"bench rollout: version {v} live after {b - a:.2f}s", flush=True)
            time.sleep(pause)
        a = time.time()
        try:
            roll.deploy(Release(bad_version, bad_copy))
            refused, why = False, ""
        except RolloutError as e:
            refused, why = True, str(e)
        b = time.time()
        print(f"bench rollout: corrupted bundle refused={refused} in {b - a:.2f}s", flush=True)
        time.sleep(pause)
        live_after = (roll.readyz() or {}).get("model_version")
        recs = _stop_load(gen, stop_file, records_file)
    finally:
        _teardown(gen, roll, work, keep)

    order = {v: i for i, v in enumerate(versions)}
    switched = [(e["end"], order[e["version"]]) for e in events]
    by_version: dict[str, int] = {}
    failed, mixed, errors = 0, 0, []
    lat_all, lat_roll = [], []
    windows = [(e["start"], e["end"]) for e in events] + [(a, b)]
    service_times = []
    for t_send, lat, service, status, v_head, v_body, err, *_ in recs:
        if status != 200:
            failed += 1
            if len(errors) < 5:
                errors.append(err)
            continue
        by_version[str(v_body)] = by_version.get(str(v_body), 0) + 1
        floor = max((i for t_end, i in switched if t_send > t_end), default=0)
        if v_head != v_body or v_body not in order or order[v_body] < floor:
            mixed += 1
        lat_all.append(lat)
        service_times.append(service)
        if any(s <= t_send <= e for s, e in windows):
            lat_roll.append(lat)
    span = max(r[0] for r in recs) - min(r[0] for r in recs) if recs else 0.0
    doc = {
        "benchmark": "rollout", "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": f"python benchmarks/rollout.py --rate {rate:g} --rollouts {n_rollouts}",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "target_rate_rps": rate, "achieved_rate_rps": round(len(recs) / span, 1) if span else None,
        "requests_sent": len(recs), "requests_failed": failed, "failed_examples": errors,
        "responses_by_version": dict(sorted(by_version.items(), key=lambda kv: int(kv[0]))),
        "mixed_version_responses": mixed,
        "latency_ms": {"measured_from": "scheduled send time (includes waiting for a free connection)",
                       "p50": _ms(_percentile(lat_all, 50)), "p99": _ms(_percentile(lat_all, 99)),
                       "service_p99": _ms(_percentile(service_times, 99)),
                       "p99_during_rollouts": _ms(_percentile(lat_roll, 99)), "max": _ms(max(lat_all, default=None)),
                       "requests_during_rollouts": len(lat_roll)},
        "rollouts": [{k: e[k] for k in ("version", "seconds", "ok")} for e in events],
        "corrupted_rollout": {"version": bad_version, "refused": refused, "seconds": round(b - a, 3), "reason": why[:300],
                              "responses_from_corrupted": by_version.get(bad_version, 0),
                              "live_version_after": live_after, "previous_version": versions[-1]},
    }
    doc["goal_met"] = bool(doc["requests_failed"] == 0 and mixed == 0 and refused and doc["requests_sent"] > 0
                           and by_version.get(bad_version, 0) == 0 and live_after == versions[-1]
                           and all(e["ok"] for e in events) and (doc["achieved_rate_rps"] or 0) >= 200)
    _write(out, doc, "rolling")
    return doc


def _holdout_rows(work: Path, n: int) -> tuple[list[dict], Any]:
    """`n` generated rows of the last staged day as /v1/score JSON rows (the load varies its rows)."""
    from ctr.data.landing import read_staged
    from ctr.schema import FEATURE_COLUMNS

    t = next(read_staged(work / "staging", dt.date(2026, 11, 20))).slice(0, n)
    return [{k: v for k, v in r.items() if v is not None and k in FEATURE_COLUMNS} for r in t.to_pylist()], t


def run_progressive(strategy: str, rate: float, n_rollouts: int, rows: int, out: Path, pause: float,
                    bake_seconds: float, canary_percent: float) -> dict:
    """N canary/shadow promotions and one drill under open-loop load; see the module docstring."""
    from ctr.deployment.image import build_context
    from ctr.deployment.rollout.base import Release, RolloutError
    from ctr.deployment.rollout.local import LocalRollout
    from ctr.deployment.rollout.progressive import Limits, Strategy
    from ctr.serving.traffic import routes_to_candidate

    # the two alternating models differ on purpose: the score limits are opened so the promotions pass (the
    # comparison numbers are still recorded); latency and error limits stay at their defaults
    limits = Limits(max_mean_shift=1.0, max_psi=100.0)
    ok_strategy = Strategy(strategy, canary_percent=canary_percent, bake_seconds=bake_seconds, bake_requests=10**9,
                           limits=limits)
    drill = {"canary": {"latency_ms": 250.0}, "shadow": {"error_rate": 0.5}}[strategy]
    drill_strategy = Strategy(strategy, canary_percent=canary_percent, bake_seconds=bake_seconds, bake_requests=10**9,
                              limits=limits, drill=drill)
    work = Path(tempfile.mkdtemp(prefix="ctr-bench-rollout-"))
    roll = gen = None
    try:
        t0 = time.monotonic()
        models = _train_bundles(work, rows)
        print(f"bench rollout[{strategy}]: trained 2 models in {time.monotonic() - t0:.0f}s", flush=True)
        versions = [str(v) for v in range(1, n_rollouts + 3)]      # 1 starts, 2..N+1 promoted, N+2 the drill
        bundles = {v: build_context(models[i % 2], v, "ctr-lightgbm", work / "images").path / "model"
                   for i, v in enumerate(versions)}
        load_rows, verify_rows = _holdout_rows(work, 500)
        verify_rows = verify_rows.slice(0, 50)
        rows_file = work / "rows.json"
        rows_file.write_text(json.dumps(load_rows))
        from socket import socket

        with socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        roll = LocalRollout(work / "serving", "127.0.0.1", port, start_timeout=120, strategy=ok_strategy)
        roll.deploy(Release(versions[0], bundles[versions[0]]))
        stop_file, records_file = work / "stop", work / "records.jsonl"
        gen = subprocess.Popen([sys.executable, __file__, "loadgen", "--url", roll.url, "--rate", str(rate),
                                "--stop-file", str(stop_file), "--out", str(records_file), "--max-seconds", "600",
                                "--rows-file", str(rows_file)])
        time.sleep(pause)
        events = []
        for k, v in enumerate(versions[1:], start=1):
            is_drill = k == len(versions) - 1
            roll.strategy = drill_strategy if is_drill else ok_strategy
            rel = Release(v, bundles[v])
            e = {"version": v, "champion": versions[k - 1], "drill": is_drill, "t_deploy": time.time()}
            roll.deploy(rel)
            e["t_loaded"] = time.time()
            time.sleep(pause)                       # the candidate beside the champion, steady
            e["t_bake"] = time.time()
            try:
                e["bake"] = roll.bake(rel, verify_rows)
                e["promoted"], e["error"] = True, None
            except RolloutError as err:
                e["promoted"], e["error"] = False, str(err)
            e["t_judged"] = time.time()
            events.append(e)
            print(f"bench rollout[{strategy}]: version {v} {'promoted' if e['promoted'] else 'dropped'} "
                  f"({e['t_judged'] - e['t_deploy']:.1f}s)", flush=True)
            if is_drill:
                roll.rollback(rel)
            time.sleep(pause)                       # the champion alone, steady
        live_after = (roll.readyz() or {}).get("model_version")
        recs = _stop_load(gen, stop_file, records_file)
    finally:
        _teardown(gen, roll, work, keep=False)

    def allowed(e: dict, rid: str, t: float) -> set[str]:
        """The versions the router may have chosen for `rid` at time `t`, around rollout event `e`."""
        cand = e["version"] if strategy == "canary" and routes_to_candidate(rid, canary_percent) else e["champion"]
        after = e["version"] if e["promoted"] else e["champion"]
        if t < e["t_deploy"]:
            return {e["champion"]}
        if t < e["t_loaded"]:
            return {e["champion"], cand}                  # the candidate switched in at some point in here
        if t < e["t_bake"]:
            return {cand}
        if t < e["t_judged"]:
            return {cand, after}                          # promoted or dropped at some point in here
        return {after}

    failed, mismatched, errors, by_version = 0, 0, [], {}
    share_n = share_c = 0
    lat_with, lat_without, lat_all = [], [], []
    last_drill_answer = None
    drill_ev = events[-1]
    for t_send, lat, service, status, v_head, v_body, err, i in recs:
        if status != 200:
            failed += 1
            if len(errors) < 5:
                errors.append(err)
            continue
        rid, t_recv = f"bench-{i}", t_send + service
        by_version[str(v_body)] = by_version.get(str(v_body), 0) + 1
        lat_all.append(lat)
        e = next((ev for ev in events if t_send < ev["t_judged"] + pause), events[-1])
        ok = v_head == v_body and v_body in (allowed(e, rid, t_send) | allowed(e, rid, t_recv))
        mismatched += not ok
        if e["t_loaded"] <= t_send and t_recv < e["t_bake"]:
            share_n += 1
            share_c += v_body == e["version"]
            if not e["drill"]:
                lat_with.append(service)
        elif e["t_judged"] + 0.5 <= t_send or t_recv < events[0]["t_deploy"]:
            lat_without.append(service)
        if v_body == drill_ev["version"]:
            last_drill_answer = t_recv
    share = round(100 * share_c / share_n, 2) if share_n else None
    recovery = round(last_drill_answer - drill_ev["t_judged"], 3) if last_drill_answer else None
    span = max(r[0] for r in recs) - min(r[0] for r in recs) if recs else 0.0
    p99_with, p99_without = _percentile(lat_with, 99), _percentile(lat_without, 99)
    doc = {
        "benchmark": "rollout", "strategy": strategy, "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": f"python benchmarks/rollout.py --strategy {strategy} --rate {rate:g} --rollouts {n_rollouts}",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg": os.getloadavg()[0]},
        "target_rate_rps": rate, "achieved_rate_rps": round(len(recs) / span, 1) if span else None,
        "requests_sent": len(recs), "requests_failed": failed, "failed_examples": errors,
        "responses_by_version": dict(sorted(by_version.items(), key=lambda kv: int(kv[0]))),
        "responses_not_the_routers_choice": mismatched,
        "canary_percent": canary_percent if strategy == "canary" else None,
        "candidate_share_percent": share if strategy == "canary" else None,
        "candidate_answers_while_shadowing": share_c if strategy == "shadow" else None,
        "drill": {"version": drill_ev["version"], "injected": drill, "dropped": not drill_ev["promoted"],
                  "error": (drill_ev["error"] or "")[:400],
                  "last_candidate_answer_after_rollback_s": recovery, "live_version_after": live_after},
        "latency_ms": {"measured_from": "scheduled send time (includes waiting for a free connection)",
                       "p50": _ms(_percentile(lat_all, 50)), "p99": _ms(_percentile(lat_all, 99)),
                       "service_p99_with_candidate": _ms(p99_with), "service_p99_champion_alone": _ms(p99_without),
                       "p99_ratio_with_candidate": round(p99_with / p99_without, 3) if p99_with and p99_without else None},
        "rollouts": [{"version": e["version"], "promoted": e["promoted"], "seconds": round(e["t_judged"] - e["t_deploy"], 2),
                      "bake": {k: v for k, v in (e.get("bake") or {}).items() if k != "limits"},
                      "error": (e["error"] or "")[:300] or None} for e in events],
    }
    promoted = [e["promoted"] for e in events]
    doc["goal_met"] = bool(failed == 0 and mismatched == 0 and recs and promoted == [True] * (len(events) - 1) + [False]
                           and live_after == versions[-2] and (recovery is None or recovery <= 5.0)
                           and (strategy != "canary" or (share is not None and abs(share - canary_percent) <= 3))
                           and (strategy != "shadow" or (share_c == 0 and doc["latency_ms"]["p99_ratio_with_candidate"]
                                                          is not None and doc["latency_ms"]["p99_ratio_with_candidate"] <= 1.2))
                           and (doc["achieved_rate_rps"] or 0) >= 200)
    _write(out, doc, strategy)
    return doc


def _write(out: Path, doc: dict, strategy: str) -> None:
    """Rolling: `out` as today (keeping any "strategies" stored there). Canary/shadow to the default file:
    under its "strategies"; to any other --out: the document alone."""
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else {}
    if strategy == "rolling":
        if old.get("strategies"):
            doc = {**doc, "strategies": old["strategies"]}
    elif out == DEFAULT_OUT:
        doc = {**old, "strategies": {**old.get("strategies", {}), strategy: doc}}
    out.write_text(json.dumps(doc, indent=1) + "\n")


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loadgen"]:
        p = argparse.ArgumentParser(prog="rollout.py loadgen")
        p.add_argument("--url", required=True)
        p.add_argument("--rate", type=float, default=300)
        p.add_argument("--stop-file", type=Path, required=True)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--max-seconds", type=float, default=300)
        p.add_argument("--connections", type=int, default=32)
        p.add_argument("--rows-file", type=Path, default=None)
        a = p.parse_args(argv[1:])
        asyncio.run(_loadgen(a.url, a.rate, a.stop_file, a.max_seconds, a.out, a.connections, a.rows_file))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=300, help="requests/s sent by the load generator")
    p.add_argument("--rollouts", type=int, default=5)
    p.add_argument("--rows-per-day", type=int, default=4000)
    p.add_argument("--pause", type=float, default=3.0, help="seconds of steady traffic between rollouts")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--strategy", choices=["rolling", "canary", "shadow"], default="rolling")
    p.add_argument("--bake-seconds", type=float, default=4.0, help="canary/shadow: bake per rollout")
    p.add_argument("--canary-percent", type=float, default=10.0)
    a = p.parse_args(argv)
    if a.strategy == "rolling":
        doc = run(a.rate, a.rollouts, a.rows_per_day, a.out, a.pause)
        keys = ("requests_sent", "requests_failed", "mixed_version_responses", "achieved_rate_rps",
                "responses_by_version", "latency_ms", "goal_met")
    else:
        doc = run_progressive(a.strategy, a.rate, a.rollouts, a.rows_per_day, a.out, a.pause, a.bake_seconds,
                              a.canary_percent)
        keys = ("requests_sent", "requests_failed", "responses_not_the_routers_choice", "achieved_rate_rps",
                "responses_by_version", "candidate_share_percent", "drill", "latency_ms", "goal_met")
    print(json.dumps({k: doc[k] for k in keys}, indent=1))
    print(f"bench rollout: wrote {a.out}")
    return 0 if doc["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
