"""Limits shared by every worker, process and host: a queue's concurrency, a task's rate.

```python
limits.set_concurrency(db, "images", 4)      # at most 4 running at once, all daemons together
limits.set_rate_limit(db, "send_email", "10/s")
```
Both live in the database, so a change takes effect everywhere within a second. The daemon
writes the ones declared in code (``@task(rate_limit=)``) and config (``[concurrency]``,
``[rate_limits]``) when it starts.

Concurrency is enforced by the claim itself (helpers/queue_sql.py, CLAIM_LIMITED). A rate limit
is a token bucket per task name (burst: one second's worth, at least 1): a worker takes the
tokens for the tasks of that name in the batch it claimed, in one transaction; a task left
without one goes back to the queue, due when its token will be, without counting an attempt.
"""
from __future__ import annotations

from helpers.queue_manager import statement_time
from helpers.queue_sql import statements
from helpers.registry import REGISTRY
from helpers.validation import CONCURRENCY_RANGE, InvalidField, number, queue_name, rate, task_name


def set_concurrency(db, queue: str, limit: int | None) -> None:
    """At most ``limit`` running tasks of ``queue`` at once (None: no limit)."""
    queue_name(queue)
    if limit is not None:
        number("concurrency", limit, minimum=CONCURRENCY_RANGE[0], maximum=CONCURRENCY_RANGE[1], integer=True)
    with db.transaction() as conn:
        conn.execute(statements(db).SET_CONCURRENCY, dict(queue=queue, concurrency=limit))
    db.hint(queue)


def set_rate_limit(db, name: str, limit: str | None, now: float | None = None) -> None:
    """At most ``limit`` ("10/s", "100/min", "5/h") runs of tasks called ``name`` (None: no limit)."""
    task_name(name)
    sql = statements(db)
    with db.transaction() as conn:
        if limit is None:
            conn.execute(sql.DROP_RATE_LIMIT, dict(name=name))
            return
        per_second = rate(limit)
        conn.execute(sql.SET_RATE_LIMIT, dict(name=name, rate=limit, per_second=per_second,
                                              burst=max(1.0, per_second), now=statement_time(db, now)))


def rate_limits(db) -> dict[str, str]:
    return {r["name"]: r["rate"] for r in db.execute(statements(db).RATE_LIMITS)}


def concurrency(db, queue: str) -> int | None:
    rows = db.execute(statements(db).CONCURRENCY, dict(queue=queue))
    return rows[0][0] if rows else None


def take(db, name: str, wanted: int = 1, now: float | None = None) -> list[float]:
    """Take up to ``wanted`` tokens for runs of ``name``: for each run, the seconds it must wait
    for its token (0.0: taken now; all 0.0 when there is no limit)."""
    sql, now = statements(db), statement_time(db, now)
    with db.transaction() as conn:
        row = conn.execute(sql.TOKENS, dict(name=name, now=now)).fetchone()
        if row is None:
            return [0.0] * wanted
        tokens, per_second = row["tokens"], row["per_second"]
        taken = min(wanted, int(tokens))
        if taken:
            conn.execute(sql.SPEND_TOKENS, dict(name=name, left=tokens - taken, now=now))
    left = tokens - taken
    # The k-th run left over waits until its own token is due, so they do not all come back at once.
    return [0.0] * taken + [(k + 1 - left) / per_second for k in range(wanted - taken)]


def wait_for_token(db, name: str, now: float | None = None) -> tuple[float, str] | None:
    """(seconds until ``name`` may run again, its rate) while its rate limit holds it back;
    None when it may run now. Reads only; for "why isn't it running?"."""
    rows = db.execute(statements(db).TOKENS, dict(name=name, now=statement_time(db, now)))
    if not rows or rows[0]["tokens"] >= 1:
        return None
    return (1.0 - rows[0]["tokens"]) / rows[0]["per_second"], rows[0]["rate"]


def apply_declared(db, config) -> None:
    """Write the limits declared in code and config (config wins). InvalidField names the
    config key that is wrong."""
    for queue, limit in config.concurrency.items():
        try:
            set_concurrency(db, queue, limit)
        except InvalidField as e:
            raise InvalidField(f"concurrency.{queue}", e.problem) from None
    declared = {name: spec.rate_limit for name, spec in REGISTRY.items() if spec.rate_limit}
    declared.update(config.rate_limits)
    for name, limit in declared.items():
        try:
            set_rate_limit(db, name, limit)
        except InvalidField as e:
            raise InvalidField(f"rate_limits.{name}", e.problem) from None
