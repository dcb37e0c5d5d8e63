"""Per task name: runs, failures, run time and queue wait, by the minute.

A worker counts what it runs in memory (``Tally``) and writes its counts of each minute to its
own rows of ``task_minutes`` (sql/*/013_task_metrics.sql) at most every ``WRITE_EVERY``
seconds and when it stops; readers add every worker's rows. Times are kept as counts per
bucket, so percentiles over any window (an hour, a day) come from adding buckets, as
Prometheus's ``histogram_quantile`` reads them. The rows survive restarts and are pruned with
the queue history (``history.KEEP``). Queue wait: from when the task was due (``run_at``: its
enqueue, or the end of its delay or backoff) to the start of its handler.
"""
from __future__ import annotations

import bisect
import json
import threading
import time

BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
WRITE_EVERY = 10.0  # seconds between a worker's writes of its counts

UPSERT = """INSERT INTO task_minutes (minute, queue, name, worker, runs, failures, run_seconds, wait_seconds,
                          run_buckets, wait_buckets)
VALUES (:minute, :queue, :name, :worker, :runs, :failures, :run_seconds, :wait_seconds, :run_buckets, :wait_buckets)
ON CONFLICT (minute, queue, name, worker) DO UPDATE SET runs = excluded.runs, failures = excluded.failures,
    run_seconds = excluded.run_seconds, wait_seconds = excluded.wait_seconds,
    run_buckets = excluded.run_buckets, wait_buckets = excluded.wait_buckets"""
ROWS = "SELECT * FROM task_minutes WHERE minute >= :since ORDER BY minute"
PRUNE = "DELETE FROM task_minutes WHERE minute < :before"


def _empty() -> dict:
    return dict(runs=0, failures=0, run_seconds=0.0, wait_seconds=0.0,
                run_buckets=[0] * (len(BOUNDS) + 1), wait_buckets=[0] * (len(BOUNDS) + 1))


class Tally:
    """One worker's counts, by (minute, queue, task name), until they are written."""

    def __init__(self, worker: str, clock=time.time):
        self.worker, self.clock = worker, clock
        self.minutes: dict[tuple[float, str, str], dict] = {}
        self.written_at = clock()

    def add(self, queue: str, name: str, seconds: float, waited: float, failed: bool) -> None:
        key = (self.clock() // 60 * 60, queue, name)
        counts = self.minutes.get(key)
        if counts is None:  # (not setdefault: that would build an empty one per task)
            counts = self.minutes[key] = _empty()
        counts["runs"] += 1
        counts["failures"] += failed
        counts["run_seconds"] += seconds
        counts["wait_seconds"] += max(0.0, waited)
        counts["run_buckets"][bisect.bisect_left(BOUNDS, seconds)] += 1
        counts["wait_buckets"][bisect.bisect_left(BOUNDS, max(0.0, waited))] += 1

    def write(self, db, force: bool = False) -> None:
        """Write the counts (each minute's row holds this worker's totals for it), at most every
        WRITE_EVERY seconds unless ``force``; minutes that are over are then forgotten."""
        now = self.clock()
        if not self.minutes or (not force and now - self.written_at < WRITE_EVERY):
            return
        with db.transaction() as conn:
            for (minute, queue, name), counts in self.minutes.items():
                conn.execute(UPSERT, dict(counts, minute=minute, queue=queue, name=name, worker=self.worker,
                                          run_buckets=json.dumps(counts["run_buckets"]),
                                          wait_buckets=json.dumps(counts["wait_buckets"])))
        self.written_at = now
        current = now // 60 * 60
        self.minutes = {key: counts for key, counts in self.minutes.items() if key[0] >= current}


def quantile(buckets: list[int], q: float) -> float | None:
    """The ``q`` quantile of bucket counts, interpolated inside its bucket (None: no runs).
    Above the last bound it is that bound: "at least"."""
    total = sum(buckets)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(buckets):
        if seen + count >= rank and count:
            if i == len(BOUNDS):
                return BOUNDS[-1]
            low = BOUNDS[i - 1] if i else 0.0
            return round(low + (BOUNDS[i] - low) * (rank - seen) / count, 6)
        seen += count
    return BOUNDS[-1]


def _sum(rows) -> dict:
    """The counts of ``rows`` added together."""
    into = _empty()
    for r in rows:
        for key in ("runs", "failures", "run_seconds", "wait_seconds"):
            into[key] += r[key]
        for key in ("run_buckets", "wait_buckets"):
            into[key] = [a + b for a, b in zip(into[key], json.loads(r[key]))]
    return into


def _grouped(rows, key) -> dict:
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return groups


def summary(db, since: float) -> list[dict]:
    """Each task name (and queue) run since ``since``: runs, failures, mean and p50/p95/p99
    run time, mean and p50/p95 queue wait (seconds), busiest first."""
    out = []
    rows = db.execute(ROWS, dict(since=since // 60 * 60))
    for (queue, name), group in _grouped(rows, lambda r: (r["queue"], r["name"])).items():
        c = _sum(group)
        runs = c["runs"]
        out.append({"task": name, "queue": queue, "runs": runs, "failures": c["failures"],
                    "run_mean": round(c["run_seconds"] / runs, 6) if runs else None,
                    **{f"run_p{p}": quantile(c["run_buckets"], p / 100) for p in (50, 95, 99)},
                    "wait_mean": round(c["wait_seconds"] / runs, 6) if runs else None,
                    **{f"wait_p{p}": quantile(c["wait_buckets"], p / 100) for p in (50, 95)}})
    return sorted(out, key=lambda m: (-m["runs"], m["task"], m["queue"]))


def series(db, since: float, now: float | None = None) -> dict:
    """Every minute from ``since`` to ``now``, for each task name: runs, failures and the p95
    run time (a minute without runs: 0, 0 and None), for the dashboard's charts:
    ``{"minutes": [...], "tasks": {name: {"runs": [...], "failures": [...], "run_p95": [...]}}}``."""
    now = time.time() if now is None else now
    rows = db.execute(ROWS, dict(since=since // 60 * 60))
    minutes = [float(m) for m in range(int(since // 60 * 60), int(now // 60 * 60) + 1, 60)]
    tasks = {}
    for name, group in sorted(_grouped(rows, lambda r: r["name"]).items()):
        by_minute = _grouped(group, lambda r: r["minute"])
        counts = [_sum(by_minute.get(m, [])) for m in minutes]
        tasks[name] = {"runs": [c["runs"] for c in counts], "failures": [c["failures"] for c in counts],
                       "run_p95": [quantile(c["run_buckets"], 0.95) for c in counts]}
    return {"minutes": minutes, "tasks": tasks}


def prune(db, before: float) -> int:
    with db.transaction() as conn:
        return conn.execute(PRUNE, dict(before=before)).rowcount


class BucketRows:
    """Observations kept in memory, by labels: a count per histogram bucket (``bounds``,
    ascending, the last +Inf; a value goes in the first bound >= it, Prometheus's ``le``) and
    their sum, under a lock."""

    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.rows: dict[tuple, list] = {}  # labels -> a count per bucket, then the sum
        self.lock = threading.Lock()

    def observe(self, labels: tuple, value: float) -> None:
        with self.lock:
            row = self.rows.get(labels)
            if row is None:
                row = self.rows[labels] = [0] * len(self.bounds) + [0.0]
            row[bisect.bisect_left(self.bounds, value)] += 1
            row[-1] += value

    def snapshot(self) -> dict[tuple, list]:
        with self.lock:
            return {labels: list(row) for labels, row in self.rows.items()}

    def take(self) -> dict[tuple, list]:
        """The rows, which start again from nothing."""
        with self.lock:
            rows, self.rows = self.rows, {}
        return rows


class Batched(BucketRows):
    """A prometheus-client histogram whose observations are kept in this process's memory and
    added to it together (``push``). Under the daemon each change of a histogram is a
    multiprocess value (a lock, a getpid and a write to its file): four per task for the
    worker's two task histograms, 12 us, an eighth of a no-op task's worker CPU. What /metrics
    shows is the same, up to the last push."""

    def __init__(self, histogram):
        super().__init__(histogram._upper_bounds)
        self.histogram = histogram

    def push(self) -> None:
        for labels, row in self.take().items():
            child = self.histogram.labels(*labels)
            child._sum.inc(row[-1])
            for bucket, count in zip(child._buckets, row):
                if count:
                    bucket.inc(count)
