"""Ranking a user's candidate items in one request: `POST /v1/rank` and `ctr rank` share this code.

A request is `{"context": {...}, "candidates": [{"id": ..., ...}, ...], "k": 10, "override": "candidate"}`.
The row scored for a candidate is the context merged with the candidate (its `id` aside); a field in
both is a 422 naming it unless `"override": "candidate"` (then the candidate's value wins, a null
included). The answer is the top `k` (default: all) by probability, descending, ties in input order.

Every field is checked by `validation.check_row`, so a mistake is a RequestError naming the field
and, for a candidate, its 0-based index (`row`). The codes matrix is built from the shared context
encoded once (`JsonRowsEncoder.encode`): every candidate's row starts as that vector, and
`JsonRowsEncoder.encode_columns` writes the candidates' own fields into it, all of a kind at once
(no Python pass per field or per candidate). Anything that path does not take (or a candidate null
overriding a context value) goes through `check_row` + `FeatureTransform.row` on the merged rows:
the same numbers, and the error naming the mistake. Tests prove the paths agree.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ctr.features.transform import N_FEATURES
from ctr.serving.validation import RequestError, _shown, check_row, parse_json

log = logging.getLogger("ctr.serving")

RANK_ROUTE = "/v1/rank"
DEFAULT_MAX_CANDIDATES = 1_000
RANK_KEYS = frozenset({"context", "candidates", "k", "override"})
OVERRIDES = frozenset({"candidate"})
ID_INT_MAX = 2**53  # integer ids beyond this would not survive a JSON round trip in most clients
ID_MAX_CHARS = 256
JSON_TYPES = frozenset({b"application/json"})


@dataclass(frozen=True)
class RankInput:
    """A checked request: candidate ids (input order), their feature matrix, and how many to return."""

    ids: list[str | int]
    x: np.ndarray
    k: int


def prepare(model: Any, payload: Any, max_candidates: int) -> RankInput:
    """A parsed `/v1/rank` body -> ids, merged feature matrix and k; RequestError naming the field.

    Takes ownership of `payload` (the candidates' `id` keys are removed from it)."""
    if not isinstance(payload, dict):
        raise RequestError(422, 'body must be {"context": {...}, "candidates": [{"id": "...", ...}, ...], "k": 10}',
                           field="candidates")
    extra = payload.keys() - RANK_KEYS
    if extra:
        name = sorted(map(str, extra))[0]
        raise RequestError(422, f"unknown top-level field {_shown(name)}; the body holds 'context', 'candidates', "
                                "'k' and 'override'", field=name)
    if "candidates" not in payload:
        raise RequestError(422, "'candidates' is required: a list of objects, each with an 'id'", field="candidates")
    context = payload.get("context")
    if context is None:
        context = {}
    elif not isinstance(context, dict):
        raise RequestError(422, f"'context' must be an object of feature -> value, got {_shown(context)}",
                           field="context")
    cands = payload["candidates"]
    if not isinstance(cands, list):
        raise RequestError(422, f"'candidates' must be a list of objects, got {_shown(cands)}", field="candidates")
    if len(cands) > max_candidates:
        raise RequestError(413, f"{len(cands)} candidates exceed the per-request limit of {max_candidates} "
                                "(CTR_RANK_MAX_CANDIDATES); send fewer", field="candidates")
    override = payload.get("override")
    if override is not None and override not in OVERRIDES:
        raise RequestError(422, f"'override' must be \"candidate\" (or absent), got {_shown(override)}",
                           field="override")
    k = _k(payload.get("k"), len(cands))
    ids = _ids(cands)
    return RankInput(ids=ids, x=_matrix(model, context, cands, override is not None), k=k)


def _k(k: Any, n: int) -> int:
    if k is None:
        return n
    if type(k) is float and k.is_integer() and abs(k) < 2**53:  # 803.0 is an integer to JSON Schema (the document)
        k = int(k)
    if type(k) is not int or k < 1:
        raise RequestError(422, f"'k' must be a positive integer (or absent for all candidates), got {_shown(k)}",
                           field="k")
    return min(k, n)


def _ids(cands: list[Any]) -> list[str | int]:
    """Pops every candidate's `id` (checked: present, a string or integer, unique).

    The plain case (every candidate an object; all ids strings of 1..256 valid characters, or all
    integers within +/-2^53; no repeats) is checked a whole list at a time; anything else goes
    through `_check_ids`, one candidate at a time, so the first mistake is named."""
    if not all(map(isinstance, cands, repeat(dict))):
        return _check_ids(cands, [c.pop("id", _ABSENT) if isinstance(c, dict) else _ABSENT for c in cands])
    ids = list(map(dict.pop, cands, repeat("id"), repeat(_ABSENT)))
    if not ids:
        return ids
    types = set(map(type, ids))
    if types == {str}:
        lengths = list(map(len, ids))
        plain = min(lengths) >= 1 and max(lengths) <= ID_MAX_CHARS and _encodes("".join(ids))
    elif types == {int}:
        plain = -ID_INT_MAX <= min(ids) and max(ids) <= ID_INT_MAX
    else:
        plain = False
    if plain and len(set(ids)) == len(ids):
        return ids
    return _check_ids(cands, ids)


def _encodes(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_ids(cands: list[Any], popped: list[Any]) -> list[str | int]:
    """The ids one candidate at a time: the first mistake as a RequestError naming it."""
    ids: list[str | int] = []
    for j, (c, v) in enumerate(zip(cands, popped, strict=True)):
        if not isinstance(c, dict):
            raise RequestError(422, f"candidate {j} must be an object with an 'id' and its features, got {_shown(c)}",
                               row=j)
        if v is _ABSENT:
            raise RequestError(422, f"candidate {j} has no 'id'", row=j, field="id")
        if type(v) is str:
            if not v or len(v) > ID_MAX_CHARS:
                raise RequestError(422, f"candidate {j}: id must be 1 to {ID_MAX_CHARS} characters, got {_shown(v)}",
                                   row=j, field="id")
            if not _encodes(v):
                raise RequestError(422, f"candidate {j}: id is not valid Unicode (a lone surrogate)",
                                   row=j, field="id")
        elif type(v) is not int or not -ID_INT_MAX <= v <= ID_INT_MAX:
            raise RequestError(422, f"candidate {j}: id must be a string or an integer within +/-2^53, got {_shown(v)}",
                               row=j, field="id")
        ids.append(v)
    if len(set(ids)) != len(ids):
        seen: set[str | int] = set()
        for j, v in enumerate(ids):
            if v in seen:
                raise RequestError(422, f"candidate {j}: id {_shown(v)} repeats an earlier candidate's", row=j,
                                   field="id")
            seen.add(v)
    return ids


def _matrix(model: Any, context: dict[str, Any], cands: list[dict[str, Any]], override: bool) -> np.ndarray:
    if not cands:
        return np.empty((0, N_FEATURES), dtype=np.float64)
    names = set().union(*cands) if context else set()  # every field some candidate sets (only a context can clash)
    if not override and not context.keys().isdisjoint(names):
        for j, c in enumerate(cands):
            if not context.keys().isdisjoint(c):
                name = next(f for f in c if f in context)
                raise RequestError(422, f"candidate {j}: field {_shown(name)} is in both context and candidate; "
                                        'set "override": "candidate" to let the candidate\'s value win',
                                   row=j, field=str(name))
    x = _fast_matrix(model, context, cands, override, names)
    return _checked_matrix(model, context, cands) if x is None else x


def _fast_matrix(model: Any, context: dict[str, Any], cands: list[dict[str, Any]], override: bool,
                 names: set[str]) -> np.ndarray | None:
    """The context encoded once, then the candidates a column at a time; None when the checked path must decide."""
    enc = model.rows
    if enc is None:
        return None
    if override and not context.keys().isdisjoint(names):
        for c in cands:  # a candidate's null must clear the context's value: the encoders would keep it
            if any(v is None and f in context for f, v in c.items()):
                return None
    base = enc.encode([context])
    if base is None:
        return None
    x = _columns_matrix(enc, base[0], cands)
    if x is not None:
        return x
    merged = copy.copy(enc)
    merged.template = base[0].tolist()
    return merged.encode(cands)


class _Absent:
    """A candidate without an id."""


_ABSENT = _Absent()


def _columns_matrix(enc: Any, base: np.ndarray, cands: list[dict[str, Any]]) -> np.ndarray | None:
    """Candidates -> codes matrix (n, 39), every row starting as the context's vector, a field at a time
    (`JsonRowsEncoder.encode_columns`); None for the general paths, which name a mistake.

    A candidate's null on a field the context sets is the caller's to route elsewhere (with
    `"override": "candidate"` it clears the context's value); here it would keep it."""
    return enc.encode_columns(base, cands)


def _checked_matrix(model: Any, context: dict[str, Any], cands: list[dict[str, Any]]) -> np.ndarray:
    """check_row on the context and on every candidate (errors say which), then the merged rows."""
    try:
        check_row(0, context)
    except RequestError as e:
        raise _located(e, "context", None) from None
    rows = []
    for j, c in enumerate(cands):
        try:
            check_row(j, c)
        except RequestError as e:
            raise _located(e, f"candidate {j}", j) from None
        rows.append(check_row(j, {**context, **c}))
    return model.bundle.transform.rows_matrix(rows)


def _located(e: RequestError, where: str, row: int | None) -> RequestError:
    """check_row's 'row i: ...' message said of the context or of candidate j instead."""
    msg, prefix = str(e), f"row {e.row if e.row is not None else 0}"
    if msg.startswith(prefix):  # "row i: I1 must be ..." or "row i must be an object ..."
        msg = msg[len(prefix):]
    return RequestError(e.status, where + (msg if msg.startswith((":", " ")) else f": {msg}"), row=row, field=e.field)


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` highest probabilities, descending; equal ones keep their input order."""
    return np.argsort(-probs, kind="stable")[:k]


def items(ids: list[str | int], probs: np.ndarray, k: int) -> list[dict[str, Any]]:
    p = probs.tolist()
    return [{"id": ids[i], "probability": p[i]} for i in top_k(probs, k).tolist()]


def answer(model: Any, req: RankInput, probs: np.ndarray) -> dict[str, Any]:
    """The ranking as the service answers it: {"model_version", "items": [{"id", "probability"}, ...]}."""
    return {"model_version": model.version, "items": items(req.ids, probs, req.k)}


def rank(model: Any, payload: Any, max_candidates: int = DEFAULT_MAX_CANDIDATES) -> tuple[np.ndarray, dict[str, Any]]:
    """One parsed request -> (every candidate's probability, the answer); RequestError for a mistake."""
    req = prepare(model, payload, max_candidates)
    probs = predict(model, req.x)
    return probs, answer(model, req, probs)


def predict(model: Any, x: np.ndarray) -> np.ndarray:
    """The model's probabilities for the merged rows (none for no candidates)."""
    return model.predict_matrix(x) if len(x) else np.empty(0)


def check_content_type(ctype: bytes) -> None:
    if ctype not in JSON_TYPES:
        raise RequestError(415, f"/v1/rank takes application/json, not {ctype.decode(errors='replace')[:60]!r}")


def answer_body(model: Any, req: RankInput, probs: np.ndarray) -> bytes:
    return orjson.dumps(answer(model, req, probs))


def rank_body(model: Any, ctype: bytes, body: bytes, max_candidates: int) -> tuple[np.ndarray, bytes]:
    """One `/v1/rank` request body -> (every probability, JSON response) (the batch lane's entry)."""
    check_content_type(ctype)
    probs, doc = rank(model, parse_json(body), max_candidates)
    return probs, orjson.dumps(doc)


def rank_file(model_dir: Path, input_path: Path, output: Path, max_candidates: int | None = None) -> tuple[int, int]:
    """`ctr rank`: every line of `input_path` (a /v1/rank body) -> one line of `output`, in order.

    A good line gets `{"line", "model_version", "items"}`, exactly the service's answer plus its
    1-based line number; a bad one (blank, not JSON, a rejected field, too many candidates) gets
    `{"line", "status", "error"[, "field"][, "row"]}`, the error the service would send. No line is
    dropped and none stops the run. Returns (requests ranked, requests rejected)."""
    from ctr.serving.app import service_limit
    from ctr.serving.model import ServedModel

    if Path(input_path).resolve() == Path(output).resolve():
        raise ValueError(f"--output {output} is also the input; writing it would destroy the input: "
                         "choose another output file")
    limit = service_limit("CTR_RANK_MAX_CANDIDATES") if max_candidates is None else max_candidates
    model = ServedModel.load(model_dir, compiled="cached")  # the service's compiled trees if cached, else LightGBM
    n_ok = n_bad = 0
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    try:
        with open(input_path, "rb") as src, open(tmp, "wb") as dst:
            for n, line in enumerate(src, start=1):
                rec = rank_line(model, n, line, limit)
                if "error" in rec:
                    n_bad += 1
                else:
                    n_ok += 1
                dst.write(orjson.dumps(rec) + b"\n")
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("ranked %d requests, rejected %d, from %s into %s", n_ok, n_bad, input_path, output)
    return n_ok, n_bad


def rank_line(model: Any, n: int, line: bytes, max_candidates: int) -> dict[str, Any]:
    """One JSON line -> its answer or its error record (never raises for a bad line)."""
    body = line.rstrip(b"\r\n")
    try:
        if not body.strip():
            raise RequestError(400, "empty line; expected a /v1/rank request (a JSON object)")
        _, doc = rank(model, parse_json(body), max_candidates)
        return {"line": n, **doc}
    except RequestError as e:
        return {"line": n, "status": e.status, **e.to_json()}
    except Exception as e:  # our bug, not the line's: recorded (and logged), the run goes on
        log.exception("ranking line %d failed", n)
        return {"line": n, "status": 500, "error": f"internal error: {type(e).__name__}: {e}"[:500]}
