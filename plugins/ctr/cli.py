"""The `ctr` command: generate, stage, train, evaluate, score, rank, serve.

Exit status 0 on success; non-zero with a one-line error on stderr otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path

from ctr.settings import Settings


def _date(s: str) -> dt.date:
    try:
        return dt.date.fromisoformat(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a date YYYY-MM-DD") from None


def _port(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a port number") from None
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port {v} is out of range; it must be between 1 and 65535")
    return v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctr", description="Criteo CTR pipeline: data, training, evaluation, scoring")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="write a synthetic Criteo-format landing zone")
    g.add_argument("--out", required=True, type=Path)
    g.add_argument("--days", type=int, required=True)
    rows = g.add_mutually_exclusive_group(required=True)
    rows.add_argument("--rows-per-day", type=int)
    rows.add_argument("--rows", type=int, help="total rows spread evenly over the days (45840617 = full Criteo)")
    g.add_argument("--end-date", type=_date, default=dt.date.today() - dt.timedelta(days=1))
    g.add_argument("--seed", type=int, default=7)
    g.add_argument("--drift", type=float, default=0.0, help="day-to-day drift of the true effects (0 = none)")
    g.add_argument("--cardinality-scale", type=float, default=1.0,
                   help="shrink the real per-column cardinalities (e.g. 0.01 for tiny test sets)")

    t = sub.add_parser("train", help="train on an inclusive day range and write a bundle")
    t.add_argument("--data", required=True, help="landing zone root (folder or abfs:// URL)")
    t.add_argument("--from", dest="start", type=_date, required=True)
    t.add_argument("--to", dest="end", type=_date, required=True)
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--engine", choices=["lightgbm", "spark", "synapseml"], default="lightgbm",
                   help="lightgbm: local; spark: the Spark job, driver-side LightGBM; synapseml: the Spark job, "
                        "SynapseML's distributed LightGBM (jars from `make jars`)")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--staging", type=Path, default=None, help="Parquet staging folder (default: CTR_HOME/staging)")
    t.add_argument("--sample-fraction", type=float, default=1.0)
    t.add_argument("--params", default="{}", help="JSON object of LightGBM parameter overrides")

    e = sub.add_parser("evaluate", help="score a model (and a baseline) on one day; prints JSON")
    e.add_argument("--model", required=True, type=Path)
    e.add_argument("--baseline", type=Path)
    e.add_argument("--data", required=True)
    e.add_argument("--day", type=_date, required=True)
    e.add_argument("--staging", type=Path, default=None)

    s = sub.add_parser("score", help="score files of rows; one output line per input row")
    s.add_argument("--model", required=True, type=Path)
    s.add_argument("--input", required=True, nargs="+")
    s.add_argument("--output", required=True, type=Path)

    r = sub.add_parser("rank", help="answer a JSON-lines file of /v1/rank requests offline; one output line per "
                                    "input line (an error record for a bad one)")
    r.add_argument("--model", required=True, type=Path)
    r.add_argument("--input", required=True, type=Path, help="JSON lines, each a /v1/rank request body")
    r.add_argument("--output", required=True, type=Path)

    v = sub.add_parser("serve", help="run the scoring service")
    v.add_argument("--model", required=True, type=Path)
    v.add_argument("--host", default=None)
    v.add_argument("--port", type=_port, default=None)

    mo = sub.add_parser("monitor", help="compare a day's prediction log with the serving model's training range "
                                        "and holdout scores; prints JSON (monitor.json)")
    mo.add_argument("--day", type=_date, required=True)
    mo.add_argument("--predictions", default=None, help="prediction log root: a folder or az://container/prefix "
                                                         "(default: CTR_PREDICTION_LOG_URL if set, else CTR_HOME/predictions)")
    mo.add_argument("--out", type=Path, default=None, help="where monitor.json/.html go (default: CTR_HOME/monitor/DAY)")
    mo.add_argument("--reference", type=Path, default=None,
                    help="a drift_reference.json to compare with (default: each version's, from its MLflow run)")
    mo.add_argument("--max-feature-psi", type=float, default=0.25)
    mo.add_argument("--max-score-psi", type=float, default=0.25)

    b = sub.add_parser("bundle", help="bundle maintenance")
    bsub = b.add_subparsers(dest="bundle_cmd", required=True)
    f = bsub.add_parser("finalize", help="write manifest.json for a bundle made before manifests existed "
                                        "(after it loads and passes its probe in a child process)")
    f.add_argument("dir", type=Path)
    return p


def _staging(arg: Path | None, settings: Settings) -> Path:
    return arg if arg is not None else settings.home / "staging"


def _stage_range(data: str, staging: Path, settings: Settings, days: list[dt.date]) -> None:
    from ctr.data.landing import stage_day

    for d in days:
        stage_day(data, staging, settings.home / "quarantine", d)


def cmd_generate(a: argparse.Namespace, settings: Settings) -> int:
    from ctr.data.generate import GeneratorConfig, generate, split_rows

    per_day = a.rows_per_day if a.rows is None else split_rows(a.rows, a.days)
    paths = generate(a.out, a.days, per_day, a.end_date, GeneratorConfig(seed=a.seed, drift=a.drift,
                                                                         cardinality_scale=a.cardinality_scale))
    total = a.rows_per_day * a.days if a.rows is None else a.rows
    print(f"wrote {len(paths)} days, {total} rows under {a.out}", file=sys.stderr)
    return 0


def cmd_train(a: argparse.Namespace, settings: Settings) -> int:
    from ctr.data.landing import daterange

    if a.end < a.start:
        raise ValueError(f"--to {a.end} is before --from {a.start}")
    params = json.loads(a.params)
    if a.engine in ("spark", "synapseml"):
        from ctr.training.spark_job import run_local_spark_job

        run_local_spark_job(data=a.data, start=a.start, end=a.end, out=a.out, seed=a.seed, params=params,
                            engine="lightgbm" if a.engine == "spark" else "synapseml")
        return 0
    from ctr.training.trainer import TrainConfig, train

    staging = _staging(a.staging, settings)
    _stage_range(a.data, staging, settings, daterange(a.start, a.end))
    train(staging, a.out, TrainConfig(start=a.start, end=a.end, seed=a.seed, sample_fraction=a.sample_fraction,
                                      params=params, num_threads=settings.num_threads))
    print(f"bundle written to {a.out}", file=sys.stderr)
    return 0


def cmd_evaluate(a: argparse.Namespace, settings: Settings) -> int:
    from ctr.validation.holdout import evaluate_day

    staging = _staging(a.staging, settings)
    _stage_range(a.data, staging, settings, [a.day])
    doc = evaluate_day(staging, a.day, a.model, a.baseline)
    print(json.dumps(doc, indent=1, sort_keys=True))
    return 0


def cmd_score(a: argparse.Namespace, settings: Settings) -> int:
    from ctr.model.batch_scoring import score_files

    n_ok, n_bad = score_files(a.model, a.input, a.output)
    print(f"scored {n_ok} rows, rejected {n_bad}; wrote {a.output}", file=sys.stderr)
    return 0


def cmd_rank(a: argparse.Namespace, settings: Settings) -> int:
    from ctr.serving.ranking import rank_file

    n_ok, n_bad = rank_file(a.model, a.input, a.output)
    print(f"ranked {n_ok} requests, rejected {n_bad}; wrote {a.output}", file=sys.stderr)
    return 0


def cmd_serve(a: argparse.Namespace, settings: Settings) -> int:
    from ctr.serving.app import serve

    serve(a.model, host=a.host or settings.serve_host, port=a.port or settings.serve_port)
    return 0


def cmd_monitor(a: argparse.Namespace, settings: Settings) -> int:
    from ctr.monitoring.monitor import MonitorConfig, monitor_day

    registry = None
    if a.reference is None:
        from ctr.registry import Registry

        registry = Registry.from_settings(settings)
    where = a.predictions or settings.prediction_log_url or settings.predictions_dir
    doc = monitor_day(a.day, where if "://" in str(where) else Path(where), a.out or settings.home / "monitor" / a.day.isoformat(),
                      registry=registry, reference=a.reference,
                      cfg=MonitorConfig(max_feature_psi=a.max_feature_psi, max_score_psi=a.max_score_psi))
    print(json.dumps(doc, indent=1, sort_keys=True))
    print(f"monitor {a.day}: {doc['status']}" + (": " + "; ".join(doc["alerts"]) if doc["alerts"] else ""), file=sys.stderr)
    return 0


def cmd_bundle(a: argparse.Namespace, settings: Settings) -> int:
    from ctr.model.bundle import refinalize

    version = refinalize(a.dir)
    print(f"bundle {a.dir} finalised (manifest.json written); version {version}", file=sys.stderr)
    return 0


COMMANDS = {"generate": cmd_generate, "train": cmd_train, "evaluate": cmd_evaluate, "score": cmd_score, "rank": cmd_rank,
            "serve": cmd_serve, "monitor": cmd_monitor, "bundle": cmd_bundle}


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[a.cmd](a, Settings.from_env())
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one line, naming the problem; -v shows the traceback
        if a.verbose:
            logging.exception("ctr %s failed", a.cmd)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"ctr {a.cmd}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
