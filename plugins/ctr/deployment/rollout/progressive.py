"""Progressive delivery: the rollout strategy (rolling | canary | shadow), its limits, and the bake judgement.

`Strategy.from_params` reads the DAG params (`rollout_strategy`, `canary_percent`, `bake_seconds`,
`bake_requests`, `rollout_limits`, `rollout_drill`), checked. During the bake the verify step watches
the live service: for a canary it scrapes `/metrics` (`ctr_model_requests_total` and
`ctr_model_request_seconds` by version and role, serving/traffic.py) at the start and the end and compares
the candidate's error rate and p99 with the champion's over that window (`canary_window`,
`canary_breaches`); for a shadow it reads `GET /admin/traffic` (`shadow_breaches`). A breach names the
limit and the numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import httpx

STRATEGIES = ("rolling", "canary", "shadow")
# drills: failure injected in the candidate only (serving/traffic.py Drill), so the rollback is exercised
DRILLS: dict[str, dict[str, float]] = {"none": {}, "latency": {"latency_ms": 250.0}, "errors": {"error_rate": 0.5}}


@dataclass(frozen=True)
class Limits:
    """What a candidate may do during the bake; beyond any of these verify rolls back and fails."""

    max_error_rate_increase: float = 0.01   # canary: candidate 5xx share minus the champion's
    max_p99_increase_ms: float = 50.0       # canary: candidate p99 minus the champion's (histogram estimate)
    max_mean_shift: float = 0.02            # shadow: |candidate mean score - champion mean score|
    max_psi: float = 0.1                    # shadow: PSI of candidate scores against the champion's deciles
    max_candidate_p99_ms: float = 50.0      # shadow: the candidate's scoring p99
    max_candidate_errors: int = 0           # shadow: candidate scorings that failed

    @classmethod
    def from_json(cls, doc: Any) -> Limits:
        if doc is None:
            return cls()
        if not isinstance(doc, dict):
            raise ValueError(f"rollout_limits must be an object of limits, not {type(doc).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ValueError(f"rollout_limits: unknown limit(s) {unknown}; known: {sorted(known)}")
        out: dict[str, Any] = {}
        for k, v in doc.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"rollout_limits.{k}={v!r} must be a number >= 0")
            out[k] = int(v) if k == "max_candidate_errors" else float(v)
        return cls(**out)


@dataclass(frozen=True)
class Strategy:
    name: str = "rolling"
    canary_percent: float = 10.0
    bake_seconds: float = 60.0
    bake_requests: int = 1000
    limits: Limits = field(default_factory=Limits)
    drill: dict[str, float] = field(default_factory=dict)

    @property
    def progressive(self) -> bool:
        return self.name != "rolling"

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> Strategy:
        """The strategy of a DAG run's params (ValueError naming the param for a bad value)."""
        name = p.get("rollout_strategy", "rolling") or "rolling"
        if name not in STRATEGIES:
            raise ValueError(f"rollout_strategy={name!r}: use one of {list(STRATEGIES)}")
        pct = float(p.get("canary_percent", 10))
        if not 0 < pct <= 100:
            raise ValueError(f"canary_percent={pct:g} must be in (0, 100]")
        secs, reqs = float(p.get("bake_seconds", 60)), int(p.get("bake_requests", 1000))
        if secs <= 0 or reqs <= 0:
            raise ValueError(f"bake_seconds={secs:g} and bake_requests={reqs} must be positive")
        drill = p.get("rollout_drill", "none") or "none"
        if drill not in DRILLS:
            raise ValueError(f"rollout_drill={drill!r}: use one of {list(DRILLS)}")
        return cls(name, pct, secs, reqs, Limits.from_json(p.get("rollout_limits") or None), dict(DRILLS[drill]))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "limits": asdict(self.limits)}


# ---- canary: the service's own /metrics over the bake window ---------------------------------------------
Scrape = dict[tuple[str, str], dict[str, Any]]


def scrape(metrics_url: str, timeout: float = 10.0) -> Scrape:
    """{(version, role): {"requests", "errors", "buckets": {le: cumulative count}}} from a /metrics URL; series
    of several instances (a federation endpoint) are summed."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(metrics_url, timeout=timeout)
    r.raise_for_status()
    out: Scrape = {}
    for fam in text_string_to_metric_families(r.text):
        if fam.name not in ("ctr_model_requests", "ctr_model_request_seconds"):
            continue
        for s in fam.samples:
            key = (s.labels.get("version", ""), s.labels.get("role", ""))
            d = out.setdefault(key, {"requests": 0.0, "errors": 0.0, "buckets": {}})
            if s.name == "ctr_model_requests_total":
                d["requests"] += s.value
                if s.labels.get("status", "").startswith("5"):
                    d["errors"] += s.value
            elif s.name == "ctr_model_request_seconds_bucket":
                le = float(s.labels["le"])
                d["buckets"][le] = d["buckets"].get(le, 0.0) + s.value
    return out


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """Prometheus's histogram_quantile on cumulative bucket counts (linear inside a bucket); seconds."""
    items = sorted(buckets.items())
    if not items or items[-1][1] <= 0:
        return None
    rank = q * items[-1][1]
    lo_bound, lo_count = 0.0, 0.0
    for bound, count in items:
        if count >= rank:
            if math.isinf(bound):
                return lo_bound  # the highest finite bound, as Prometheus does
            if count == lo_count:
                return bound
            return lo_bound + (bound - lo_bound) * (rank - lo_count) / (count - lo_count)
        lo_bound, lo_count = bound, count
    return lo_bound


def canary_window(before: Scrape, after: Scrape, version: str, role: str) -> dict[str, Any]:
    """Requests, errors, error rate and p99 (ms) of one (version, role) between two scrapes."""
    a, b = after.get((version, role)), before.get((version, role), {"requests": 0.0, "errors": 0.0, "buckets": {}})
    if a is None:
        return {"version": version, "role": role, "requests": 0, "errors": 0, "error_rate": None, "p99_ms": None}
    n, e = a["requests"] - b["requests"], a["errors"] - b["errors"]
    buckets = {le: c - b["buckets"].get(le, 0.0) for le, c in a["buckets"].items()}
    p99 = quantile(buckets, 0.99)
    return {"version": version, "role": role, "requests": int(n), "errors": int(e),
            "error_rate": round(e / n, 6) if n else None, "p99_ms": None if p99 is None else round(p99 * 1000, 3)}


def canary_breaches(cand: dict[str, Any], champ: dict[str, Any], limits: Limits) -> list[str]:
    """The limits the canary broke over the window (empty: promote)."""
    out = []
    if not cand["requests"]:
        return [f"the candidate (version {cand['version']}) answered no requests during the bake: nothing to judge"]
    champ_rate = champ["error_rate"] or 0.0
    if cand["error_rate"] - champ_rate > limits.max_error_rate_increase:
        out.append(f"max_error_rate_increase={limits.max_error_rate_increase:g}: candidate error rate "
                   f"{cand['error_rate']:.4f} ({cand['errors']}/{cand['requests']}) vs champion {champ_rate:.4f} "
                   f"({champ['errors']}/{champ['requests']})")
    if cand["p99_ms"] is not None and champ["p99_ms"] is not None \
            and cand["p99_ms"] - champ["p99_ms"] > limits.max_p99_increase_ms:
        out.append(f"max_p99_increase_ms={limits.max_p99_increase_ms:g}: candidate p99 {cand['p99_ms']:.1f} ms vs "
                   f"champion {champ['p99_ms']:.1f} ms")
    return out


def shadow_breaches(summary: dict[str, Any], limits: Limits) -> list[str]:
    """The limits the shadow broke (`GET /admin/traffic`'s "shadow"; empty: promote)."""
    out = []
    if summary["errors"] > limits.max_candidate_errors:
        out.append(f"max_candidate_errors={limits.max_candidate_errors}: {summary['errors']} of "
                   f"{summary['requests']} shadow scorings failed (last: {summary['last_error']})")
    if not summary["rows"]:
        return out + ["the shadow scored no rows during the bake: nothing to judge"]
    if abs(summary["mean_shift"]) > limits.max_mean_shift:
        out.append(f"max_mean_shift={limits.max_mean_shift:g}: mean score {summary['candidate_mean']:.5f} vs champion "
                   f"{summary['champion_mean']:.5f} (shift {summary['mean_shift']:+.5f}) over {summary['rows']} rows")
    if summary["psi"] > limits.max_psi:
        out.append(f"max_psi={limits.max_psi:g}: PSI {summary['psi']:.4f} between the score distributions "
                   f"over {summary['rows']} rows")
    if summary["candidate_p99_ms"] is not None and summary["candidate_p99_ms"] > limits.max_candidate_p99_ms:
        out.append(f"max_candidate_p99_ms={limits.max_candidate_p99_ms:g}: candidate p99 "
                   f"{summary['candidate_p99_ms']:.1f} ms")
    return out
