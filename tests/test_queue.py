"""Contract tests of the queue's semantics, on an injected clock: each runs on a real SQLite file
and again on a real PostgreSQL server."""
from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from helpers import backoff, write_turn
from helpers.config import load_config
from helpers.engine import get_database
from helpers.queue_manager import LEASE_GRACE, QueueManager, get_queue_manager, prune, set_progress
from helpers.worker import Slots, Worker
from tests.daemon import wait_for
from tests.test_write_turn import no_inotify

pytestmark = pytest.mark.both_engines


def count_rows(db) -> int:
    return db.execute("SELECT count(*) FROM tasks")[0][0]


def test_the_readme_example(config, monkeypatch):
    monkeypatch.setenv("OOS_DATA_DIR", str(config.data_dir))
    if config.database_url:
        monkeypatch.setenv("OOS_DATABASE_URL", config.database_url)
    queue = get_queue_manager("my_queue")
    task_id = queue.enqueue("process_data", {"file": "data.csv"})
    task = queue.dequeue("worker_1")
    assert task.id == task_id and task.task_data == {"file": "data.csv"}
    assert queue.complete_task(task.id, "worker_1", {"rows": 3})
    assert queue.dequeue("worker_1") is None
    done = queue.get_task(task_id)
    assert done.state == "succeeded" and done.result == {"rows": 3} and done.attempts == 1
    assert config.db_path.exists() != bool(config.database_url)


@pytest.mark.sqlite_only
def test_the_file_is_wal_and_fully_synchronous_by_default(db):
    conn = db.pool.connection()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 0  # OOS polls for the write lock itself (helpers/database_config._retrying)


def test_claim_order_is_priority_then_due_time_then_fifo(queue, clock):
    low = queue.enqueue("t", 1)
    clock.advance(1)
    high = queue.enqueue("t", 2, priority=5)
    later = queue.enqueue("t", 3)
    earlier_due = queue.enqueue("t", 4, run_at=clock.now - 10)
    order = [queue.dequeue("w").id for _ in range(4)]
    assert order == [high, earlier_due, low, later]


def test_batch_claim_returns_claim_order(queue):
    ids = [queue.enqueue("t", i, priority=i % 3) for i in range(10)]
    got = queue.dequeue_batch("w", 4)
    expected = sorted(ids, key=lambda i: (-(ids.index(i) % 3), i))[:4]
    assert [t.id for t in got] == expected
    assert all(t.state == "running" and t.worker == "w" for t in got)


def test_delayed_tasks_wait_for_their_time(queue, clock):
    task_id = queue.enqueue("t", None, delay=30)
    assert queue.dequeue("w") is None
    assert queue.stats()["delayed"] == 1
    clock.advance(29.9)
    assert queue.dequeue("w") is None
    clock.advance(0.2)
    assert queue.dequeue("w").id == task_id


def test_idempotency_key_gives_back_the_existing_task(queue, db, config, clock):
    first = queue.enqueue("t", {"a": 1}, idempotency_key="order-42")
    again = queue.enqueue("t", {"a": 2}, idempotency_key="order-42")
    assert first == again and count_rows(db) == 1
    results = queue.enqueue_many([{"task": "t", "idempotency_key": "order-42"},
                                  {"task": "t", "idempotency_key": "order-43"}])
    assert results[0] == (first, False) and results[1].created
    other_queue = QueueManager("other", db, config, clock=clock)
    assert other_queue.enqueue("t", None, idempotency_key="order-42") != first


def test_retry_backoff_follows_the_schedule_without_jitter(db, config, clock):
    queue = QueueManager("jobs", db, config.replace(queue_backoff_jitter=0.0), clock=clock)
    task_id = queue.enqueue("t", None, max_attempts=11)
    waits = []
    for _ in range(10):
        task = queue.dequeue("w")
        assert task.id == task_id
        assert queue.fail_task(task.id, "w", "boom") == "queued"
        waits.append(queue.get_task(task_id).run_at - clock.now)
        clock.advance(waits[-1])
    assert waits == [1, 2, 4, 8, 16, 32, 60, 120, 300, 300]


def test_jitter_only_shortens_and_is_seeded(queue, clock):
    a = backoff.delays(random.Random(1))
    assert a == backoff.delays(random.Random(1))
    assert all(0.8 * s <= d <= s for d, s in zip(a, backoff.SCHEDULE))
    task_id = queue.enqueue("t", None)
    queue.fail_task(queue.dequeue("w").id, "w", "boom")
    assert 0.8 <= queue.get_task(task_id).run_at - clock.now <= 1.0


def test_last_attempt_dead_letters_with_its_error_history(queue, clock):
    task_id = queue.enqueue("t", None, max_attempts=3)
    states = []
    for i in range(3):
        task = queue.dequeue("w", now=clock.advance(400))
        states.append(queue.fail_task(task.id, "w", f"error {i}"))
    assert states == ["queued", "queued", "dead"]
    dead = queue.get_task(task_id)
    assert dead.state == "dead" and dead.last_error == "error 2" and dead.finished_at == clock.now
    assert [(e["attempt"], e["error"]) for e in dead.errors] == [(1, "error 0"), (2, "error 1"), (3, "error 2")]
    assert queue.dequeue("w", now=clock.advance(10_000)) is None


def test_fail_without_retry_dead_letters_at_once(queue):
    task_id = queue.enqueue("no_such_handler", None)
    assert queue.fail_task(queue.dequeue("w").id, "w", "no handler", retry=False) == "dead"
    assert queue.get_task(task_id).attempts == 1


def test_an_error_text_no_engine_stores_is_recorded_written_out(queue, db):
    """A handler's error may quote a payload string (JSON carries lone surrogates) or a NUL,
    which PostgreSQL's text refuses: the failure is still recorded, the odd characters escaped."""
    task_id = queue.enqueue("t", "\ud800")
    task = queue.dequeue("w")
    assert set_progress(db, task_id, "w", task.attempts, 0.5, "at \x00")
    assert queue.fail_task(task.id, "w", f"bad value {task.task_data} \x00", retry=False) == "dead"
    dead = queue.get_task(task_id)
    assert dead.last_error == "bad value \\ud800 \\x00" and dead.progress_message == "at \\x00"


def test_expired_lease_is_claimed_again_and_the_old_worker_cannot_overwrite(queue, clock):
    task_id = queue.enqueue("t", None, timeout=10)
    assert queue.dequeue("old").id == task_id
    assert queue.get_task(task_id).lease_until == clock.now + 10 + LEASE_GRACE
    clock.advance(10 + LEASE_GRACE + 0.5)
    assert queue.dequeue("new") is None  # requeued, waiting out its 1 s backoff
    task = queue.dequeue("new", now=clock.advance(1))
    assert task.id == task_id and task.attempts == 2
    assert "stopped responding" in task.errors[0]["error"]
    assert not queue.complete_task(task_id, "old", "stale")
    assert queue.fail_task(task_id, "old", "stale") is None
    assert not queue.extend_lease(task_id, "old")
    assert queue.get_task(task_id).state == "running"
    assert queue.complete_task(task_id, "new", "fresh")
    assert queue.get_task(task_id).result == "fresh"


def test_a_late_result_is_refused_even_when_the_same_worker_claimed_the_task_again(queue, clock):
    task_id = queue.enqueue("t", 1, timeout=10)
    first = queue.dequeue("w1")
    clock.advance(10 + LEASE_GRACE + 1)  # w1 was cut off past its lease...
    assert queue.requeue_expired() == [(task_id, "queued")]
    clock.advance(60)
    second = queue.dequeue("w1")  # ...and, back, claimed the task again
    assert second.id == task_id and second.attempts == 2
    assert not queue.complete_task(task_id, "w1", "stale", attempt=first.attempts)
    assert not queue.extend_lease(task_id, "w1", attempt=first.attempts)
    assert queue.fail_task(task_id, "w1", "stale failure", attempt=first.attempts) is None
    assert not queue.release_task(task_id, "w1", attempt=first.attempts)
    assert queue.complete_task(task_id, "w1", "fresh", attempt=second.attempts)
    assert queue.get_task(task_id).result == "fresh"


def test_expired_lease_on_the_last_attempt_dead_letters(queue, clock):
    task_id = queue.enqueue("t", None, timeout=5, max_attempts=1)
    queue.dequeue("w")
    assert queue.requeue_expired(now=clock.advance(5 + LEASE_GRACE - 1)) == []
    assert queue.requeue_expired(now=clock.advance(2)) == [(task_id, "dead")]
    assert queue.get_task(task_id).state == "dead"


def test_heartbeat_keeps_a_long_task_leased(queue, clock):
    task_id = queue.enqueue("t", None, timeout=10)
    queue.dequeue("w")
    for _ in range(5):
        clock.advance(8)
        assert queue.extend_lease(task_id, "w")
    assert queue.requeue_expired() == []
    assert queue.dequeue("other", now=clock.advance(5)) is None
    assert queue.extend_lease(task_id, "w", seconds=100)
    assert queue.get_task(task_id).lease_until == clock.now + 100


def test_release_gives_the_task_back_without_using_an_attempt(queue):
    task_id = queue.enqueue("t", None)
    assert queue.release_task(queue.dequeue("w").id, "w")
    task = queue.dequeue("w2")
    assert task.id == task_id and task.attempts == 1


def test_cancel_a_queued_task_at_once_and_ask_a_running_one_to_stop(queue):
    queued = queue.enqueue("t", None)
    running = queue.enqueue("t", None, priority=9)
    claimed = queue.dequeue("w")
    assert queue.cancel_task(running) == "cancelling"
    assert queue.get_task(running).state == "running" and queue.get_task(running).cancel_requested
    assert queue.cancel_task(queued) == "cancelled" and queue.get_task(queued).state == "cancelled"
    assert queue.cancel_task(queued) is None
    assert queue.dequeue("w") is None
    # The worker records the interrupted run: cancelled, never retried, even with attempts left.
    assert queue.fail_task(running, "w", "cancelled", attempt=claimed.attempts) == "cancelled"
    assert queue.get_task(running).finished_at is not None and queue.count_dead() == 0


def test_pause_and_resume(queue):
    queue.enqueue("t", None)
    queue.pause()
    assert queue.is_paused() and queue.dequeue("w") is None
    queue.resume()
    assert not queue.is_paused() and queue.dequeue("w") is not None


def test_dead_letter_list_inspect_retry_and_purge(queue, clock):
    ids = {}
    for name in ("a", "a", "b"):
        task_id = queue.enqueue(name, None, max_attempts=1)
        queue.fail_task(queue.dequeue("w").id, "w", f"{name} broke")
        ids.setdefault(name, []).append(task_id)
        clock.advance(1)
    assert queue.count_dead() == 3 and queue.count_dead("a") == 2
    assert [t.id for t in queue.dead_letters()] == [ids["b"][0], ids["a"][1], ids["a"][0]]
    assert [t.id for t in queue.dead_letters(limit=1, offset=1)] == [ids["a"][1]]
    assert {t.name for t in queue.dead_letters(task_name="a")} == {"a"}

    assert queue.retry_dead(task_id=ids["b"][0]) == 1
    replayed = queue.dequeue("w")
    assert replayed.id == ids["b"][0] and replayed.attempts == 1 and replayed.errors[0]["error"] == "b broke"
    assert queue.retry_dead(task_name="a") == 2
    assert queue.count_dead() == 0
    for task in queue.dequeue_batch("w", 10):
        queue.fail_task(task.id, "w", "again")
    assert queue.purge_dead(task_id=ids["a"][0]) == 1
    assert queue.purge_dead() == 1 and queue.count_dead() == 0


def test_prune_drops_old_dead_finished_and_expired_results(queue, db, config, clock):
    dead = queue.enqueue("t", None, max_attempts=1)
    queue.fail_task(queue.dequeue("w").id, "w", "x")
    done = queue.enqueue("t", None)
    queue.complete_task(queue.dequeue("w").id, "w", {"big": "result"})
    clock.advance(config.queue_result_ttl_seconds + 1)
    prune(db, config, clock.now)
    assert queue.get_task(done).result is None and queue.get_task(done).state == "succeeded"
    assert queue.get_task(dead) is not None
    clock.advance(7 * 86_400)
    assert prune(db, config, clock.now) == 2
    assert queue.get_task(dead) is None and queue.get_task(done) is None


def test_enqueue_many_is_all_or_nothing(queue, db):
    ids = [e.id for e in queue.enqueue_many([{"task": "t", "payload": i} for i in range(100)])]
    assert len(set(ids)) == 100
    with pytest.raises(ValueError, match=r"tasks\[2\].payload"):
        queue.enqueue_many([{"task": "t"}, {"task": "t"}, {"task": "t", "payload": {1, 2}}])
    assert count_rows(db) == 100


def test_complete_many_in_one_transaction(queue):
    for i in range(5):
        queue.enqueue("t", i)
    tasks = queue.dequeue_batch("w", 5)
    outcome = queue.complete_many([(t.id, t.task_data * 2) for t in tasks] + [(999, None)], "w")
    assert outcome == [True] * 5 + [False]
    assert [queue.get_task(t.id).result for t in tasks] == [0, 2, 4, 6, 8]


def test_stats_counts_age_totals_and_depth_alert(db, config, clock):
    queue = QueueManager("jobs", db, config.replace(queue_depth_alert=3), clock=clock)
    for i in range(4):
        queue.enqueue("t", i)
    queue.enqueue("t", None, delay=60)
    clock.advance(12)
    queue.complete_task(queue.dequeue("w").id, "w")
    stats = queue.stats()
    assert stats["counts"]["queued"] == 4 and stats["counts"]["succeeded"] == 1
    assert stats["ready"] == 3 and stats["delayed"] == 1
    assert stats["oldest_ready_age"] == pytest.approx(12)
    assert stats["totals"] == {"enqueued": 5, "succeeded": 1, "failed": 0, "dead": 0}
    assert stats["succeeded_last_minute"] == 1
    assert queue.stats(now=clock.now + 61)["succeeded_last_minute"] == 0
    assert stats["depth_alert"] is True


@pytest.mark.parametrize("kwargs, message", [
    (dict(task_name="", task_data=None), "task: expected a non-empty name"),
    (dict(task_name="t", task_data=object()), "payload: not JSON-serialisable"),
    (dict(task_name="t", task_data=float("nan")), "payload: not JSON-serialisable"),
    (dict(task_name="t", task_data="x" * (1024 * 1024)), "payload: 1048578 bytes is over the limit"),
    (dict(task_name="t", delay=-1), "delay: must be >= 0"),
    (dict(task_name="t", delay=1, run_at=5), "delay: give delay or run_at"),
    (dict(task_name="t", priority=1.5), "priority: expected an integer"),
    (dict(task_name="t", max_attempts=0), "max_attempts: must be >= 1"),
    (dict(task_name="t", timeout=0), "timeout: must be >= 0.001"),
    # The ranges the HTTP schemas give (helpers/validation.py): the Python API and the CLI keep them too
    (dict(task_name="t", priority=2**70), "priority: must be <= 1000000"),
    (dict(task_name="t", max_attempts=1001), "max_attempts: must be <= 1000"),
    (dict(task_name="t", timeout=8 * 86_400), "timeout: must be <= 604800"),
    (dict(task_name="t", delay=1e12), "delay: must be <= 315360000"),
    (dict(task_name="t", priority=10**400), "priority: must be <= 1000000"),  # no float holds it either
    (dict(task_name="t", run_at=10**400), "run_at: expected a finite number"),
    (dict(task_name="t", idempotency_key=""), "idempotency_key: expected a non-empty string"),
    (dict(task_name="t", idempotency_key="a\x00b"), "idempotency_key: contains a NUL character"),
    (dict(task_name="\ud800"), "task: contains a NUL character or a lone surrogate"),
])
def test_bad_input_is_refused_and_nothing_is_written(queue, db, kwargs, message):
    with pytest.raises(ValueError, match=message):
        queue.enqueue(**kwargs)
    assert count_rows(db) == 0


def test_bad_queue_name_is_refused(db):
    with pytest.raises(ValueError, match="queue: expected"):
        QueueManager("no spaces/or slashes", db)


def test_payload_limit_is_configurable(db, config, clock):
    queue = QueueManager("jobs", db, config.replace(queue_max_payload_bytes=10), clock=clock)
    queue.enqueue("t", "12345678")
    with pytest.raises(ValueError, match="over the limit of 10 bytes"):
        queue.enqueue("t", "123456789")


def test_synchronous_setting_is_applied_and_checked(tmp_path):
    from helpers.database_config import DatabaseManager
    db = DatabaseManager(tmp_path / "n.db", synchronous="normal")
    assert db.pool.connection().execute("PRAGMA synchronous").fetchone()[0] == 1
    with pytest.raises(ValueError, match="synchronous"):
        DatabaseManager(tmp_path / "x.db", synchronous="sometimes")


@pytest.mark.sqlite_only
def test_integrity_check_and_backup(queue, db):
    for i in range(50):
        queue.enqueue("t", i)
    assert db.check_integrity() and db.check_integrity(quick=True)
    path = db.create_backup()
    assert path.parent == db.backup_dir and path.exists()
    copy = sqlite3.connect(path)
    assert copy.execute("SELECT count(*) FROM tasks").fetchone()[0] == 50
    copy.close()
    assert not list(db.backup_dir.glob(".*tmp"))


def test_integrity_check_reports_a_damaged_file(tmp_path):
    from helpers.database_config import check_file_integrity
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not a database" * 100)
    report = check_file_integrity(bad)
    assert not report and report.problems


FSYNC_COUNTER = """
import sys
from helpers.config import load_config
from helpers.queue_manager import QueueManager
from helpers.engine import get_database
config = load_config()
queue = QueueManager("q", get_database(config), config)
queue.enqueue_many([{"task": "t", "payload": i} for i in range(int(sys.argv[1]))])
print("START", flush=True)  # strace's mark: count what follows
while (task := queue.dequeue("w")) is not None:
    queue.complete_task(task.id, "w", None)
"""


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace (.ci/run installs it)")
@pytest.mark.sqlite_only  # the PostgreSQL server syncs its WAL, not this process
def test_the_one_call_path_pays_one_fsync_per_task_not_two(tmp_path, subprocess_env, db):
    """dequeue + complete_task at synchronous=FULL: the claim is not fsynced (the completion's
    fsync carries it; a power cut before that only queues the task again), so N tasks cost N
    syncs of the WAL, where raw sqlite3 pays 2N for the same claim + ack."""
    n = 100
    trace = tmp_path / "trace"
    subprocess.run(["strace", "-f", "-o", str(trace), "-e", "trace=fsync,fdatasync,write", "-e", "signal=none",
                    sys.executable, "-c", FSYNC_COUNTER, str(n)], env=subprocess_env, check=True, timeout=120,
                   capture_output=True)
    lines = trace.read_text().splitlines()
    after = lines[next(i for i, line in enumerate(lines) if 'write(1, "START' in line):]
    syncs = sum(1 for line in after if "fsync(" in line or "fdatasync(" in line)
    assert n <= syncs <= n + 5, syncs  # the last empty claim writes nothing; a checkpoint may add a few


@pytest.mark.sqlite_only  # PostgreSQL shares WAL flushes in the server; group() is one transaction per call there
def test_group_commit_shares_one_transaction_and_a_failure_undoes_only_its_own(db, monkeypatch):
    """Five threads hand in writes while the write lock is taken: the first leads (its own
    write waits for the lock), the four queued behind it then go in one transaction (each sees
    the rows of those before it); the one that raises loses only its own row and gets its own
    error, the rest commit."""
    db.execute("CREATE TABLE notes (n INTEGER)")
    results, errors = {}, {}
    commits = []  # the callers each commit carried (the real commit runs)
    commit = db._commit_group
    monkeypatch.setattr(db, "_commit_group", lambda batch: (commits.append(len(batch)), commit(batch))[1])

    def work(i):
        def write(conn):
            conn.execute("INSERT INTO notes (n) VALUES (?)", (i,))
            if i == 2:
                raise ValueError("bad input 2")
            return conn.execute("SELECT count(*) FROM notes").fetchone()[0]
        try:
            results[i] = db.group(write)
        except ValueError as e:
            errors[i] = str(e)

    with db.writing():  # hold the turn until all five are queued
        threads = []
        for i in range(5):
            threads.append(threading.Thread(target=work, args=(i,)))
            threads[-1].start()
            wait_for(lambda i=i: db._leading and len(db._pending) == i, what="the callers to queue")  # the leader took its own
    for t in threads:
        t.join(30)
    assert errors == {2: "bad input 2"}
    assert commits == [1, 4]  # the leader's own, then the four queued behind it together
    assert sorted(results.values()) == [1, 2, 3, 4]  # each saw the rows before its own
    assert sorted(r[0] for r in db.execute("SELECT n FROM notes")) == [0, 1, 3, 4]


@pytest.mark.sqlite_only  # group() is one transaction per call on PostgreSQL
def test_busy_threads_share_their_commits_instead_of_alternating_full_and_lone_ones(db, config, monkeypatch):
    """Eight threads enqueue one task per call: the callers a commit woke hand in their next
    task before the next commit starts (it waits for them: ``gather_seconds``, long here so a
    loaded machine cannot make it miss), so nearly every commit carries all eight. It used to
    alternate eight and one: twice the fsyncs."""
    queue = QueueManager("busy", db, config)
    db.gather_seconds = 1.0  # it ends when they are all in: long only on a machine too busy
    sizes = []
    commit = db._commit_group
    monkeypatch.setattr(db, "_commit_group", lambda batch: (sizes.append(len(batch)), commit(batch))[1])

    def enqueue(k):
        for i in range(50):
            queue.enqueue("t", {"k": k, "i": i})
    threads = [threading.Thread(target=enqueue, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert db.execute("SELECT count(*) FROM tasks WHERE queue = 'busy'")[0][0] == 400
    assert sum(sizes) >= 390  # the first callers may commit alone, before anyone waits
    assert sum(1 for n in sizes if n == 1) <= 5 and len(sizes) <= 70, sizes


class Interrupted(BaseException):
    """As a task's timeout, raised in the middle of a write."""


@pytest.mark.sqlite_only
def test_a_group_commit_interrupted_mid_way_writes_nothing_tells_everyone_and_passes_the_lead(db):
    """Caller 1 leads a commit carrying caller 2 and is interrupted in its own work (a
    BaseException, as a task's timeout): nothing of that commit is written, caller 1 raises
    the interruption, caller 2 is told its write did not happen (never a result for a write
    rolled back), and the lead is not left hanging: the next call commits."""
    db.execute("CREATE TABLE notes (n INTEGER)")
    outcome = {}

    def call(i):
        def write(conn):
            conn.execute("INSERT INTO notes (n) VALUES (?)", (i,))
            if i == 1:
                raise Interrupted()
            return i
        try:
            outcome[i] = db.group(write)
        except BaseException as e:  # noqa: BLE001 - what each caller got is the test
            outcome[i] = e

    with db.writing():
        threads = []
        for i in range(3):
            threads.append(threading.Thread(target=call, args=(i,)))
            threads[-1].start()
            wait_for(lambda i=i: db._leading and len(db._pending) == i, what="the callers to queue")
        # Caller 0 leads with its own work alone; 1 and 2 queue behind it: 1 leads the next commit.
    for t in threads:
        t.join(30)
    assert outcome[0] == 0 and isinstance(outcome[1], Interrupted)
    assert isinstance(outcome[2], sqlite3.OperationalError) and "interrupted" in str(outcome[2])
    assert [r[0] for r in db.execute("SELECT n FROM notes")] == [0]
    assert db.group(lambda conn: conn.execute("SELECT count(*) FROM notes").fetchone()[0]) == 1


@pytest.mark.sqlite_only  # group() is one transaction per call on PostgreSQL
def test_a_group_that_cannot_commit_gives_every_caller_the_error_and_none_hangs(db, config):
    from helpers.database_config import DatabaseManager

    impatient = DatabaseManager(db.path, "FULL", 0, max_lock_wait=0.3)
    errors = []

    def call():
        try:
            impatient.group(lambda conn: conn.execute("SELECT 1").fetchone())
        except sqlite3.OperationalError as e:
            errors.append(str(e))

    with impatient.writing():  # held past every caller's max_lock_wait
        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
        wait_for(lambda: len(errors) == 3, 20, what="every caller's error")
    for t in threads:
        t.join(10)
    assert all("database is locked" in e for e in errors)
    impatient.close()


def test_an_idle_worker_woken_by_another_queues_commit_only_reads(config, data_dir, database_url):
    """A commit to any queue wakes an idle worker. It asks its queues by a read whether a task
    is ready before it claims: an empty claim takes SQLite's write lock, and the API's
    enqueues queued behind those of every idle worker. Its claims find the task once one of
    its own queues has one."""
    env = {"OOS_DATA_DIR": str(data_dir), "OOS_WORKERS_QUEUES": "mine"}
    if database_url:
        env["OOS_DATABASE_URL"] = database_url
    worker_config = load_config(env=env)
    worker = Worker(worker_config, 0, Slots.create(multiprocessing.get_context("spawn"), 1), os.getppid())
    db = get_database(worker_config)
    assert worker.claim() == [] and worker.idle
    QueueManager("other", db, worker_config).enqueue("t")
    statements = []
    if db.engine == "sqlite":
        db.pool.connection().set_trace_callback(statements.append)
    assert worker.claim() == []
    if db.engine == "sqlite":
        db.pool.connection().set_trace_callback(None)
        assert statements and not [s for s in statements if s.lstrip().upper().startswith(("UPDATE", "BEGIN"))]
    mine = QueueManager("mine", db, worker_config)
    mine.pause()
    task_id = mine.enqueue("t")
    assert worker.claim() == []  # paused: ready, but not to be claimed
    mine.resume()
    assert [t.id for t in worker.claim()] == [task_id] and not worker.idle


@pytest.mark.sqlite_only  # every commit wakes a SQLite waiter; a PostgreSQL one, its queue's hints
def test_a_waiting_claim_woken_by_another_queues_commit_only_reads(db, config, monkeypatch):
    """``dequeue_batch(wait=)`` is woken by every commit, to any queue. It looks by a read
    before it claims again: an empty claim takes SQLite's write lock. So three commits to
    another queue cost it three reads and no claim; its own queue's task is claimed."""
    mine = QueueManager("mine", db, config, reap_expired=False)  # (its once-a-second reaping writes too)
    other = QueueManager("other", db, config)
    claims, looks, got = [], [], []
    claim, has_ready = mine._claim, mine.has_ready  # the real ones run; the test counts them
    monkeypatch.setattr(mine, "_claim", lambda *a: (claims.append(1), claim(*a))[1])
    monkeypatch.setattr(mine, "has_ready", lambda *a: (looks.append(1), has_ready(*a))[1])
    thread = threading.Thread(target=lambda: got.extend(mine.dequeue_batch("w", 1, wait=60)))
    thread.start()
    wait_for(lambda: len(claims) == 1, what="the first, empty claim")
    for n in range(1, 4):
        other.enqueue("t")
        wait_for(lambda n=n: len(looks) + len(claims) - 1 == n, what="the waiter to wake after the commit")
    task_id = mine.enqueue("t")
    thread.join(30)
    assert [t.id for t in got] == [task_id]
    assert len(looks) == 4 and len(claims) == 2  # a look per wake; the first, empty claim and this one


@pytest.mark.sqlite_only  # PostgreSQL waiters LISTEN
@pytest.mark.parametrize("inotify", [True, False])
def test_a_waiter_sleeps_until_another_connection_commits(db, monkeypatch, inotify):
    """An idle waiter sleeps until the WAL file is written (it polled data_version every
    millisecond: 900 wake-ups a second per idle worker), and still wakes on a commit from
    another connection. Without inotify (too many instances), it polls."""
    if not inotify:
        monkeypatch.setattr(write_turn, "INotify", no_inotify)
    db.execute("CREATE TABLE notes (n INTEGER)")
    looks, woke = [], []
    real = db.data_version
    monkeypatch.setattr(db, "data_version", lambda: (looks.append(1), real())[1])

    def waiter():
        version = db.data_version()
        woke.append(db.wait_for_change(version, time.monotonic() + 60))
    thread = threading.Thread(target=waiter)
    thread.start()
    wait_for(lambda: len(looks) >= 2, what="the waiter to look")
    time.sleep(0.3)  # an idle stretch: what it costs is counted, not timed
    idle_looks = len(looks)
    writer = sqlite3.connect(db.path, isolation_level=None)
    writer.execute("INSERT INTO notes VALUES (1)")
    writer.close()
    thread.join(30)
    assert woke == [True]
    if inotify:
        assert idle_looks < 30, idle_looks  # at most one look per BLOCK_SECONDS, plus the first
    else:
        assert idle_looks > 30, idle_looks


@pytest.mark.both_engines
def test_run_now_makes_a_delayed_or_backing_off_task_due_and_nothing_else(db, config):
    from helpers.queue_manager import run_now
    queue = QueueManager("later", db, config)
    delayed = int(queue.enqueue("t", delay=3600))
    assert queue.dequeue("w") is None
    assert run_now(db, delayed) and queue.get_task(delayed).run_at <= time.time() + 1
    claimed = queue.dequeue("w")
    assert claimed.id == delayed
    assert not run_now(db, delayed)  # running: nothing to bring forward
    queue.fail_task(delayed, "w", "boom", attempt=claimed.attempts)  # backs off before its retry
    assert queue.get_task(delayed).run_at > time.time() and run_now(db, delayed)
    assert queue.dequeue("w").id == delayed
    assert not run_now(db, 10**6)


@pytest.mark.both_engines
def test_a_replayed_task_shows_where_its_new_attempts_start(db, config):
    queue = QueueManager("replays", db, config)
    task_id = int(queue.enqueue("t", max_attempts=1))
    queue.fail_task(queue.dequeue("w").id, "w", "first life", attempt=1)
    assert queue.get_task(task_id).state == "dead"
    assert queue.retry_dead(task_id) == 1
    queue.fail_task(queue.dequeue("w").id, "w", "second life", attempt=1)
    errors = queue.get_task(task_id).errors
    assert [e.get("error") or "replayed" for e in errors] == ["first life", "replayed", "second life"]
    assert errors[1]["replayed"] is True and errors[1]["at"] <= errors[2]["at"]
