"""The daemon's periodic jobs (helpers/housekeeping.py), on an injected clock."""
from __future__ import annotations

import os

from helpers.housekeeping import Housekeeping
from helpers.queue_manager import LEASE_GRACE, QueueManager
from tests.conftest import FakeClock


class Log:
    def __init__(self):
        self.lines = []

    def __getattr__(self, level):
        return lambda event, **kw: self.lines.append((level, event, kw))


def test_jobs_run_on_their_intervals_and_a_failing_one_stops_nothing(db, config):
    clock, log = FakeClock(0.0), Log()
    house = Housekeeping(db, config, log, clock=clock)
    ran = []
    for job in house.jobs:
        job.run = (lambda name=job.name: ran.append(name)) if job.name != "disk" else (lambda: 1 / 0)
    house.run_due()
    assert ran == ["leases", "rescue", "history", "prune"]  # integrity waits a day; disk failed
    assert ("error", "disk job failed", {"error": "ZeroDivisionError: division by zero"}) in log.lines
    clock.advance(1.0)
    house.run_due()
    assert ran == ["leases", "rescue", "history", "prune", "leases"]  # rescue: every 2 s
    clock.advance(config.database_integrity_check_hours * 3600)
    house.run_due()
    assert ran.count("integrity") == 1 and ran.count("prune") == 2


def test_under_the_daemon_only_housekeeping_expires_leases(db, config):
    clock = FakeClock(1_000.0)
    worker_side = QueueManager("jobs", db, config, clock=clock, reap_expired=False)
    task_id = worker_side.enqueue("t", timeout=1)
    assert worker_side.dequeue("w1").id == task_id
    clock.advance(1 + LEASE_GRACE + 5)
    assert worker_side.dequeue("w2") is None, "a worker's claim leaves expired leases alone"
    house = Housekeeping(db, config, Log())
    house.expire_leases()  # real time is far past the fake clock's lease
    assert worker_side.get_task(task_id).state == "queued"
    assert house.healthy()


def test_a_database_file_replaced_under_the_daemon_stops_it(db, config):
    house = Housekeeping(db, config, Log())
    os.replace(db.path, db.path.with_name("moved.db"))
    house.run_due()
    assert house.failure and "was removed or replaced" in house.failure
