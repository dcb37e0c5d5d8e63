"""Prometheus metrics for ``GET /metrics``.

Queue depths, lifetime counters, workers and breakers are read from the database at each
scrape (so they are right whichever process did the work, and survive restarts). Task durations
(observed by the workers) are prometheus-client metrics; under the daemon every process writes
them to ``PROMETHEUS_MULTIPROC_DIR`` and the scrape merges them. HTTP requests are counted in
the API process's memory (``HttpCollector``, one per app).
"""
from __future__ import annotations

import itertools
import math
import os
import threading
import time

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from helpers import breaker as breakers
from helpers import reports
from helpers.queue_manager import STATES, queue_names
from helpers.task_metrics import BucketRows

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BREAKER_VALUE = {"closed": 0, "half-open": 1, "open": 2}

class HttpCollector:
    """HTTP requests answered and their latency, kept in this process's memory: only the API
    process answers HTTP, and a multiprocess value costs a lock, a getpid and a write to its
    file at each change (the three per request took 8 % of the single-task POST)."""

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = {}  # (method, endpoint, status) -> count
        self.latency = BucketRows((*self.BUCKETS, math.inf))  # by (method, endpoint)

    def observe(self, method: str, endpoint: str, status: str, seconds: float) -> None:
        with self.lock:
            self.requests[method, endpoint, status] = self.requests.get((method, endpoint, status), 0) + 1
        self.latency.observe((method, endpoint), seconds)

    def collect(self):
        with self.lock:
            requests = dict(self.requests)
        latency = self.latency.snapshot()
        answered = CounterMetricFamily("oos_http_requests", "HTTP requests answered",
                                       labels=["method", "endpoint", "status"])
        for labels, count in requests.items():
            answered.add_metric(list(labels), count)
        duration = HistogramMetricFamily("oos_http_request_duration_seconds", "HTTP request latency",
                                         labels=["method", "endpoint"])
        for labels, row in latency.items():
            cumulative = list(itertools.accumulate(row[:-1]))
            bounds = [str(float(b)) for b in self.BUCKETS] + ["+Inf"]
            duration.add_metric(list(labels), list(zip(bounds, cumulative)), sum_value=row[-1])
        yield from (answered, duration)


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def observe_request(http: HttpCollector, request, response, seconds: float) -> None:
    # Labels only from closed sets: any client may send any method (or path), and each new
    # label value would be a series kept for the process's life.
    http.observe(request.method if request.method in METHODS else "other",
                 request.url_rule.rule if request.url_rule else "unmatched", str(response.status_code), seconds)


class DatabaseCollector:
    def __init__(self, db, config):
        self.db, self.config = db, config

    def collect(self):
        now = time.time()
        tasks = GaugeMetricFamily("oos_queue_tasks", "Tasks by queue and state", labels=["queue", "state"])
        ready = GaugeMetricFamily("oos_queue_ready", "Queued tasks that are due", labels=["queue"])
        age = GaugeMetricFamily("oos_queue_oldest_ready_age_seconds", "Age of the oldest ready task",
                                labels=["queue"])
        totals = {name: CounterMetricFamily(f"oos_tasks_{name}", help_, labels=["queue"]) for name, help_ in (
            ("enqueued", "Tasks enqueued"), ("processed", "Tasks that succeeded"),
            ("failed", "Failed attempts"), ("dead_lettered", "Tasks moved to the dead letter"))}
        breaker = GaugeMetricFamily("oos_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open",
                                    labels=["queue"])
        for name in queue_names(self.db):
            stats = reports.queue(self.db, self.config, name).stats(now)
            for state in STATES:
                tasks.add_metric([name, state], stats["counts"][state])
            ready.add_metric([name], stats["ready"])
            age.add_metric([name], stats["oldest_ready_age"])
            for key, metric in zip(("enqueued", "succeeded", "failed", "dead"), totals.values()):
                metric.add_metric([name], stats["totals"][key])
            breaker.add_metric([name], BREAKER_VALUE.get(breakers.status(self.db, name)["state"], 2))
        daemon = reports.daemon_status(self.db, self.config)
        desired = GaugeMetricFamily("oos_workers_desired", "Workers the daemon wants", value=daemon["workers_desired"])
        actual = GaugeMetricFamily("oos_workers_actual", "Workers running", value=daemon["workers_actual"])
        yield from (tasks, ready, age, *totals.values(), breaker, desired, actual)


def render(db, config, http: HttpCollector) -> bytes:
    database = CollectorRegistry()
    database.register(DatabaseCollector(db, config))
    database.register(http)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        process_metrics = generate_latest(merged)
    else:
        process_metrics = generate_latest(REGISTRY)
    return process_metrics + generate_latest(database)
