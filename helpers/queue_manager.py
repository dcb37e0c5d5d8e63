"""The durable task queue: one SQLite table, leased claims, retries, a dead letter.

```python
from helpers.queue_manager import get_queue_manager
queue = get_queue_manager("my_queue")
task_id = queue.enqueue("process_data", {"file": "data.csv"})
task = queue.dequeue("worker_1")              # None when nothing is ready
queue.complete_task(task.id, "worker_1")      # or queue.fail_task(task.id, "worker_1", "why")
```

Delivery is at least once. A claim holds a lease of ``timeout`` seconds; a task whose lease
runs out (its worker died) is retried with backoff or dead-lettered, like a failure. A worker
that lost its lease cannot complete, fail or extend the task any more: every call below that
acts for a worker returns False/None instead of overwriting a newer attempt.

All of the queue's semantics are the SQL statements in ``helpers/queue_sql.py``, one block per
engine (SQLite, PostgreSQL); this module validates, encodes and counts around them.
"""
from __future__ import annotations

import collections
import inspect
import json
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

from helpers import backoff, queue_sql, validation
from helpers.config import Config, load_config
from helpers.counts import STATES, queue_counts
from helpers.engine import Database, driver_connection, get_database
from helpers.queue_sql import statements
from helpers.registry import handler_for, registered_queues
from helpers.validation import (
    DELAY_MAX,
    NAME_MAX,
    PRIORITY_RANGE,
    UNIQUE_FOR_MAX,
    InvalidField,
    existing_id,
    json_text,
    number,
    queue_name,
    shown,
    storable,
    stored_text,
    task_name,
)

# -- the Python side ----------------------------------------------------------------------

FINISHED = frozenset({"succeeded", "dead", "cancelled", "blocked"})  # a waiter stops waiting at these
DEFAULT_UNIQUE_FOR = 3600.0  # seconds a unique key holds when the enqueue does not say
MAX_ERROR_CHARS = 4000
# A lease outlives the task's run-time limit by this much, so a handler stopped at its timeout
# (or its worker killed for ignoring it) is recorded by its own worker or the daemon before
# the lease could hand the task to a second worker.
LEASE_GRACE = 15.0


@dataclass
class Task:
    """One task as stored. ``task_data`` is the decoded payload."""
    id: int
    queue: str
    name: str
    task_data: Any
    state: str
    priority: int
    run_at: float
    attempts: int
    max_attempts: int
    timeout: float
    lease_until: float | None
    worker: str | None
    idempotency_key: str | None
    result: Any
    errors: list
    last_error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    progress: float | None = None
    progress_message: str | None = None
    cancel_requested: float | None = None
    workflow: int | None = None
    waiting_on: int = 0
    unique_key: str | None = None
    unique_until: float | None = None
    failures: int = 0  # attempts its own handler failed (not a dead worker's or host's)

    @property
    def payload(self) -> Any:
        return self.task_data

    @classmethod
    def from_row(cls, row) -> Task:
        """The task of a ``SELECT *`` row: each field is its column, decoded where stored as JSON."""
        values = {name: row[name] for name in _ROW_COLUMNS}
        values["task_data"] = json.loads(row["payload"])
        values["timeout"] = float(values["timeout"])
        values["result"] = None if values["result"] is None else json.loads(values["result"])
        values["errors"] = [] if values["errors"] == "[]" else json.loads(values["errors"])
        return cls(**values)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["payload"] = d.pop("task_data")
        return d


_ROW_COLUMNS = tuple(f.name for f in fields(Task) if f.name != "task_data")  # payload: task_data


class PayloadTooLarge(InvalidField):
    """A payload over ``queue_max_payload_bytes`` (the API answers 413)."""


class Enqueued(NamedTuple):
    id: int
    created: bool  # False when the idempotency or unique key named an existing task


class TaskFailed(Exception):
    """The task waited for ended without a result: dead, cancelled, or blocked in its
    workflow. ``.task`` is the task as stored."""

    def __init__(self, task: Task):
        super().__init__(f"task {task.id} ({task.name}) is {task.state}"
                         + (f": {task.last_error.splitlines()[0]}" if task.last_error else ""))
        self.task = task


class TaskRef(int):
    """A task's id (an int) that can also wait for the task: ``ref.result(timeout=10)``."""
    db: Any

    def __new__(cls, task_id: int, db):
        ref = super().__new__(cls, task_id)
        ref.db = db
        return ref

    def result(self, timeout: float | None = None) -> Any:
        """The task's result once it succeeded. Raises TaskFailed when it ended otherwise,
        TimeoutError when it is still unfinished after ``timeout`` seconds (None: wait on)."""
        task = wait(self.db, int(self), timeout)
        if task.state != "succeeded":
            raise TaskFailed(task)
        return task.result


JITTER = random.Random()  # backoff jitter, unless a caller injects its own (tests seed theirs)


class QueueManager:
    """One named queue in the OOS database. Safe to use from many threads and processes."""

    def __init__(self, name: str, db: Database, config: Config | None = None,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None,
                 reap_expired: bool = True):
        """``reap_expired``: claims also requeue expired leases (at most once a second), so a
        queue used on its own needs no janitor. The daemon's workers pass False: under the
        daemon, its housekeeping is the one owner of lease expiry."""
        self.name = queue_name(name)
        self.db = db
        self.sql = statements(db)
        self.config = config or Config()
        self.clock = clock
        self.rng = rng or JITTER  # seeding a Random of its own costs 11 us: the API makes one per request
        self.reap_expired = reap_expired
        self._last_reap = -math.inf
        self._concurrency: int | None = None  # the queue's limit, read again each second
        self._concurrency_until = -math.inf

    # -- producing --------------------------------------------------------------------------

    def enqueue(self, task_name: str, task_data: Any = None, *, priority: int = 0,
                delay: float | None = None, run_at: float | None = None,
                max_attempts: int | None = None, timeout: float | None = None,
                idempotency_key: str | None = None, unique_key: str | None = None,
                unique_for: float | None = None, now: float | None = None, connection=None) -> TaskRef:
        """Store a task and return its id (a TaskRef: ``.result(timeout=)`` waits for it).
        With an ``idempotency_key`` already used in this queue, or a ``unique_key`` held by a
        task still queued or running (for ``unique_for`` seconds, default an hour), return that
        task's id and store nothing. Raises InvalidField (a ValueError) for bad input, before
        anything is written. ``connection``: see ``enqueue_many``."""
        # Only what was given: a spec of task and payload is checked fastest.
        spec = {field: value for field, value in locals().items() if field in SPEC_FIELDS and value is not None}
        if spec.get("priority") == 0:
            del spec["priority"]
        spec.update(task=task_name, payload=task_data)
        return TaskRef(self.enqueue_many([spec], now=now, batch=False, connection=connection)[0].id, self.db)

    def enqueue_many(self, specs: Iterable[dict], now: float | None = None, conn=None, *,
                     batch: bool = True, connection=None) -> list[Enqueued]:
        """Store many tasks in one transaction: all or none. Each spec is a dict with
        ``task`` and optional ``payload``, ``priority``, ``delay`` or ``run_at``,
        ``max_attempts``, ``timeout``, ``idempotency_key``, ``unique_key``, ``unique_for``. A bad
        field is named with its task's index (``tasks[2].payload``); ``batch=False``, for one
        task given on its own, names it bare (``payload``).

        In the caller's transaction, nothing committed here: ``conn``, one of OOS's own
        (``db.transaction()``); ``connection``, the application's: an open psycopg 3 or sqlite3
        connection to this database (a SQLite application keeps its tables in OOS's file, or
        ATTACHes it), or a SQLAlchemy ``Connection`` or ``Session`` over one. The tasks, their
        counters and (PostgreSQL) the NOTIFY that wakes a worker become real at the caller's
        COMMIT, and vanish with a rollback."""
        now = self._now(now)
        rows = [self._row(spec, now, f"tasks[{i}]." if batch else "") for i, spec in enumerate(specs)]
        if connection is not None:
            conn = self.db.adopt(driver_connection(connection))
        own = conn is None
        keyed = any(row["idempotency_key"] is not None or row["unique_key"] is not None for row in rows)

        def write(conn) -> list[Enqueued]:
            if self.sql.COUNTS_IN_STATEMENT and not keyed:
                # One statement: the queue, the tasks and the counter.
                ids = sorted(r[0] for r in conn.execute(self.sql.INSERT, dict(
                    queue=self.name, now=now, rows=json.dumps([dict(row, ord=i) for i, row in enumerate(rows)]),
                    default_attempts=self.config.queue_max_attempts,
                    default_timeout=float(self.config.queue_lease_seconds))))
                return [Enqueued(i, True) for i in ids]
            single = len(rows) == 1 and not keyed
            if not single:
                self._published_defaults(conn, rows)
            if keyed:
                conn.execute(self.sql.ENSURE_QUEUE, dict(queue=self.name))  # PostgreSQL's COUNT does not
                if self.sql.LOCK_UNIQUE_KEY:
                    for key in sorted({r["unique_key"] for r in rows if r["unique_key"]}):
                        conn.execute(self.sql.LOCK_UNIQUE_KEY, (key,))
                out = [self._insert_keyed(conn, row) for row in rows]
            else:
                # We hold the write lock, so the new rowids are consecutive: one C-level loop.
                if single:
                    last = conn.execute(self.sql.INSERT_DEFAULTED, rows[0]).lastrowid
                else:
                    conn.executemany(self.sql.INSERT, rows)
                    last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
                out = [Enqueued(i, True) for i in range(last - len(rows) + 1, last + 1)]
            _count(conn, self.sql, self.name, enqueued=sum(e.created for e in out))  # makes the queue's row
            return out

        # Our own: a group commit, shared with the concurrent enqueues of other threads.
        out = self.db.group(write, one_statement=self.sql.COUNTS_IN_STATEMENT and not keyed) if own else write(conn)
        if own and rows:
            self.db.confirm_written()  # before the caller hears "stored"
            self.db.hint(self.name)  # after the commit: a hint before it would wake workers to nothing
        elif connection is not None and rows:
            self.db.hint(self.name, conn)  # sent at the caller's commit, never for a rollback
        return out

    def _published_defaults(self, conn, rows: list[dict]) -> None:
        published_defaults(conn, self.sql, rows)

    def _insert_keyed(self, conn, row: dict) -> Enqueued:
        if row["unique_key"] is not None:
            holder = conn.execute(self.sql.UNIQUE_HOLDER, row).fetchone()
            if holder:
                return Enqueued(holder[0], False)
        got = conn.execute(self.sql.INSERT_ONE, row).fetchone()
        return (Enqueued(got[0], True) if got else
                Enqueued(conn.execute(self.sql.FIND_KEY, row).fetchone()[0], False))

    def _now(self, now: float | None) -> float | None:
        return statement_time(self.db, now, self.clock)

    def _row(self, spec: dict, now: float | None, where: str = "") -> dict:
        """Validate one spec into an INSERT row; InvalidField names the field, after ``where``
        (``tasks[2].`` in a batch). Attempts and timeout not given come from the task's handler
        (``@task``): this process's, else the one a daemon published (the handlers table),
        else the queue's config."""
        if not isinstance(spec, dict):
            raise InvalidField(where.rstrip(".") or "task", f"expected an object, got {type(spec).__name__}")
        if not spec.keys() <= SPEC_FIELDS:
            raise InvalidField(f"{where}{sorted(spec.keys() - SPEC_FIELDS)[0]}", "unknown field")
        name = task_name(spec.get("task"), f"{where}task")
        payload = json_text(f"{where}payload", spec.get("payload"))
        if len(payload) > self.config.queue_max_payload_bytes:
            raise PayloadTooLarge(f"{where}payload", f"{len(payload)} bytes is over the limit "
                                  f"of {self.config.queue_max_payload_bytes} bytes")
        priority, delay, run_at, max_attempts, timeout, key, unique, unique_for = 0, None, None, None, None, None, None, None
        if len(spec) > 2 or "payload" not in spec:  # anything beyond task + payload
            priority = number(f"{where}priority", spec.get("priority") or 0, integer=True,
                              minimum=PRIORITY_RANGE[0], maximum=PRIORITY_RANGE[1])
            delay, run_at = spec.get("delay"), spec.get("run_at")
            if delay is not None and run_at is not None:
                raise InvalidField(f"{where}delay", "give delay or run_at, not both")
            if delay is not None:
                number(f"{where}delay", delay, minimum=0, maximum=DELAY_MAX)
            elif run_at is not None:
                run_at = number(f"{where}run_at", run_at)
            if (max_attempts := spec.get("max_attempts")) is not None:
                validation.max_attempts(max_attempts, f"{where}max_attempts")
            if (timeout := spec.get("timeout")) is not None:
                validation.timeout(timeout, f"{where}timeout")
            key = _key(spec, "idempotency_key", where)
            unique = _key(spec, "unique_key", where)
            if (unique_for := spec.get("unique_for")) is not None:
                if unique is None:
                    raise InvalidField(f"{where}unique_for", "needs unique_key")
                number(f"{where}unique_for", unique_for, minimum=0, maximum=UNIQUE_FOR_MAX, exclusive=True)
        if max_attempts is None or timeout is None:
            handler = handler_for(name)
            if handler is not None:
                max_attempts = handler.max_attempts if max_attempts is None else max_attempts
                timeout = handler.timeout if timeout is None else timeout
        # Still None: the handler's as a daemon published it, else the config's, read once per
        # call in the enqueue's transaction (published_defaults; PostgreSQL's batch joins them).
        return dict(queue=self.name, name=name, payload=payload, priority=priority, run_at=run_at,
                    delay=float(delay or 0), max_attempts=max_attempts,
                    timeout=None if timeout is None else float(timeout),
                    default_attempts=self.config.queue_max_attempts, default_timeout=float(self.config.queue_lease_seconds),
                    idempotency_key=key, unique_key=unique,
                    unique_for=float(unique_for or DEFAULT_UNIQUE_FOR) if unique else None,
                    state="queued", workflow=None, waiting_on=0, now=now)

    # -- consuming --------------------------------------------------------------------------

    def dequeue(self, worker_id: str, now: float | None = None) -> Task | None:
        """Claim the next ready task for ``worker_id``, or None when nothing is ready."""
        tasks = self.dequeue_batch(worker_id, 1, now=now)
        return tasks[0] if tasks else None

    def dequeue_batch(self, worker_id: str, limit: int, now: float | None = None,
                      wait: float = 0.0, trial: bool = False, breaker: str | None = None) -> list[Task]:
        """Claim up to ``limit`` ready tasks in one transaction, in claim order. With ``wait``,
        block up to that many seconds for work to arrive when none is ready. ``trial``: for a
        breaker's trial, tasks that never failed come first. ``breaker`` (a breaker's name):
        claim nothing unless that breaker is closed, as the claim's own statement reads it."""
        if not isinstance(worker_id, str) or not worker_id:
            raise InvalidField("worker_id", "expected a non-empty string")
        deadline = time.monotonic() + wait
        woken = False
        while True:
            at = self._now(now)
            local = self.clock() if at is None else at
            if self.reap_expired and local - self._last_reap >= 1.0:
                self._last_reap = local
                requeue_expired(self.db, at, self.rng, self.config.queue_backoff_jitter)
            version = self.db.data_version() if wait > 0 else None  # to see commits while we wait
            # Woken by a commit, to any queue: look by a read first, as an empty claim still
            # takes SQLite's write lock (and every writer would queue behind the waiters).
            rows = [] if woken and not self.has_ready(at) else self._claim(
                dict(worker=worker_id, now=at, queue=self.name, limit=limit, grace=LEASE_GRACE, breaker=breaker), trial)
            if rows or time.monotonic() >= deadline:
                break
            woken = self.db.wait_for_change(version, deadline, self.config.workers_poll_interval)
        tasks = [Task.from_row(r) for r in rows]
        tasks.sort(key=lambda t: (-t.priority, t.run_at, t.id))
        return tasks

    def has_ready(self, now: float | None = None) -> bool:
        """Whether a task of this queue is ready to claim now (a read: it takes no lock)."""
        return bool(self.db.execute(self.sql.ANY_READY, dict(queue=self.name, now=self._now(now)))[0][0])

    def _claim(self, params: dict, trial: bool) -> list:
        if time.monotonic() >= self._concurrency_until:
            rows = self.db.execute(self.sql.CONCURRENCY, dict(queue=self.name))
            self._concurrency = rows[0][0] if rows else None
            self._concurrency_until = time.monotonic() + 1.0
        # A claim is not fsynced: the completion's fsync carries it (one per task, not two),
        # and a power cut before that leaves the task queued, to run again (at-least-once).
        if self._concurrency is None:
            return self.db.execute(self.sql.CLAIM_TRIAL if trial else self.sql.CLAIM, params, synced=False)
        with self.db.transaction(synced=False) as conn:
            if self.sql.LOCK_QUEUE:
                conn.execute(self.sql.LOCK_QUEUE, params)
            return conn.execute(self.sql.CLAIM_TRIAL_LIMITED if trial else self.sql.CLAIM_LIMITED, params).fetchall()

    def complete_task(self, task_id: int, worker_id: str, result: Any = None,
                      now: float | None = None, attempt: int | None = None) -> bool:
        """Mark the task succeeded with ``result`` (JSON). False if this worker no longer
        holds its lease (nothing is changed then). With ``attempt`` (``task.attempts`` of the
        claim), also False when the task was claimed again since, even by this same worker."""
        return self.complete_many([(task_id, result, attempt)], worker_id, now=now)[0]

    def complete_many(self, done: Iterable[tuple[int, Any]], worker_id: str,
                      now: float | None = None) -> list[bool]:
        """Complete many tasks in one transaction; one bool per task, as complete_task. Each
        item is (task_id, result) or (task_id, result, attempt)."""
        done = [{"id": item[0], "result": self._result_json(item[1]), "attempt": item[2] if len(item) > 2 else None}
                for item in done]
        params = dict(done=json.dumps(done), worker=worker_id, now=self._now(now), queue=self.name)

        def write(conn) -> set[int]:
            rows = conn.execute(self.sql.COMPLETE, params).fetchall()
            if not self.sql.COUNTS_IN_STATEMENT:
                _count(conn, self.sql, self.name, succeeded=len(rows))
                for queue, n in collections.Counter(r[1] for r in rows).items():
                    conn.execute(self.sql.COUNT_SUCCEEDED, dict(queue=queue, n=n))
            return {r[0] for r in rows}

        # Shared with the concurrent completions of other threads.
        took = self.db.group(write, one_statement=self.sql.COUNTS_IN_STATEMENT)
        return [d["id"] in took for d in done]

    def _result_json(self, result: Any) -> str:
        """The result as stored: JSON, capped like payloads (a larger one is replaced by a note
        saying so, rather than growing the database without bound)."""
        if result is None:  # most handlers return nothing: no encoder for it
            return "null"
        text = json.dumps(result, default=str, allow_nan=False)
        if len(text.encode()) > self.config.queue_max_payload_bytes:
            return json.dumps({"oos_error": f"result of {len(text.encode())} bytes is over the limit of "
                                            f"{self.config.queue_max_payload_bytes} bytes; not stored"})
        return text

    def fail_task(self, task_id: int, worker_id: str, error: str, *, retry: bool = True,
                  now: float | None = None, attempt: int | None = None, handler: bool = False) -> str | None:
        """Record a failed attempt. Returns the task's new state: ``"queued"`` (it will be
        retried after the backoff) or ``"dead"`` (last attempt, or ``retry=False``); None if
        this worker no longer holds the lease. ``handler``: the task's own handler failed (it
        raised or ran out of time), counted in ``Task.failures``."""
        return fail_task(self.db, task_id, worker_id, error, self._now(now), retry=retry, rng=self.rng,
                         jitter=self.config.queue_backoff_jitter, attempt=attempt, handler=handler)

    def extend_lease(self, task_id: int, worker_id: str, seconds: float | None = None,
                     now: float | None = None, attempt: int | None = None) -> bool:
        """Heartbeat: push the lease ``seconds`` (default: the task's timeout) past now.
        False if the lease is already lost."""
        if seconds is not None:
            number("seconds", seconds, minimum=0, exclusive=True)
        with self.db.transaction() as conn:
            return conn.execute(self.sql.EXTEND, dict(id=task_id, worker=worker_id, now=self._now(now), attempt=attempt,
                                             seconds=seconds)).rowcount == 1

    def snooze(self, task: Task, worker_id: str, seconds: float, now: float | None = None) -> bool:
        """Give a claimed task back, due in ``seconds``, without counting the attempt (it was
        not run: its rate limit said wait)."""
        with self.db.transaction() as conn:
            return conn.execute(self.sql.SNOOZE, dict(id=task.id, worker=worker_id, attempt=task.attempts,
                                                      seconds=seconds, now=self._now(now))).rowcount == 1

    def release_task(self, task_id: int, worker_id: str, attempt: int | None = None) -> bool:
        """Give a claimed task back to the queue without counting the attempt."""
        with self.db.transaction() as conn:
            return conn.execute(self.sql.RELEASE, dict(id=task_id, worker=worker_id, attempt=attempt)).rowcount == 1

    def requeue_expired(self, now: float | None = None) -> list[tuple[int, str]]:
        """Treat every expired lease (in every queue) as a failed attempt; see the module."""
        return requeue_expired(self.db, self._now(now), self.rng, self.config.queue_backoff_jitter)

    # -- control and inspection -------------------------------------------------------------

    def get_task(self, task_id: int) -> Task | None:
        return get_task(self.db, task_id)

    def cancel_task(self, task_id: int, now: float | None = None) -> str | None:
        """See ``cancel_task``: "cancelled", "cancelling" (it is running) or None (finished)."""
        return cancel_task(self.db, task_id, self.clock() if now is None else now)

    def purge(self, now: float | None = None) -> int:
        """Cancel every task of this queue that has not started. Returns how many."""
        return purge_queue(self.db, self.name, self.clock() if now is None else now)

    def wait(self, task_id: int, timeout: float | None = None) -> Task:
        """See ``wait``: the task once finished; TimeoutError after ``timeout`` seconds."""
        return wait(self.db, task_id, timeout)

    def pause(self) -> None:
        """Stop handing out this queue's tasks; running ones finish."""
        self._set_paused(True)

    def resume(self) -> None:
        self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        with self.db.transaction() as conn:
            conn.execute(self.sql.SET_PAUSED, dict(queue=self.name, paused=int(paused)))
        if not paused:
            self.db.hint(self.name)

    def is_paused(self) -> bool:
        rows = self.db.execute(self.sql.QUEUE_ROW, dict(queue=self.name))
        return bool(rows and rows[0]["paused"])

    def dead_letters(self, limit: int = 50, offset: int = 0, task_name: str | None = None) -> list[Task]:
        """Dead tasks, newest first, optionally only those named ``task_name``."""
        return dead_letters(self.db, self.name, limit, offset, task_name)

    def count_dead(self, task_name: str | None = None) -> int:
        return count_dead(self.db, self.name, task_name)

    def retry_dead(self, task_id: int | None = None, task_name: str | None = None,
                   now: float | None = None) -> int:
        """Replay dead tasks (one by id, or all, optionally by name) with fresh attempts.
        Returns how many were requeued."""
        return retry_dead(self.db, self.name, task_id, task_name, self.clock() if now is None else now)

    def purge_dead(self, task_id: int | None = None, older_than: float = 0.0,
                   task_name: str | None = None, now: float | None = None) -> int:
        """Delete dead tasks (one, or all dead for at least ``older_than`` seconds)."""
        return purge_dead(self.db, self.name, task_id, task_name, older_than,
                          self.clock() if now is None else now)

    def prune(self, now: float | None = None) -> int:
        """Housekeeping for the whole database; see ``prune``."""
        return prune(self.db, self.config, self.clock() if now is None else now)

    def stats(self, now: float | None = None) -> dict:
        """Counts by state, ready/delayed split, the oldest ready task's age, lifetime
        counters and the depth alert flag; read from counters, not by counting the tasks
        (helpers/counts.py)."""
        now = self.clock() if now is None else now
        sql = self.sql
        held = queue_counts(self.db, self.name, now)
        counts = held["counts"]
        queue_row = self.db.execute(sql.QUEUE_ROW, dict(queue=self.name))
        totals = dict(queue_row[0]) if queue_row else {}
        oldest = held["oldest_ready"]
        return {
            "queue": self.name,
            "counts": counts,
            "ready": held["ready"],
            "delayed": held["delayed"],
            "oldest_ready_age": max(0.0, now - oldest) if oldest is not None else 0.0,
            "paused": bool(totals.get("paused", 0)),
            "totals": {k: totals.get(k, 0) for k in ("enqueued", "succeeded", "failed", "dead")},
            "succeeded_last_minute": self.db.execute(sql.RECENT, dict(queue=self.name, since=now - 60))[0][0],
            "depth_alert": counts["queued"] > self.config.queue_depth_alert,
        }


# -- the dead letter, of one queue or (queue=None) of all -----------------------------------


# What an enqueue may set (a spec's keys): the task, its payload and enqueue()'s keywords.
# enqueue()'s keywords a spec may set, in order, with their annotations ("int", "float | None").
ENQUEUE_OPTIONS = {p.name: p.annotation for p in inspect.signature(QueueManager.enqueue).parameters.values()
                   if p.kind is p.KEYWORD_ONLY and p.name not in ("now", "connection")}
SPEC_FIELDS = frozenset({"task", "payload", *ENQUEUE_OPTIONS})

def dead_letters(db: Database, queue: str | None = None, limit: int = 50, offset: int = 0,
                 task_name: str | None = None) -> list[Task]:
    """Dead tasks, newest first."""
    number("limit", limit, minimum=1, integer=True)
    number("offset", offset, minimum=0, integer=True)
    rows = db.execute(statements(db).LIST_DEAD, dict(queue=queue, id=None, name=task_name, limit=limit, offset=offset))
    return [Task.from_row(r) for r in rows]


def count_dead(db: Database, queue: str | None = None, task_name: str | None = None) -> int:
    return db.execute(statements(db).COUNT_DEAD, dict(queue=queue, id=None, name=task_name))[0][0]


def retry_dead(db: Database, queue: str | None, task_id: int | None, task_name: str | None,
               now: float) -> int:
    """Replay dead tasks with fresh attempts (their error history stays). Returns how many."""
    if task_id is not None and not existing_id(task_id):
        return 0
    with db.transaction() as conn:
        replayed = conn.execute(statements(db).REPLAY_DEAD, dict(queue=queue, id=task_id, name=task_name,
                                                                now=now)).rowcount
    for name in [queue] if queue else queue_names(db):
        db.hint(name)
    return replayed


def purge_dead(db: Database, queue: str | None, task_id: int | None, task_name: str | None,
               older_than: float, now: float) -> int:
    """Delete dead tasks dead for at least ``older_than`` seconds. Returns how many."""
    if task_id is not None and not existing_id(task_id):
        return 0
    with db.transaction() as conn:
        return conn.execute(statements(db).PURGE_DEAD, dict(queue=queue, id=task_id, name=task_name,
                                             before=now - older_than)).rowcount


def settle_dead(db: Database, action: str, task_ids: Iterable[int], now: float) -> int:
    """Replay (``retry``) or delete (``purge``) the tasks of ``task_ids`` that are dead, in one
    transaction. Returns how many."""
    statement = {"retry": statements(db).REPLAY_DEAD, "purge": statements(db).PURGE_DEAD}[action]
    done = 0
    with db.transaction() as conn:
        for task_id in task_ids:
            done += conn.execute(statement, dict(queue=None, id=task_id, name=None, now=now, before=now)).rowcount
    for name in queue_names(db) if action == "retry" and done else ():
        db.hint(name)
    return done


def published_defaults(conn, sql, rows: list[dict]) -> None:
    """In ``rows`` (enqueue rows, in the caller's transaction), fill in the attempts and
    timeout left to the handler: as the daemons published them, else the queue's config. One
    read for the whole batch (a look-up per row cost a 100-task batch a sixth of its rate)."""
    names = {r["name"] for r in rows if r["max_attempts"] is None or r["timeout"] is None}
    if not names:
        return
    if len(names) == 1:  # the common case, one name: a plain primary-key read
        found = conn.execute(sql.HANDLER_DEFAULT, dict(name=next(iter(names)))).fetchall()
    else:
        found = conn.execute(sql.HANDLER_DEFAULTS, dict(names=json.dumps(sorted(names)))).fetchall()
    published = {h[0]: h for h in found}
    for row in rows:
        _, attempts, timeout = published.get(row["name"], (None, None, None))
        if row["max_attempts"] is None:
            row["max_attempts"] = row["default_attempts"] if attempts is None else attempts
        if row["timeout"] is None:
            row["timeout"] = row["default_timeout"] if timeout is None else float(timeout)


def fail_params(now: float | None, error: str | None, final: bool, rng: random.Random, jitter: float,
                handler: bool = False, **extra) -> dict:
    return dict(now=now, error=error, final=int(final), steps=len(backoff.SCHEDULE),
                delays=json.dumps(backoff.delays(rng, jitter)), handler=int(handler), **extra)


def fail_task(db: Database, task_id: int, worker_id: str, error: str, now: float | None = None, *,
              retry: bool = True, rng: random.Random | None = None, jitter: float = 0.2,
              attempt: int | None = None, handler: bool = False) -> str | None:
    """A failed attempt of the task ``worker_id`` holds, whatever its queue: see
    ``QueueManager.fail_task``."""
    params = fail_params(statement_time(db, now), storable(str(error)[:MAX_ERROR_CHARS]), not retry, rng or JITTER, jitter,
                         handler, id=task_id, worker=worker_id, attempt=attempt)
    with db.transaction() as conn:
        rows = _count_failures(conn, statements(db), conn.execute(statements(db).FAIL, params).fetchall())
    return rows[0]["state"] if rows else None


def requeue_expired(db: Database, now: float | None = None, rng: random.Random | None = None,
                    jitter: float = 0.2, batch: int = 1000) -> list[tuple[int, str]]:
    """Every running task whose lease ran out counts as a failed attempt: it goes back to the
    queue after its backoff, or to the dead letter. ``batch`` at a time, each batch its own
    transaction. Returns (id, new state) pairs."""
    params = fail_params(statement_time(db, now), None, False, rng or JITTER, jitter, batch=batch)
    out: list[tuple[int, str]] = []
    while True:
        with db.transaction() as conn:
            rows = _count_failures(conn, statements(db), conn.execute(statements(db).REQUEUE_EXPIRED, params).fetchall())
        out += [(r["id"], r["state"]) for r in rows]
        if len(rows) < batch:
            return out


def fail_worker_tasks(db: Database, worker_id: str, error: str, now: float | None = None,
                      rng: random.Random | None = None, jitter: float = 0.2) -> list[tuple[int, str]]:
    """Every task ``worker_id`` holds counts as a failed attempt with ``error`` (the worker
    died). Returns (id, new state) pairs."""
    with db.transaction() as conn:
        return fail_held_tasks(conn, db, [worker_id], error, statement_time(db, now), rng, jitter)


def fail_held_tasks(conn, db: Database, worker_ids: list[str], error: str, now: float | None,
                    rng: random.Random | None = None, jitter: float = 0.2) -> list[tuple[int, str]]:
    """In the caller's transaction: every task the workers ``worker_ids`` hold counts as a
    failed attempt with ``error`` (their daemon stopped answering). (id, new state) pairs."""
    found = []
    for worker in worker_ids:
        params = fail_params(now, error, False, rng or JITTER, jitter, worker=worker)
        found += _count_failures(conn, statements(db), conn.execute(statements(db).FAIL_WORKER, params).fetchall())
    return [(r["id"], r["state"]) for r in found]


def rebase_times(db: Database, step: float, now: float) -> int:
    """The wall clock stepped by ``step`` seconds and reads ``now``: move the running tasks'
    leases and the delayed tasks' due times with it. How many tasks moved."""
    with db.transaction() as conn:
        return sum(conn.execute(sql, dict(step=step, then=now - step)).rowcount for sql in statements(db).REBASE)


def release_worker_tasks(db: Database, worker_id: str) -> int:
    """Give back every task ``worker_id`` holds, without counting the attempts."""
    with db.transaction() as conn:
        released = conn.execute(statements(db).RELEASE_WORKER, dict(worker=worker_id)).rowcount
    for name in queue_names(db) if released else ():
        db.hint(name)
    return released


def ready_counts(db: Database, now: float) -> dict[str, int]:
    """Ready (due, queued) tasks per queue that has any (``helpers/counts.py``: a read that
    does not grow with the tasks)."""
    counts = {name: queue_counts(db, name, now)["ready"] for name in queue_names(db)}
    return {name: n for name, n in counts.items() if n}


def get_task(db: Database, task_id: int) -> Task | None:
    """Any task by id, whatever its queue (None if there is none)."""
    rows = db.execute(statements(db).GET, dict(id=task_id)) if existing_id(task_id) else []
    return Task.from_row(rows[0]) if rows else None


def run_now(db: Database, task_id: int, now: float | None = None) -> bool:
    """A queued task waiting for its delay or its retry's backoff becomes due now. False for
    a task that is due already, running or finished (nothing changes)."""
    if not existing_id(task_id):
        return False
    with db.transaction() as conn:
        row = conn.execute(statements(db).RUN_NOW, dict(id=task_id, now=statement_time(db, now))).fetchone()
    if row is not None:
        db.hint(row[0])  # an idle worker of its queue looks now
    return row is not None


def cancel_task(db: Database, task_id: int, now: float | None = None) -> str | None:
    """Cancel a task, whatever its queue. One that has not started is cancelled at once, with
    the workflow steps after it: ``"cancelled"``. A running one is asked to stop: its handler's
    context says so, and after ``workers.cancel_grace`` its worker interrupts it; it ends
    cancelled and is never retried: ``"cancelling"``. None when it is finished (or unknown)."""
    if not existing_id(task_id):
        return None
    sql, now = statements(db), time.time() if now is None else now
    with db.transaction() as conn:
        if conn.execute(sql.CANCEL, dict(id=task_id, now=now)).rowcount == 1:
            return "cancelled"
        if conn.execute(sql.REQUEST_CANCEL, dict(id=task_id, now=now)).rowcount == 1:
            return "cancelling"
        state = conn.execute(sql.STATE, dict(id=task_id)).fetchone()
    return "cancelling" if state and state[0] == "running" else None


def cancel_requested(db: Database, task_id: int) -> bool:
    """True when a cancel of the running task was asked."""
    rows = db.execute(statements(db).CANCEL_REQUESTED, dict(id=task_id))
    return bool(rows) and rows[0][0] is not None


def purge_queue(db: Database, queue: str, now: float | None = None) -> int:
    """Cancel every task of ``queue`` that has not started (queued, or a workflow step waiting
    or blocked); running ones finish. Returns how many."""
    with db.transaction() as conn:
        return conn.execute(statements(db).PURGE_QUEUE,
                            dict(queue=queue_name(queue), now=time.time() if now is None else now)).rowcount


def set_progress(db: Database, task_id: int, worker_id: str, attempt: int, fraction: float,
                 message: str | None = None) -> bool:
    """Store a running task's progress (0..1) and message. False if the lease is lost."""
    fraction = number("progress", fraction, minimum=0)
    if fraction > 1:
        raise InvalidField("progress", f"expected a fraction from 0 to 1, got {fraction}")
    if message is not None:
        message = storable(str(message)[:MAX_ERROR_CHARS])
    with db.transaction() as conn:
        return conn.execute(statements(db).PROGRESS, dict(id=task_id, worker=worker_id, attempt=attempt,
                                                          progress=float(fraction), message=message)).rowcount == 1


def wait(db: Database, task_id: int, timeout: float | None = None) -> Task:
    """The task once it is finished (succeeded, dead, cancelled, or blocked in its workflow).
    Sleeps on the database's change signal between looks (SQLite: any commit; PostgreSQL: a
    notification the task's own completion sends), never a busy loop. Raises TimeoutError
    after ``timeout`` seconds (None: no limit) and LookupError for an unknown task."""
    if timeout is not None:
        number("timeout", timeout, minimum=0)
    deadline = math.inf if timeout is None else time.monotonic() + timeout
    watched = not db.capabilities.notifies
    while True:
        version = db.data_version()
        task = get_task(db, task_id)
        if task is None:
            raise LookupError(f"no task {task_id}")
        if task.state in FINISHED:
            return task
        if not watched:  # from now on its completion notifies; look once more, then sleep
            with db.transaction() as conn:
                if (conn.execute(statements(db).WATCH, dict(id=task_id)).fetchone() or [None])[0] == "queued":
                    # A claim skips the row while this holds it locked (SKIP LOCKED): workers
                    # woken for it now would sleep until their next poll. Wake them again.
                    db.hint(task.queue, conn)
            watched = True
            continue
        if time.monotonic() >= deadline:
            raise TimeoutError(f"task {task_id} is still {task.state} after {timeout:g} s")
        db.wait_for_change(version, min(deadline, time.monotonic() + 1.0), 0.005)


def browse(db: Database, *, before: int | None = None, limit: int = 50,
           **filters) -> tuple[list[Task], int | None]:
    """Tasks matching every filter given, newest first: (page, cursor of the next page or
    None). Filters: ``queue``, ``state``, ``name``, ``text`` (the payload contains it),
    ``since``/``until`` (created in that time range); ``before``: the cursor of a previous page
    (keyset paging: no OFFSET scans)."""
    number("limit", limit, minimum=1, integer=True)
    if limit > 1000:
        raise InvalidField("limit", f"at most 1000, got {limit}")
    if before is not None:
        number("before", before, minimum=1, integer=True)
    filters = dict(browse_filters(**filters), before=before)
    rows = db.execute(queue_sql.browse(db, filters), dict(filters, limit=limit + 1))
    tasks = [Task.from_row(r) for r in rows[:limit]]
    return tasks, (tasks[-1].id if len(rows) > limit else None)


def count_matching(db: Database, *, up_to: int | None = None, **filters) -> int:
    """How many tasks (with an id up to ``up_to``) match the filters of ``browse``."""
    filters = dict(browse_filters(**filters), before=None if up_to is None else up_to + 1)
    return db.execute(queue_sql.browse(db, filters, count=True), filters)[0][0]


def browse_filters(queue: str | None = None, state: str | None = None, name: str | None = None,
                    since: float | None = None, until: float | None = None, text: str | None = None) -> dict:
    if state is not None and state not in STATES:
        raise InvalidField("state", f"expected one of {', '.join(STATES)}, got {shown(state)}")
    if queue is not None:
        queue_name(queue)
    for field, value in (("since", since), ("until", until)):
        if value is not None:
            number(field, value)
    for field, value in (("name", name), ("text", text)):
        if value is not None and value.__class__ is not str:
            raise InvalidField(field, f"expected text, got {shown(value)}")
        if value is not None:
            stored_text(field, value)
    return dict(queue=queue, state=state, name=name, since=since, until=until, text=text or None)


def _key(spec: dict, field: str, where: str) -> str | None:
    key = spec.get(field)
    if key is not None and (not isinstance(key, str) or not key or len(key) > NAME_MAX):
        raise InvalidField(f"{where}{field}", f"expected a non-empty string of at most {NAME_MAX} "
                           f"characters, got {shown(key)}")
    return key if key is None else stored_text(f"{where}{field}", key)


def statement_time(db, now: float | None, clock: Callable[[], float] = time.time) -> float | None:
    """The time for a statement: ``now`` if given, else ``clock()``, except on PostgreSQL
    with the system clock on an engine with a server clock: None, and the statement uses it."""
    if now is not None:
        return now
    if clock is time.time and db.capabilities.server_clock:
        return None
    return clock()


def _count(conn, sql, queue: str, enqueued: int = 0, succeeded: int = 0, failed: int = 0,
           dead: int = 0) -> None:
    conn.execute(sql.COUNT, dict(queue=queue, enqueued=enqueued, succeeded=succeeded, failed=failed,
                             dead=dead))


def _count_failures(conn, sql, rows: list) -> list:
    by_queue: dict[str, list[int]] = {}
    for r in rows:
        counts = by_queue.setdefault(r["queue"], [0, 0])
        counts[0] += 1
        counts[1] += r["state"] == "dead"
    for queue, (failed, dead) in by_queue.items():
        _count(conn, sql, queue, failed=failed, dead=dead)
    return rows


def prune(db: Database, config: Config, now: float, batch: int = 5000) -> int:
    """Delete dead tasks and finished tasks past their retention and drop results past their
    TTL, ``batch`` rows per transaction (no long lock, no huge transaction). Returns how many
    rows were deleted or cleared. (Other parts prune their own rows: lib/stream.py's events.)"""
    day = 86_400.0
    params = dict(dead_before=now - config.queue_dead_retention_days * day,
                  finished_before=now - config.queue_finished_retention_days * day,
                  result_before=now - config.queue_result_ttl_seconds, batch=batch)
    return in_batches(db, statements(db).PRUNE, params, batch)


def in_batches(db: Database, deletes, params: dict, batch: int) -> int:
    """Run each statement (each changes at most ``:batch`` rows) until it changes fewer; how
    many rows changed in all."""
    total = 0
    for sql in deletes:
        while True:
            with db.transaction() as conn:
                changed = conn.execute(sql, params).rowcount
            total += changed
            if changed < batch:
                break
    return total


def queue_names(db: Database) -> list[str]:
    """Every queue that ever had a task or was paused."""
    return [r["name"] for r in db.execute(statements(db).QUEUE_NAMES)]


class UnknownQueue(LookupError):
    """A queue name nothing uses: most likely a typo (the API answers 404, ``oos`` exits 1)."""


def known_queue(db: Database, name: str, config: Config, create: bool = False) -> str:
    """``name`` if some task was ever enqueued to it, or a handler (this process's or one a
    daemon published), a schedule or ``workers.queues`` names it, or ``create``; else
    UnknownQueue. So pausing, limiting or resetting a misspelt queue is refused instead of
    making a new queue while the real one runs on."""
    queue_name(name)
    if create or name in config.workers_queues or name in registered_queues():
        return name
    if db.execute(statements(db).KNOWN_QUEUE, dict(queue=name))[0][0]:
        return name
    raise UnknownQueue(f"no queue {name!r}: no task, handler, schedule or workers.queues names it "
                       f"(a typo? `oos status` lists the queues; --create makes it anyway)")


def get_queue_manager(name: str = "default", config: Config | None = None, **kwargs) -> QueueManager:
    """The queue ``name`` in the configured database (``OOS_DATA_DIR`` / config file)."""
    config = config or load_config()
    return QueueManager(name, get_database(config), config, **kwargs)
