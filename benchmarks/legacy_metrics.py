"""`ctr serve` with the hand-written metrics it had before issue 22, for benchmarks/serve.py's before/after.

    python benchmarks/legacy_metrics.py serve --model BUNDLE --port P

Benchmark only: the service itself always uses prometheus_client (ctr/serving/metrics.py). This is
the old plain-counter class behind the new class's interface, swapped into ctr.serving.app.
"""

from __future__ import annotations

import bisect
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
PROB_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (1.0,)


class LegacyMetrics:
    """Plain per-process counters rendered by hand (the service's metrics.py before issue 22)."""

    def __init__(self, routes: Iterable[str], multiproc: str | None = None,
                 inflight: Callable[[], float] | None = None) -> None:
        self.routes = frozenset(routes)
        self.inflight = inflight or (lambda: 0)
        self.inflight_gauge: Any = None
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.rows = 0
        self.prob = [0] * len(PROB_BUCKETS)
        self.prob_sum = 0.0
        self.version, self.loaded_at = "", 0.0
        # what the service binds to the metrics object besides the counters above (issues 17 and 18): the
        # per-model metrics and the prediction log's counters go to a registry of their own, never rendered,
        # so the old exposition stays what it was
        from prometheus_client import CollectorRegistry, Counter

        self.registry = CollectorRegistry()
        self.log_dropped = Counter("ctr_prediction_log_dropped", "unrendered", ["reason"], registry=self.registry)
        self.log_written = Counter("ctr_prediction_log_written", "unrendered", registry=self.registry)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        route = path if path in self.routes else "other"
        self.requests[(route, status)] += 1
        self.latency[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def observe_predictions(self, p: np.ndarray, version: str | None = None) -> None:  # per-version: not in the old metrics
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

    def set_model(self, version: str, loaded_at: float) -> None:
        self.version, self.loaded_at = version, loaded_at

    def close(self) -> None:
        pass

    def render(self) -> bytes:
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
        out += ["# TYPE ctr_rows_scored_total counter", f"ctr_rows_scored_total {self.rows}",
                "# TYPE ctr_predicted_probability histogram"]
        cum = 0
        for b, n in zip(PROB_BUCKETS, self.prob, strict=True):
            cum += n
            out.append(f'ctr_predicted_probability_bucket{{le="{b}"}} {cum}')
        out.append(f'ctr_predicted_probability_bucket{{le="+Inf"}} {self.rows}')
        out.append(f"ctr_predicted_probability_sum {self.prob_sum}")
        out.append(f"ctr_predicted_probability_count {self.rows}")
        label = self.version.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        out += ["# TYPE ctr_model_info gauge", f'ctr_model_info{{version="{label}"}} 1',
                "# TYPE ctr_model_loaded_timestamp_seconds gauge", f"ctr_model_loaded_timestamp_seconds {self.loaded_at}",
                "# TYPE ctr_inflight_requests gauge", f"ctr_inflight_requests {self.inflight()}"]
        return ("\n".join(out) + "\n").encode()


if __name__ == "__main__":
    import ctr.serving.app as app_module
    from ctr.cli import main

    app_module.Metrics = LegacyMetrics  # type: ignore[misc,assignment]
    sys.exit(main(sys.argv[1:]))
