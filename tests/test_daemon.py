"""The real daemon: processes, signals, sd_notify, scaling, chaos. No sleeps to wait: polls.
Tests marked both_engines run again with the daemon on a PostgreSQL server."""
from __future__ import annotations

import collections
import random
import signal
import subprocess
import sys
import time

import pytest

import tests.tasks.sample  # noqa: F401 - like an app importing its tasks: their @task defaults apply
from helpers import breaker as breakers
from helpers import workflow
from helpers.exit_codes import CRASH_LOOP as RET_CRASH_LOOP
from helpers.exit_codes import IMPORT as RET_IMPORT
from helpers.queue_manager import QueueManager, wait
from helpers.workflow import chain, step
from tests.daemon import ROOT, Daemon, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def daemon_factory(data_dir, tmp_path, database_url):
    made = []

    def make(env=None, **kwargs):
        if database_url:
            env = dict(env or {}, OOS_DATABASE_URL=database_url)
        d = Daemon(data_dir, tmp_path, env=env, **kwargs)
        made.append(d)
        return d

    yield make
    for d in made:
        d.cleanup()


def states(db, queue: str | None = None) -> dict:
    if queue:
        return {r[0]: r[1] for r in db.execute("SELECT state, count(*) FROM tasks WHERE queue = ? GROUP BY state",
                                               (queue,))}
    return {r[0]: r[1] for r in db.execute("SELECT state, count(*) FROM tasks GROUP BY state")}


def sleepy_done(db) -> int:
    return db.execute("SELECT count(*) FROM tasks WHERE name = 'sleepy' AND state = 'succeeded'")[0][0]


def executions(tmp_path) -> collections.Counter:
    path = tmp_path / "executions.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return collections.Counter(line.split()[0] + " " + line.split()[1] for line in lines)


def test_ready_after_workers_then_watchdog_then_stopping(daemon_factory, db, config):
    d = daemon_factory(env={"OOS_WORKERS_MIN": "2", "OOS_LOG_METRICS_INTERVAL": "0.5", "OOS_LOG_LEVEL": "debug"},
                       watchdog_usec=1_000_000).start()
    lines = d.notify.lines()
    ready = lines.index("READY=1")
    assert any(line.startswith("STATUS=starting") for line in lines[:ready])
    assert len(d.workers()) == 2, "both workers run when READY is sent"
    first = d.notify.times("WATCHDOG=1")
    wait_for(lambda: len(d.notify.times("WATCHDOG=1")) >= len(first) + 4, 10, what="watchdog pings")
    pings = d.notify.times("WATCHDOG=1")[-4:]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert all(0.2 < g < 1.5 for g in gaps), f"pings about every half WATCHDOG_USEC (0.5 s), got {gaps}"
    task_id = QueueManager("default", db, config).enqueue("noop", {"n": 1})
    wait_for(lambda: QueueManager("default", db, config).get_task(task_id).state == "succeeded", 30)
    assert d.stop() == 0
    assert "STOPPING=1" in d.notify.lines()
    assert d.workers() == []
    metrics = [e for e in d.logs() if e.get("event") == "metrics"]
    assert metrics and {"memory_percent", "cpu_percent", "load1", "queue_ready", "workers_desired", "workers_actual",
                        "breakers"} <= set(metrics[0])
    done = [e for e in d.logs() if e.get("event") == "task succeeded"]
    assert done and {"task_id", "queue", "worker", "attempt", "duration"} <= set(done[0])


def test_a_frozen_manager_stops_sending_watchdog(daemon_factory):
    d = daemon_factory(watchdog_usec=400_000).start()
    wait_for(lambda: len(d.notify.times("WATCHDOG=1")) >= 2, 10, what="watchdog pings")
    d.signal(signal.SIGSTOP)
    try:
        frozen_at = time.monotonic()
        time.sleep(0.1)  # let a datagram already sent arrive
        count = len(d.notify.times("WATCHDOG=1"))
        wait_for(lambda: time.monotonic() - frozen_at > 1.5, 5, what="time to pass")
        assert len(d.notify.times("WATCHDOG=1")) == count, "no ping while the loop is frozen"
    finally:
        d.signal(signal.SIGCONT)
    wait_for(lambda: len(d.notify.times("WATCHDOG=1")) > count, 10, what="pings after SIGCONT")


@pytest.mark.both_engines
def test_chaos_sigkill_workers_and_the_manager_loses_nothing(daemon_factory, db, config, tmp_path):
    """2000 tasks among 40 poison ones (2 %, always failing, 3 attempts), 40 three-step workflows
    and a periodic task every second, while workers and the manager are SIGKILLed: every healthy
    task and step succeeds within 2 minutes of the last kill (the poison never holds them back
    behind the queue's breaker), each chain's result went from step to step, and no periodic
    slot was enqueued twice."""
    queue = QueueManager("default", db, config)
    specs = [{"task": "sleepy", "payload": {"n": i, "seconds": 0.02}, "max_attempts": 20} for i in range(2000)]
    for i in range(40):
        specs.insert(i * 51, {"task": "poison", "max_attempts": 3})
    enqueued = [e.id for e in queue.enqueue_many(specs)]
    ids = [i for i, spec in zip(enqueued, specs) if spec["task"] == "sleepy"]
    flows = [workflow.submit(db, chain(step("jobs.add", 0), step("jobs.add"), step("jobs.add")), config)
             for _ in range(40)]
    d = daemon_factory(env={"OOS_WORKERS_MIN": "3", "OOS_WORKERS_MAX": "3", "OOS_WORKERS_BATCH_SIZE": "5",
                            "OOS_TASK_MODULES": "tests.tasks.sample,tests.tasks.jobs"}).start()
    rng = random.Random(1234)
    kills, manager_killed, done_at_last_kill = 0, False, -1
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        done = sleepy_done(db)
        if done == 2000:
            break
        # Kill only once the workers made some progress since the last kill, so a slow
        # machine still finishes; on a fast one this is every 0.4 s.
        workers = [w for w in d.workers() if time.time() - w.create_time() > 2.0]
        if workers and done >= done_at_last_kill + 40:
            done_at_last_kill = done
            try:
                rng.choice(workers).send_signal(signal.SIGKILL)
                kills += 1
            except Exception:
                pass
        if not manager_killed and done > 600:
            d.signal(signal.SIGKILL)
            d.proc.wait(10)
            manager_killed = True
            d.start()
        time.sleep(0.4)
    assert manager_killed and kills >= 5
    wait_for(lambda: sleepy_done(db) == 2000, 120, what="every task to succeed")
    for flow in flows:
        last = wait(db, flow["ids"][-1], 60)
        assert last.result == 3 and workflow.status(db, flow["workflow"])["state"] == "succeeded"
    wait_for(lambda: states(db, "default").get("dead") == 40, 60, what="the poison to be dead-lettered")
    assert states(db, "default") == {"succeeded": 2000 + 3 * len(flows), "dead": 40}  # the chains run there too
    # A task ran twice only if a worker died holding it, which shows as a second attempt.
    runs = executions(tmp_path)
    attempts = {r[0]: r[1] for r in db.execute("SELECT id, attempts FROM tasks")}
    for n in range(2000):
        count = runs[f"sleepy-start {n}"]
        assert count >= 1
        if count > 1:
            assert attempts[ids[n]] > 1, f"task {n} ran {count} times on a single attempt"
    ticks = db.execute("SELECT id, idempotency_key FROM tasks WHERE queue = 'ticks'")
    slots = [r["idempotency_key"] for r in ticks]
    assert len(ticks) >= 5 and len(slots) == len(set(slots))
    for r in ticks:
        assert runs[f"tick {r['id']}"] <= 1 or attempts[r["id"]] > 1
    assert d.stop() == 0


@pytest.mark.both_engines
def test_scaling_grows_to_the_ceiling_and_shrinks_without_killing_busy_workers(daemon_factory, db, config, tmp_path):
    queue = QueueManager("default", db, config)
    queue.enqueue_many([{"task": "sleepy", "payload": {"n": i, "seconds": 0.2}} for i in range(150)])
    d = daemon_factory(env={"OOS_WORKERS_MIN": "1", "OOS_WORKERS_MAX": "4",
                            "OOS_WORKERS_BACKLOG_PER_WORKER": "10",
                            "OOS_WORKERS_SCALE_DOWN_COOLDOWN": "1"}).start()
    wait_for(lambda: len(d.workers()) == 4, 30, what="4 workers")
    wait_for(lambda: states(db) == {"succeeded": 150}, 120, what="the burst to finish")
    wait_for(lambda: len(d.workers()) == 1, 30, what="scale down to 1")
    runs = executions(tmp_path)
    started = sum(c for k, c in runs.items() if k.startswith("sleepy-start"))
    ended = sum(c for k, c in runs.items() if k.startswith("sleepy-end"))
    assert started == ended == 150, "no running task was cut by scale-down"
    assert [tuple(r) for r in db.execute("SELECT DISTINCT attempts FROM tasks")] == [(1,)]
    decisions = [e for e in d.logs() if e.get("event") == "scaling"]
    assert any("scale up" in e["reason"] for e in decisions)
    assert any("scale down" in e["reason"] for e in decisions)


@pytest.mark.both_engines
def test_sigterm_lets_running_tasks_finish(daemon_factory, db, config, tmp_path):
    queue = QueueManager("default", db, config)
    queue.enqueue_many([{"task": "sleepy", "payload": {"n": i, "seconds": 1.5}} for i in range(2)])
    d = daemon_factory(env={"OOS_WORKERS_MIN": "2", "OOS_WORKERS_MAX": "2"}).start()
    wait_for(lambda: sum(c for k, c in executions(tmp_path).items() if k.startswith("sleepy-start")) == 2,
             30, what="both tasks to start")
    assert d.stop() == 0
    assert states(db) == {"succeeded": 2}


@pytest.mark.both_engines
def test_sigterm_past_the_stop_timeout_counts_the_cut_run_as_an_attempt(daemon_factory, db, config, tmp_path):
    queue = QueueManager("default", db, config)
    ids = [e.id for e in queue.enqueue_many([{"task": "sleepy", "payload": {"n": i, "seconds": 60}}
                                             for i in range(2)])]
    d = daemon_factory(env={"OOS_WORKERS_MIN": "2", "OOS_WORKERS_MAX": "2",
                            "OOS_WORKERS_STOP_TIMEOUT": "1"}).start()
    wait_for(lambda: sum(c for k, c in executions(tmp_path).items() if k.startswith("sleepy-start")) == 2,
             30, what="both tasks to start")
    started = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - started < 20
    assert states(db) == {"queued": 2}
    for task in map(queue.get_task, ids):  # a run cut short is an attempt, with its reason
        assert task.attempts == 1 and task.last_error == "killed at shutdown: still running 1 s after the stop request"
    assert d.workers() == []


@pytest.mark.both_engines
def test_timeouts_unknown_tasks_and_failures_end_in_the_dead_letter(daemon_factory, db, config):
    queue = QueueManager("default", db, config)
    slow = queue.enqueue("too_slow", None, max_attempts=2)
    unknown = queue.enqueue("no_such_task", None)
    failing = queue.enqueue("boom", None, max_attempts=1)
    permanent = queue.enqueue("bad_input", None, max_attempts=5)
    daemon_factory().start()
    wait_for(lambda: all(queue.get_task(i).state == "dead" for i in (slow, unknown, failing, permanent)), 60,
             what="four dead tasks")
    assert queue.get_task(permanent).attempts == 1 and queue.get_task(permanent).last_error == "payload: missing 'path'"
    assert queue.get_task(slow).last_error == "timed out after 0.5 s"
    assert queue.get_task(slow).attempts == 2
    assert queue.get_task(unknown).last_error == "no handler registered for task 'no_such_task'"
    assert queue.get_task(unknown).attempts == 1
    assert queue.get_task(failing).last_error.startswith("ValueError: always fails")


@pytest.mark.both_engines
def test_breaker_opens_stops_claiming_half_opens_and_closes(daemon_factory, db, config, tmp_path):
    gate = tmp_path / "downstream-is-down"
    gate.write_text("x")
    flaky = QueueManager("flaky", db, config)
    ids = [flaky.enqueue("flaky", {"n": i, "fail_while": str(gate)}) for i in range(20)]
    d = daemon_factory(env={"OOS_BREAKER_FAIL_MAX": "3", "OOS_BREAKER_RESET_TIMEOUT": "2",
                            "OOS_QUEUE_BACKOFF_JITTER": "0"}).start()
    wait_for(lambda: breakers.status(db, "flaky")["state"] == "open", 30, what="the breaker to open")
    runs_when_open = sum(executions(tmp_path).values())
    first_opened = breakers.status(db, "flaky")["opened_at"]
    # Other queues keep flowing while this one is blocked.
    echo = QueueManager("echo", db, config)
    echo_id = echo.enqueue("echo", {"hello": 1})
    wait_for(lambda: echo.get_task(echo_id).state == "succeeded", 30, what="the echo queue to flow")
    assert sum(executions(tmp_path).values()) == runs_when_open, "nothing claimed while open"
    attempts_used = sum(flaky.get_task(i).attempts for i in ids)
    assert attempts_used == runs_when_open <= 4
    # Half-open: after the reset timeout one trial runs; it fails, the breaker opens again.
    # (pybreaker writes the new opened_at and the state one after the other: wait for both.)
    wait_for(lambda: (b := breakers.status(db, "flaky"))["opened_at"] > first_opened and b["state"] == "open", 30,
             what="a failed trial to open the breaker again")
    assert sum(executions(tmp_path).values()) == runs_when_open + 1, "exactly one trial task ran"
    gate.unlink()
    wait_for(lambda: all(flaky.get_task(i).state == "succeeded" for i in ids), 60, what="recovery")
    assert breakers.status(db, "flaky")["state"] == "closed"
    assert d.stop() == 0


def test_a_broken_task_module_stops_start_up_with_a_named_code(data_dir, subprocess_env):
    env = dict(subprocess_env, OOS_TASK_MODULES="tests.tasks.no_such_module")
    proc = subprocess.run([sys.executable, str(ROOT / "oos_service_manager.py")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == RET_IMPORT
    assert "oos: cannot import task module 'tests.tasks.no_such_module': ModuleNotFoundError" in proc.stderr


def test_a_sigkilled_manager_takes_its_fork_server_and_workers_with_it(daemon_factory):
    """Workers are forked by the daemon's fork server, whose "alive" pipe they hold open too:
    it must still die with the manager, and they with it, leaving no process behind."""
    import psutil
    d = daemon_factory(env={"OOS_WORKERS_MIN": "2"}).start()
    manager = psutil.Process(d.proc.pid)
    left = [p for p in manager.children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())]
    assert any("forkserver" in " ".join(p.cmdline()) for p in left) and len(d.workers()) == 2
    manager.kill()
    d.proc.wait(10)
    wait_for(lambda: not [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], 20,
             what="the fork server and the workers to exit")


def test_workers_that_die_at_start_stop_the_daemon(daemon_factory):
    d = daemon_factory(env={"OOS_TASK_MODULES": "tests.tasks.sample,tests.tasks.crash_in_worker"})
    d.start(wait_ready=False)
    d.proc.wait(60)
    assert d.proc.returncode == RET_CRASH_LOOP
    assert any(e.get("event") == "stopping the daemon" for e in d.logs())


def test_sigttin_and_sigttou_move_the_target_by_one(daemon_factory):
    d = daemon_factory(env={"OOS_WORKERS_MIN": "1", "OOS_WORKERS_MAX": "3"}).start()
    wait_for(lambda: len(d.workers()) == 1, 20, what="1 worker")
    d.signal(signal.SIGTTIN)
    wait_for(lambda: len(d.workers()) == 2, 20, what="2 workers")
    d.signal(signal.SIGTTOU)
    wait_for(lambda: len(d.workers()) == 1, 20, what="back to 1 worker")


def test_sighup_reloads_and_replaces_workers(daemon_factory, data_dir):
    d = daemon_factory().start()
    before = {p.pid for p in wait_for(d.workers, 20, what="a worker")}
    d.notify.messages.clear()
    d.signal(signal.SIGHUP)
    wait_for(lambda: "RELOADING=1" in d.notify.lines() and "READY=1" in d.notify.lines(), 20, what="reload")
    wait_for(lambda: {p.pid for p in d.workers()} and not ({p.pid for p in d.workers()} & before), 30,
             what="fresh workers")


def test_workers_are_recycled_after_their_task_limit(daemon_factory, db, config):
    queue = QueueManager("default", db, config)
    ids = [e.id for e in queue.enqueue_many([{"task": "noop", "payload": {"n": i}} for i in range(30)])]
    d = daemon_factory(env={"OOS_WORKERS_MAX_TASKS_PER_CHILD": "5", "OOS_WORKERS_MIN": "1",
                            "OOS_WORKERS_MAX": "1"}).start()
    wait_for(lambda: all(queue.get_task(i).state == "succeeded" for i in ids), 60, what="all tasks")
    recycled = [e for e in d.logs() if e.get("event") == "recycling: task limit reached"]
    assert len(recycled) >= 5 and all(r["tasks_done"] == 5 for r in recycled)
    assert len({r["worker"] for r in recycled}) == len(recycled), "each worker recycled once, then replaced"
    assert [tuple(r) for r in db.execute("SELECT DISTINCT attempts FROM tasks")] == [(1,)]
