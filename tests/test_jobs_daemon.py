"""The job features through the real daemon and its worker processes, on both engines: a
handler's context (progress, heartbeat), cancelling running tasks (cooperatively and by
force, and by replacing a worker deaf to the interrupt), workflows, a rate limit and a concurrency limit, periodic tasks from code and config."""
from __future__ import annotations

import time

import psutil
import pytest

import tests.tasks.jobs  # noqa: F401 - the handlers' defaults (timeouts) apply to what we enqueue
from helpers import bulk, exit_codes, limits, periodic, reports, task_metrics, worker_requests, workflow
from helpers.process import pid_of, worker_id
from helpers.queue_manager import QueueManager, cancel_task, wait
from helpers.workflow import chain, chord, step
from tests.daemon import Daemon, wait_for

pytestmark = pytest.mark.both_engines


def notes(tmp_path) -> list[list[str]]:
    path = tmp_path / "executions.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_job_features_in_the_daemon(data_dir, tmp_path, db, config, subprocess_env):
    (data_dir / "oos.toml").write_text('[schedules.cfgtick]\ntask = "noop"\nevery = 1\nqueue = "ticks"\n'
                                       '[concurrency]\nnarrow = 1\n')
    env = {k: v for k, v in subprocess_env.items() if k == "OOS_DATABASE_URL"}
    d = Daemon(data_dir, tmp_path, env=dict(env, OOS_TASK_MODULES="tests.tasks.sample,tests.tasks.jobs",
                                            OOS_WORKERS_MIN="4", OOS_WORKERS_MAX="4",
                                            OOS_WORKERS_QUEUES="default,narrow,ticks",
                                            OOS_WORKERS_CANCEL_GRACE="1")).start()
    try:
        queue = QueueManager("default", db, config)
        deaf = queue.enqueue("jobs.deaf", {"n": 1}, max_attempts=5)  # checked at the end: it takes ~11 s
        wait_for(lambda: queue.get_task(deaf).state == "running", 30, what="the deaf task to run")
        assert cancel_task(db, deaf) == "cancelling"
        # A context: progress stored, heartbeats carry it past its 3 s timeout.
        long = queue.enqueue("jobs.steps", {"steps": 8})
        assert long.result(timeout=60) == {"steps": 8, "attempt": 1}
        done = queue.get_task(long)
        assert (done.progress, done.progress_message) == (1.0, "step 8")

        # Cancel: cooperative, and forced after the grace; neither is retried.
        polite = queue.enqueue("jobs.steps", {"steps": 1000, "pause": 0.05})
        stubborn = queue.enqueue("jobs.stubborn", {"n": 1})
        wait_for(lambda: queue.get_task(polite).state == "running" and queue.get_task(stubborn).state == "running",
                 30, what="both to run")
        assert cancel_task(db, polite) == "cancelling" and cancel_task(db, stubborn) == "cancelling"
        for task_id in (polite, stubborn):
            assert wait(db, task_id, 60).state == "cancelled"
            assert queue.get_task(task_id).attempts == 1
        assert "cancelled: interrupted 1 s after the cancel" in queue.get_task(stubborn).last_error

        # Workflows: a chain passes results along; a chord calls back with the list.
        flow = workflow.submit(db, chain(step("jobs.add", 0), step("jobs.add"), step("jobs.add")), config)
        assert queue.get_task(flow["ids"][-1]) and wait(db, flow["ids"][-1], 60).result == 3
        joined = workflow.submit(db, chord([step("jobs.add", i) for i in range(4)], step("jobs.sum")), config)
        assert wait(db, joined["ids"][-1], 60).result == 1 + 2 + 3 + 4

        # A rate limit of 5/s (from @task): 15 runs take at least 2 s after the burst of 5.
        mails = [e.id for e in queue.enqueue_many([{"task": "jobs.mail", "payload": i} for i in range(15)])]
        for task_id in mails:
            assert wait(db, task_id, 60).state == "succeeded"
        sent = sorted(float(n[3]) for n in notes(tmp_path) if n[0] == "mail")
        assert len(sent) == 15 and sent[-1] - sent[0] >= 1.9
        assert all(queue.get_task(i).attempts == 1 for i in mails)  # waiting is not an attempt
        assert limits.rate_limits(db) == {"jobs.mail": "5/s"}

        # A concurrency limit of 1 (from the config) with 4 workers: the runs never overlap.
        narrow = QueueManager("narrow", db, config)
        for task_id in [narrow.enqueue("jobs.narrow", i) for i in range(5)]:
            assert wait(db, task_id, 60).state == "succeeded"
        events = sorted((float(n[3]), n[0]) for n in notes(tmp_path) if n[0].startswith("narrow"))
        running = 0
        for _, kind in events:
            running += 1 if kind == "narrow-start" else -1
            assert running <= 1

        # The deaf handler: its worker was replaced cancel_grace + 10 s after the cancel.
        assert wait(db, deaf, 60).state == "cancelled" and queue.get_task(deaf).attempts == 1
        assert "did not stop within workers.cancel_grace = 1 s" in queue.get_task(deaf).last_error

        # Periodic tasks, from code and from config: one task per slot.
        wait_for(lambda: len(db.execute("SELECT id FROM tasks WHERE queue = 'ticks' AND state = 'succeeded'")) >= 4,
                 30, what="a few ticks")
        keys = [r[0] for r in db.execute("SELECT idempotency_key FROM tasks WHERE queue = 'ticks'")]
        assert len(keys) == len(set(keys))
        assert {k.split(":")[1] for k in keys} == {"jobs.tick", "cfgtick"}
        names = {s["name"] for s in periodic.listing(db, periodic.configured(config.replace(
            schedules={"cfgtick": {"task": "noop", "every": 1, "queue": "ticks"}})))}
        assert {"jobs.tick", "cfgtick"} <= names
        assert d.stop() == 0  # the workers write their counts as they stop
        # Per task name: a cancelled run is not its handler's failure; "jobs.steps" ran twice.
        by_task = {m["task"]: m for m in task_metrics.summary(db, time.time() - 3600)}
        assert (by_task["jobs.steps"]["runs"], by_task["jobs.steps"]["failures"]) == (2, 0)
        assert (by_task["jobs.stubborn"]["runs"], by_task["jobs.stubborn"]["failures"]) == (1, 0)  # interrupted
        # No worker died of an exception (a claimed batch its rate limit sent back whole
        # divided by zero in the worker's batch sizing: exit code 1, its counts lost).
        assert not [e for e in d.logs() if e.get("event") == "worker exited" and e.get("exit_code") == 1]
    finally:
        d.cleanup()


def test_bad_limits_and_schedules_in_the_config_stop_the_daemon_with_one_line(data_dir, tmp_path, subprocess_env):
    env = {k: v for k, v in subprocess_env.items() if k == "OOS_DATABASE_URL"}
    for case, (toml, message) in enumerate((('[schedules.bad]\ntask = "noop"\ncron = "99 * * * *"\n', "schedules.bad.cron"),
                          ("[concurrency]\ndefault = -2\n", "concurrency.default"))):
        (data_dir / "oos.toml").write_text(toml)
        (tmp_path / str(case)).mkdir()
        d = Daemon(data_dir, tmp_path / str(case), env=env).start(wait_ready=False)
        try:
            assert d.proc.wait(60) == exit_codes.CONFIG
            assert message in d.logs_text()
        finally:
            d.cleanup()


def test_the_dashboards_requests_through_the_daemon_drain_stop_and_replay_all(data_dir, tmp_path, db, config,
                                                                             subprocess_env):
    """What the dashboard's buttons ask, carried out by a real daemon: drain a worker (it
    finishes its task and a new one takes its place), stop one (killed now; its task is a failed
    attempt and runs again), and replay every matching dead task as a background task."""
    env = {k: v for k, v in subprocess_env.items() if k == "OOS_DATABASE_URL"}
    d = Daemon(data_dir, tmp_path, env=dict(env, OOS_TASK_MODULES="tests.tasks.sample,tests.tasks.jobs",
                                            OOS_WORKERS_MIN="2", OOS_WORKERS_MAX="2")).start()
    try:
        queue = QueueManager("default", db, config)
        wait_for(lambda: len(reports.daemon_status(db, config)["workers"]) == 2, 30, what="two workers reported")
        busy = queue.enqueue("jobs.steps", {"steps": 40, "pause": 0.1})
        wait_for(lambda: queue.get_task(busy).state == "running", 30, what="the task to run")
        holder = pid_of(queue.get_task(busy).worker)
        worker_requests.ask(db, worker_id(holder), "drain")
        assert wait(db, busy, 60).state == "succeeded" and queue.get_task(busy).attempts == 1
        wait_for(lambda: not psutil.pid_exists(holder) or psutil.Process(holder).status() == psutil.STATUS_ZOMBIE,
                 30, what="the drained worker to exit")
        wait_for(lambda: len(d.workers()) == 2, 30, what="a new worker in its place")

        stopped = queue.enqueue("jobs.steps", {"steps": 40, "pause": 0.1})
        wait_for(lambda: queue.get_task(stopped).state == "running", 30, what="the task to run")
        worker_requests.ask(db, queue.get_task(stopped).worker, "stop")
        assert wait(db, stopped, 90).state == "succeeded"
        task = queue.get_task(stopped)
        assert task.attempts == 2 and "stopped from the dashboard" in task.errors[0]["error"]
        assert db.execute("SELECT count(*) FROM worker_requests")[0][0] == 0

        marker = tmp_path / "marker"
        dead = [queue.enqueue("jobs.needs_file", {"path": str(marker), "n": i}) for i in range(5)]
        wait_for(lambda: all(queue.get_task(i).state == "dead" for i in dead), 30, what="the tasks to die")
        marker.write_text("here")
        job = bulk.request(db, "retry", name="jobs.needs_file")
        assert job.result(timeout=60) == {"action": "retry", "done": 5, "total": 5}
        assert all(wait(db, i, 60).state == "succeeded" for i in dead)
    finally:
        d.cleanup()
