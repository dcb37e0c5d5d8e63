"""What only the PostgreSQL engine has: migrations raced by several processes, NOTIFY wake-ups and
their fallbacks, the server's clock for leases, and the CLI saying what it cannot do there."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from helpers import schema
from helpers.engine import open_database
from helpers.queue_manager import QueueManager, wait

postgres_only = pytest.mark.parametrize("engine", ["postgresql"], indirect=True)


MIGRATE = r"""
import sys
from helpers.config import load_config
from helpers.engine import open_database
from helpers import schema
sys.stdin.readline()  # all start together
db = open_database(load_config())
print(schema.version(db))
"""


@pytest.mark.both_engines
def test_several_processes_migrating_at_once_do_not_race(config, subprocess_env, database_url):
    procs = [subprocess.Popen([sys.executable, "-c", MIGRATE], env=subprocess_env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(6)]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, [err for _, err in outputs]
    latest = schema.latest("postgresql" if database_url else "sqlite")
    assert [out.strip() for out, _ in outputs] == [str(latest)] * 6
    db = open_database(config)
    assert [tuple(r) for r in db.execute("SELECT version, count(*) FROM schema_version GROUP BY version "
                                         "ORDER BY version")] == \
        [(v, 1) for v in range(1, latest + 1)]
    db.close()


@pytest.mark.both_engines
def test_oos_migrate_reports_the_version_and_never_a_password(subprocess_env, database_url):
    env = dict(subprocess_env)
    if database_url:  # the test server trusts every connection, so any password gets in
        env["OOS_DATABASE_URL"] = database_url.replace("postgres@", "postgres:s3cret@", 1)
    out = subprocess.run([sys.executable, "-m", "oos_cli", "migrate", "--json"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    latest = schema.latest("postgresql" if database_url else "sqlite")
    assert f'"version": {latest}' in out.stdout and ("postgresql" if database_url else "sqlite") in out.stdout
    if database_url:
        assert "postgres:***@" in out.stdout and "s3cret" not in out.stdout + out.stderr


@postgres_only
def test_file_backups_are_refused_on_postgresql_in_one_line(subprocess_env):
    for command in (["backup"], ["backup", "list"], ["restore"]):
        out = subprocess.run([sys.executable, "-m", "oos_cli", *command], env=subprocess_env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and out.stdout == ""
        assert out.stderr.count("\n") == 1 and "pg_dump" in out.stderr and "SQLite file only" in out.stderr


def claim_in_thread(queue: QueueManager, wait: float) -> tuple[threading.Thread, list]:
    got: list = []
    thread = threading.Thread(target=lambda: got.extend(queue.dequeue_batch("waiter", 1, wait=wait)))
    thread.start()
    return thread, got


@postgres_only
def test_a_waiting_claim_is_woken_by_a_hint_not_by_the_poll(config):
    # The poll is 60 s away: only the NOTIFY sent after the enqueue commits can end the wait.
    slow_poll = config.replace(database_poll_interval=60.0)
    waiter_db, producer_db = open_database(slow_poll), open_database(slow_poll)
    waiter, producer = QueueManager("hints", waiter_db, slow_poll), QueueManager("hints", producer_db, slow_poll)
    waiter_db.data_version()  # opens the LISTEN connection
    thread, got = claim_in_thread(waiter, wait=50)
    time.sleep(0.3)  # let it reach the wait (if it has not, the claim finds the task anyway)
    task_id = producer.enqueue("t", 1)
    thread.join(30)
    assert not thread.is_alive(), "the hint did not wake the waiting claim"
    assert [t.id for t in got] == [task_id]
    waiter_db.close()
    producer_db.close()


@postgres_only
def test_a_broken_listen_connection_reconnects_and_polls_again(config, pg_server):
    fast = config.replace(database_poll_interval=60.0)
    waiter_db, producer_db = open_database(fast), open_database(fast)
    waiter = QueueManager("hints", waiter_db, fast)
    waiter_db.data_version()  # opens the LISTEN connection
    listener = waiter_db._listener.info.backend_pid
    with psycopg.connect(pg_server.url, autocommit=True) as admin:  # the server drops the listener
        assert admin.execute("SELECT pg_terminate_backend(%s)", (listener,)).fetchone()[0]
    QueueManager("hints", producer_db, fast).enqueue("t", 2)  # its hint is lost: nobody listens
    thread, got = claim_in_thread(waiter, wait=50)
    thread.join(30)
    assert not thread.is_alive() and len(got) == 1, "a lost listener must lead to a re-poll, not a 60 s sleep"
    waiter_db.close()
    producer_db.close()


@postgres_only
def test_with_notify_off_workers_still_find_work_by_polling(config):
    polled = config.replace(database_notify=False, database_poll_interval=0.2)
    db = open_database(polled)
    queue = QueueManager("polled", db, polled)
    thread, got = claim_in_thread(queue, wait=30)
    time.sleep(0.3)
    task_id = queue.enqueue("t", 3)
    thread.join(30)
    assert [t.id for t in got] == [task_id]
    assert db._listener is None  # no LISTEN connection was opened
    db.close()


@postgres_only
def test_leases_are_timed_by_the_servers_clock(db, config):
    queue = QueueManager("clock", db, config)  # no injected clock: the server's
    task_id = queue.enqueue("t", None, timeout=30)
    task = queue.dequeue("w")
    server_now = db.execute("SELECT extract(epoch FROM statement_timestamp())::float8")[0][0]
    assert task.id == task_id and abs(task.started_at - server_now) < 5
    from helpers.queue_manager import LEASE_GRACE
    assert task.lease_until == pytest.approx(task.started_at + 30 + LEASE_GRACE)
    # With no time given, the rescue is timed by the server too (on one machine its clock and
    # ours agree, so this shows the path, not a skew): the fresh lease has not run out.
    assert queue.requeue_expired() == []


@postgres_only
def test_housekeeping_has_no_file_jobs_and_forgets_daemons_gone_a_day(db, config):
    from helpers import log
    from helpers.housekeeping import Housekeeping
    house = Housekeeping(db, config, log.get_logger())
    assert [job.name for job in house.jobs] == ["leases", "rescue", "history", "prune"]  # disk, integrity: the server's
    db.execute("INSERT INTO daemon_status (daemon, host, pid, started_at, updated_at, status) "
               "VALUES ('gone:1', 'gone', 1, 0, 0, '{}'), ('here:2', 'here', 2, 0, ?, '{}')", (time.time(),))
    house.prune()
    assert [r[0] for r in db.execute("SELECT daemon FROM daemon_status")] == ["here:2"]


@postgres_only
def test_a_short_lock_wait_is_kept(db, config):
    # The daemon's manager opens its database with a short lock wait, so a worker frozen in a
    # transaction cannot freeze the loop that would kill it; on PostgreSQL that is lock_timeout.
    task_id = QueueManager("locks", db, config).enqueue("t", 1)
    impatient = open_database(config, max_lock_wait=0.5)
    with db.transaction() as conn:
        conn.execute("SELECT id FROM tasks WHERE id = ? FOR UPDATE", (task_id,))
        with pytest.raises(psycopg.errors.LockNotAvailable):
            impatient.execute("UPDATE tasks SET priority = 1 WHERE id = ?", (task_id,))
    impatient.close()


@postgres_only
def test_a_claim_that_skipped_a_row_a_waiting_client_held_is_woken_again(config, pg_server, monkeypatch):
    """A client waiting for its task marks the row watched (an UPDATE: the row is locked for
    that moment), and a worker's claim then skips it (SKIP LOCKED) and sleeps until its next
    poll. So the watch also sends a hint, at its commit, and the worker looks again."""
    slow = config.replace(database_poll_interval=60.0)  # only hints wake the worker
    worker_db, client_db = open_database(slow), open_database(slow)
    try:
        task_id = QueueManager("watched", client_db, slow).enqueue("t", 1)
        worker = QueueManager("watched", worker_db, slow)
        sleeping = threading.Event()  # the worker claimed (and skipped the row) and now waits
        really_wait = worker_db.wait_for_change
        monkeypatch.setattr(worker_db, "wait_for_change", lambda *a: (sleeping.set(), really_wait(*a))[1])
        with psycopg.connect(client_db.url, autocommit=True) as admin, admin.transaction():
            admin.execute("SELECT 1 FROM tasks WHERE id = %s FOR UPDATE", (task_id,))  # as the watch does
            thread, got = claim_in_thread(worker, wait=50)
            assert sleeping.wait(30)
        time.sleep(0.5)  # nothing wakes it: the unlocked row sends no hint
        assert thread.is_alive() and not got, "without a hint the worker sleeps through the unlocked row"
        with pytest.raises(TimeoutError):
            wait(client_db, task_id, timeout=0.2)  # watches the row, and its commit hints
        thread.join(30)
        assert not thread.is_alive() and [t.id for t in got] == [task_id]
    finally:
        worker_db.close()
        client_db.close()


def test_a_killed_runs_server_directory_is_swept_and_a_live_or_young_one_kept(tmp_path):
    """A test run killed mid-way leaves its server's directory in /tmp (the server itself dies
    with the run): the next server made sweeps it, never one still serving or just made."""
    from scripts.pg_server import sweep_stale

    ended = subprocess.Popen(["true"])
    ended.wait()

    def server_dir(name: str, pid: int | None, age: float):
        path = tmp_path / f"oos-pg-{name}"
        (path / "data").mkdir(parents=True)
        if pid is not None:
            (path / "data" / "postmaster.pid").write_text(f"{pid}\n{path / 'data'}\n")
        then = time.time() - age
        os.utime(path, (then, then))
        return path

    killed = server_dir("killed", ended.pid, 3600)
    never_started = server_dir("never-started", None, 3600)
    serving = server_dir("serving", os.getpid(), 3600)
    starting = server_dir("starting", ended.pid, 5)
    assert sorted(sweep_stale(tmp_path)) == sorted([killed, never_started])
    assert serving.exists() and starting.exists() and not killed.exists()
