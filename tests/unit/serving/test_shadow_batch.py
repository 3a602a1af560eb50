"""The batched shadow (serving/traffic.py): queued bodies scored together equal scoring each alone; a
body the candidate cannot score is an error, never a lost request; a full queue skips and counts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
from ctr.serving import traffic as tr
from ctr.serving.model import ModelHolder, ServedModel
from ctr.serving.traffic import SHADOW, Candidate, Drill, ShadowStats, Traffic

JSON, TSV = b"application/json", b"text/tab-separated-values"


def _rows(staged: Path, n: int) -> list[dict]:
    from ctr.data.landing import read_staged
    from ctr.schema import FEATURE_COLUMNS

    from tests.conftest import END_DAY

    t = next(read_staged(staged, END_DAY)).slice(0, n)
    return [{k: v for k, v in r.items() if v is not None and k in FEATURE_COLUMNS} for r in t.to_pylist()]


def _shadowing(bundle: Path) -> tuple[Traffic, Candidate, ServedModel]:
    model = ServedModel.load(bundle)
    traffic = Traffic(ModelHolder(model), lane=None, lane_bytes=1 << 20, lane_tsv_bytes=1 << 20)
    traffic.candidate = Candidate(model, SHADOW, 0.0, Drill(), time.time(), ShadowStats())
    return traffic, traffic.candidate, model


async def _settled(cand: Candidate, n: int) -> ShadowStats:
    stats = cand.shadow
    deadline = time.monotonic() + 10
    while stats.requests + stats.skipped < n and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    return stats


def test_batched_shadow_scores_equal_each_body_alone(trained_bundle: Path, staged: Path) -> None:
    traffic, cand, model = _shadowing(trained_bundle)
    rows = _rows(staged, 30)
    bodies: list[tuple[str, bytes, bytes, list[dict]]] = []
    for i in range(0, 20):                                    # one row each, the service's common case
        bodies.append(("/v1/score", JSON, orjson.dumps({"rows": [rows[i]]}), [rows[i]]))
    bodies.append(("/v1/score", JSON, orjson.dumps({"rows": rows[20:26]}), rows[20:26]))
    cols = sorted({k for r in rows[26:30] for k in r})
    split = {"dataframe_split": {"columns": cols, "data": [[r.get(c) for c in cols] for r in rows[26:30]]}}
    bodies.append(("/invocations", JSON, orjson.dumps(split), rows[26:30]))

    async def send() -> ShadowStats:
        for route, ctype, body, rs in bodies:
            # the champion's scores as the request path would pass them (here the same model: offline scores)
            traffic.after(route, ctype, body, 1000, model.bundle.predict_rows(rs))
        traffic.after("/v1/score", JSON, b'{"rows": [{"I1": "many"}]}', 1000, np.array([0.5]))  # candidate fails
        return await _settled(cand, len(bodies) + 1)

    stats = asyncio.run(send())
    assert stats.requests == len(bodies) + 1 and stats.skipped == 0
    assert stats.errors == 1 and "I1" in stats.last_error
    assert 0 < stats.batches < len(bodies)                    # scored together, not one call per request
    want = np.concatenate([model.bundle.predict_rows(rs) for *_, rs in bodies])
    assert np.array_equal(np.concatenate(stats.candidate), want)   # bit-identical to offline, in order
    assert np.array_equal(np.concatenate(stats.champion), want)
    s = stats.summary()
    assert s["rows"] == len(want) and s["psi"] == pytest.approx(0.0, abs=1e-12) and s["max_abs_diff"] == 0.0
    assert s["candidate_p99_ms"] is not None and s["candidate_p99_ms"] > 0


def test_a_full_shadow_queue_skips_and_counts(trained_bundle: Path, staged: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tr, "SHADOW_MAX_PENDING", 4)
    traffic, cand, model = _shadowing(trained_bundle)
    row = _rows(staged, 1)
    body, probs = orjson.dumps({"rows": row}), model.bundle.predict_rows(row)

    async def burst() -> ShadowStats:
        for _ in range(10):                                   # no await: nothing is scored while they arrive
            traffic.after("/v1/score", JSON, body, 1000, probs)
        return await _settled(cand, 10)

    stats = asyncio.run(burst())
    assert stats.skipped == 6 and stats.requests == 4 and stats.errors == 0 and stats.rows == 4
