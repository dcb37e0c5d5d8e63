"""What a hostile audit broke (issue 15), each as a regression test on real files and processes."""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import backup as backups
from helpers.database_config import DatabaseManager
from helpers.queue_manager import QueueManager
from tests.daemon import ROOT, Daemon, wait_for

WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from helpers.config import load_config
    from helpers.database_config import DatabaseManager
    from helpers.queue_manager import QueueManager
    config = load_config(env={{"OOS_DATA_DIR": {data!r}}})
    q = QueueManager("load", DatabaseManager.from_config(config), config)
    print("writing", flush=True)
    while True:  # about 100 commits a second until killed
        q.enqueue("t", "x" * 200)
        time.sleep(0.01)
""")


def test_an_online_backup_finishes_under_steady_writes(db, config):
    q = QueueManager("load", db, config)
    for _ in range(45):  # about 45 MB
        q.enqueue_many([{"task": "t", "payload": "p" * 1000} for _ in range(1000)])
    writer = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), data=str(config.data_dir))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        before = db.execute("SELECT count(*) FROM tasks")[0][0]
        started = time.monotonic()
        made = backups.create_backup(db, config)
        took = time.monotonic() - started
        after = db.execute("SELECT count(*) FROM tasks")[0][0]
    finally:
        writer.kill()
        writer.wait(10)
    assert after > before, "the writer kept committing during the backup"
    copy = DatabaseManager(made.path)
    try:
        assert before <= copy.execute("SELECT count(*) FROM tasks")[0][0] <= after
    finally:
        copy.close()
    assert took < 120 and oct(made.path.stat().st_mode & 0o777) == "0o600"
    assert not list(config.backups_path.glob(".oos-*")), "no temporary file left"


def test_a_backup_past_its_time_limit_stops_and_leaves_nothing(db, config):
    QueueManager("q", db, config).enqueue_many([{"task": "t", "payload": "p" * 1000} for _ in range(20000)])
    with pytest.raises(RuntimeError, match="longer than"):
        db.create_backup(config.backups_path, time_limit=0.001)
    assert not list(config.backups_path.glob("*")) and not list(config.backups_path.glob(".*"))


def test_leftovers_of_killed_backups_are_pruned(db, config):
    backups.create_backup(db, config)
    old = time.time() - 7200
    for name in (".oos-20260101-000000-000000.db.tmp", ".oos-20260101-000000-000000.db.tmp-journal"):
        (config.backups_path / name).write_text("half")
        os.utime(config.backups_path / name, (old, old))
    removed = backups.prune_backups(config)
    assert len(removed) == 2 and not list(config.backups_path.glob(".oos-*"))


@pytest.mark.slow
def test_a_slow_task_in_a_batch_costs_the_rest_of_the_batch_nothing(data_dir, tmp_path, db, config):
    queue = QueueManager("default", db, config)
    specs = [{"task": "noop", "payload": {"n": i}, "timeout": 0.1} for i in range(70)]
    specs[40] = {"task": "naps", "payload": {"seconds": 16.5}, "timeout": 30}  # behind it: a batch of leases of 15.1 s
    ids = [e.id for e in queue.enqueue_many(specs)]
    d = Daemon(data_dir, tmp_path, env={"OOS_WORKERS_MIN": "1", "OOS_WORKERS_MAX": "1"}).start()
    try:
        wait_for(lambda: all(queue.get_task(i).state == "succeeded" for i in ids), 90, what="every task to succeed")
    finally:
        d.cleanup()
    runs = collections.Counter(line.split()[1] for line in (tmp_path / "executions.log").read_text().splitlines()
                               if line.startswith("noop"))
    assert set(runs.values()) == {1} and len(runs) == 69, "each quick task ran exactly once"
    tasks = [queue.get_task(i) for i in ids]
    assert all(t.attempts == 1 and not t.errors for t in tasks), [(t.id, t.errors) for t in tasks if t.errors][:3]
    assert any(e.get("event") == "slow task: rest of its batch given back" for e in d.logs())


@pytest.mark.slow
def test_a_worker_growing_mid_task_past_the_kill_limit_is_killed_and_the_attempt_counted(data_dir, tmp_path, db,
                                                                                          config):
    queue = QueueManager("default", db, config)
    task_id = queue.enqueue("hog", {"mb": 300, "seconds": 60}, timeout=120)
    d = Daemon(data_dir, tmp_path, env={"OOS_WORKERS_MAX_MEMORY_MB": "100",
                                        "OOS_WORKERS_KILL_MEMORY_MB": "200"}).start()
    try:
        task = wait_for(lambda: (t := queue.get_task(task_id)).attempts >= 1 and t.state != "running" and t, 60,
                        what="the hog to be stopped")
        assert "over workers.kill_memory_mb = 200" in task.last_error and task.errors[0]["attempt"] == 1
        assert [e for e in d.logs() if e.get("event") == "killing worker over the memory limit"]
        queue.cancel_task(task_id)
    finally:
        d.cleanup()


def test_a_breaker_trial_takes_healthy_work_before_poison_retries(db, config, clock):
    import random as _random

    from helpers import breaker as breakers

    queue = QueueManager("mixed", db, config, clock=clock, rng=_random.Random(3))
    poison = [queue.enqueue("poison", max_attempts=100) for _ in range(15)]
    for _ in poison:  # each failed once already: retries, due again after their backoff
        queue.fail_task(queue.dequeue("w").id, "w", "poison")
    clock.advance(5)
    healthy = [queue.enqueue("healthy") for _ in range(10)]
    clock.advance(1)
    breaker = breakers.queue_breaker(db, "mixed", fail_max=1, reset_timeout=60)
    with pytest.raises(RuntimeError):
        breaker.call(_fail)
    opened = breakers.status(db, "mixed")["opened_at"]
    assert breakers.may_claim(breaker, now=opened + 61) == 1
    trial, = queue.dequeue_batch("w", 1, trial=True)
    assert trial.id in healthy, "the one trial goes to work that never failed"
    assert all(t.id in poison for t in queue.dequeue_batch("w", 2)), "outside trials, the usual order"


def _fail():
    raise RuntimeError("down")
