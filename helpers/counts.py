"""How many tasks a queue holds in each state, read in the same time at ten tasks and at ten
million: from the counters the writes keep (``sql/*/012_task_counts.sql``), the running tasks
(at most the workers' batches) and the not-yet-due ones counted from the index.

``delayed`` is the one figure that grows with something: the tasks scheduled for later.
"""
from __future__ import annotations

from helpers.queue_sql import statements

STATES = ("queued", "running", "succeeded", "dead", "cancelled", "waiting", "blocked")


def queue_counts(db, queue: str, now: float) -> dict:
    """``counts`` (every state of STATES), ``ready`` (queued and due at ``now``), ``delayed``
    (queued, due later) and ``oldest_ready`` (the earliest due time among the ready ones, or
    None). Two statements: a task that moves between them can make ready off by one."""
    sql = statements(db)
    kept = {r["state"]: r["n"] for r in db.execute(sql.COUNTS, dict(queue=queue))}
    counts = {state: int(kept.get(state) or 0) for state in STATES}
    counts["queued"] = max(0, int(kept.get("queued_or_running") or 0) - counts["running"])
    due = db.execute(sql.DUE, dict(queue=queue, now=now))[0]
    delayed = min(int(due["delayed"]), counts["queued"])
    first_due = due["first_due"]
    return {"counts": counts, "ready": counts["queued"] - delayed, "delayed": delayed,
            "oldest_ready": first_due if first_due is not None and first_due <= now else None}
