"""One circuit breaker per queue, kept in SQLite so every worker process shares it and it
survives a restart.

pybreaker runs the state machine (closed -> open after ``fail_max`` consecutive failures,
half-open after ``reset_timeout``, closed again on a successful trial); ``SQLiteStorage`` is
where it keeps its state. Workers ask ``may_claim`` before claiming: nothing while open, a
single trial task once the timeout has passed, everything while closed. Tasks waiting behind an
open breaker are simply not claimed, so they use up no attempts.

A breaker protects a queue from a dependency that is down, not from one task's bad input:
it hears only a task's first failure by its own handler (the worker runs a task that failed
before beside the breaker), never a PermanentError, and its trial takes a task that never
failed, newest first (``queue_sql.TRIAL_ORDER``). So a few poison tasks cost the rest of the
queue at most about one ``reset_timeout``.
"""
from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime

import pybreaker

from helpers.engine import Database
from helpers.registry import PermanentError

ROW = "SELECT * FROM breakers WHERE name = ?"
ENSURE = "INSERT INTO breakers (name) VALUES (?) ON CONFLICT DO NOTHING"
SET = "UPDATE breakers SET {column} = ? WHERE name = ?"
ADD = "UPDATE breakers SET {column} = {column} + 1 WHERE name = ?"
RESET = """UPDATE breakers SET state = 'closed', fail_counter = 0, success_counter = 0,
    opened_at = NULL WHERE name = ?"""
ALL = "SELECT * FROM breakers ORDER BY name"


# Seconds a worker's view of its queue's breaker serves: pybreaker reads the state twice per
# call, and on PostgreSQL those round trips were most of a no-op task's cost. While the view
# says closed the worker claims without reading the row first: its claim takes nothing unless
# the breaker is still closed (``dequeue_batch(breaker=...)``), so another worker's trip stops
# its claims at once; the view's counters are at most this old.
BATCH_VIEW = 1.0


class SQLiteStorage(pybreaker.CircuitBreakerStorage):
    """pybreaker's storage interface over one row of the ``breakers`` table. Writes only when
    a value changes; reads the row each time it is asked, except within ``hold()``'s window,
    when the last row read serves (any write here forgets it). So a healthy queue's worker
    costs one read a second (``may_claim``) and no writes."""

    def __init__(self, db: Database, name: str):
        super().__init__(name)
        self.db = db
        self._held_until = 0.0
        self._kept = None
        db.execute(ENSURE, (name,))

    def hold(self, seconds: float) -> None:
        """Read the row now, and let that read serve for ``seconds`` (see BATCH_VIEW)."""
        self.forget()
        self._kept = self._row()
        self._held_until = time.monotonic() + seconds

    def closed_view(self) -> bool:
        """Whether a read less than ``hold()``'s seconds ago found the breaker closed."""
        return self._kept is not None and time.monotonic() < self._held_until and \
            self._kept["state"] == pybreaker.STATE_CLOSED

    def quiet_view(self) -> bool:
        """``closed_view()``, and no failure counted in it: a success would change nothing."""
        return self.closed_view() and not self._kept["fail_counter"]

    def forget(self) -> None:
        """The next read goes to the table (called before every write)."""
        self._kept = None

    def _row(self):
        if self._kept is not None and time.monotonic() < self._held_until:
            return self._kept
        rows = self.db.execute(ROW, (self.name,))
        if not rows:
            self.db.execute(ENSURE, (self.name,))
            rows = self.db.execute(ROW, (self.name,))
        self._kept = rows[0]
        return rows[0]

    def _set(self, column: str, value) -> None:
        self.forget()
        self.db.execute(SET.format(column=column), (value, self.name))

    @property
    def state(self) -> str:
        return self._row()["state"]

    @state.setter
    def state(self, state: str) -> None:
        self._set("state", state)

    def increment_counter(self) -> None:
        self.forget()
        self.db.execute(ADD.format(column="fail_counter"), (self.name,))

    def reset_counter(self) -> None:
        if self._row()["fail_counter"]:
            self._set("fail_counter", 0)

    def increment_success_counter(self) -> None:
        self.forget()
        self.db.execute(ADD.format(column="success_counter"), (self.name,))

    def reset_success_counter(self) -> None:
        if self._row()["success_counter"]:
            self._set("success_counter", 0)

    @property
    def counter(self) -> int:
        return self._row()["fail_counter"]

    @property
    def success_counter(self) -> int:
        return self._row()["success_counter"]

    @property
    def opened_at(self) -> datetime | None:
        at = self._row()["opened_at"]
        return None if at is None else datetime.fromtimestamp(at, UTC)

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        self._set("opened_at", value.timestamp())


def shared_breaker(db: Database, name: str, fail_max: int, reset_timeout: float,
                   exclude=()) -> pybreaker.CircuitBreaker:
    """A breaker whose state every process shares (``queue:<q>``, ``provider:<p>``,
    ``search:google``). A call that trips it re-raises the call's own error
    (``throw_new_error_on_trip=False``), so the failure is recorded with its real cause."""
    return pybreaker.CircuitBreaker(fail_max=fail_max, reset_timeout=reset_timeout,
                                    state_storage=SQLiteStorage(db, name), name=name,
                                    exclude=list(exclude), throw_new_error_on_trip=False)


def queue_breaker(db: Database, queue: str, fail_max: int = 10,
                  reset_timeout: float = 60.0) -> pybreaker.CircuitBreaker:
    """The breaker of ``queue``. A PermanentError is the handler saying its input is bad, not
    that a dependency is down: it does not count."""
    return shared_breaker(db, f"queue:{queue}", fail_max, reset_timeout, exclude=[PermanentError])


# Taking the one trial is a conditional write, so of several workers asking at once exactly
# one gets it: open past the timeout -> half-open, or a half-open trial out for two timeouts
# (its worker presumably gone) -> taken again.
TAKE_TRIAL = """UPDATE breakers SET state = 'half-open', opened_at = CASE WHEN state = 'half-open'
    THEN :now - :timeout ELSE opened_at END
WHERE name = :name AND ((state = 'open' AND opened_at <= :now - :timeout)
                        OR (state = 'half-open' AND opened_at <= :now - 2 * :timeout))"""


def may_claim(breaker: pybreaker.CircuitBreaker, now: float | None = None) -> int | None:
    """How many tasks a worker may claim from the breaker's queue: None for no limit (closed),
    1 for the trial (open past its timeout, or a half-open trial out for longer than twice the
    timeout), 0 otherwise. Of several workers asking at once, exactly one gets the trial.
    None without a read while the last one, under BATCH_VIEW ago, found it closed: the caller
    then claims with ``dequeue_batch(breaker=breaker.name)``, which checks it again."""
    storage = breaker._state_storage
    if storage.closed_view():
        return None
    storage.hold(BATCH_VIEW)
    if storage._row()["state"] == pybreaker.STATE_CLOSED:
        return None
    now = time.time() if now is None else now
    storage.forget()
    taken = storage.db.execute(TAKE_TRIAL + " RETURNING name",
                               dict(name=storage.name, now=now, timeout=breaker.reset_timeout))
    return 1 if taken else 0


def look_again(breaker: pybreaker.CircuitBreaker) -> None:
    """The next ``may_claim`` reads the breaker's row (after a claim that found nothing: another
    worker's failures may have opened it)."""
    breaker._state_storage.forget()


def call(breaker: pybreaker.CircuitBreaker, func, *args):
    """``breaker.call(func, *args)``, without pybreaker's bookkeeping where it would do nothing:
    while the worker's view (BATCH_VIEW) says closed with no failure counted, a success
    changes nothing, so ``func`` runs bare, and a failure is then told to the breaker as
    pybreaker would have heard it (counted, or not if excluded; it may open the breaker)."""
    if not breaker._state_storage.quiet_view():
        return breaker.call(func, *args)
    try:
        return func(*args)
    except BaseException as error:
        with contextlib.suppress(pybreaker.CircuitBreakerError):  # opened meanwhile: not counted
            breaker.call(_raise, error)  # raises ``error`` again once counted
        raise


def _raise(error: BaseException):
    raise error


def reset(db: Database, queue: str) -> None:
    """Close the queue's breaker and clear its counters."""
    db.execute(ENSURE, (f"queue:{queue}",))
    db.execute(RESET, (f"queue:{queue}",))


def status(db: Database, queue: str) -> dict:
    """The breaker's stored state: ``state``, ``fail_counter``, ``opened_at`` (or closed
    defaults when the queue never had one)."""
    rows = db.execute(ROW, (f"queue:{queue}",))
    if not rows:
        return {"queue": queue, "state": "closed", "fail_counter": 0, "opened_at": None}
    row = rows[0]
    return {"queue": queue, "state": row["state"], "fail_counter": row["fail_counter"],
            "opened_at": row["opened_at"]}


def state(db: Database, name: str) -> str:
    """The stored state of the breaker called ``name`` (``closed`` if it never tripped)."""
    rows = db.execute(ROW, (name,))
    return rows[0]["state"] if rows else "closed"


def all_status(db: Database) -> list[dict]:
    return [status(db, r["name"].removeprefix("queue:")) for r in db.execute(ALL)
            if r["name"].startswith("queue:")]
