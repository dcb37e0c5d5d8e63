"""Each queue's history, one row a minute, for the dashboard's charts: kept in the database so
the charts survive restarts, pruned after ``KEEP`` seconds so the table stays small.

The daemon's housekeeping calls ``record`` every minute (with several daemons on PostgreSQL the
first to write a minute wins); ``series`` turns the rows into per-minute rates and depths.
"""
from __future__ import annotations

import time

from helpers import task_metrics
from helpers.queue_manager import QueueManager, queue_names

KEEP = 7 * 86_400.0
INSERT = """INSERT INTO metrics_history (minute, queue, enqueued, succeeded, failed, dead, queued, running, oldest_age)
VALUES (:minute, :queue, :enqueued, :succeeded, :failed, :dead, :queued, :running, :oldest_age)
ON CONFLICT (minute, queue) DO NOTHING"""
PRUNE = "DELETE FROM metrics_history WHERE minute < :before"
ROWS = """SELECT * FROM metrics_history WHERE minute >= :since AND (:queue IS NULL OR queue = :queue)
ORDER BY minute"""


def record(db, config, now: float | None = None) -> int:
    """Write this minute's row for every queue; returns how many queues."""
    now = time.time() if now is None else now
    minute = now // 60 * 60
    rows = []
    for name in queue_names(db):
        stats = QueueManager(name, db, config).stats(now=now)
        rows.append(dict(minute=minute, queue=name, **stats["totals"], queued=stats["counts"]["queued"],
                         running=stats["counts"]["running"], oldest_age=stats["oldest_ready_age"]))
    with db.transaction() as conn:
        for row in rows:
            conn.execute(INSERT, row)
        conn.execute(PRUNE, dict(before=now - KEEP))
        conn.execute(task_metrics.PRUNE, dict(before=now - KEEP))
    return len(rows)


def series(db, since: float, queue: str | None = None) -> dict:
    """Per minute, all queues together (or ``queue``): ``minutes``, and for each the tasks
    ``succeeded`` and ``failed`` in that minute, the ``queued`` depth and the ``oldest_age``."""
    by_minute: dict[float, dict] = {}
    for r in db.execute(ROWS, dict(since=since - 60, queue=queue)):
        m = by_minute.setdefault(r["minute"], dict(succeeded=0, failed=0, queued=0, oldest_age=0.0))
        m["succeeded"] += r["succeeded"]
        m["failed"] += r["failed"]
        m["queued"] += r["queued"]
        m["oldest_age"] = max(m["oldest_age"], r["oldest_age"])
    minutes = sorted(by_minute)
    out = dict(minutes=[], succeeded=[], failed=[], queued=[], oldest_age=[])
    for before, minute in zip(minutes, minutes[1:]):
        a, b = by_minute[before], by_minute[minute]
        out["minutes"].append(minute)
        out["succeeded"].append(max(0, b["succeeded"] - a["succeeded"]))
        out["failed"].append(max(0, b["failed"] - a["failed"]))
        out["queued"].append(b["queued"])
        out["oldest_age"].append(round(b["oldest_age"], 1))
    return out
