"""The scaling policy (injected clock and pressure probe) and the shared breaker storage."""
from __future__ import annotations

import time

import pybreaker
import pytest

from helpers import breaker as breakers
from helpers.queue_manager import QueueManager
from helpers.registry import REGISTRY, PermanentError, TaskModuleError, load_task_modules
from helpers.resource_manager import ResourceManager
from helpers.tasks import task


class Machine:
    def __init__(self):
        self.memory, self.load = 30.0, 0.5

    def __call__(self):
        return self.memory, self.load


@pytest.fixture
def policy(config, clock):
    machine = Machine()
    rm = ResourceManager(config.replace(workers_min=1, workers_max=5, workers_backlog_per_worker=100,
                                        workers_scale_down_cooldown=30, resources_load_high=4.0,
                                        resources_load_high_seconds=300), clock=clock, probe=machine)
    rm.machine = machine
    return rm


def test_target_follows_ready_depth_within_bounds(policy):
    assert policy.calculate_worker_scaling(current=2, queue_depth=150) == 2
    assert policy.calculate_worker_scaling(current=2, queue_depth=301) == 4
    assert policy.calculate_worker_scaling(current=4, queue_depth=10_000) == 5
    assert "scale up" in policy.decide(1, 250).reason


def test_scale_down_waits_for_the_cooldown(policy, clock):
    assert policy.decide(4, 0).target == 4
    clock.advance(29)
    decision = policy.decide(4, 0)
    assert decision.target == 4 and "cooldown" in decision.reason
    clock.advance(2)
    assert policy.decide(4, 0).target == 1
    # A burst in between resets the cooldown.
    policy.decide(4, 0)
    clock.advance(20)
    policy.decide(4, 400)
    clock.advance(20)
    assert policy.decide(4, 0).target == 4


def test_memory_pressure_blocks_growth(policy):
    policy.machine.memory = 90.0
    decision = policy.decide(2, 10_000)
    assert decision.target == 2 and "no growth" in decision.reason
    assert policy.check_memory_pressure().memory_high


def test_sustained_load_lowers_the_ceiling(policy, clock):
    policy.machine.load = 6.0
    assert policy.decide(4, 10_000).target == 5  # not yet sustained
    clock.advance(301)
    decision = policy.decide(5, 10_000)
    assert decision.target == 4 and "load 6.0" in decision.reason
    policy.machine.load = 1.0
    assert policy.decide(4, 10_000).target == 5


def test_cleanup_disk_space_reports_usage(policy, config):
    report = policy.cleanup_disk_space(config.data_dir)
    assert 0 <= report["percent_used"] <= 100 and report["free_bytes"] > 0


def test_breaker_state_is_shared_and_survives_new_instances(db, config):
    first = breakers.queue_breaker(db, "q", fail_max=2, reset_timeout=60)
    second = breakers.queue_breaker(db, "q", fail_max=2, reset_timeout=60)

    def fail():
        raise RuntimeError("down")

    for b in (first, second):
        with pytest.raises(RuntimeError):
            b.call(fail)
    assert breakers.status(db, "q")["state"] == "open"
    assert breakers.may_claim(first) == 0
    third = breakers.queue_breaker(db, "q", fail_max=2, reset_timeout=60)  # "after a restart"
    with pytest.raises(pybreaker.CircuitBreakerError):
        third.call(lambda: "x")
    opened = breakers.status(db, "q")["opened_at"]
    assert breakers.may_claim(third, now=opened + 61) == 1
    breakers.reset(db, "q")
    assert breakers.status(db, "q") == {"queue": "q", "state": "closed", "fail_counter": 0, "opened_at": None}
    assert third.call(lambda: "x") == "x" and breakers.may_claim(third) is None


def test_of_several_workers_asking_at_once_exactly_one_gets_the_trial(db):
    workers = [breakers.queue_breaker(db, "q", fail_max=1, reset_timeout=60) for _ in range(4)]
    with pytest.raises(RuntimeError):
        workers[0].call(_raise)
    opened = breakers.status(db, "q")["opened_at"]
    assert [breakers.may_claim(b, now=opened + 61) for b in workers] == [1, 0, 0, 0]
    assert breakers.status(db, "q")["state"] == "half-open"
    assert [breakers.may_claim(b, now=opened + 100) for b in workers] == [0, 0, 0, 0]
    assert [breakers.may_claim(b, now=opened + 121) for b in workers] == [1, 0, 0, 0], "a lost trial is retaken once"
    assert [breakers.may_claim(b, now=opened + 150) for b in workers] == [0, 0, 0, 0]


def _raise():
    raise RuntimeError("down")


@pytest.mark.both_engines
def test_a_claim_given_its_breaker_takes_nothing_once_another_worker_opened_it(db, config):
    """A worker whose view of the breaker (under BATCH_VIEW old) says closed claims without
    reading it first; the claim's own statement reads it, so another worker's trip stops it."""
    queue = QueueManager("q", db, config)
    queue.enqueue("noop", 1)
    mine = breakers.queue_breaker(db, "q", fail_max=1, reset_timeout=60)
    other = breakers.queue_breaker(db, "q", fail_max=1, reset_timeout=60)
    assert breakers.may_claim(mine) is None  # read: closed
    with pytest.raises(RuntimeError):
        other.call(_raise)  # opened by the other worker
    assert breakers.may_claim(mine) is None, "the view serves: no read"
    assert queue.dequeue_batch("w1", 10, breaker=mine.name) == []
    breakers.look_again(mine)  # what the worker does after a claim that found nothing
    assert breakers.may_claim(mine) == 0
    assert [t.task_data for t in queue.dequeue_batch("w2", 10)] == [1], "a claim given no breaker ignores it"


def test_task_decorator_registers_and_enqueues_with_its_defaults(config, monkeypatch):
    monkeypatch.setenv("OOS_DATA_DIR", str(config.data_dir))

    @task("unit_resize", queue="images", max_attempts=7, timeout=42)
    def resize(payload):
        return payload

    try:
        task_id = resize.enqueue({"path": "a.png"})
        from helpers.queue_manager import get_queue_manager
        stored = get_queue_manager("images").get_task(task_id)
        assert (stored.name, stored.queue, stored.max_attempts, stored.timeout) == ("unit_resize", "images", 7, 42)
        with pytest.raises(ValueError, match="already registered"):
            task("unit_resize")(lambda p: p)
    finally:
        REGISTRY.pop("unit_resize", None)


@pytest.mark.parametrize("options, message", [
    (dict(max_attempts=0), "max_attempts: must be >= 1"),
    (dict(max_attempts=2.5), "max_attempts: expected an integer"),
    (dict(timeout=30 * 86_400), "timeout: must be <= 604800"),
    (dict(name="x" * 201), "task: expected a non-empty name of at most 200"),  # could never be enqueued
])
def test_a_bad_task_option_fails_where_the_handler_is_declared(options, message):
    with pytest.raises(ValueError, match=message):
        task(**{"name": "unit_bad_option", **options})


def test_a_broken_module_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "broken_tasks.py").write_text("raise RuntimeError('bad\\nconfig')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TaskModuleError) as info:
        load_task_modules(["broken_tasks"])
    assert str(info.value) == "cannot import task module 'broken_tasks': RuntimeError: bad config"


@pytest.mark.both_engines
def test_a_call_under_a_quiet_view_counts_failures_as_pybreaker_would(db):
    """breakers.call runs the handler bare while the view says closed with nothing counted;
    its failures still reach the breaker: counted, excluded, opening it with the own error."""
    breaker = breakers.queue_breaker(db, "q", fail_max=2, reset_timeout=60)
    assert breakers.may_claim(breaker) is None and breaker._state_storage.quiet_view()
    assert breakers.call(breaker, lambda x: x + 1, 1) == 2
    with pytest.raises(PermanentError):
        breakers.call(breaker, _raise_permanent)
    assert breakers.status(db, "q")["fail_counter"] == 0, "a PermanentError does not count"
    with pytest.raises(RuntimeError, match="down"):
        breakers.call(breaker, _raise)
    assert breakers.status(db, "q")["fail_counter"] == 1 and not breaker._state_storage.quiet_view()
    assert breakers.call(breaker, lambda: "ok") == "ok"
    assert breakers.status(db, "q")["fail_counter"] == 0, "a success after a failure resets the count"
    for _ in range(2):
        with pytest.raises(RuntimeError, match="down"):
            breakers.call(breaker, _raise)
    assert breakers.status(db, "q")["state"] == "open"


@pytest.mark.both_engines
def test_a_failure_after_another_worker_opened_the_breaker_is_still_the_handlers_error(db):
    mine = breakers.queue_breaker(db, "q", fail_max=1, reset_timeout=60)
    assert breakers.may_claim(mine) is None  # quiet view
    with pytest.raises(RuntimeError):
        breakers.queue_breaker(db, "q", fail_max=1, reset_timeout=60).call(_raise)
    with pytest.raises(RuntimeError, match="down"):  # its view still says closed and quiet
        breakers.call(mine, _raise)
    assert breakers.status(db, "q")["state"] == "open"


def _raise_permanent():
    raise PermanentError("bad input")


@pytest.mark.both_engines
def test_a_long_handler_that_fails_after_its_view_ran_out_and_the_breaker_opened_raises_its_own_error(db):
    """The view was quiet when the handler started; by its failure the view is gone and the row
    reads open, where pybreaker would raise its own CircuitBreakerError: the handler's error is
    what the worker records (the breaker was opened by others; this failure is not counted)."""
    mine = breakers.queue_breaker(db, "q", fail_max=1, reset_timeout=60)
    mine._state_storage.hold(0.2)  # a quiet view, shorter than the handler
    assert mine._state_storage.quiet_view()
    other = breakers.queue_breaker(db, "q", fail_max=1, reset_timeout=60)

    def slow_failure():
        with pytest.raises(RuntimeError):
            other.call(_raise)  # opened meanwhile by another worker
        time.sleep(0.3)
        raise RuntimeError("down, mine")

    with pytest.raises(RuntimeError, match="down, mine"):
        breakers.call(mine, slow_failure)
    assert breakers.status(db, "q")["fail_counter"] == 1, "the other worker's failure only"
