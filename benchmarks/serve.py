"""Scoring service benchmark -> benchmarks/results/serve.json (ratios against baselines of the same run).

    .venv/bin/python benchmarks/serve.py [--model BUNDLE] [--duration 15] [--connections 8]

1. Single row: `ctr serve` and `mlflow models serve` on the same bundle, started here one after the
   other on 127.0.0.1, each loaded by wrk (a separate process) with the same single-row
   `/invocations` dataframe_split request at N connections for a fixed duration.
   Goal: ctr requests/s >= 50x MLflow's, with ctr p99 <= 5 ms.
2. Batch: 1,000 held-out raw Criteo lines per request (TSV body) to `ctr serve`, against in-process
   `Booster.predict` on the same rows pre-encoded as numpy. Goal: rows/s >= 0.7x the faster of
   `Booster.predict(X)` (LightGBM's default threads) and `Booster.predict(X, num_threads=1)`.
3. Mixed (issue 21): two clients (wrk -c2) streaming 10,000-row batches (JSON rows, then raw TSV)
   while a single-row client (a separate process, one keep-alive connection, open loop at
   --probe-rate requests/s; latency counted from each request's scheduled time, so queueing
   behind a stall counts) posts one row to /v1/score; the same batch load alone first.
   Goal: single-row p99 <= 20 ms while batch rows/s stay >= 0.6x the batch load alone.
4. Rank (issue 20): `POST /v1/rank` with 100 candidates (one held-out row's I1..I13, C1..C13 as the
   context, each of 100 held-out rows' C14..C26 as a candidate, k=10) by wrk at N connections, and
   in-process `Booster.predict` on the same 100 merged rows pre-encoded as numpy, side by side.
   Goal: candidates/s >= 0.7x the faster of `Booster.predict(X)` and `Booster.predict(X, num_threads=1)`.
   Also measured, without a goal: the same 100 rows sent whole as candidates (an empty context).
   `--only rank` runs just this part and updates the "rank" key (and its goal) of an existing JSON.
5. Metrics cost (issue 22): the same single-row `/invocations` load against `ctr serve` with its
   prometheus_client metrics and against `ctr serve` with the hand-written counters it had before
   (benchmarks/legacy_metrics.py, benchmark only), alternating A/B/B/A... in one run, each /metrics
   scraped and parsed. Goal: prometheus_client's requests/s >= 0.95x the hand-written counters'.
Every number a server returns is checked against the offline prediction first.
Without --model, a bundle is trained here the way `make demo` does (8 days x 50,000 generated rows).
Needs wrk (`apt-get install wrk`). Load goes only to loopback, bounded by --duration.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RESULTS = REPO / "benchmarks" / "results" / "serve.json"
END = dt.date(2026, 11, 20)

WRK_SCRIPT = r"""
local f = assert(io.open(os.getenv("WRK_BODY"), "rb")); wrk.body = f:read("*a"); f:close()
wrk.method = "POST"; wrk.headers["Content-Type"] = os.getenv("WRK_CTYPE")
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%d,"duration_us":%d,"non2xx":%d,"socket_errors":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n', summary.requests, summary.duration,
    e.status, e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


def log(msg: str) -> None:
    print(f"bench serve: {msg}", flush=True)


def run(cmd: list[str], **kw: Any) -> None:
    subprocess.run(cmd, check=True, env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}, **kw)


def build_bundle(work: Path) -> tuple[Path, Path]:
    """Generate 8 days x 50,000 rows and train with the defaults (as `make demo`); returns (bundle, holdout)."""
    landing = work / "landing"
    ctr = str(VENV_BIN / "ctr")
    log("generating 8 days x 50,000 rows and training a bundle with the default settings ...")
    run([ctr, "generate", "--out", str(landing), "--days", "8", "--rows-per-day", "50000",
         "--end-date", END.isoformat(), "--seed", "7"])
    run([ctr, "train", "--data", str(landing), "--from", (END - dt.timedelta(days=7)).isoformat(),
         "--to", (END - dt.timedelta(days=1)).isoformat(), "--out", str(work / "bundle"),
         "--staging", str(work / "staging")])
    return work / "bundle", landing / f"day={END.isoformat()}" / "part-00000.tsv.gz"


def holdout_lines(path: Path | None, n: int) -> list[str]:
    if path is None or not path.exists():
        work = Path(tempfile.mkdtemp(prefix="bench-serve-rows-"))
        run([str(VENV_BIN / "ctr"), "generate", "--out", str(work), "--days", "1", "--rows-per-day", str(n),
             "--end-date", END.isoformat(), "--seed", "99"])
        path = work / f"day={END.isoformat()}" / "part-00000.tsv.gz"
    return gzip.open(path, "rt").read().splitlines()[:n]


def wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def wait_predictor(url: str, timeout: float = 900.0) -> dict[str, Any]:
    """Wait until the service's compiled predictor is ready (or off / failed): the benchmark measures
    what the service serves once settled, not LightGBM during a background compile. Its state and the wait."""
    t0 = time.monotonic()
    while True:
        with urllib.request.urlopen(url + "/readyz", timeout=10) as r:
            state = json.loads(r.read()).get("compiled_predictor", "off")
        if state != "compiling" or time.monotonic() - t0 > timeout:
            log(f"compiled predictor: {state} after {time.monotonic() - t0:.1f} s")
            return {"state": state, "waited_s": round(time.monotonic() - t0, 1)}
        time.sleep(0.5)


def post(url: str, body: bytes, ctype: str) -> dict[str, Any]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def wrk(url: str, body: bytes, ctype: str, connections: int, duration: int, work: Path, tag: str = "") -> dict[str, Any]:
    script, body_path = work / f"post{tag}.lua", work / f"body{tag}.bin"
    script.write_text(WRK_SCRIPT)
    body_path.write_bytes(body)
    env = {**os.environ, "WRK_BODY": str(body_path), "WRK_CTYPE": ctype}
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "-s", str(script), url]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=duration + 60).stdout
    doc = json.loads(next(line for line in out.splitlines() if line.startswith("WRKJSON ")).split(" ", 1)[1])
    secs = doc["duration_us"] / 1e6
    return {"requests": doc["requests"], "seconds": round(secs, 3), "requests_per_s": round(doc["requests"] / secs, 1),
            "p50_ms": doc["p50_us"] / 1e3, "p90_ms": doc["p90_us"] / 1e3, "p99_ms": doc["p99_us"] / 1e3,
            "max_ms": doc["max_us"] / 1e3, "non_2xx": doc["non2xx"], "socket_errors": doc["socket_errors"],
            "command": " ".join(cmd), "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


class Server:
    def __init__(self, cmd: list[str], ready_path: str, port: int, log_path: Path, env: dict[str, str]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.cmd = cmd
        with open(log_path, "ab") as lf:
            self.proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)
        try:
            wait_http(self.url + ready_path, self.proc, 240)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def in_process_rows_per_s(booster: Any, x: np.ndarray, seconds: float, **kw: Any) -> dict[str, Any]:
    booster.predict(x, **kw)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        booster.predict(x, **kw)
        n += 1
    secs = time.perf_counter() - t0
    return {"calls": n, "seconds": round(secs, 3), "rows_per_s": round(n * len(x) / secs, 1),
            "ms_per_call": round(secs / n * 1e3, 3)}


PROBE = r"""
import http.client, json, sys, time
host, port, path, rate, seconds, body = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), \
    float(sys.argv[5]), open(sys.argv[6], "rb").read()
c = http.client.HTTPConnection(host, port, timeout=30)
lat, errors, t0 = [], 0, time.perf_counter()
k = 0
while True:
    due = t0 + k / rate
    if due - t0 >= seconds:
        break
    now = time.perf_counter()
    if due > now:
        time.sleep(due - now)
    c.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    errors += r.status != 200
    lat.append(time.perf_counter() - due)
    k += 1
lat.sort()
pct = lambda q: lat[min(len(lat) - 1, int(q / 100 * len(lat)))] * 1e3
print(json.dumps({"requests": len(lat), "errors": errors, "rate_per_s": rate, "p50_ms": round(pct(50), 3),
                  "p90_ms": round(pct(90), 3), "p99_ms": round(pct(99), 3), "max_ms": round(lat[-1] * 1e3, 3)}))
"""


def probe(url: str, body: bytes, rate: float, seconds: float, work: Path) -> dict[str, Any]:
    """Single-row requests at a fixed rate from a separate process; latency from the scheduled send time."""
    from urllib.parse import urlparse

    u = urlparse(url)
    (work / "probe.bin").write_bytes(body)
    cmd = [sys.executable, "-c", PROBE, u.hostname, str(u.port), u.path, str(rate), str(seconds), str(work / "probe.bin")]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=seconds + 120).stdout
    doc = json.loads(out.strip().splitlines()[-1])
    doc["command"] = f"python -c PROBE (benchmarks/serve.py) {u.hostname} {u.port} {u.path} {rate} {seconds}"
    doc["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return doc


def mixed_scenario(url: str, table: Any, lines: list[str], single_body: bytes, a: argparse.Namespace,
                   work: Path) -> dict[str, Any]:
    """Two clients streaming `a.mixed_rows`-row batches, alone and then beside a single-row client."""
    from concurrent.futures import ThreadPoolExecutor

    from ctr.schema import FEATURE_COLUMNS

    n = a.mixed_rows
    bodies = {
        "json": (json.dumps({"rows": [{k: v for k, v in r.items() if v is not None}
                                      for r in table.select(FEATURE_COLUMNS).slice(0, n).to_pylist()]}).encode(),
                 "application/json"),
        "tsv": (("\n".join(lines[:n]) + "\n").encode(), "text/tab-separated-values"),
    }
    out: dict[str, Any] = {"rows_per_batch": n, "batch_clients": 2, "single_row_clients": 1,
                           "single_row_request": f"POST /v1/score JSON, 1 row, {a.probe_rate:g}/s open loop",
                           "bodies": {}}
    for kind, (body, ctype) in bodies.items():
        assert len(post(url + "/v1/score", body, ctype)["probabilities"]) == n
        log(f"mixed ({kind}): {n}-row batches alone ...")
        alone = wrk(url + "/v1/score", body, ctype, 2, a.duration, work, tag="-batch")
        log(f"mixed ({kind}): {n}-row batches beside single rows ...")
        with ThreadPoolExecutor(2) as ex:
            fb = ex.submit(wrk, url + "/v1/score", body, ctype, 2, a.duration, work, "-batch")
            time.sleep(0.5)  # the batch clients are streaming before the single-row client starts
            fs = ex.submit(probe, url + "/v1/score", single_body, a.probe_rate, a.duration - 1, work)
            together, single = fb.result(), fs.result()
        for r in (alone, together):
            r["rows_per_s"] = round(r["requests_per_s"] * n, 1)
        out["bodies"][kind] = {"batch_alone": alone, "batch_with_single": together, "single_row": single,
                               "batch_ratio_vs_alone": round(together["rows_per_s"] / alone["rows_per_s"], 3)}
        log(f"mixed ({kind}): single-row p99 {single['p99_ms']:.1f} ms; batch {together['rows_per_s']:.0f} rows/s "
            f"vs {alone['rows_per_s']:.0f} alone")
    return out


RANK_CONTEXT = [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 14)]


def rank_bodies(rows: list[dict[str, Any]], n: int) -> dict[str, dict[str, Any]]:
    """The 100-candidate requests: context + item fields, and whole rows as candidates (empty context)."""
    ctx = {c: v for c, v in rows[0].items() if c in RANK_CONTEXT}
    split = {"context": ctx, "k": 10,
             "candidates": [{"id": f"item-{j}", **{c: v for c, v in r.items() if c not in RANK_CONTEXT}}
                            for j, r in enumerate(rows[:n])]}
    whole = {"context": {}, "k": 10, "candidates": [{"id": f"item-{j}", **r} for j, r in enumerate(rows[:n])]}
    return {"context_plus_items": split, "whole_rows": whole}


def rank_scenario(url: str, bundle: Any, rows: list[dict[str, Any]], a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """`/v1/rank` by wrk, then in-process Booster.predict on the same merged rows; candidates/s each."""
    from ctr.serving import ranking
    from ctr.serving.model import ServedModel

    n = a.rank_candidates
    offline = ServedModel.build(bundle, compiled="cached")  # as `ctr rank`: the cached compiled trees, or LightGBM
    out: dict[str, Any] = {"candidates_per_request": n, "k": 10, "context_fields": RANK_CONTEXT, "requests": {}}
    for kind, req in rank_bodies(rows, n).items():
        body = json.dumps(req).encode()
        merged = [{**req["context"], **{c: v for c, v in cand.items() if c != "id"}} for cand in req["candidates"]]
        _, want = ranking.rank(offline, json.loads(body))
        got = post(url + "/v1/rank", body, "application/json")
        assert [i["id"] for i in got["items"]] == [i["id"] for i in want["items"]]
        assert max(abs(g["probability"] - w["probability"]) for g, w in zip(got["items"], want["items"], strict=True)) <= 1e-12
        x = bundle.transform.derive(bundle.transform.rows_matrix(merged))  # the model input, derived features included
        log(f"rank ({kind}): /v1/rank {n} candidates ...")
        wrk(url + "/v1/rank", body, "application/json", a.connections, 3, work, tag="-rank")  # warm-up
        served = wrk(url + "/v1/rank", body, "application/json", a.connections, a.duration, work, tag="-rank")
        served["candidates_per_s"] = round(served["requests_per_s"] * n, 1)
        log(f"rank ({kind}): in-process Booster.predict on the same {n} rows ...")
        base_default = in_process_rows_per_s(bundle.booster, x, a.duration)
        base_one = in_process_rows_per_s(bundle.booster, x, a.duration, num_threads=1)
        best = max(base_default["rows_per_s"], base_one["rows_per_s"])
        out["requests"][kind] = {"body_bytes": len(body), "ctr_rank": served,
                                 "booster_predict_default_threads": base_default, "booster_predict_1_thread": base_one,
                                 "ratio_vs_best_booster_predict": round(served["candidates_per_s"] / best, 3)}
        log(f"rank ({kind}): {served['candidates_per_s']:.0f} candidates/s vs Booster.predict {best:.0f} rows/s "
            f"= {served['candidates_per_s'] / best:.2f}x (p99 {served['p99_ms']:.2f} ms)")
    return out


def rank_goal(rank: dict[str, Any]) -> bool:
    r = rank["requests"]["context_plus_items"]
    return r["ratio_vs_best_booster_predict"] >= 0.7 and r["ctr_rank"]["non_2xx"] == 0 \
        and r["ctr_rank"]["socket_errors"] == 0


def metrics_cost(bundle_dir: Path, single: bytes, want: float, env: dict[str, str], a: argparse.Namespace,
                 work: Path, batch_tsv: bytes | None = None) -> dict[str, Any]:
    """Single-row req/s of `ctr serve` with prometheus_client vs the hand-written counters, interleaved."""
    from ctr.serving.process import free_port
    from prometheus_client.parser import text_string_to_metric_families

    cmds = {"prometheus_client": [sys.executable, "-m", "ctr.cli"],
            "hand_written": [sys.executable, str(REPO / "benchmarks" / "legacy_metrics.py")]}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in cmds}
    for r in range(a.metrics_rounds):
        for variant in (list(cmds) if r % 2 == 0 else list(cmds)[::-1]):
            port = free_port()
            log(f"metrics cost: {variant} round {r + 1} on :{port}")
            srv = Server([*cmds[variant], "serve", "--model", str(bundle_dir), "--port", str(port)], "/readyz", port,
                         work / f"ctr-{variant}.log", env)
            try:
                got = post(srv.url + "/invocations", single, "application/json")["predictions"][0]
                assert abs(got - want) <= 1e-12, (variant, got, want)
                wrk(srv.url + "/invocations", single, "application/json", a.connections, 3, work)  # warm-up
                res = wrk(srv.url + "/invocations", single, "application/json", a.connections, a.duration, work)
                if batch_tsv is not None:  # the same 1,000-row TSV batches as scenario 2, same server
                    b = wrk(srv.url + "/v1/score", batch_tsv, "text/tab-separated-values", a.connections, a.duration,
                            work)
                    res["batch_tsv_rows_per_s"] = round(b["requests_per_s"] * a.batch_rows, 1)
                    res["batch_tsv_p99_ms"] = b["p99_ms"]
                with urllib.request.urlopen(srv.url + "/metrics", timeout=10) as resp:
                    fams = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
                served = sum(s.value for s in fams["ctr_requests"].samples
                             if s.name == "ctr_requests_total" and s.labels.get("route") == "/invocations")
                res["metrics_requests_counted"] = served
                res["metrics_families"] = len(fams)
                runs[variant].append(res)
            finally:
                srv.stop()
    mean = {k: round(sum(x["requests_per_s"] for x in v) / len(v), 1) for k, v in runs.items()}
    ratio = mean["prometheus_client"] / mean["hand_written"]
    extra: dict[str, Any] = {}
    if batch_tsv is not None:
        bmean = {k: round(sum(x["batch_tsv_rows_per_s"] for x in v) / len(v), 1) for k, v in runs.items()}
        extra = {"batch_tsv_mean_rows_per_s": bmean,
                 "batch_tsv_ratio": round(bmean["prometheus_client"] / bmean["hand_written"], 4)}
    return {**extra, "request": "POST /invocations dataframe_split, 1 row", "rounds": a.metrics_rounds,
            "order": "alternating, each round restarts the service", "runs": runs, "mean_requests_per_s": mean,
            "ratio_prometheus_client_vs_hand_written": round(ratio, 4),
            "drop_pct": round((1 - ratio) * 100, 2)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (/proc/PID/stat utime, stime), and of its live
    child processes (the prediction log's writer process, the batch lane's workers)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    try:
        kids = [int(k) for t in Path(f"/proc/{pid}/task").iterdir() for k in (t / "children").read_text().split()]
    except OSError:
        kids = []
    total = own
    for k in kids:
        try:
            total += cpu_seconds(k)
        except OSError:  # it exited meanwhile
            pass
    return total


def log_cost(bundle_dir: Path, single: bytes, want: float, env: dict[str, str], a: argparse.Namespace,
             work: Path) -> dict[str, Any]:
    """Single-row p99 and req/s of `ctr serve` with the prediction log at rate 0 (off) vs 1.0 (every row), interleaved."""
    import gzip as gz

    from ctr.serving.process import free_port

    rates = ("0", "1.0")
    runs: dict[str, list[dict[str, Any]]] = {r: [] for r in rates}
    for rnd in range(a.log_rounds):
        for rate in (rates if rnd % 2 == 0 else rates[::-1]):
            port = free_port()
            home = work / f"home-{rate}-{rnd}"
            log(f"prediction log cost: rate {rate} round {rnd + 1} on :{port}")
            srv = Server([sys.executable, "-m", "ctr.cli", "serve", "--model", str(bundle_dir), "--port", str(port)],
                         "/readyz", port, work / f"ctr-log-{rate}.log",
                         {**env, "CTR_HOME": str(home), "CTR_PREDICTION_LOG_RATE": rate})
            try:
                got = post(srv.url + "/invocations", single, "application/json")["predictions"][0]
                assert abs(got - want) <= 1e-12, (rate, got, want)
                wrk(srv.url + "/invocations", single, "application/json", a.connections, 3, work)  # warm-up
                cpu0 = cpu_seconds(srv.proc.pid)
                res = wrk(srv.url + "/invocations", single, "application/json", a.connections, a.duration, work)
                # the service's CPU per request (its child processes, so the log's writer, included): robust to a shared machine's load
                res["service_cpu_us_per_request"] = round((cpu_seconds(srv.proc.pid) - cpu0) / res["requests"] * 1e6, 1)
                with urllib.request.urlopen(srv.url + "/metrics", timeout=10) as resp:
                    text = resp.read().decode()
                res["dropped"] = sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                                     if ln.startswith("ctr_prediction_log_dropped_total"))
            finally:
                srv.stop()
            res["rows_logged"] = sum(len(gz.decompress(f.read_bytes()).splitlines())
                                     for f in home.glob("predictions/date=*/part-*.jsonl.gz"))
            runs[rate].append(res)
    p99 = {r: round(sorted(x["p99_ms"] for x in v)[len(v) // 2], 3) for r, v in runs.items()}  # median round
    rps = {r: round(sum(x["requests_per_s"] for x in v) / len(v), 1) for r, v in runs.items()}
    cpu = {r: round(sorted(x["service_cpu_us_per_request"] for x in v)[len(v) // 2], 1) for r, v in runs.items()}
    rise = p99["1.0"] / p99["0"] - 1
    return {"request": "POST /invocations dataframe_split, 1 row", "rounds": a.log_rounds,
            "order": "alternating, each round restarts the service", "runs": runs, "median_p99_ms": p99,
            "mean_requests_per_s": rps, "median_service_cpu_us_per_request": cpu,
            "cpu_rise_pct": round((cpu["1.0"] / cpu["0"] - 1) * 100, 2), "p99_rise_pct": round(rise * 100, 2),
            "goal_p99_rise_le_10pct": rise <= 0.10}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="bundle directory (default: train one like make demo)")
    ap.add_argument("--rows", type=Path, help="raw Criteo .tsv.gz of held-out rows (default: generated)")
    ap.add_argument("--duration", type=int, default=15, help="seconds per wrk run (default 15)")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--batch-rows", type=int, default=1000)
    ap.add_argument("--mixed-rows", type=int, default=10_000, help="rows per batch in the mixed scenario")
    ap.add_argument("--probe-rate", type=float, default=200.0,
                    help="single-row requests/s beside the batches in the mixed scenario")
    ap.add_argument("--rank-candidates", type=int, default=100, help="candidates per /v1/rank request")
    ap.add_argument("--only", choices=["rank"], help="run only this part; update its keys in an existing --out")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--metrics-rounds", type=int, default=2,
                    help="rounds of the metrics-cost scenario (each runs both variants, order alternating)")
    ap.add_argument("--only-metrics-cost", action="store_true",
                    help="run only the metrics-cost scenario and print its JSON (nothing written)")
    ap.add_argument("--log-rounds", type=int, default=3,
                    help="rounds of the prediction-log cost scenario (rate 0 and 1.0, order alternating)")
    ap.add_argument("--only-log-cost", action="store_true",
                    help="run only the prediction-log cost scenario; write benchmarks/results/serve_predlog.json")
    a = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench serve: wrk not found; install it with `apt-get install wrk` (Debian package)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO / "plugins"))
    from ctr.data.reader import read_text
    from ctr.model.bundle import Bundle
    from ctr.schema import FEATURE_COLUMNS
    from ctr.serving.process import free_port

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    holdout = a.rows
    bundle_dir = a.model
    if bundle_dir is None:
        bundle_dir, holdout = build_bundle(work)
    bundle = Bundle.load(bundle_dir)
    lines = holdout_lines(holdout, max(a.batch_rows, a.mixed_rows, 1))
    table, bad = read_text("\n".join(lines) + "\n", require_label=False)
    if bad:
        raise SystemExit(f"held-out rows have bad lines, e.g. {bad[0]}")
    row = {k: v for k, v in table.select(FEATURE_COLUMNS).slice(0, 1).to_pylist()[0].items() if v is not None}
    rank_rows = [{k: v for k, v in r.items() if v is not None}
                 for r in table.select(FEATURE_COLUMNS).slice(0, a.rank_candidates).to_pylist()]
    want_single = float(bundle.predict_rows([row])[0])
    single = json.dumps({"dataframe_split": {"columns": list(row), "data": [list(row.values())]}}).encode()
    batch_tsv = ("\n".join(lines[: a.batch_rows]) + "\n").encode()
    want_batch = bundle.predict_table(table.slice(0, a.batch_rows))
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "CTR_SERVE_TOKEN": "", "CTR_ADMIN_TOKEN": ""}
    result: dict[str, Any] = {
        "command": "python benchmarks/serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_start": os.getloadavg()},
        "bundle": {"path": str(bundle_dir), "version": bundle.version, "trees": bundle.booster.num_trees()},
        "load": {"generator": "wrk -t1 (separate process)", "connections": a.connections, "duration_s": a.duration},
    }

    if a.only == "rank":
        return only_rank(a, argv, bundle, bundle_dir, rank_rows, env, work, result)
    if a.only_log_cost:
        result["prediction_log"] = log_cost(bundle_dir, single, want_single, env, a, work)
        result["machine"]["loadavg_end"] = os.getloadavg()
        out = RESULTS.with_name("serve_predlog.json")
        out.write_text(json.dumps(result, indent=1) + "\n")
        pl = result["prediction_log"]
        log(f"prediction log: single-row p99 {pl['median_p99_ms']['1.0']} ms at rate 1.0 vs {pl['median_p99_ms']['0']} ms "
            f"off ({pl['p99_rise_pct']:+.1f}%); req/s {pl['mean_requests_per_s']}; service CPU us/request "
            f"{pl['median_service_cpu_us_per_request']} ({pl['cpu_rise_pct']:+.1f}%); wrote {out}")
        shutil.rmtree(work, ignore_errors=True)
        return 0
    if a.only_metrics_cost:
        print(json.dumps(metrics_cost(bundle_dir, single, want_single, env, a, work, batch_tsv), indent=1))
        shutil.rmtree(work, ignore_errors=True)
        return 0

    # ---- 1. single row: ctr serve vs mlflow models serve, same request --------------------------
    port = free_port()
    log(f"ctr serve on :{port}")
    ctr = Server([sys.executable, "-m", "ctr.cli", "serve", "--model", str(bundle_dir), "--port", str(port)],
                 "/readyz", port, work / "ctr.log", env)
    try:
        result["compiled_predictor"] = wait_predictor(ctr.url)
        with urllib.request.urlopen(ctr.url + "/readyz", timeout=10) as r:
            result["ctr_fast_paths"] = json.loads(r.read())["fast_paths"]
        got = post(ctr.url + "/invocations", single, "application/json")["predictions"][0]
        assert abs(got - want_single) <= 1e-12, (got, want_single)
        got_batch = np.array(post(ctr.url + "/v1/score", batch_tsv, "text/tab-separated-values")["probabilities"])
        assert np.max(np.abs(got_batch - want_batch)) <= 1e-12
        batch_json = json.dumps({"rows": [{k: v for k, v in r.items() if v is not None}
                                          for r in table.select(FEATURE_COLUMNS).slice(0, a.batch_rows).to_pylist()]})
        got_json = np.array(post(ctr.url + "/v1/score", batch_json.encode(), "application/json")["probabilities"])
        assert np.max(np.abs(got_json - want_batch)) <= 1e-12
        wrk(ctr.url + "/invocations", single, "application/json", a.connections, 3, work)  # warm-up
        log("ctr single-row run ...")
        ctr_single = wrk(ctr.url + "/invocations", single, "application/json", a.connections, a.duration, work)
        body_v1 = json.dumps({"rows": [row]}).encode()
        ctr_single_v1 = wrk(ctr.url + "/v1/score", body_v1, "application/json", a.connections, a.duration, work)
        log("ctr batch run ...")
        wrk(ctr.url + "/v1/score", batch_tsv, "text/tab-separated-values", a.connections, 3, work)
        ctr_batch = wrk(ctr.url + "/v1/score", batch_tsv, "text/tab-separated-values", a.connections, a.duration, work)
        ctr_batch_json = wrk(ctr.url + "/v1/score", batch_json.encode(), "application/json", a.connections,
                             a.duration, work)
        mixed = mixed_scenario(ctr.url, table, lines, body_v1, a, work)
        rank = rank_scenario(ctr.url, bundle, rank_rows, a, work)
    finally:
        ctr.stop()

    port = free_port()
    log(f"mlflow models serve on :{port}")
    mlf = Server([str(VENV_BIN / "mlflow"), "models", "serve", "-m", str(bundle_dir), "--env-manager", "local",
                  "-h", "127.0.0.1", "-p", str(port)], "/ping", port, work / "mlflow.log", env)
    try:
        got = post(mlf.url + "/invocations", single, "application/json")["predictions"][0]
        assert abs(got - want_single) <= 1e-12, (got, want_single)
        wrk(mlf.url + "/invocations", single, "application/json", a.connections, 3, work)
        log("mlflow single-row run ...")
        mlf_single = wrk(mlf.url + "/invocations", single, "application/json", a.connections, a.duration, work)
    finally:
        mlf.stop()

    # ---- 5. metrics cost: prometheus_client vs the hand-written counters, same run ----------------
    cost = metrics_cost(bundle_dir, single, want_single, env, a, work, batch_tsv)

    # ---- 2. batch baseline: in-process Booster.predict on pre-encoded numpy ----------------------
    x = bundle.transform.derive(bundle.transform.transform_table(table.slice(0, a.batch_rows)))  # codes + derived
    log("in-process Booster.predict ...")
    base_default = in_process_rows_per_s(bundle.booster, x, a.duration)
    base_one = in_process_rows_per_s(bundle.booster, x, a.duration, num_threads=1)
    best_base = max(base_default["rows_per_s"], base_one["rows_per_s"])
    ctr_batch["rows_per_s"] = round(ctr_batch["requests_per_s"] * a.batch_rows, 1)
    ctr_batch_json["rows_per_s"] = round(ctr_batch_json["requests_per_s"] * a.batch_rows, 1)

    speedup = ctr_single["requests_per_s"] / mlf_single["requests_per_s"]
    batch_ratio = ctr_batch["rows_per_s"] / best_base
    clean = all(r["non_2xx"] == 0 and r["socket_errors"] == 0 for r in (ctr_single, ctr_batch, mlf_single))
    result.update({
        "single_row": {"request": "POST /invocations dataframe_split, 1 row", "ctr": ctr_single,
                       "mlflow": mlf_single, "ctr_v1_score_json": ctr_single_v1,
                       "speedup_vs_mlflow": round(speedup, 1)},
        "batch": {"rows_per_request": a.batch_rows, "ctr_tsv": ctr_batch, "ctr_json": ctr_batch_json,
                  "booster_predict_default_threads": base_default, "booster_predict_1_thread": base_one,
                  "ratio_vs_best_booster_predict": round(batch_ratio, 3),
                  "ratio_vs_default_booster_predict": round(ctr_batch["rows_per_s"] / base_default["rows_per_s"], 3),
                  "ratio_json_vs_best_booster_predict": round(ctr_batch_json["rows_per_s"] / best_base, 3)},
        "mixed": mixed,
        "rank": rank,
        "metrics_cost": cost,
        "goals": {
            "rank_candidates_per_s_ge_0.7x_booster_predict": rank_goal(rank),
            "metrics_cost_le_5pct": cost["drop_pct"] <= 5.0,
            "mixed_single_row_p99_le_20ms": all(m["single_row"]["p99_ms"] <= 20.0 for m in mixed["bodies"].values()),
            "mixed_batch_ge_0.6x_alone": all(m["batch_ratio_vs_alone"] >= 0.6 for m in mixed["bodies"].values()),
            "single_row_speedup_ge_50x": speedup >= 50,
            "single_row_p99_le_5ms": ctr_single["p99_ms"] <= 5.0,
            "batch_rows_per_s_ge_0.7x_booster_predict": batch_ratio >= 0.7,
            "no_errors": clean,
        },
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    })
    result["goals"]["all_met"] = all(result["goals"].values())
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"single row: ctr {ctr_single['requests_per_s']:.0f} req/s p99 {ctr_single['p99_ms']:.2f} ms; "
        f"mlflow {mlf_single['requests_per_s']:.1f} req/s p99 {mlf_single['p99_ms']:.0f} ms; {speedup:.0f}x")
    log(f"batch: ctr {ctr_batch['rows_per_s']:.0f} rows/s vs Booster.predict {best_base:.0f} rows/s = {batch_ratio:.2f}x")
    log(f"metrics cost: prometheus_client {cost['mean_requests_per_s']['prometheus_client']:.0f} req/s vs "
        f"hand-written {cost['mean_requests_per_s']['hand_written']:.0f} req/s: {cost['drop_pct']:+.2f}% drop")
    log(f"goals: {result['goals']} -> {a.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if result["goals"]["all_met"] else 1


def only_rank(a: argparse.Namespace, argv: list[str] | None, bundle: Any, bundle_dir: Path,
              rank_rows: list[dict[str, Any]], env: dict[str, str], work: Path, result: dict[str, Any]) -> int:
    """`--only rank`: the rank part alone; its keys replace those of an existing results file, the rest stay."""
    from ctr.serving.process import free_port

    port = free_port()
    log(f"ctr serve on :{port} (rank only)")
    ctr = Server([sys.executable, "-m", "ctr.cli", "serve", "--model", str(bundle_dir), "--port", str(port)],
                 "/readyz", port, work / "ctr.log", env)
    try:
        predictor = wait_predictor(ctr.url)
        rank = rank_scenario(ctr.url, bundle, rank_rows, a, work)
        rank["compiled_predictor"] = predictor
    finally:
        ctr.stop()
    doc = json.loads(a.out.read_text()) if a.out.exists() else {}
    rank.update({"command": result["command"], "started": result["started"], "machine": result["machine"],
                 "bundle": result["bundle"], "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
    doc["rank"] = rank
    goals = doc.setdefault("goals", {})
    goals.pop("all_met", None)
    goals["rank_candidates_per_s_ge_0.7x_booster_predict"] = rank_goal(rank)
    goals["all_met"] = all(goals.values())
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    log(f"rank goal met: {goals['rank_candidates_per_s_ge_0.7x_booster_predict']} -> {a.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if goals["rank_candidates_per_s_ge_0.7x_booster_predict"] else 1


if __name__ == "__main__":
    sys.exit(main())
