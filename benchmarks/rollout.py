"""Reliability of the local rollout under load -> benchmarks/results/rollout.json

    python benchmarks/rollout.py [--rate 300] [--rollouts 5] [--out benchmarks/results/rollout.json]

Trains two small models on generated data, stamps them as registry versions 1..N+1 (alternating,
so consecutive versions really predict differently), starts `ctr serve` through LocalRollout on a
free loopback port, and starts a separate load-generator process (this script's `loadgen` mode)
sending single-row POST /v1/score at a fixed open-loop rate. While it runs: N consecutive
rollouts, then one rollout of a corrupted bundle (model.txt truncated, stamped as the next
version). Reported: requests sent, failed, responses by model version, mixed-version responses
(header and body disagree, an unknown version, or an older version answering a request sent
after a newer one was switched in), latency p50/p99 overall and during rollouts, and whether the
corrupted bundle ever answered and the previous version stayed live.
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
from urllib.parse import urlparse

HERE = Path(__file__).resolve().parent
ROW = {"I1": 3, "I2": 20, "I5": 1200, "C1": "05db9164", "C9": "a73ee510", "C14": "b28479f6"}


# ---- load generator (a separate process) ----------------------------------------------------
# Plain asyncio HTTP/1.1 over keep-alive connections: an HTTP client library costs more CPU per
# request than the scoring service on a 2-core machine. Requests are scheduled open-loop at
# `rate`; a request waits for a free connection, and its latency is measured from its scheduled
# time (queueing included, no coordinated omission) as well as from when it was written.
async def _connection(host: str, port: int, request: bytes, q: asyncio.Queue, records: list) -> None:
    reader = writer = None
    while True:
        due = await q.get()
        if due is None:
            break
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
            records.append((t_wall, t1 - due, t1 - t0, status, v_head, v_body, None if status == 200 else body[:200].decode()))
            if hdrs.get(b"connection", b"").lower() == b"close":
                writer.close()
                reader = writer = None
        except Exception as e:  # a failed request is data, not a crash of the generator
            t1 = time.perf_counter()
            records.append((t_wall, t1 - due, t1 - t0, 0, None, None, f"{type(e).__name__}: {e}"[:200]))
            if writer is not None:
                writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def _loadgen(url: str, rate: float, stop_file: Path, max_seconds: float, out: Path, connections: int) -> None:
    u = urlparse(url)
    body = json.dumps({"rows": [ROW]}).encode()
    request = (f"POST /v1/score HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    q: asyncio.Queue = asyncio.Queue()
    records: list = []
    workers = [asyncio.create_task(_connection(u.hostname or "127.0.0.1", u.port or 80, request, q, records))
               for _ in range(connections)]
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < max_seconds and not (i % 50 == 0 and stop_file.exists()):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        q.put_nowait(due)
        i += 1
    for _ in workers:
        q.put_nowait(None)
    await asyncio.gather(*workers)
    out.write_text("\n".join(json.dumps(r) for r in records) + "\n")


# ---- orchestration ---------------------------------------------------------------------------
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
        stop_file.touch()
        gen.wait(timeout=120)
        recs = [json.loads(line) for line in records_file.read_text().splitlines() if line.strip()]
    finally:
        if gen is not None and gen.poll() is None:
            gen.kill()
        if roll is not None:
            roll.stop()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

    order = {v: i for i, v in enumerate(versions)}
    switched = [(e["end"], order[e["version"]]) for e in events]
    by_version: dict[str, int] = {}
    failed, mixed, errors = 0, 0, []
    lat_all, lat_roll = [], []
    windows = [(e["start"], e["end"]) for e in events] + [(a, b)]
    service_times = []
    for t_send, lat, service, status, v_head, v_body, err in recs:
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


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
        a = p.parse_args(argv[1:])
        asyncio.run(_loadgen(a.url, a.rate, a.stop_file, a.max_seconds, a.out, a.connections))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=300, help="requests/s sent by the load generator")
    p.add_argument("--rollouts", type=int, default=5)
    p.add_argument("--rows-per-day", type=int, default=4000)
    p.add_argument("--pause", type=float, default=3.0, help="seconds of steady traffic between rollouts")
    p.add_argument("--out", type=Path, default=HERE / "results" / "rollout.json")
    a = p.parse_args(argv)
    doc = run(a.rate, a.rollouts, a.rows_per_day, a.out, a.pause)
    print(json.dumps({k: doc[k] for k in ("requests_sent", "requests_failed", "mixed_version_responses", "achieved_rate_rps",
                                          "responses_by_version", "latency_ms", "goal_met")}, indent=1))
    print(f"bench rollout: wrote {a.out}")
    return 0 if doc["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
