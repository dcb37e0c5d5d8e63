"""A worker process: claim tasks, run their handlers, record the outcome.

The manager starts each worker in its own process (a crashed or hung handler cannot take the
daemon down) and watches it through a shared-memory slot (``Slots``): pid, heartbeat, the task
it runs and that task's deadline. SIGTERM asks the worker to finish its current task, give
back the tasks it claimed but did not start, and exit.
"""
from __future__ import annotations

import functools
import math
import os
import random
import signal
import threading
import time
import traceback
from typing import Any

import psutil
import pybreaker
from prometheus_client import Histogram

from helpers import breaker as breakers
from helpers import exit_codes, limits, log, workflow
from helpers.config import Config
from helpers.engine import DATABASE_ERRORS, get_database
from helpers.process import die_with_parent, leave, worker_id
from helpers.queue_manager import LEASE_GRACE, QueueManager, Task, cancel_requested, set_progress
from helpers.registry import (
    PermanentError,
    TaskCancelled,
    TaskContext,
    TaskSpec,
    TaskTimeout,
    handler_for,
    load_task_modules,
    registered_queues,
)
from helpers.task_metrics import Batched, Tally

# idle: when the worker last found nothing to claim (0 while it has work), so the manager
# stops the longest-idle worker when it scales down. Every time in a slot is time.monotonic()
# (one clock for the host's processes, which an NTP step of the wall clock does not move): a
# step must not make a running task look overdue, nor a hung one look fresh.
FIELDS = ("pid", "beat", "task", "deadline", "done", "rss_mb", "started", "idle", "task_since")
_OFFSET = {name: i for i, name in enumerate(FIELDS)}
# Observed per task, added to the (multiprocess) histograms at each flush, before the commit.
TASK_DURATION = Batched(Histogram("oos_task_duration_seconds", "Handler run time", ["queue", "task", "outcome"],
                                  buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800)))
TASK_WAIT = Batched(Histogram("oos_task_queue_wait_seconds", "From when a task was due to its handler's start",
                              ["queue", "task"], buckets=(0.001, 0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 3600)))
FLUSH_AFTER = 0.02  # seconds a finished task's result may wait to share a commit
SLOW_TASK = 0.01  # seconds: tasks slower than this are claimed one at a time
# Seconds a task may run before the watcher records the batch's finished results and hands
# its unstarted tasks back: no lease of a task held in memory runs out behind a slow one.
HAND_BACK_AFTER = 1.0
# Seconds a queue whose claim found nothing is not claimed from again unless a hint names it:
# a retry's backoff, a delayed task falling due or an enqueue within a hint's debounce sends
# none, so such a task waits at most this long for a busy worker.
RECHECK_EMPTY = 0.05


class Slots:
    """Per-worker status in shared memory: written by one worker, read by the manager."""

    def __init__(self, array, count: int):
        self.array, self.count = array, count

    @classmethod
    def create(cls, ctx, count: int) -> Slots:
        return cls(ctx.Array("d", count * len(FIELDS), lock=False), count)

    def get(self, slot: int) -> dict:
        base = slot * len(FIELDS)
        return dict(zip(FIELDS, self.array[base:base + len(FIELDS)]))

    def set(self, slot: int, **values: float) -> None:
        base = slot * len(FIELDS)
        for name, value in values.items():
            self.array[base + _OFFSET[name]] = value

    def clear(self, slot: int) -> None:
        self.set(slot, **dict.fromkeys(FIELDS, 0.0))


CANCEL_CHECK = 0.5  # seconds between the watcher's looks for a cancel of the running task
TRACEBACK_FRAMES = 20  # the innermost frames of a handler's traceback that are kept


def handler_error(error: BaseException, spec: TaskSpec) -> str:
    """The error a handler raised, as stored: its first line, then its traceback from the
    handler's own frame inward (as Sidekiq and Celery show it), without the worker's and the
    breaker's frames around the call."""
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code is not spec.func.__code__:
        tb = tb.tb_next
    frames = traceback.format_exception(type(error), error, tb or error.__traceback__, limit=-TRACEBACK_FRAMES)
    return f"{type(error).__name__}: {error}\n{''.join(frames)}"


class Worker:
    def __init__(self, config: Config, slot: int, slots: Slots, parent_pid: int):
        self.config, self.slot, self.slots, self.parent_pid = config, slot, slots, parent_pid
        self.id = worker_id()
        self.tally = Tally(self.id)  # per task name, per minute (helpers/task_metrics.py)
        self.stopping = False
        self.in_task = False
        self.done = 0
        # Shared with the watcher thread, under ``lock``: results not yet committed, and the
        # claimed batch's tasks not yet started.
        self.lock = threading.Lock()
        self.pending: list[tuple[QueueManager, int, Any, int]] = []  # queue, id, result, attempt
        self.pending_since = math.inf
        self.unstarted: list[Task] = []
        self.task_began = 0.0  # monotonic start of the running handler, 0 between tasks
        self.running: Task | None = None  # the task whose handler runs now
        self.cancel_seen = 0.0  # monotonic time the watcher saw a cancel of it, 0 if none
        self.cancel_target = 0  # the task the watcher's SIGUSR2 is meant to interrupt
        self.rate_limited: set[str] = set()  # task names with a rate limit, read with the queues
        self.exiting = False
        self.failures = 0  # database errors in a row
        self.claim_size = 1
        self.next_check = 0.0
        self.queues: dict[str, QueueManager] = {}
        self.breakers: dict[str, pybreaker.CircuitBreaker] = {}
        self.trials: set[int] = set()  # tasks claimed as their breaker's half-open trial
        self.empty: dict[str, tuple[int, float]] = {}  # queue -> (its hints, monotonic) at a claim that found nothing
        self.claimed_at = 0.0  # time.monotonic() of the last claim
        self.turn = 0
        self.queues_until = 0.0  # when to look for new queues again
        self.seen_version = 0  # the database's data_version before the last claim
        self.idle = False  # the last claim found nothing
        # Up to 10 % less than the limit, so workers started together are not all replaced at
        # the same moment (gunicorn's max_requests_jitter).
        limit = config.workers_max_tasks_per_child
        self.task_limit = limit - random.Random(os.getpid()).randrange(max(1, limit // 10)) if limit > 10 else limit
        self.log = log.get_logger(worker=self.id)

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        threading.Thread(target=self.watch, name="oos-watch", daemon=True).start()
        while not self.stopping and os.getppid() == self.parent_pid:
            try:
                if not self.work_once():
                    break
                self.failures = 0
            except DATABASE_ERRORS as e:  # a full disk, a lock held too long: pause, then go on
                self.pause(e)
        try:
            self.flush(force=True)
            self.tally.write(get_database(self.config), force=True)
        except DATABASE_ERRORS as e:  # the leases run out and the tasks run again: at least once
            self.log.error("results not recorded at exit", error=f"{type(e).__name__}: {e}")
        self.exiting = True
        self.log.info("worker stopped", tasks_done=self.done)
        return exit_codes.OK

    def work_once(self) -> bool:
        """Claim a batch and run it, or wait for work. False when the worker should recycle."""
        self.beat()
        if self.should_recycle():
            return False
        batch = self.claim()
        if not batch:
            self.flush()
            self.tally.write(get_database(self.config))
            self.slots.set(self.slot, idle=self.slots.get(self.slot)["idle"] or time.monotonic())
            self.wait_for_work()
            return True
        self.slots.set(self.slot, idle=0)
        started = self.claimed_at = time.monotonic()
        batch = self.ration(batch)
        with self.lock:
            self.unstarted = list(batch)
        while (task := self.next_task()) is not None:
            if self.stopping:
                self.release([task, *self.take_unstarted()])
                break
            if self.still_holds(task):
                self.execute(task)
        self.flush(force=True)
        self.tally.write(get_database(self.config))
        if batch:  # a batch its rate limits sent back whole ran nothing to adapt to
            self.adapt(time.monotonic() - started, len(batch))
        return True

    def pause(self, error: Exception) -> None:
        """Back off 0.1, 0.2, ... up to 5 s after a database error; held tasks stay held (their
        results are kept for the next flush, their leases cover the pause)."""
        self.failures += 1
        delay = min(5.0, 0.1 * 2 ** (self.failures - 1))
        if self.failures == 1 or delay == 5.0:
            self.log.warning("database error; pausing", error=f"{type(error).__name__}: {error}",
                             seconds=delay, failures=self.failures)
        deadline = time.monotonic() + delay
        while not self.stopping and time.monotonic() < deadline:
            self.beat()  # paused, not hung
            time.sleep(0.1)

    def claim(self) -> list[Task]:
        """Claim from the next queue, round-robin, that has ready work and an unblocked
        breaker. After a round that found nothing, each queue is first asked by a read: every
        commit, to any queue, wakes an idle worker, and a claim takes SQLite's write lock even
        when it finds nothing (the API's enqueues queued behind idle workers' empty claims)."""
        self.refresh_queues()
        # Read before claiming: a commit after this point, even one landing between an empty
        # claim and the wait, ends wait_for_work at once.
        db = get_database(self.config)
        self.seen_version = db.data_version()
        names = sorted(self.queues)
        for offset in range(len(names)):
            name = names[(self.turn + offset) % len(names)]
            queue = self.queues[name]
            if self.nothing_new(name, db):
                continue
            if self.idle and not queue.has_ready():  # (before the breaker's own read)
                continue
            limit = breakers.may_claim(self.breakers[name])
            if limit == 0:
                continue
            room = self.task_limit - self.done  # recycle on the dot
            tasks = queue.dequeue_batch(self.id, max(1, min(limit or room, self.claim_size, room)), trial=limit == 1,
                                        breaker=None if limit == 1 else self.breakers[name].name)
            if limit == 1:
                self.trials.update(t.id for t in tasks)
            elif not tasks:
                breakers.look_again(self.breakers[name])
            if tasks:
                self.turn = (self.turn + offset + 1) % len(names)
                self.idle = False
                self.empty.pop(name, None)
                return tasks
            if db.capabilities.notifies:
                self.empty[name] = (db.hints(name), time.monotonic())
        self.idle = True
        return []

    def nothing_new(self, name: str, db) -> bool:
        """On an engine whose hints name their queue: the queue's last claim found nothing, no
        hint has named it since, and that was less than RECHECK_EMPTY ago: skip it (on
        PostgreSQL an empty claim and its breaker's read are two round trips, which busy
        workers spent on every idle queue between batches). SQLite's claims are local, and its
        own connection's commits (a handler's enqueue, a step's release) raise no hint."""
        seen = self.empty.get(name)  # (only recorded where hints name queues)
        return seen is not None and time.monotonic() - seen[1] < RECHECK_EMPTY and db.hints(name) == seen[0]

    def ration(self, batch: list[Task]) -> list[Task]:
        """The tasks of the batch its rate limits let run now (one transaction per limited
        name); the others go back to the queue, each due when its token will be."""
        limited: dict[str, list[Task]] = {}
        for task in batch:
            if task.name in self.rate_limited:
                limited.setdefault(task.name, []).append(task)
        if not limited:
            return batch
        later: set[int] = set()
        for name, tasks in limited.items():
            for task, wait in zip(tasks, limits.take(get_database(self.config), name, len(tasks))):
                if wait:
                    self.queues[task.queue].snooze(task, self.id, wait)
                    later.add(task.id)
        return [t for t in batch if t.id not in later]

    def execute(self, task: Task) -> None:
        """Run one task's handler, then record what came of it."""
        spec = handler_for(task.name)
        if spec is None:
            self.flush(force=True)
            self.queues[task.queue].fail_task(task.id, self.id, f"no handler registered for task {task.name!r}",
                                              retry=False, attempt=task.attempts)
            self.log.error("task dead-lettered: no handler", **self.context(task))
            return
        began, waited = time.monotonic(), time.time() - task.run_at
        outcome = self.run_handler(task, spec)
        if outcome is None:  # the breaker opened meanwhile: given back untouched
            self.queues[task.queue].release_task(task.id, self.id, task.attempts)
            return
        self.record(task, *outcome, duration=round(time.monotonic() - began, 6), waited=waited)

    def run_handler(self, task: Task, spec: TaskSpec) -> tuple[Any, str | None, bool, bool] | None:
        """(result, error, retry, handler failed) of one run under the task's timeout and its
        queue's breaker; None if the breaker refused the call.

        The breaker hears a task's first failure only: a task its handler failed before is
        known to fail on its own input, and its retries say nothing new about a dependency, so
        they run beside the breaker (unless this run is the breaker's trial). A PermanentError
        (bad input, said by the handler) never counts."""
        results = workflow.results_for(get_database(self.config), task) if task.workflow is not None else []
        payload = task.task_data
        if results and payload is None:  # a workflow step given no payload gets what came before
            payload = results[0] if len(results) == 1 else results
        context = self.context_for(task, results) if spec.bind or spec.takes_context else None
        self.slots.set(self.slot, task=task.id, deadline=time.monotonic() + task.timeout, task_since=time.monotonic())
        self.running, self.cancel_seen = task, 0.0
        self.task_began = time.monotonic()
        result, error, retry = None, None, True
        trial = task.id in self.trials
        self.trials.discard(task.id)
        guard = functools.partial(breakers.call, self.breakers[task.queue]) if trial or not task.failures \
            else lambda f, *a: f(*a)
        ran: dict = {}  # the handler's own outcome, told apart from the breaker's bookkeeping

        def handler(data):
            # The time limit covers the handler only, not the breaker's reads and writes: a
            # slow database must not turn a task that finished into one that timed out.
            ran["started"] = True
            signal.setitimer(signal.ITIMER_REAL, task.timeout)
            try:
                ran["value"] = spec.call(data, context)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            return ran["value"]
        try:
            self.in_task = True
            result = guard(handler, payload)
            self.in_task = False
            if self.cancel_seen:  # it returned after a cancel was asked: it ends cancelled
                error, retry = "cancelled while running (the result is not kept)", False
        except pybreaker.CircuitBreakerError:
            return None
        except TaskTimeout:
            error = f"timed out after {task.timeout:g} s"
        except TaskCancelled:
            error, retry = f"cancelled: interrupted {self.config.workers_cancel_grace:g} s after the cancel", False
        except PermanentError as e:
            error, retry = str(e) or type(e).__name__, False
        except DATABASE_ERRORS as e:
            if not ran:  # the breaker could not read its state: the task never ran; pause
                raise
            if "value" not in ran:  # the handler's own database call failed: a task error
                error = handler_error(e, spec)
            else:  # it ran and returned; only the breaker could not write down the success
                self.log.warning("breaker not updated", error=f"{type(e).__name__}: {e}", **self.context(task))
                result = ran["value"]
        except Exception as e:
            error = handler_error(e, spec)
        finally:
            self.in_task = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.task_began, self.running = 0.0, None
            self.slots.set(self.slot, task=0, deadline=0)
        handler_failed = error is not None and "started" in ran and retry and not self.cancel_seen
        return result, error, retry, handler_failed

    def context_for(self, task: Task, results: list) -> TaskContext:
        db = get_database(self.config)

        def heartbeat() -> bool:
            held = self.queues[task.queue].extend_lease(task.id, self.id, task.timeout + LEASE_GRACE,
                                                        attempt=task.attempts)
            if held and self.in_task:  # the time limit starts again too
                signal.setitimer(signal.ITIMER_REAL, task.timeout)
                self.slots.set(self.slot, deadline=time.monotonic() + task.timeout)
            return held

        return TaskContext(
            id=task.id, name=task.name, queue=task.queue, attempt=task.attempts, max_attempts=task.max_attempts,
            results=results, _heartbeat=heartbeat, _cancelled=lambda: bool(self.cancel_seen),
            _progress=lambda fraction, message: set_progress(db, task.id, self.id, task.attempts, fraction, message))

    def record(self, task: Task, result: Any, error: str | None, retry: bool, handler_failed: bool,
               duration: float, waited: float = 0.0) -> None:
        """A success waits (up to FLUSH_AFTER) to share a commit; a failure is written now."""
        TASK_DURATION.observe((task.queue, task.name, "ok" if error is None else "error"), duration)
        TASK_WAIT.observe((task.queue, task.name), max(0.0, waited))
        # A failure is its handler's: raised or timed out (a cancelled run is neither).
        self.tally.add(task.queue, task.name, duration, waited, failed=error is not None and not self.cancel_seen)
        self.done += 1
        self.slots.set(self.slot, done=self.done)
        if error is None:
            with self.lock:
                self.pending.append((self.queues[task.queue], task.id, result, task.attempts))
                self.pending_since = min(self.pending_since, time.monotonic())
            self.log.debug("task succeeded", duration=duration, **self.context(task))
            return
        self.flush(force=True)
        state = self.queues[task.queue].fail_task(task.id, self.id, error, retry=retry, attempt=task.attempts,
                                                  handler=handler_failed)
        event = {"queued": "task failed, will retry", "dead": "task dead-lettered",
                 "cancelled": "task cancelled"}.get(state, "task lease lost")
        self.log.warning(event, duration=duration, error=error.splitlines()[0], **self.context(task))

    def flush(self, force: bool = False) -> None:
        """Record finished tasks: one transaction per queue for everything pending. The task
        histograms get their observations first, so a task seen finished is in /metrics."""
        TASK_DURATION.push()
        TASK_WAIT.push()
        with self.lock:
            if not self.pending or (not force and time.monotonic() - self.pending_since < FLUSH_AFTER):
                return
            pending, self.pending, self.pending_since = self.pending, [], math.inf
        by_queue: dict[str, list] = {}
        for queue, task_id, result, attempt in pending:
            by_queue.setdefault(queue.name, []).append((task_id, result, attempt))
        for name, done in by_queue.items():
            try:
                took = self.queues[name].complete_many(done, self.id)
            except Exception:  # keep the results for the next flush (a completion is fenced,
                with self.lock:  # so one that did commit is simply not counted twice)
                    self.pending = [p for p in pending if p[0].name in by_queue] + self.pending
                    self.pending_since = time.monotonic()
                raise
            for (task_id, *_), ok in zip(done, took):
                if not ok:
                    self.log.warning("result not recorded: lease lost", task_id=task_id, queue=name)

    # -- the batch: what is held in memory, and the watcher that keeps it safe ----------------

    def next_task(self) -> Task | None:
        with self.lock:
            return self.unstarted.pop(0) if self.unstarted else None

    def take_unstarted(self) -> list[Task]:
        with self.lock:
            rest, self.unstarted = self.unstarted, []
        return rest

    def still_holds(self, task: Task) -> bool:
        """A task that waited behind others in its batch gets its lease renewed first; if
        the lease is already gone (another worker may run it now), it is not run here."""
        if time.monotonic() - self.claimed_at <= HAND_BACK_AFTER:
            return True
        if self.queues[task.queue].extend_lease(task.id, self.id, seconds=task.timeout + LEASE_GRACE,
                                                attempt=task.attempts):
            return True
        self.log.warning("task skipped: its lease was lost while it waited", **self.context(task))
        return False

    def watch(self) -> None:
        """Thread: once the running handler passes HAND_BACK_AFTER, record the batch's
        finished results and give its unstarted tasks back to the queue; while it runs, look
        for a cancel of it every CANCEL_CHECK seconds."""
        next_cancel_check = 0.0
        while not self.exiting:
            time.sleep(0.2)
            began, task = self.task_began, self.running
            if task is not None and began and time.monotonic() >= next_cancel_check:
                next_cancel_check = time.monotonic() + CANCEL_CHECK
                try:
                    self.check_cancel(task)
                except Exception as e:  # looked for again at the next turn
                    self.log.warning("cannot look for a cancel", error=f"{type(e).__name__}: {e}")
            if not began or time.monotonic() - began < HAND_BACK_AFTER:
                continue
            try:
                self.flush(force=True)
                rest = self.take_unstarted()
                if rest:
                    self.release(rest)
                    self.log.info("slow task: rest of its batch given back", tasks=len(rest))
            except Exception as e:  # the loop's own calls will meet the same error and report it
                self.log.warning("watcher could not hand back the batch", error=f"{type(e).__name__}: {e}")

    def check_cancel(self, task: Task) -> None:
        """A cancel was asked: the context says so at once; after the grace the handler is
        interrupted (SIGUSR2 raises TaskCancelled in it, if it still runs that task)."""
        if not self.cancel_seen:
            if cancel_requested(get_database(self.config), task.id) and self.running is task:
                self.cancel_seen = time.monotonic()
                self.log.info("cancel asked; the handler has the grace to stop", **self.context(task))
        elif time.monotonic() - self.cancel_seen >= self.config.workers_cancel_grace and self.running is task:
            self.cancel_target = task.id
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR2)

    def context(self, task: Task) -> dict:
        return dict(task_id=task.id, queue=task.queue, task=task.name, attempt=task.attempts)

    def release(self, tasks: list[Task]) -> None:
        for task in tasks:
            self.queues[task.queue].release_task(task.id, self.id, task.attempts)

    # -- bookkeeping ----------------------------------------------------------------------

    def beat(self) -> None:
        self.slots.set(self.slot, beat=time.monotonic())

    def adapt(self, seconds: float, count: int) -> None:
        # Batches are for tiny tasks: start with one, double while tasks are quick, back to one
        # as soon as they are not, so slow tasks never wait behind each other in one worker.
        fast = seconds / count <= SLOW_TASK
        self.claim_size = min(self.claim_size * 2, self.config.workers_batch_size) if fast else 1

    def should_recycle(self) -> bool:
        if self.done >= self.task_limit:
            self.log.info("recycling: task limit reached", tasks_done=self.done)
            return True
        now = time.monotonic()
        if now < self.next_check:
            return False
        self.next_check = now + 1.0
        rss_mb = psutil.Process().memory_info().rss / 2**20
        self.slots.set(self.slot, rss_mb=rss_mb)
        if rss_mb > self.config.workers_max_memory_mb:
            self.log.info("recycling: memory limit reached", rss_mb=round(rss_mb, 1))
            return True
        return False

    def refresh_queues(self) -> None:
        if self.queues and time.monotonic() < self.queues_until:
            return
        self.queues_until = time.monotonic() + 2.0
        db = get_database(self.config)
        # Only queues this daemon serves: a task in any other queue waits for a daemon that
        # has its handler, rather than being claimed here and dead-lettered.
        self.rate_limited = set(limits.rate_limits(db))
        names = set(self.config.workers_queues) or registered_queues()
        for name in names - set(self.queues):
            self.queues[name] = QueueManager(name, db, self.config, reap_expired=False)
            self.breakers[name] = breakers.queue_breaker(db, name, self.config.breaker_fail_max,
                                                         self.config.breaker_reset_timeout)

    def wait_for_work(self) -> None:
        db = get_database(self.config)
        db.wait_for_change(self.seen_version, time.monotonic() + 0.5, self.config.workers_poll_interval)

    # -- signals: record only; the loop acts ----------------------------------------------

    def on_stop(self, signum, frame) -> None:
        self.stopping = True

    def on_alarm(self, signum, frame) -> None:
        # The handlers that act: a timeout or a cancel must interrupt the handler's own code.
        if self.in_task:
            self.in_task = False
            raise TaskTimeout()

    def on_cancel(self, signum, frame) -> None:
        # Sent by the watcher for one task: one that ended meanwhile is not the next one's cancel.
        running = self.running
        if self.in_task and running is not None and running.id == self.cancel_target and self.cancel_seen:
            self.in_task = False
            raise TaskCancelled()


def main(config: Config, modules: tuple[str, ...], slot: int, slots: Slots) -> None:
    """Entry point of a worker process, forked by the daemon's fork server (which has the
    worker's own modules imported already, and exits when the manager does): imports the task
    ``modules``, then claims and runs tasks until told to stop, or until its parent is gone."""
    die_with_parent()
    log.configure(config.log_level, process="worker")
    slots.set(slot, pid=os.getpid(), started=time.monotonic())
    worker = Worker(config, slot, slots, os.getppid())
    signal.signal(signal.SIGTERM, worker.on_stop)
    signal.signal(signal.SIGINT, worker.on_stop)
    signal.signal(signal.SIGALRM, worker.on_alarm)
    signal.signal(signal.SIGUSR2, worker.on_cancel)
    try:
        load_task_modules(modules)
        get_database(config)
    except Exception as e:
        worker.log.critical("worker cannot start", error=str(e))
        leave(exit_codes.IMPORT)
    code = worker.run()
    get_database(config).close()
    leave(code)
