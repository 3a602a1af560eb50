"""Prometheus metrics of the scoring service, kept and exposed by `prometheus_client`.

Requests by route and status, a latency histogram, rows scored, the model version (info gauge and
load time), requests in flight and a histogram of predicted probabilities for watching drift; plus
the library's process, platform and GC collectors. Label values are bounded (route names come from
the app's router, anything else is "other") and escaped by the library.

One serving process (today's `ctr serve`): a private `CollectorRegistry`. When the service runs more
than one worker process, the process that starts them sets `PROMETHEUS_MULTIPROC_DIR` (an empty
directory) before they start: every metric then lives in that directory's files and `/metrics`, in
any worker, reports the sum over workers (`MultiProcessCollector`). The batch lane's worker processes
record nothing (the serving process counts a lane request's status, rows and probabilities when the
lane answers), so they need no share of that directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
PROB_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (1.0,)
OTHER = "other"  # the route label of anything the router does not know (404s, 431s before routing)
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4.encode()  # the text format generate_latest writes


def multiprocess_dir(env: dict[str, str] | None = None) -> str | None:
    """The library's multiprocess directory (`PROMETHEUS_MULTIPROC_DIR`), checked; None = one process."""
    path = (os.environ if env is None else env).get("PROMETHEUS_MULTIPROC_DIR", "").strip()
    if not path:
        return None
    if not os.path.isdir(path):
        raise ValueError(f"PROMETHEUS_MULTIPROC_DIR={path[:200]!r} is not a directory; create it (empty) before "
                         "the workers start")
    return path


class BulkHistogram(Histogram):
    """A Histogram that can also take many observations at once (a 10,000-row batch's probabilities
    in one numpy pass instead of 10,000 `observe` calls on the event loop). It adds to the same
    bucket and sum values `observe` does (single- and multi-process), which tests/unit/serving checks
    against `observe` for the pinned prometheus_client."""

    def observe_many(self, values: np.ndarray) -> None:
        if len(values) == 0:
            return
        self.observe_counts(self.bucket_counts(values), float(values.sum()))

    def bucket_counts(self, values: np.ndarray) -> list[int]:
        """How many of `values` fall in each bucket (v <= bound, the last one +Inf), as `observe` counts them."""
        bounds = self.__dict__.get("_bounds_array")
        if bounds is None:
            bounds = self.__dict__["_bounds_array"] = np.asarray(self._upper_bounds)  # ends with +Inf
        idx = np.minimum(np.searchsorted(bounds, values, side="left"), len(bounds) - 1)
        return np.bincount(idx, minlength=len(bounds)).tolist()

    def observe_counts(self, counts: list[int], total: float) -> None:
        """Add `bucket_counts` of some values (and their sum): a second histogram with the same buckets
        takes the same values without counting them again."""
        self._raise_if_not_observable()
        for i, c in enumerate(counts):
            if c:
                self._buckets[i].inc(c)
        self._sum.inc(total)


class Metrics:
    """The service's metrics. `routes` are the router's paths (the only route label values besides
    "other"); `multiproc` is `PROMETHEUS_MULTIPROC_DIR` when several worker processes share it.

    In-flight requests: in one process the gauge reads `inflight()` at scrape time (no per-request
    cost); in multiprocess mode (no `set_function` there) the app calls `inflight_gauge.inc()/.dec()`."""

    def __init__(self, routes: Iterable[str], multiproc: str | None = None,
                 inflight: Callable[[], float] | None = None) -> None:
        self.routes = frozenset(routes)
        self.multiproc = multiproc
        disable_created_metrics()  # no `*_created` series: today's series, nothing a dashboard must filter out
        reg = None if multiproc else CollectorRegistry(auto_describe=True)
        self.registry = reg
        self.requests = Counter("ctr_requests", "Requests by route and status.", ["route", "status"], registry=reg)
        self.latency = Histogram("ctr_request_seconds", "Request latency.", buckets=LATENCY_BUCKETS, registry=reg)
        self.rows = Counter("ctr_rows_scored", "Rows scored.", registry=reg)
        self.prob = BulkHistogram("ctr_predicted_probability", "Predicted click probabilities (drift watch).",
                                  buckets=PROB_BUCKETS, registry=reg)
        # per model version: count (= _count), mean (= _sum / _count) and the distribution of its answers
        self.version_prob = BulkHistogram("ctr_model_predicted_probability", "Predicted click probabilities by model "
                                          "version (count, sum and buckets per version).", ["version"],
                                          buckets=PROB_BUCKETS, registry=reg)
        self.model_info = Gauge("ctr_model_info", "The model version being served (1; 0 for one served before).",
                                ["version"], registry=reg, multiprocess_mode="liveall")
        self.loaded = Gauge("ctr_model_loaded_timestamp_seconds", "When the served model was loaded.",
                            registry=reg, multiprocess_mode="liveall")
        self.inflight = Gauge("ctr_inflight_requests", "Requests in flight.", registry=reg,
                              multiprocess_mode="livesum")
        self.log_dropped = Counter("ctr_prediction_log_dropped", "Sampled prediction-log records not written, by reason "
                                   "(queue_full: back-pressure; unparsable; write_error; writer_lost: the writer process died "
                                   "holding them).", ["reason"], registry=reg)
        self.log_written = Counter("ctr_prediction_log_records", "Prediction-log records written.", registry=reg)
        for reason in ("queue_full", "unparsable", "write_error", "writer_lost"):
            self.log_dropped.labels(reason)  # present at 0 from the start: an alert can rate() it
        self.inflight_gauge: Gauge | None = None
        if multiproc or inflight is None:
            self.inflight_gauge = self.inflight
        else:
            self.inflight.set_function(inflight)
        if reg is not None:  # custom collectors report one process only: not in multiprocess mode
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)
            GCCollector(registry=reg)
        self._children: dict[tuple[str, int], Counter] = {}
        self._version_children: dict[str, BulkHistogram] = {}
        self._version: str | None = None
        self._observe_latency = self.latency.observe

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        route = path if path in self.routes else OTHER  # bounded label values, whatever clients send
        child = self._children.get((route, status))
        if child is None:
            child = self._children[(route, status)] = self.requests.labels(route, str(status))
        child.inc()
        self._observe_latency(seconds)

    def observe_predictions(self, p: np.ndarray, version: str | None = None) -> None:
        n = len(p)
        if n == 0:
            return
        self.rows.inc(n)
        child = None
        if version is not None:
            child = self._version_children.get(version)
            if child is None:
                child = self._version_children[version] = self.version_prob.labels(version)
        if n == 1:
            v = float(p[0])
            self.prob.observe(v)
            if child is not None:
                child.observe(v)
        else:  # the same buckets: counted once, added to both
            counts, total = self.prob.bucket_counts(p), float(p.sum())
            self.prob.observe_counts(counts, total)
            if child is not None:
                child.observe_counts(counts, total)

    def set_model(self, version: str, loaded_at: float) -> None:
        """The model now served (at start and after every swap)."""
        if self._version is not None and self._version != version:
            if self.multiproc:
                self.model_info.labels(self._version).set(0)  # the library cannot remove series here
            else:
                self.model_info.remove(self._version)
        self.model_info.labels(version).set(1)
        self.loaded.set(loaded_at)
        self._version = version

    def render(self) -> bytes:
        """The exposition text (`CONTENT_TYPE`): this process's registry, or the sum over the workers."""
        if self.multiproc is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg, path=self.multiproc)
        return generate_latest(reg)

    def close(self) -> None:
        """At shutdown: in multiprocess mode this process's live gauges leave the sum."""
        if self.multiproc:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid(), self.multiproc)
