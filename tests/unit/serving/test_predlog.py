"""The prediction log: seeded sampling = rows in the log, back-pressure counted, atomic files, crash salvage."""

from __future__ import annotations

import datetime as dt
import gzip
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orjson
import pytest
from ctr.serving.predlog import PredictionLog, complete_members, log_files, read_log
from ctr.settings import Settings

ROW = {"I1": 3, "I2": 20, "C1": "05db9164"}


def _body(n: int) -> bytes:
    return orjson.dumps({"rows": [{**ROW, "I1": i} for i in range(n)]})


def test_rows_in_log_equal_what_the_seeded_sampling_decided(tmp_path) -> None:
    plog = PredictionLog(tmp_path, rate=0.3, seed=5).start()
    sizes = [1, 1, 7, 1, 120, 3, 1, 40]
    for n in sizes:
        plog.log("/v1/score", b"application/json", _body(n), np.linspace(0.1, 0.9, n), "v1")
    plog.close()
    want = int((np.random.default_rng(5).random(sum(sizes)) < 0.3).sum())  # one draw per row, in order
    recs = list(read_log(tmp_path, dt.datetime.now(dt.UTC).date()))
    assert len(recs) == plog.sampled == want == plog.rows_written and 0 < want < sum(sizes)
    r = recs[0]
    assert set(r) == {"request_id", "time", "model_version", "route", "row_index", "row", "probability"}
    assert r["model_version"] == "v1" and r["row"]["I1"] == r["row_index"] and r["row"]["C1"] == "05db9164"
    assert not list(tmp_path.rglob("*.tmp"))


def test_rate_one_logs_every_row_of_every_format(tmp_path) -> None:
    plog = PredictionLog(tmp_path, rate=1.0).start()
    plog.log("/v1/score", b"text/tab-separated-values", b"0\t1\t2" + b"\t" * 37 + b"\n1\t5" + b"\t" * 38 + b"\n",
             np.array([0.2, 0.3]), "v2")
    plog.log("/invocations", b"application/json",
             orjson.dumps({"dataframe_split": {"columns": ["I1", "C1"], "data": [[1, "a"], [2, None]]}}),
             np.array([0.4, 0.5]), "v2")
    plog.log("/v1/rank", b"application/json",
             orjson.dumps({"context": {"I1": 1}, "candidates": [{"id": "x", "C9": "q"}, {"id": "y"}], "k": 1}),
             np.array([0.6, 0.7]), "v2")
    plog.close()
    recs = list(read_log(tmp_path, dt.datetime.now(dt.UTC).date()))
    assert [r["probability"] for r in recs] == [0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    assert recs[0]["row"]["tsv"].startswith("0\t1\t2") and recs[3]["row"] == {"I1": 2, "C1": None}
    assert recs[4]["row"] == {"I1": 1, "C9": "q", "item_id": "x"}


def test_a_full_queue_drops_and_counts_never_blocks(tmp_path) -> None:
    seen: list[tuple[str, int]] = []
    plog = PredictionLog(tmp_path, rate=1.0, queue_size=2, dropped=lambda r, n: seen.append((r, n)))  # no writer yet
    for _ in range(5):
        plog.log("/v1/score", b"application/json", _body(3), np.full(3, 0.5), "v1")
    assert plog.drops["queue_full"] == 9 and seen == [("queue_full", 3)] * 3
    plog.start()
    plog.close()
    assert plog.rows_written == 6 and plog.sampled == 15  # sampled = written + dropped, never silent


def test_an_unparsable_body_is_counted(tmp_path) -> None:
    plog = PredictionLog(tmp_path, rate=1.0).start()
    plog.log("/v1/score", b"application/json", b"{not json", np.full(2, 0.5), "v1")
    plog.close()
    assert plog.drops["unparsable"] == 2 and plog.rows_written == 0


def test_files_rotate_and_appear_whole(tmp_path) -> None:
    plog = PredictionLog(tmp_path, rate=1.0, rotate_rows=10).start()
    for _ in range(5):
        plog.log("/v1/score", b"application/json", _body(4), np.full(4, 0.5), "v1")
        plog.flush()
    plog.close()
    files = log_files(tmp_path, dt.datetime.now(dt.UTC).date())
    assert len(files) >= 2 and sum(len(gzip.decompress(f.read_bytes()).splitlines()) for f in files) == 20


def _service(tmp_path) -> tuple[subprocess.Popen, int]:
    """A process logging 15 rows (3 requests) with a long rotation until its writer reported them written;
    it prints its writer's pid and sleeps, its file still open."""
    code = (
        "import numpy as np, orjson, time, sys\n"
        "from ctr.serving.predlog import PredictionLog\n"
        f"p = PredictionLog(__import__('pathlib').Path({str(tmp_path)!r}), rate=1.0, rotate_s=3600).start()\n"
        "for i in range(3):\n"
        "    p.log('/v1/score', b'application/json', orjson.dumps({'rows': [{'I1': i}] * 5}), np.full(5, 0.5), 'v1')\n"
        "    time.sleep(0.1)\n"
        "while p.rows_written < 15:\n"
        "    p._read_reports(); time.sleep(0.02)\n"
        "print(p._proc.pid, flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env={**os.environ})
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def _gone(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def test_a_killed_service_leaves_its_writer_to_finish_the_file_whole(tmp_path) -> None:
    """SIGKILL of the service: its writer process sees the end of its input, closes and renames the file with
    every row handed over, and exits (it dies with the service, leaving no torn file)."""
    proc, writer = _service(tmp_path)
    assert writer != proc.pid and not _gone(writer)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20
    while not _gone(writer) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(writer) and not list(tmp_path.rglob("*.tmp"))
    (f,) = log_files(tmp_path, dt.datetime.now(dt.UTC).date())
    assert f"-{writer}-" in f.name and complete_members(f.read_bytes())[1]  # every member whole
    assert len(list(read_log(tmp_path, dt.datetime.now(dt.UTC).date()))) == 15


def test_a_killed_writer_loses_nothing_flushed_and_leaves_no_torn_file(tmp_path) -> None:
    """Service and writer SIGKILLed together (the file open): readers see nothing half-written; the next start
    salvages every complete member of the writer's `.tmp` (named with its pid) and drops a cut-off member."""
    proc, writer = _service(tmp_path)
    os.kill(writer, signal.SIGKILL)
    proc.kill()
    proc.wait()
    (tmp,) = tmp_path.rglob(".part-*.tmp")
    assert f"-{writer}-" in tmp.name
    assert log_files(tmp_path, dt.datetime.now(dt.UTC).date()) == []  # readers see nothing half-written
    with open(tmp, "ab") as fh:  # a member cut mid-write
        fh.write(gzip.compress(b'{"x": 1}\n' * 50)[:30])
    deadline = time.monotonic() + 20
    while not _gone(writer) and time.monotonic() < deadline:
        time.sleep(0.05)
    again = PredictionLog(tmp_path, rate=1.0)
    (final,) = again.salvage()
    assert not tmp.exists() and len(list(read_log(tmp_path, dt.datetime.now(dt.UTC).date()))) == 15
    content, whole = complete_members(final.read_bytes())
    assert whole and content.count(b"\n") == 15


def test_a_stop_signal_to_the_writer_is_left_to_the_service(tmp_path) -> None:
    """The writer ignores SIGTERM (and is not in the service's process group): only the service's close() ends
    it, after every row is written and the file renamed (a group-wide SIGTERM used to kill it first)."""
    plog = PredictionLog(tmp_path, rate=1.0).start()
    plog.log("/v1/score", b"application/json", _body(3), np.full(3, 0.5), "v1")
    plog.flush()  # the writer is past its start-up
    assert plog._proc is not None and os.getpgid(plog._proc.pid) != os.getpgid(0)
    os.kill(plog._proc.pid, signal.SIGTERM)
    plog.log("/v1/score", b"application/json", _body(2), np.full(2, 0.5), "v1")
    plog.close()
    assert plog.rows_written == 5 and plog.drops["writer_lost"] == 0 and not list(tmp_path.rglob("*.tmp"))
    assert len(list(read_log(tmp_path, dt.datetime.now(dt.UTC).date()))) == 5


def test_a_killed_writer_process_is_counted_and_replaced(tmp_path) -> None:
    """Rows handed to a writer that dies are counted (writer_lost) in the metrics hook, never silent; a new
    writer starts and later rows are written: sampled = written + dropped."""
    seen: dict[str, int] = {}
    plog = PredictionLog(tmp_path, rate=1.0, dropped=lambda r, n: seen.__setitem__(r, seen.get(r, 0) + n)).start()
    plog.log("/v1/score", b"application/json", _body(4), np.full(4, 0.5), "v1")
    plog.flush()
    assert plog.rows_written == 4
    first = plog._proc
    assert first is not None
    os.kill(first.pid, signal.SIGSTOP)  # it takes the rows into its pipe but never writes them
    plog.log("/v1/score", b"application/json", _body(3), np.full(3, 0.5), "v1")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    plog._handover()
    assert plog.drops["writer_lost"] == 3 and seen == {"writer_lost": 3} and plog._proc is None
    time.sleep(1.1)  # the restart's back-off
    plog.log("/v1/score", b"application/json", _body(2), np.full(2, 0.5), "v1")
    plog.flush()
    assert plog._proc is not None and plog._proc.pid != first.pid
    plog.close()
    assert plog.rows_written == 6 and plog.sampled == 9 == plog.rows_written + sum(plog.drops.values())
    assert len(list(read_log(tmp_path, dt.datetime.now(dt.UTC).date()))) == 6 and not list(tmp_path.rglob("*.tmp"))


def test_settings_resolve_and_check_the_rate(tmp_path) -> None:
    s = Settings.from_env({"CTR_HOME": str(tmp_path), "CTR_PREDICTION_LOG_RATE": "1.0"})
    assert s.prediction_log_rate == 1.0 and s.predictions_dir == tmp_path / "predictions"
    assert Settings.from_env({}).prediction_log_rate == 0.01
    for bad, msg in (("2", "between 0 and 1"), ("lots", "not a number"), ("nan", "between 0 and 1")):
        with pytest.raises(ValueError, match=f"CTR_PREDICTION_LOG_RATE.*{msg}"):
            Settings.from_env({"CTR_PREDICTION_LOG_RATE": bad})


def test_a_one_row_json_request_is_stored_as_its_raw_body_and_read_as_its_row(tmp_path, caplog) -> None:
    """The writer does not parse one-row JSON bodies: the line holds the body verbatim (newlines made spaces);
    read_log derives the same record a parsed row gives, NaN of /invocations included, and the service's
    request id is the record's."""
    split = b'{"dataframe_split": {"columns": ["I1", "C1"],\n "data": [[NaN, "05db9164"]]}}\r\n'
    score = b'  {"rows": [{"I1": 4, "C1": "05db9164"}]}'
    rank = b'{"context": {"I1": 1}, "candidates": [{"id": "x", "C9": "q"}], "k": 1}'
    plog = PredictionLog(tmp_path, rate=1.0).start()
    plog.log("/invocations", b"application/json", split, np.array([0.125]), "v3", b"client-1")
    plog.log("/v1/score", b"application/json", score, np.array([0.25]), "v3", b'odd"id\\')
    plog.log("/v1/rank", b"application/json", rank, np.array([0.5]), "v3")
    plog.log("/v1/score", b"application/json", _body(2), np.array([0.75, 0.875]), "v3", b"many")  # parsed: "row"
    plog.close()
    (f,) = log_files(tmp_path, dt.datetime.now(dt.UTC).date())
    lines = gzip.decompress(f.read_bytes()).splitlines()
    assert len(lines) == 5
    assert b'"body":{"dataframe_split": {"columns": ["I1", "C1"],  "data": [[NaN, "05db9164"]]}}' in lines[0]
    assert b'"body":{"rows": [{"I1": 4, "C1": "05db9164"}]}' in lines[1] and b'"row":' in lines[3]
    recs = list(read_log(tmp_path, dt.datetime.now(dt.UTC).date()))
    keys = {"request_id", "time", "model_version", "route", "row_index", "row", "probability"}
    assert all(set(r) == keys for r in recs)
    assert [r["row"] for r in recs[:3]] == [{"I1": None, "C1": "05db9164"}, {"I1": 4, "C1": "05db9164"},
                                            {"I1": 1, "C9": "q", "item_id": "x"}]
    assert [r["request_id"] for r in recs] == ["client-1", 'odd"id\\', recs[2]["request_id"], "many", "many"]
    assert recs[2]["request_id"] and [r["probability"] for r in recs] == [0.125, 0.25, 0.5, 0.75, 0.875]
    assert all(r["model_version"] == "v3" and r["row_index"] == i for r, i in zip(recs, [0, 0, 0, 0, 1], strict=True))
    assert dt.datetime.fromisoformat(recs[0]["time"]).tzinfo is not None

    # a body no rule can read still yields its record (row None, the reason); a line that is not JSON is named
    with gzip.open(f.with_name("part-99999999T000000000000-1-000001.jsonl.gz"), "wb") as fh:
        fh.write(b'{"request_id":"r","route":"/v1/score","row_index":0,"body":{"rowz":[]},"probability":0.5}\n'
                 b'{"request_id":"r","route":"/v1/sc\n')
    with caplog.at_level("WARNING", logger="ctr.serving.predlog"):
        *_, odd = read_log(tmp_path, dt.datetime.now(dt.UTC).date())
    assert odd["row"] is None and "row not derivable" in odd["row_error"] and odd["probability"] == 0.5
    assert "1 line(s) of" in caplog.text and "are not JSON" in caplog.text


def test_only_the_picked_rows_are_built_and_equal_the_full_parse(tmp_path) -> None:
    """At a low rate the writer builds just the sampled rows of a multi-row body; each equals what parsing
    every row (`_payload_rows`, the old way, and read_log's rule) gives at its row_index, for every route."""
    from ctr.serving.predlog import _payload_rows

    cands = [{"id": f"i{j}", "C9": f"{j:08x}"} if j % 3 else {"C9": "q"} for j in range(40)]
    bodies = {
        "/v1/rank": {"context": {"I1": 7, "C1": "05db9164"}, "candidates": cands, "k": 3},
        "/invocations": {"dataframe_split": {"columns": ["I1", "C1"], "data": [[j, None] for j in range(40)]}},
        "/v1/score": {"rows": [{**ROW, "I1": j} for j in range(40)]},
    }
    records = {"dataframe_records": [{"I1": float("nan"), "C1": "a"}] + [{"I1": j} for j in range(39)]}
    plog = PredictionLog(tmp_path, rate=0.2, seed=3).start()
    for route, body in bodies.items():
        plog.log(route, b"application/json", orjson.dumps(body), np.linspace(0, 1, 40), "v1", route.encode())
    raw = b'{"dataframe_records": [{"I1": NaN, "C1": "a"}' + b"".join(b', {"I1": %d}' % j for j in range(39)) + b"]}"
    plog.log("/invocations", b"application/json", raw, np.linspace(0, 1, 40), "v1", b"records")
    plog.close()
    recs = list(read_log(tmp_path, dt.datetime.now(dt.UTC).date()))
    assert len(recs) == plog.sampled == int((np.random.default_rng(3).random(160) < 0.2).sum())
    full = {route: _payload_rows(route, body) for route, body in bodies.items()}
    full["records"] = _payload_rows("/invocations", records)  # NaN -> None, as the stored record has it
    assert all(r["row"] == full[r["request_id"]][r["row_index"]] for r in recs)
    assert {r["request_id"] for r in recs} == set(full)
