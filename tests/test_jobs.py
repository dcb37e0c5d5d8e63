"""The job features at the queue's level, on an injected clock, on both engines: browsing,
waiting for results, cancelling, purging, workflows, limits, unique tasks, periodic slots,
"why isn't it running?"."""
from __future__ import annotations

import threading
import time

import pytest

from helpers import blockers, limits, periodic, workflow
from helpers.config import Config
from helpers.queue_manager import (
    QueueManager,
    TaskFailed,
    browse,
    cancel_task,
    purge_queue,
    set_progress,
    wait,
)
from helpers.validation import InvalidField
from helpers.workflow import chain, chord, group, step

pytestmark = pytest.mark.both_engines


def run(queue: QueueManager, worker: str = "w", result=None, fail: str | None = None):
    """Claim one task and finish it; returns the task claimed."""
    task = queue.dequeue(worker)
    assert task is not None, "nothing to claim"
    if fail:
        queue.fail_task(task.id, worker, fail, retry=False, attempt=task.attempts)
    else:
        queue.complete_task(task.id, worker, result, attempt=task.attempts)
    return task


# -- browsing -------------------------------------------------------------------------------

def test_browse_filters_newest_first_with_keyset_pages(db, queue, clock):
    other = QueueManager("other", db, queue.config, clock=clock)
    ids = [queue.enqueue("a" if i % 2 else "b", {"n": i, "word": "needle" if i == 7 else "hay"}) for i in range(10)]
    other.enqueue("a", None)
    page, cursor = browse(db, queue=queue.name, limit=4)
    assert [t.id for t in page] == ids[::-1][:4] and cursor == ids[6]
    page2, cursor2 = browse(db, queue=queue.name, limit=4, before=cursor)
    assert [t.id for t in page2] == ids[::-1][4:8]
    assert [t.id for t in browse(db, queue=queue.name, limit=4, before=cursor2)[0]] == ids[1::-1]
    assert browse(db, queue=queue.name, limit=4, before=cursor2)[1] is None
    assert {t.name for t in browse(db, name="a", queue=queue.name)[0]} == {"a"}
    assert [t.id for t in browse(db, text="needle")[0]] == [ids[7]]
    run(queue)  # the highest priority, then oldest: ids[0]
    assert [t.id for t in browse(db, state="succeeded")[0]] == [ids[0]]
    assert browse(db, since=clock.now + 1)[0] == []
    for bad, field in ((dict(state="nope"), "state"), (dict(limit=0), "limit"), (dict(limit=5000), "limit"),
                       (dict(queue="bad name!"), "queue"), (dict(before=-1), "before"), (dict(before=2**64), "before")):
        with pytest.raises(InvalidField) as e:
            browse(db, **bad)
        assert e.value.field == field


# -- results --------------------------------------------------------------------------------

def test_wait_returns_when_another_thread_finishes_the_task(db, queue):
    task_id = queue.enqueue("t", None)
    claimed = queue.dequeue("w")
    threading.Timer(0.3, lambda: queue.complete_task(claimed.id, "w", {"ok": 1})).start()
    assert task_id.result(timeout=30) == {"ok": 1}
    assert wait(db, task_id, timeout=0).state == "succeeded"


def test_wait_times_out_and_reports_failure(db, queue):
    task_id = queue.enqueue("t", None)
    with pytest.raises(TimeoutError, match="still queued"):
        task_id.result(timeout=0.2)
    run(queue, fail="boom")
    with pytest.raises(TaskFailed, match="dead: boom") as e:
        task_id.result(timeout=5)
    assert e.value.task.state == "dead"
    with pytest.raises(LookupError):
        wait(db, 999_999, timeout=1)


# -- progress, cancel, purge ----------------------------------------------------------------

def test_progress_is_stored_for_the_lease_holder_only(db, queue):
    task_id = queue.enqueue("t", None)
    task = queue.dequeue("w")
    assert set_progress(db, task_id, "w", task.attempts, 0.5, "half way")
    assert not set_progress(db, task_id, "intruder", task.attempts, 0.9)
    got = queue.get_task(task_id)
    assert (got.progress, got.progress_message) == (0.5, "half way")
    with pytest.raises(InvalidField) as e:
        set_progress(db, task_id, "w", task.attempts, 1.5)
    assert e.value.field == "progress"


def test_a_cancel_of_a_running_task_is_never_retried_even_when_its_worker_dies(db, queue):
    task_id = queue.enqueue("t", None, max_attempts=5)
    task = queue.dequeue("w")
    assert cancel_task(db, task_id) == "cancelling"
    assert queue.requeue_expired(now=task.lease_until + 1) == [(task_id, "cancelled")]
    assert queue.get_task(task_id).state == "cancelled" and queue.dequeue("w") is None


def test_purge_cancels_every_task_not_started(db, queue):
    for i in range(5):
        queue.enqueue("t", i)
    running = queue.dequeue("w")
    assert purge_queue(db, queue.name) == 4
    assert queue.stats()["counts"]["cancelled"] == 4 and queue.get_task(running.id).state == "running"


# -- workflows ------------------------------------------------------------------------------

def test_a_chain_runs_step_after_step_each_with_the_previous_result(db, queue, config):
    flow = workflow.submit(db, chain(step("a", 1, queue=queue.name), step("b", queue=queue.name),
                                     step("c", queue=queue.name)), config)
    a, b, c = flow["ids"]
    assert [queue.get_task(i).state for i in (a, b, c)] == ["queued", "waiting", "waiting"]
    assert run(queue, result=10).id == a
    got = queue.dequeue("w")
    assert got.id == b and workflow.results_for(db, got) == [10] and queue.dequeue("w") is None
    queue.complete_task(b, "w", 20, attempt=got.attempts)
    assert workflow.results_for(db, run(queue, result=30)) == [20]
    assert workflow.status(db, flow["workflow"])["state"] == "succeeded"


def test_a_chord_calls_back_with_every_result_once_all_succeeded(db, queue, config):
    flow = workflow.submit(db, chord([step("part", i, queue=queue.name) for i in range(3)],
                                     step("total", queue=queue.name)), config)
    *parts, total = flow["ids"]
    claimed = [queue.dequeue("w") for _ in range(3)]
    assert queue.dequeue("w") is None
    for t in reversed(claimed):
        queue.complete_task(t.id, "w", t.task_data * 10, attempt=t.attempts)
    callback = queue.dequeue("w")
    assert callback.id == total and workflow.results_for(db, callback) == [0, 10, 20]
    assert workflow.status(db, total)["steps"][-1]["after"] == parts


def test_a_dead_step_blocks_the_rest_and_replaying_it_resumes(db, queue, config):
    flow = workflow.submit(db, chain(step("a", queue=queue.name), group(step("b", queue=queue.name),
                                                                        step("c", queue=queue.name)),
                                     step("d", queue=queue.name)), config)
    a, b, c, d = flow["ids"]
    run(queue, fail="broken")
    assert [queue.get_task(i).state for i in (b, c, d)] == ["blocked"] * 3
    assert workflow.status(db, a)["state"] == "blocked"
    why_d = blockers.why(db, config, d)["blockers"][0]
    # d waits behind b and c, themselves blocked: the step to replay is the dead root, a
    assert why_d["reason"] == "blocked" and why_d["tasks"] == [a] and f"oos dlq retry {a}" in why_d["detail"]
    assert queue.retry_dead(task_id=a) == 1
    assert [queue.get_task(i).state for i in (b, c, d)] == ["waiting"] * 3
    run(queue, result="A")
    run(queue)
    run(queue)
    assert run(queue).id == d and workflow.status(db, a)["state"] == "succeeded"


def test_cancelling_a_step_cancels_the_steps_after_it(db, queue, config):
    a, b, c = workflow.submit(db, chain(*(step(n, queue=queue.name) for n in "abc")), config)["ids"]
    assert cancel_task(db, a) == "cancelled"
    assert [queue.get_task(i).state for i in (a, b, c)] == ["cancelled"] * 3


def test_bad_workflows_are_refused_and_write_nothing(db, queue, config):
    before = db.execute("SELECT count(*) FROM tasks")[0][0]
    cases = [
        ([{"task": "a", "after": [1]}, {"task": "b", "after": [0]}], "steps[0].after", "cycle"),
        ([{"task": "a", "after": [5]}], "steps[0].after", "no step 5"),
        ([{"task": "a"}, {"task": "b", "timeout": -1}], "steps[1].timeout", ">="),
        ([{"task": "a", "idempotency_key": "k"}], "steps[0].idempotency_key", "unknown"),
        ([{"task": "a", "queue": "no good"}], "steps[0].queue", "letters"),
        ([], "steps", "non-empty"),
    ]
    for steps, field, problem in cases:
        with pytest.raises(InvalidField) as e:
            workflow.submit(db, steps, config)
        assert e.value.field == field and problem in e.value.problem
    assert db.execute("SELECT count(*) FROM tasks")[0][0] == before


# -- limits and unique tasks ----------------------------------------------------------------

def test_a_queue_concurrency_limit_holds_across_claimers(db, queue, clock):
    limits.set_concurrency(db, queue.name, 2)
    for i in range(5):
        queue.enqueue("t", i)
    other = QueueManager(queue.name, db, queue.config, clock=clock)  # a second worker process
    assert len(queue.dequeue_batch("w1", 5)) == 2
    assert other.dequeue_batch("w2", 5) == []
    why = blockers.why(db, queue.config, queue.get_task(5).id, now=clock.now)
    assert "concurrency" in [b["reason"] for b in why["blockers"]]
    run_one = queue.get_task(1)
    queue.complete_task(run_one.id, "w1", None)
    assert len(other.dequeue_batch("w2", 5)) == 1
    limits.set_concurrency(db, queue.name, None)
    time.sleep(1.05)  # the claimers read the limit again each second
    assert len(other.dequeue_batch("w2", 5)) == 2
    for bad in (-1, 100_001):  # the API's range, from Python too
        with pytest.raises(InvalidField) as e:
            limits.set_concurrency(db, queue.name, bad)
        assert e.value.field == "concurrency"


def test_a_rate_limit_gives_tokens_at_its_rate(db):
    now = 1000.0
    limits.set_rate_limit(db, "mail", "2/s", now=now)
    assert limits.take(db, "mail", 3, now=now) == [0, 0, pytest.approx(0.5)]  # a burst of 2, then 2/s
    assert limits.take(db, "mail", 1, now=now + 0.5) == [0]
    assert limits.take(db, "mail", 2, now=now + 0.75) == [pytest.approx(0.25), pytest.approx(0.75)]
    assert limits.take(db, "other", 2, now=now) == [0, 0]  # no limit
    held = QueueManager("mail", db, Config(), clock=lambda: now).enqueue("mail", None)
    reasons = {b["reason"]: b for b in blockers.why(db, Config(), held, now=now + 0.75)["blockers"]}
    assert "(2/s)" in reasons["rate_limit"]["detail"] and reasons["rate_limit"]["until"] == pytest.approx(now + 1.0)
    for bad in ("-1/s", "10/day", "ten/s", 5, "1" + "0" * 400 + "/s"):
        with pytest.raises(InvalidField) as e:
            limits.set_rate_limit(db, "mail", bad)
        assert e.value.field == "rate"


def test_a_unique_task_is_not_enqueued_twice_while_queued_or_running(queue, clock):
    first = queue.enqueue("sync", {"a": 1}, unique_key="sync:a", unique_for=60)
    assert queue.enqueue("sync", {"a": 1}, unique_key="sync:a") == first
    task = queue.dequeue("w")
    assert queue.enqueue("sync", None, unique_key="sync:a") == first  # running
    queue.complete_task(task.id, "w", None)
    second = queue.enqueue("sync", None, unique_key="sync:a", unique_for=60)
    assert second != first
    clock.advance(61)  # past its TTL: the key is free though the task still waits
    assert queue.enqueue("sync", None, unique_key="sync:a") != second
    with pytest.raises(InvalidField) as e:
        queue.enqueue("sync", None, unique_for=5)
    assert e.value.field == "unique_for"


# -- periodic tasks -------------------------------------------------------------------------

def test_each_slot_is_enqueued_once_across_daemons_and_restarts(db, config):
    nightly = periodic.Schedule("nightly", "report", "reports", {"k": 1}, cron="0 3 * * *", tz="Europe/Paris")
    start = 1764036000.0 - 10  # 10 s before 03:00 in Paris on 2025-11-25
    periodic.register(db, [nightly], now=start)
    assert periodic.tick(db, [nightly], config, now=start + 5) == []
    taken = periodic.tick(db, [nightly], config, now=start + 11)
    assert [(n, s) for n, s, _ in taken] == [("nightly", 1764036000.0)]
    # a second daemon, and a restart (register again), see the same slot: nothing more
    periodic.register(db, [nightly], now=start + 12)
    assert periodic.tick(db, [nightly], config, now=start + 12) == []
    rows = db.execute("SELECT payload, idempotency_key FROM tasks WHERE queue = 'reports'")
    assert [r["idempotency_key"] for r in rows] == ["periodic:nightly:1764036000"]


def test_missed_slots_run_once_or_are_skipped(db, config):
    once = periodic.Schedule("once", "t", every=600, missed="once")
    skip = periodic.Schedule("skip", "t", every=600, missed="skip")
    periodic.register(db, [once, skip], now=6000.0)
    # down for an hour: six slots missed, the newest 100 s ago
    taken = {n: t for n, _, t in periodic.tick(db, [once, skip], config, now=9700.0)}
    assert taken["once"] is not None and taken["skip"] is None
    assert db.execute("SELECT count(*) FROM tasks")[0][0] == 1
    assert periodic.tick(db, [once, skip], config, now=9800.0) == []
    on_time = {n: t for n, _, t in periodic.tick(db, [once, skip], config, now=10205.0)}
    assert on_time["once"] and on_time["skip"]
    assert periodic.listing(db, [once], now=10205.0)[0]["next_runs"][:2] == [10800.0, 11400.0]


def test_bad_schedules_name_the_field():
    for kwargs, field in ((dict(cron="61 * * * *"), "cron"), (dict(every=0), "every"),
                          (dict(cron="* * * * *", tz="Mars/Olympus"), "tz"),
                          (dict(every=5, missed="all"), "missed"), (dict(), "cron")):
        with pytest.raises(InvalidField) as e:
            periodic.Schedule("s", "t", **kwargs)
        assert e.value.field.endswith(field)


# -- edge cases found in review ---------------------------------------------------------------

def test_a_step_left_blocked_by_two_replays_side_by_side_still_runs(db, queue, config):
    flow = workflow.submit(db, chord([step("a", queue=queue.name), step("b", queue=queue.name)],
                                     step("c", queue=queue.name)), config)
    a, b, c = flow["ids"]
    run(queue, fail="x")
    run(queue, fail="y")
    assert queue.get_task(c).state == "blocked"
    queue.retry_dead(task_id=a)
    queue.retry_dead(task_id=b)
    # what two replays committing at once on PostgreSQL can leave: each saw the other still dead
    db.execute("UPDATE tasks SET state = 'blocked' WHERE id = ?", (c,))
    run(queue)
    run(queue)
    assert run(queue).id == c


def test_pruning_a_finished_step_keeps_the_other_steps_dependencies(db, queue, config):
    a, b, c = workflow.submit(db, [{"task": "a", "queue": queue.name, "delay": 10},
                                   {"task": "b", "queue": queue.name, "after": [0]},
                                   {"task": "c", "queue": queue.name, "after": [0]}], config)["ids"]
    assert cancel_task(db, b) == "cancelled"
    db.execute("UPDATE tasks SET finished_at = 0 WHERE id = ?", (b,))
    assert queue.prune(now=1e10) >= 1 and queue.get_task(b) is None
    task = queue.dequeue("w", now=queue.clock() + 20)
    queue.complete_task(task.id, "w", "A", now=queue.clock() + 20)
    assert task.id == a and queue.get_task(c).state == "queued"


def test_a_task_asked_to_cancel_before_it_started_is_not_given_back(db, queue):
    task_id = queue.enqueue("t", None)
    claimed = queue.dequeue("w")
    assert cancel_task(db, task_id) == "cancelling"
    assert queue.release_task(task_id, "w", claimed.attempts)
    assert queue.get_task(task_id).state == "cancelled" and queue.dequeue("w") is None


def test_an_empty_group_keeps_the_chain_in_order(db, queue, config):
    a, b = workflow.submit(db, chain(step("a", queue=queue.name), group(), step("b", queue=queue.name)), config)["ids"]
    assert queue.get_task(b).state == "waiting"
    assert workflow.status(db, 2**70) is None


def test_lifting_a_concurrency_limit_while_claimers_remember_it(db, queue):
    limits.set_concurrency(db, queue.name, 1)
    queue.enqueue("t", None)
    queue.enqueue("t", None)
    assert len(queue.dequeue_batch("w", 5)) == 1
    limits.set_concurrency(db, queue.name, None)
    assert len(queue.dequeue_batch("w", 5)) == 1  # the claimer still thinks it is limited
