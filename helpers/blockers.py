""""Why isn't it running?": what holds a task back, each reason named, most decisive first.

```python
blockers.why(db, config, task_id)
# {"task": 7, "state": "queued", "blockers": [
#     {"reason": "paused", "detail": "queue 'images' is paused (oos resume images)"},
#     {"reason": "ahead", "detail": "3 ready tasks are ahead of it", "count": 3}]}
```
Reasons: ``finished``, ``running``, ``waiting`` (workflow steps not done yet), ``blocked`` (a
step before it is dead), ``paused``, ``breaker`` (open, until when), ``scheduled`` (run_at in
the future), ``concurrency``, ``rate_limit``, ``no_daemon`` (no running daemon serves its
queue), ``no_handler`` (the daemons serving it have no handler for its name), ``ahead``.
An empty list for a queued task means it is next: a worker should take it within a moment.
"""
from __future__ import annotations

import time

from helpers import breaker as breakers
from helpers import daemon_status, limits, times
from helpers.config import Config
from helpers.queue_manager import FINISHED, Task, get_task
from helpers.queue_sql import statements


def why(db, config: Config, task_id: int, now: float | None = None) -> dict | None:
    """The task's state and what holds it back (None for an unknown task)."""
    task = get_task(db, task_id)
    if task is None:
        return None
    return {"task": task.id, "state": task.state,
            "blockers": list(_reasons(db, config, task, time.time() if now is None else now, now))}


def roots(db, task_id: int) -> tuple[list[int], list[int]]:
    """The steps that hold a blocked workflow step back: (dead ones, cancelled ones) found by
    following its blocked dependencies back to where the chain broke."""
    sql = statements(db)
    dead, cancelled, seen, todo = set(), set(), set(), [task_id]
    while todo:
        for d in db.execute(sql.DEPENDENCIES, dict(id=todo.pop())):
            if d["id"] in seen:
                continue
            seen.add(d["id"])
            if d["state"] == "dead":
                dead.add(d["id"])
            elif d["state"] == "cancelled":
                cancelled.add(d["id"])
            elif d["state"] == "blocked":
                todo.append(d["id"])
    return sorted(dead), sorted(cancelled)


def _reasons(db, config: Config, task: Task, now: float, given: float | None):
    """``now``: this host's clock, for the comparisons made here; ``given``: the caller's
    ``now`` as statements take it (None: the engine's clock rule)."""
    sql = statements(db)
    if task.state in FINISHED and task.state != "blocked":
        yield dict(reason="finished", detail=f"it is {task.state}")
        return
    if task.state == "running":
        yield dict(reason="running", detail=f"worker {task.worker} runs it (attempt {task.attempts}), lease until "
                                            f"{times.local(task.lease_until)}", worker=task.worker)
        return
    if task.state in ("waiting", "blocked"):
        deps = db.execute(sql.DEPENDENCIES, dict(id=task.id))
        if any(d["state"] in ("dead", "blocked", "cancelled") for d in deps):
            dead, cancelled = roots(db, task.id)
            if dead:
                yield dict(reason="blocked", detail=f"step {', '.join(map(str, dead))} before it is dead; replaying it "
                                                    f"(oos dlq retry {dead[0]}) resumes the workflow", tasks=dead)
            if cancelled:
                yield dict(reason="cancelled", detail=f"step {', '.join(map(str, cancelled))} before it was cancelled: "
                                                      "this step cannot run", tasks=cancelled)
        else:
            pending = [d["id"] for d in deps if d["state"] != "succeeded"]
            yield dict(reason="waiting", detail=f"it runs after task {', '.join(map(str, pending))}", tasks=pending)
        return
    queue = task.queue
    rows = db.execute(sql.QUEUE_ROW, dict(queue=queue))
    if rows and rows[0]["paused"]:
        yield dict(reason="paused", detail=f"queue {queue!r} is paused (oos resume {queue})")
    breaker = breakers.status(db, queue)
    if breaker["state"] != "closed":
        until = (breaker["opened_at"] or now) + config.breaker_reset_timeout
        yield dict(reason="breaker", detail=f"the breaker of queue {queue!r} is {breaker['state']} after "
                                            f"{breaker['fail_counter']} failures; a trial at {times.local(until)}",
                   until=until)
    held = limits.wait_for_token(db, task.name, given)
    if task.run_at > now and held is not None:  # given back to wait for a token: the limit is why
        yield dict(reason="rate_limit", detail=f"task {task.name!r} is at its rate limit ({held[1]}); it runs again "
                                               f"in {task.run_at - now:.2f} s", until=task.run_at)
        held = None
    elif task.run_at > now:
        yield dict(reason="scheduled", detail=f"it is due in {task.run_at - now:.1f} s", until=task.run_at)
    limit = limits.concurrency(db, queue)
    if limit is not None:
        running = db.execute(sql.RUNNING_IN_QUEUE, dict(queue=queue))[0][0]
        if running >= limit:
            yield dict(reason="concurrency", detail=f"queue {queue!r} runs {running} tasks, its limit is {limit}")
    if held is not None:
        wait, rate = held
        yield dict(reason="rate_limit", detail=f"task {task.name!r} is at its rate limit ({rate}); next run in "
                                               f"{wait:.2f} s", until=now + wait)
    daemons = daemon_status.live(db)
    serving = [d for d in daemons if queue in d.get("served_queues", ())]
    if not serving:
        yield dict(reason="no_daemon", detail=f"no running daemon serves queue {queue!r} (its task modules have "
                                              "no handler on it, or workers.queues leaves it out)")
    elif not any(task.name in d.get("handlers", ()) for d in serving):
        yield dict(reason="no_handler", detail=f"the daemons serving {queue!r} have no handler for {task.name!r}")
    ahead = db.execute(sql.AHEAD, dict(queue=queue, now=now, priority=task.priority, run_at=task.run_at,
                                       id=task.id))[0][0]
    if ahead:
        yield dict(reason="ahead", detail=f"{ahead} ready task{'s are' if ahead != 1 else ' is'} ahead of it",
                   count=ahead)
