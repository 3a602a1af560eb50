"""Data-layer benchmark -> benchmarks/results/data.json.

Measured in one run, on one generated day (raw Criteo TSV, decompressed so both readers parse the
same bytes):
  * baseline: a plain `pyarrow.csv.read_csv` of the file (tab delimiter, type inference, threads on);
  * ctr reader: `iter_chunks` (read + split + validate every field + quarantine), the same file;
  * the same with 0.1% of lines corrupted (the quarantine path), and staging (validate + Parquet);
  * the generator (`write_day`: rows + truth sidecar + gzip) in rows/s.
Each measurement runs in a fresh child process (so its peak RSS is its own); repeats are interleaved
and the best and median of each are reported. Ratios are against the baseline of the same run.

    .venv/bin/python benchmarks/data.py [--rows 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DAY = dt.date(2026, 11, 20)


# ---- child phases ----------------------------------------------------------------------------
def _phase(name: str, path: Path, rows: int, work: Path) -> dict:
    import pyarrow.csv as pcsv
    from ctr.data.generate import GeneratorConfig, write_day
    from ctr.data.landing import stage_day
    from ctr.data.reader import iter_chunks

    t0, c0 = time.perf_counter(), time.process_time()  # imports done: time the work only
    out: dict = {}
    if name == "baseline":
        names = [f"f{i}" for i in range(40)]
        table = pcsv.read_csv(path, read_options=pcsv.ReadOptions(column_names=names),
                              parse_options=pcsv.ParseOptions(delimiter="\t"))
        out["rows"] = table.num_rows
    elif name == "reader":
        ok = bad = 0
        for ch in iter_chunks(str(path)):
            ok += ch.table.num_rows
            bad += len(ch.bad)
        out.update(rows=ok + bad, rows_ok=ok, rows_quarantined=bad)
    elif name == "reader_stream":  # the file 4 times over as one stream: memory must not grow
        ok = bad = 0
        rss_1x = 0.0
        stream = _Repeat(path, STREAM_TIMES)
        for ch in iter_chunks(stream):
            ok += ch.table.num_rows
            bad += len(ch.bad)
            if not rss_1x and ok + bad >= rows:
                rss_1x = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out.update(rows=ok + bad, rows_ok=ok, rows_quarantined=bad, peak_rss_mb_after_first_pass=round(rss_1x, 1))
    elif name == "stage":
        shutil.rmtree(work / "staging", ignore_errors=True)
        rep = stage_day(str(path), work / "staging", work / "quarantine", DAY, force=True)
        out.update(rows=rep.rows_in, rows_ok=rep.rows_ok, rows_quarantined=rep.rows_quarantined)
    elif name == "generate":
        write_day(path, DAY, rows, GeneratorConfig(seed=7))
        out["rows"] = rows
    else:
        raise SystemExit(f"unknown phase {name!r}")
    out["secs"] = time.perf_counter() - t0
    out["cpu_secs"] = time.process_time() - c0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


STREAM_TIMES = 4


class _Repeat(io.RawIOBase):
    """A file read `times` times over as one binary stream."""

    def __init__(self, path: Path, times: int) -> None:
        self.path, self.left, self.f = path, times, open(path, "rb")  # noqa: SIM115

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while True:
            b = self.f.read(n)
            if b or self.left <= 1:
                return b
            self.left -= 1
            self.f.close()
            self.f = open(self.path, "rb")  # noqa: SIM115

    def close(self) -> None:
        self.f.close()
        super().close()


def _run_child(name: str, path: Path, rows: int, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--path", str(path), "--rows", str(rows), "--work", str(work)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"phase {name} failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict]) -> dict:
    secs = [r["secs"] for r in runs]
    rows = runs[0]["rows"]
    return {
        "rows": rows, "runs": len(runs),
        "best_secs": round(min(secs), 3), "median_secs": round(statistics.median(secs), 3),
        "rows_per_s_best": round(rows / min(secs)), "rows_per_s_median": round(rows / statistics.median(secs)),
        "cpu_secs_best": round(min(r["cpu_secs"] for r in runs), 3),
        "rows_per_cpu_s_best": round(rows / min(r["cpu_secs"] for r in runs)),  # all threads' CPU time
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
        **{k: runs[0][k] for k in ("rows_ok", "rows_quarantined") if k in runs[0]},
    }


def _corrupt(src: Path, dst: Path, every: int) -> int:
    """Copy `src` replacing every `every`-th line by a malformed variant (cycling through kinds)."""
    kinds = [lambda ln: b"2" + ln[1:], lambda ln: ln + b"\textra", lambda ln: ln.replace(b"\t", b"\tx", 1),
             lambda ln: ln[: len(ln) // 3] + b"zz", lambda ln: b""]
    n = 0
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        for i, line in enumerate(fi, 1):
            if i % every == 0:
                line = kinds[n % len(kinds)](line.rstrip(b"\n")) + b"\n"
                n += 1
            fo.write(line)
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=HERE / "data" / "data-bench")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "data.json")
    ap.add_argument("--phase")
    ap.add_argument("--path", type=Path)
    a = ap.parse_args()
    if a.phase:
        print(json.dumps(_phase(a.phase, a.path, a.rows, a.work)))
        return 0

    load_before = os.getloadavg()
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    landing = a.work / "landing"
    gen_runs = [_run_child("generate", landing, a.rows, a.work)]
    gz = landing / f"day={DAY.isoformat()}" / "part-00000.tsv.gz"
    plain = a.work / "day.tsv"
    with gzip.open(gz, "rb") as fi, open(plain, "wb") as fo:
        shutil.copyfileobj(fi, fo, 16 << 20)
    corrupt = a.work / "corrupt.tsv"
    n_bad = _corrupt(plain, corrupt, every=1000)
    runs: dict[str, list[dict]] = {"baseline": [], "reader": [], "reader_0.1pct_bad": []}
    for _ in range(a.repeats):  # interleaved, so load changes hit both sides alike
        runs["baseline"].append(_run_child("baseline", plain, a.rows, a.work))
        runs["reader"].append(_run_child("reader", plain, a.rows, a.work))
        runs["reader_0.1pct_bad"].append(_run_child("reader", corrupt, a.rows, a.work))
    for _ in range(a.repeats - 1):
        gen_runs.append(_run_child("generate", a.work / "landing2", a.rows, a.work))
    stage = [_run_child("stage", landing, a.rows, a.work)]
    stream = [_run_child("reader_stream", plain, a.rows, a.work)]
    res = {name: _summary(r) for name, r in runs.items()}
    res["generator"] = _summary(gen_runs)
    res["stage_day_gz"] = _summary(stage)
    res["reader_stream_4x"] = _summary(stream) | {"peak_rss_mb_after_first_pass": stream[0]["peak_rss_mb_after_first_pass"]}
    base, ours = res["baseline"], res["reader"]
    doc = {
        "benchmark": "data",
        "command": f".venv/bin/python benchmarks/data.py --rows {a.rows} --repeats {a.repeats}",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "file": {"rows": a.rows, "tsv_mb": round(plain.stat().st_size / 2**20, 1),
                 "gz_mb": round(gz.stat().st_size / 2**20, 1), "corrupted_lines": n_bad},
        "results": res,
        "ratios": {
            "reader_vs_pyarrow_csv_best": round(ours["rows_per_s_best"] / base["rows_per_s_best"], 3),
            "reader_vs_pyarrow_csv_median": round(ours["rows_per_s_median"] / base["rows_per_s_median"], 3),
            "reader_vs_pyarrow_csv_cpu": round(base["cpu_secs_best"] / ours["cpu_secs_best"], 3),
            "reader_0.1pct_bad_vs_pyarrow_csv_best": round(
                res["reader_0.1pct_bad"]["rows_per_s_best"] / base["rows_per_s_best"], 3),
        },
        "goals": {"reader_vs_pyarrow_csv": ">= 0.5", "generator_rows_per_s": ">= 200000"},
        "note": "baseline = pyarrow.csv.read_csv (tab, type inference, threads on) of the clean file; it validates "
                "nothing and stops at the first wrong field count, so the corrupted file (same size, 0.1% of lines "
                "malformed) is compared with the clean file's baseline. rows_per_s are wall-clock; the machine is "
                "shared, see loadavg. rows_per_cpu_s counts the CPU time of all threads of the phase.",
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["ratios"] | {"generator_rows_per_s_best": res["generator"]["rows_per_s_best"]}, indent=1))
    shutil.rmtree(a.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
