"""Periodic tasks: a task enqueued on a schedule, once per slot.

```python
from helpers.periodic import periodic

@periodic("0 3 * * *", tz="Europe/Paris")          # every night at 03:00, Paris time
def nightly_report(payload):
    ...

@periodic(every=timedelta(minutes=5), missed="skip")
def poll_feeds(payload):
    ...
```
or in the config file::

    [schedules.nightly]
    task = "report"          # a handler registered with @task
    cron = "0 3 * * *"       # or: every = 300 (seconds)
    tz = "Europe/Paris"
    queue = "reports"        # default: the handler's queue
    payload = {kind = "daily"}
    missed = "once"          # or "skip"

Every running daemon looks at the schedules each second. A slot is taken by one conditional
update of its ``schedules`` row (``last_slot < slot``) in the transaction that enqueues it,
with an idempotency key of the slot (``periodic:<name>:<slot>``) besides: one run per slot,
whatever restarts, crashes or several daemons do. ``every`` slots fall on multiples of the
interval (so daemons agree); ``cron`` is read by croniter, in ``tz``.

Slots missed while no daemon ran (more than MISSED_AFTER seconds late): ``missed="once"``
runs the newest of them once; ``"skip"`` runs none and waits for the next slot.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from helpers.config import Config
from helpers.queue_manager import QueueManager
from helpers.registry import handler_for
from helpers.tasks import task
from helpers.validation import InvalidField, number, queue_name, task_name

MISSED_AFTER = 60.0  # seconds: a slot seen later than this was missed (the daemon was down)
POLICIES = ("once", "skip")
UPSERT = """INSERT INTO schedules (name, task, queue, spec, missed, last_slot, next_at, updated_at)
VALUES (:name, :task, :queue, :spec, :missed, :now, :next_at, :now)
ON CONFLICT (name) DO UPDATE SET task = excluded.task, queue = excluded.queue, spec = excluded.spec,
    missed = excluded.missed, next_at = excluded.next_at, updated_at = excluded.updated_at"""
# The one statement that decides who runs a slot: only the first to move last_slot past it.
TAKE_SLOT = """UPDATE schedules SET last_slot = :slot, next_at = :next_at, updated_at = :now
WHERE name = :name AND last_slot < :slot"""
LAST_TASK = "UPDATE schedules SET last_task = :task WHERE name = :name"
ROWS = "SELECT * FROM schedules ORDER BY name"


@dataclass(frozen=True)
class Schedule:
    name: str
    task: str
    queue: str = "default"
    payload: Any = None
    cron: str | None = None
    every: float | None = None  # seconds
    tz: str = "UTC"
    missed: str = "once"

    def __post_init__(self):
        where = f"schedules.{self.name}." if self.name else ""
        task_name(self.name, f"{where}name")
        task_name(self.task, f"{where}task")
        queue_name(self.queue)
        if (self.cron is None) == (self.every is None):
            raise InvalidField(f"{where}cron", "give cron or every (not both)")
        if self.cron is not None and (not isinstance(self.cron, str) or not croniter.is_valid(self.cron)):
            raise InvalidField(f"{where}cron", f"not a cron expression: {self.cron!r}")
        if self.every is not None:
            number(f"{where}every", self.every, minimum=1)
        try:
            ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise InvalidField(f"{where}tz", f"unknown time zone {self.tz!r}") from None
        if self.missed not in POLICIES:
            raise InvalidField(f"{where}missed", f"expected one of {', '.join(POLICIES)}, got {self.missed!r}")

    @property
    def spec(self) -> str:
        return json.dumps({"cron": self.cron, "tz": self.tz} if self.cron else {"every": self.every})

    def latest_slot(self, now: float) -> float:
        """The newest slot at or before ``now``."""
        if self.every is not None:
            return now // self.every * self.every
        zone = ZoneInfo(self.tz)
        latest = croniter(self.cron, datetime.fromtimestamp(now, zone)).get_prev(float)
        following = croniter(self.cron, datetime.fromtimestamp(latest, zone)).get_next(float)
        return following if following <= now else latest

    def next_slots(self, after: float, count: int = 1) -> list[float]:
        """The first ``count`` slots after ``after``."""
        if self.every is not None:
            first = (after // self.every + 1) * self.every
            return [first + i * self.every for i in range(count)]
        it = croniter(self.cron, datetime.fromtimestamp(after, ZoneInfo(self.tz)))
        return [it.get_next(float) for _ in range(count)]


SCHEDULES: dict[str, Schedule] = {}


def periodic(cron: str | None = None, *, every: float | timedelta | None = None, tz: str = "UTC",
             name: str | None = None, queue: str = "default", payload: Any = None, missed: str = "once",
             **task_options) -> Callable:
    """Register the decorated function as a task (``@task``, named ``name`` or after the
    function) and enqueue it on the schedule: ``cron`` (5 fields, in ``tz``) or ``every``."""
    if isinstance(every, timedelta):
        every = every.total_seconds()

    def register(func):
        task_name_ = name or func.__name__
        SCHEDULES[task_name_] = Schedule(task_name_, task_name_, queue, payload, cron, every, tz, missed)
        return task(task_name_, queue=queue, **task_options)(func)

    return register


def configured(config: Config) -> list[Schedule]:
    """The schedules of the loaded task modules and of the config (``[schedules.<name>]``;
    the config wins for a name in both)."""
    out = dict(SCHEDULES)
    for name, table in config.schedules.items():
        if not isinstance(table, dict):
            raise InvalidField(f"schedules.{name}", "expected a table")
        unknown = set(table) - {"task", "cron", "every", "tz", "queue", "payload", "missed"}
        if unknown:
            raise InvalidField(f"schedules.{name}.{sorted(unknown)[0]}", "unknown key")
        handler = handler_for(table.get("task", ""))
        try:
            out[name] = Schedule(name, table.get("task"), table.get("queue") or (handler.queue if handler else "default"),
                                 table.get("payload"), table.get("cron"), table.get("every"), table.get("tz", "UTC"),
                                 table.get("missed", "once"))
        except InvalidField as e:
            field = e.field if e.field.startswith("schedules.") else f"schedules.{name}.{e.field}"
            raise InvalidField(field, e.problem) from None
    return sorted(out.values(), key=lambda s: s.name)


def register(db, schedules: list[Schedule], now: float | None = None) -> None:
    """Record the schedules (a new one's first run is its next slot; a known one keeps its
    last slot, so a restart neither repeats nor loses one)."""
    now = time.time() if now is None else now
    with db.transaction() as conn:
        for s in schedules:
            conn.execute(UPSERT, dict(name=s.name, task=s.task, queue=s.queue, spec=s.spec, missed=s.missed,
                                      now=now, next_at=s.next_slots(now)[0]))


def tick(db, schedules: list[Schedule], config: Config, now: float | None = None, log=None) -> list[tuple]:
    """Enqueue every slot that came due since the last look. Returns (name, slot, task id or
    None when skipped) for each slot this call took."""
    now = time.time() if now is None else now
    last = {r["name"]: r["last_slot"] for r in db.execute(ROWS)}
    taken = []
    for s in schedules:
        slot = s.latest_slot(now)
        if s.name not in last or slot <= last[s.name]:
            continue
        late = now - slot > MISSED_AFTER
        with db.transaction() as conn:
            if conn.execute(TAKE_SLOT, dict(name=s.name, slot=slot, next_at=s.next_slots(now)[0], now=now)).rowcount != 1:
                continue  # another daemon took it
            task_id = None
            if not (late and s.missed == "skip"):
                key = f"periodic:{s.name}:{slot:.0f}"
                task_id = QueueManager(s.queue, db, config).enqueue_many(
                    [dict(task=s.task, payload=s.payload, idempotency_key=key)], conn=conn)[0].id
                conn.execute(LAST_TASK, dict(task=task_id, name=s.name))
        if task_id is not None:
            db.hint(s.queue)
        taken.append((s.name, slot, task_id))
        if log is not None and late:
            log.warning("periodic slots missed while no daemon ran", schedule=s.name, newest_missed=slot,
                        policy=s.missed, enqueued=task_id is not None)
    return taken


def readable(spec: str) -> str:
    """A schedule's stored spec as people read it: ``0 3 * * * Europe/Paris``, ``every 300 s``."""
    parsed = json.loads(spec)
    return f"{parsed['cron']} {parsed['tz']}" if parsed.get("cron") else f"every {parsed['every']:g} s"


def listing(db, schedules: list[Schedule], now: float | None = None, count: int = 3) -> list[dict]:
    """Every schedule with its next ``count`` runs and the last slot taken: those ``schedules``
    declares (this process loaded them), then those only the database knows (a daemon
    registered them; this process has not loaded their module): ``declared`` false, their
    next run as the daemon last computed it."""
    now = time.time() if now is None else now
    rows = {r["name"]: r for r in db.execute(ROWS)}
    out = []
    for s in schedules:
        row = rows.pop(s.name, None)
        out.append(dict(name=s.name, task=s.task, queue=s.queue, schedule=readable(s.spec), cron=s.cron, every=s.every, tz=s.tz,
                        missed=s.missed, next_runs=s.next_slots(now, count), declared=True,
                        last_slot=row["last_slot"] if row else None, last_task=row["last_task"] if row else None))
    for name, row in sorted(rows.items()):
        spec = json.loads(row["spec"])
        out.append(dict(name=name, task=row["task"], queue=row["queue"], schedule=readable(row["spec"]),
                        cron=spec.get("cron"), every=spec.get("every"), tz=spec.get("tz"), missed=row["missed"], next_runs=[row["next_at"]] if row["next_at"] else [],
                        declared=False, last_slot=row["last_slot"], last_task=row["last_task"]))
    return out
