"""A queue's counts come from counters the writes keep (helpers/counts.py): after every kind
of write, on both engines, they equal what counting the tasks gives."""
from __future__ import annotations

import pytest

from helpers import workflow
from helpers.counts import STATES, queue_counts
from helpers.queue_manager import QueueManager, fail_worker_tasks, purge_queue, ready_counts

pytestmark = pytest.mark.both_engines


def counted(db, queue: str, now: float) -> dict:
    """The truth, by counting every task (what the counters replace)."""
    rows = db.execute("SELECT state, count(*) AS n FROM tasks WHERE queue = ? GROUP BY state", (queue,))
    counts = dict.fromkeys(STATES, 0) | {r["state"]: r["n"] for r in rows}
    delayed = db.execute("SELECT count(*) FROM tasks WHERE queue = ? AND state = 'queued' AND run_at > ?",
                         (queue, now))[0][0]
    oldest = db.execute("SELECT min(run_at) FROM tasks WHERE queue = ? AND state = 'queued' AND run_at <= ?",
                        (queue, now))[0][0]
    return {"counts": counts, "ready": counts["queued"] - delayed, "delayed": delayed, "oldest_ready": oldest}


def test_the_counters_equal_a_count_of_the_tasks_after_every_kind_of_write(db, config, clock):
    jobs = QueueManager("jobs", db, config, clock=clock)
    other = QueueManager("other", db, config, clock=clock)

    def check(step: str) -> None:
        for q in ("jobs", "other"):
            assert queue_counts(db, q, clock()) == counted(db, q, clock()), f"after {step}, queue {q}"

    check("nothing")
    jobs.enqueue_many([{"task": "t", "payload": i, "priority": i % 3} for i in range(30)])
    jobs.enqueue("t", 1, idempotency_key="k")
    jobs.enqueue("t", 1, idempotency_key="k")  # the same key: no second task
    jobs.enqueue("t", delay=60)
    jobs.enqueue("t", delay=120, priority=5)
    jobs.enqueue("u", "u", unique_key="u", unique_for=30)
    other.enqueue_many([{"task": "t"} for _ in range(5)])
    check("enqueues")
    workflow.submit(db, workflow.chain(workflow.step("t", queue="jobs"), workflow.step("t", queue="jobs"),
                                       workflow.step("t", queue="other")), config, now=clock())
    check("a workflow")

    claimed = jobs.dequeue_batch("w1", 10)
    check("a claim")
    assert jobs.complete_many([(t.id, "ok", t.attempts) for t in claimed[:4]], "w1") == [True] * 4
    assert not jobs.complete_task(claimed[0].id, "w1", attempt=claimed[0].attempts), "completed once only"
    check("completions")
    jobs.fail_task(claimed[4].id, "w1", "boom", attempt=claimed[4].attempts)  # retried later
    jobs.fail_task(claimed[5].id, "w1", "bad input", retry=False, attempt=claimed[5].attempts)  # dead
    jobs.release_task(claimed[6].id, "w1", claimed[6].attempts)
    jobs.cancel_task(claimed[7].id)  # running: asked, then cancelled by its next write
    jobs.fail_task(claimed[7].id, "w1", "stopped", attempt=claimed[7].attempts)
    check("failures, a release and a cancel")
    fail_worker_tasks(db, "w1", "worker died", now=clock())  # claimed[8], claimed[9]
    check("a dead worker")
    more = jobs.dequeue_batch("w2", 3)
    clock.advance(3600)
    jobs.requeue_expired()
    check("expired leases")

    jobs.cancel_task(jobs.enqueue("t"))
    assert jobs.retry_dead() >= 1
    check("a cancel and a replay")
    for t in jobs.dequeue_batch("w3", 50):
        jobs.fail_task(t.id, "w3", "permanent", retry=False, attempt=t.attempts)
    check("dead letters")
    assert jobs.purge_dead(older_than=0) >= 1
    purge_queue(db, "other", now=clock())
    check("purges")
    clock.advance(30 * 86400)
    jobs.prune()
    check("a prune")
    assert more and ready_counts(db, clock()) == {q: counted(db, q, clock())["ready"] for q in ("jobs", "other")
                                                  if counted(db, q, clock())["ready"]}


def test_stats_read_the_counters_not_the_tasks(db, config, clock):
    """A counter changed behind the writes' back shows in stats(): proof they are read, not
    recounted. (Only a test does this; the writes keep them right.)"""
    queue = QueueManager("jobs", db, config, clock=clock)
    queue.enqueue_many([{"task": "t"} for _ in range(3)])
    db.execute("UPDATE task_counts SET n = n + 1000 WHERE queue = 'jobs' AND state = 'queued_or_running'")
    stats = queue.stats()
    assert stats["counts"]["queued"] == 1003 and stats["ready"] == 1003
