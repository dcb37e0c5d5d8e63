"""The queue under real concurrency: several processes and threads on one database, and SIGKILL;
on a SQLite file and again on a PostgreSQL server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers.queue_manager import LEASE_GRACE, QueueManager

pytestmark = pytest.mark.both_engines

DRAIN = r"""
import json, sqlite3, sys
from helpers.queue_manager import get_queue_manager
queue = get_queue_manager("bulk")
worker = sys.argv[1]
print("ready", flush=True)
sys.stdin.readline()  # all four start together
claimed, lock_errors, empty = [], 0, 0
while empty < 3:
    try:
        tasks = queue.dequeue_batch(worker, 50)
        if not tasks:
            empty += 1
            continue
        empty = 0
        queue.complete_many([(t.id, None) for t in tasks], worker)
        claimed += [t.id for t in tasks]
    except sqlite3.OperationalError:
        lock_errors += 1
print(json.dumps({"claimed": claimed, "lock_errors": lock_errors}))
"""


def test_four_processes_drain_20000_tasks_exactly_once(db, config, subprocess_env):
    queue = QueueManager("bulk", db, config)
    ids = []
    for start in range(0, 20_000, 1000):
        ids += [e.id for e in queue.enqueue_many([{"task": "noop", "payload": i}
                                                  for i in range(start, start + 1000)])]
    procs = [subprocess.Popen([sys.executable, "-c", DRAIN, f"w{i}"], env=subprocess_env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for i in range(4)]
    assert all(p.stdout.readline().strip() == "ready" for p in procs)
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outputs = [json.loads(p.communicate(timeout=240)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    claimed = [task_id for out in outputs for task_id in out["claimed"]]
    assert sum(out["lock_errors"] for out in outputs) == 0
    assert len(claimed) == 20_000 and sorted(claimed) == sorted(ids)
    rows = db.execute("SELECT state, attempts, count(*) AS n FROM tasks GROUP BY state, attempts")
    assert [tuple(r) for r in rows] == [("succeeded", 1, 20_000)]
    # Shared, not serialised: on 2 cores one of the four may be scheduled only after the other
    # three drained everything, so at least two (not all four) must have claimed work.
    assert sum(1 for out in outputs if out["claimed"]) >= 2, "the processes shared the work"


def test_threads_share_a_queue_without_double_claims(db, config):
    queue = QueueManager("threads", db, config)
    queue.enqueue_many([{"task": "noop", "payload": i} for i in range(2000)])
    seen, errors = [], []

    def work(name):
        try:
            while tasks := queue.dequeue_batch(name, 20):
                queue.complete_many([(t.id, None) for t in tasks], name)
                seen.extend(t.id for t in tasks)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and len(seen) == 2000 and len(set(seen)) == 2000


HOLD_LEASES = r"""
import sys, time
from helpers.queue_manager import get_queue_manager
queue = get_queue_manager("jobs")
tasks = queue.dequeue_batch("doomed", 100)
print(len(tasks), flush=True)
time.sleep(600)
"""


def test_sigkill_while_holding_leases_loses_nothing(db, config, subprocess_env):
    queue = QueueManager("jobs", db, config)
    ids = [queue.enqueue("t", i, timeout=2) for i in range(100)]
    child = subprocess.Popen([sys.executable, "-c", HOLD_LEASES], env=subprocess_env,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "100"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert db.engine != "sqlite" or db.check_integrity()  # a server checks its own pages
    later = time.time() + 3 + LEASE_GRACE  # past every lease, without sleeping
    assert len(queue.requeue_expired(now=later)) == 100
    finished = []
    while tasks := queue.dequeue_batch("survivor", 30, now=later + 10):
        finished += [t.id for t, ok in zip(tasks, queue.complete_many([(t.id, "ok") for t in tasks],
                                                                       "survivor", now=later + 10)) if ok]
    assert sorted(finished) == ids
    rows = db.execute("SELECT state, attempts, count(*) FROM tasks GROUP BY state, attempts")
    assert [tuple(r) for r in rows] == [("succeeded", 2, 100)]


ENQUEUE_FOREVER = r"""
import sys
from helpers.queue_manager import get_queue_manager
queue = get_queue_manager("acks")
i = 0
while True:
    if i % 2:
        ids = [e.id for e in queue.enqueue_many([{"task": "t", "payload": i}] * 20)]
    else:
        ids = [queue.enqueue("t", i)]
    print(" ".join(map(str, ids)), flush=True)   # acknowledged: committed before printing
    i += 1
"""


def test_sigkill_mid_enqueue_keeps_every_acknowledged_task(db, config, subprocess_env):
    for round_ in range(3):
        child = subprocess.Popen([sys.executable, "-c", ENQUEUE_FOREVER], env=subprocess_env,
                                 stdout=subprocess.PIPE, text=True)
        acked = []
        try:
            while len(acked) < 300 * (round_ + 1):
                acked += [int(x) for x in child.stdout.readline().split()]
        finally:
            os.kill(child.pid, signal.SIGKILL)
        acked += [int(x) for line in child.stdout.read().splitlines() for x in line.split()]
        child.wait(timeout=30)
        assert db.engine != "sqlite" or db.check_integrity()
        stored = {r[0] for r in db.execute("SELECT id FROM tasks WHERE queue = 'acks'")}
        assert set(acked) <= stored
