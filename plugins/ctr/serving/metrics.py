"""Prometheus text metrics for the scoring service, kept in plain counters (no client library).

Requests by route and status, a latency histogram, rows scored, the model version (info gauge and
load time) and a histogram of predicted probabilities for watching drift.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

import numpy as np

ROUTES = frozenset({"/v1/score", "/invocations", "/healthz", "/readyz", "/metrics", "/openapi.json", "/admin/load"})
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
PROB_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (1.0,)


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.rows = 0
        self.prob = [0] * len(PROB_BUCKETS)
        self.prob_sum = 0.0

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "other"  # bounded label values, whatever clients send
        self.requests[(route, status)] += 1
        self.latency[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def observe_predictions(self, p: np.ndarray) -> None:
        n = len(p)
        if n == 0:
            return
        self.rows += n
        if n == 1:
            v = float(p[0])
            self.prob[min(bisect.bisect_left(PROB_BUCKETS, v), len(PROB_BUCKETS) - 1)] += 1
            self.prob_sum += v
            return
        idx = np.minimum(np.searchsorted(PROB_BUCKETS, p, side="left"), len(PROB_BUCKETS) - 1)
        for i, c in enumerate(np.bincount(idx, minlength=len(PROB_BUCKETS)).tolist()):
            self.prob[i] += c
        self.prob_sum += float(p.sum())

    def render(self, version: str, loaded_at: float, inflight: int) -> str:
        out = ["# HELP ctr_requests_total Requests by route and status.", "# TYPE ctr_requests_total counter"]
        for (route, status), n in sorted(self.requests.items()):
            out.append(f'ctr_requests_total{{route="{route}",status="{status}"}} {n}')
        out += ["# HELP ctr_request_seconds Request latency.", "# TYPE ctr_request_seconds histogram"]
        cum = 0
        for b, n in zip(LATENCY_BUCKETS, self.latency, strict=False):
            cum += n
            out.append(f'ctr_request_seconds_bucket{{le="{b}"}} {cum}')
        out.append(f'ctr_request_seconds_bucket{{le="+Inf"}} {self.latency_count}')
        out.append(f"ctr_request_seconds_sum {self.latency_sum}")
        out.append(f"ctr_request_seconds_count {self.latency_count}")
        out += ["# HELP ctr_rows_scored_total Rows scored.", "# TYPE ctr_rows_scored_total counter",
                f"ctr_rows_scored_total {self.rows}"]
        out += ["# HELP ctr_predicted_probability Predicted click probabilities (drift watch).",
                "# TYPE ctr_predicted_probability histogram"]
        cum = 0
        for b, n in zip(PROB_BUCKETS, self.prob, strict=True):
            cum += n
            out.append(f'ctr_predicted_probability_bucket{{le="{b}"}} {cum}')
        out.append(f'ctr_predicted_probability_bucket{{le="+Inf"}} {self.rows}')
        out.append(f"ctr_predicted_probability_sum {self.prob_sum}")
        out.append(f"ctr_predicted_probability_count {self.rows}")
        label = version.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        out += ["# HELP ctr_model_info The model version being served.", "# TYPE ctr_model_info gauge",
                f'ctr_model_info{{version="{label}"}} 1',
                "# HELP ctr_model_loaded_timestamp_seconds When the served model was loaded.",
                "# TYPE ctr_model_loaded_timestamp_seconds gauge",
                f"ctr_model_loaded_timestamp_seconds {loaded_at}",
                "# HELP ctr_inflight_requests Requests in flight.", "# TYPE ctr_inflight_requests gauge",
                f"ctr_inflight_requests {inflight}"]
        return "\n".join(out) + "\n"
