"""Request and response schemas: they validate input and generate the OpenAPI document."""
from __future__ import annotations

import dataclasses
import datetime
import re

from apiflask import Schema, fields, validators
from marshmallow import RAISE, ValidationError, missing, pre_load, validates_schema

from helpers.queue_manager import STATES, Task
from helpers.times import iso
from helpers.validation import (
    CONCURRENCY_RANGE,
    DELAY_MAX,
    MAX_ATTEMPTS_RANGE,
    MAX_BATCH,
    MAX_ID,
    MAX_PAGE,
    MEMORY_CONTENT_MAX,
    MEMORY_TYPES,
    MIN_TIMEOUT,
    NAME_MAX,
    PRIORITY_RANGE,
    PROVIDERS,
    RATE_PATTERN,
    TIMEOUT_MAX,
    UNIQUE_FOR_MAX,
    InvalidField,
    stored_text,
)


def iso_of(name: str):
    """The epoch field ``name`` again as ISO 8601 UTC text (``<name>_iso``)."""
    return fields.Function(lambda obj: iso(obj.get(name)), dump_only=True, allow_none=True,
                           metadata={"type": "string", "format": "date-time",
                                     "description": f"{name} as ISO 8601, UTC"})


class Number(fields.Float):
    """A number in a JSON body: a JSON number, never a string of one (``"10"``) nor a boolean,
    as the strict integers refuse them too: one rule for every number a client sends."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, (str, bool)):
            raise ValidationError("Not a valid number.")
        return super()._deserialize(value, attr, data, **kwargs)


class Moment(fields.Float):
    """A time in a query: epoch seconds, or ISO 8601 (``2026-12-07T10:00:00+01:00``; without an
    offset, UTC), as the CLI takes it."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str) and not re.fullmatch(r"\s*[-+]?[\d.eE+-]+\s*", value):
            # "+01:00" unescaped in a URL arrives as " 01:00"
            value = re.sub(r" (\d\d:?\d\d)$", r"+\1", value.strip())
            try:
                moment = datetime.datetime.fromisoformat(value)
            except ValueError:
                raise ValidationError("Not a time: give epoch seconds or ISO 8601.") from None
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=datetime.UTC)
            return moment.timestamp()
        return super()._deserialize(value, attr, data, **kwargs)


NO_NUL = "^[^\\x00]*$"  # JSON Schema (ECMA-262) and Python read it alike


class Whole(fields.Integer):
    """An integer in a JSON body: a JSON number with no fraction (``5`` or ``5.0``, as JSON
    Schema's ``integer`` says), never a string of one nor a boolean."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class Flag(fields.Boolean):
    """A JSON ``true`` or ``false``, never ``0``, ``1`` or ``"yes"``."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


class Text(fields.String):
    """A string both engines can store (``stored_text``: no NUL, no lone surrogate); the
    document says so with a pattern (a field may give a stricter one)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.metadata = {"pattern": NO_NUL, **self.metadata}

    def _deserialize(self, value, attr, data, **kwargs):
        try:
            return stored_text(attr, super()._deserialize(value, attr, data, **kwargs))
        except InvalidField as e:
            raise ValidationError(e.problem) from None


class Strict(Schema):
    class Meta:
        unknown = RAISE


class TaskNumbers(Strict):
    """A task's numbers, in the ranges the queue checks (helpers/validation.py)."""
    priority = Whole(validate=validators.Range(*PRIORITY_RANGE),
                              metadata={"description": "higher runs first (default 0)"})
    delay = Number(allow_nan=False, validate=validators.Range(0, DELAY_MAX),
                         metadata={"description": "seconds before it may run"})
    max_attempts = Whole(validate=validators.Range(*MAX_ATTEMPTS_RANGE), metadata={
        "description": "attempts before the dead letter (default: the handler's @task(max_attempts=), else the config's)"})
    timeout = Number(allow_nan=False, validate=validators.Range(MIN_TIMEOUT, TIMEOUT_MAX),
                           metadata={"description": "lease and run-time limit in seconds (default: the handler's)"})


class TaskIn(TaskNumbers):
    task = Text(required=True, validate=validators.Length(1, NAME_MAX),
                metadata={"description": "the task's name (its handler)"})
    payload = fields.Raw(allow_none=True, load_default=None, metadata={"description": "any JSON value"})
    idempotency_key = Text(validate=validators.Length(1, NAME_MAX), metadata={
        "description": "an enqueue with a key already used in this queue stores nothing and answers that task"})
    unique_key = Text(validate=validators.Length(1, NAME_MAX), metadata={
        "description": "no second task with this key while one is queued or running"})
    unique_for = Number(allow_nan=False, validate=validators.Range(0, UNIQUE_FOR_MAX, min_inclusive=False),
                        metadata={"description": "seconds the unique key holds at most (default 3600)",
                                  "exclusiveMinimum": 0})


class EnqueueIn(TaskIn):
    """One task (the fields of TaskIn) or ``{"tasks": [...]}``; a bare JSON list works too."""
    tasks = fields.List(fields.Nested(TaskIn), validate=validators.Length(1, MAX_BATCH))

    def on_bind_field(self, field_name, field_obj):
        # TaskIn's own fields, but none is given when 'tasks' is (checked in one_or_many)
        if field_name == "task":
            field_obj.required = False
        if field_name == "payload":
            field_obj.load_default = missing

    @pre_load
    def wrap_list(self, data, **kwargs):
        return {"tasks": data} if isinstance(data, list) else data

    @validates_schema
    def one_or_many(self, data, **kwargs):
        if "tasks" in data and len(data) > 1:
            raise ValidationError("give either one task's fields or 'tasks', not both", "tasks")
        if "tasks" not in data and "task" not in data:
            raise ValidationError("Missing data for required field.", "task")


class EnqueuedOut(Schema):
    ids = fields.List(fields.Integer())
    created = fields.List(fields.Boolean())


# A task as answered: the fields of helpers.queue_manager.Task, each by its type (a new task
# column reaches the answers and the document without a line here); the times again as ISO.
TASK_NOTES = {
    "payload": "any JSON value", "progress": "0..1, set by the handler",
    "cancel_requested": "when a cancel of the running task was asked",
    "workflow": "the workflow's first task", "waiting_on": "workflow steps before it not yet succeeded",
    "failures": "attempts its own handler failed (raised or timed out)",
}
_OUT_TYPES = {"int": fields.Integer, "float": fields.Float, "str": fields.String}


def _task_out_fields() -> dict:
    out = {}
    for f in dataclasses.fields(Task):
        name = "payload" if f.name == "task_data" else f.name
        kind, _, optional = f.type.partition(" | ")
        meta = {"metadata": {"description": TASK_NOTES[name]}} if name in TASK_NOTES else {}
        if kind in _OUT_TYPES:
            out[name] = _OUT_TYPES[kind](allow_none=bool(optional), **meta)
        elif kind == "list":
            out[name] = fields.List(fields.Dict(), **meta)
        else:
            out[name] = fields.Raw(allow_none=True, **meta)
    for name in ("run_at", "lease_until", "created_at", "started_at", "finished_at"):
        out[f"{name}_iso"] = iso_of(name)
    return out


TaskOut = Schema.from_dict(_task_out_fields(), name="TaskOut")


class Page(Strict):
    limit = fields.Integer(load_default=50, validate=validators.Range(1, MAX_PAGE))
    offset = fields.Integer(load_default=0, validate=validators.Range(0, 10**9))


class PageIn(Page):
    task = Text(validate=validators.Length(1, NAME_MAX))


class DeadPageOut(Schema):
    items = fields.List(fields.Nested(TaskOut))
    total = fields.Integer()
    limit = fields.Integer()
    offset = fields.Integer()


class FilterIn(Strict):
    task = Text(validate=validators.Length(1, NAME_MAX),
                metadata={"description": "only dead tasks with this name"})
    older_than = fields.Float(load_default=0.0, validate=validators.Range(0, 10**10),
                              metadata={"description": "purge: only tasks dead for this many seconds"})


class CountOut(Schema):
    count = fields.Integer()


class BreakerOut(Schema):
    queue = fields.String()
    state = fields.String()
    fail_counter = fields.Integer()
    opened_at = fields.Float(allow_none=True)
    opened_at_iso = iso_of("opened_at")


class QueueStatsOut(Schema):
    queue = fields.String()
    counts = fields.Dict(keys=fields.String(), values=fields.Integer())
    ready = fields.Integer()
    delayed = fields.Integer()
    oldest_ready_age = fields.Float()
    paused = fields.Boolean()
    totals = fields.Dict(keys=fields.String(), values=fields.Integer())
    succeeded_last_minute = fields.Integer()
    depth_alert = fields.Boolean()
    breaker = fields.Nested(BreakerOut)
    served = fields.Boolean(allow_none=True, metadata={
        "description": "whether the running daemon claims from this queue (null: no daemon runs)"})
    alerts = fields.List(fields.String())


class QueuesOut(Schema):
    queues = fields.List(fields.Nested(QueueStatsOut))


class PausedOut(Schema):
    queue = fields.String()
    paused = fields.Boolean()


class WorkerOut(Schema):
    pid = fields.Integer()
    id = fields.String()
    task_id = fields.Integer(allow_none=True)
    rss_mb = fields.Float()
    tasks_done = fields.Integer()
    started_at = fields.Float(allow_none=True)
    last_beat = fields.Float(allow_none=True)
    idle_since = fields.Float(allow_none=True)
    draining = fields.Boolean()
    drain_reason = fields.String(allow_none=True)
    task_started = fields.Float(allow_none=True)
    daemon = fields.String(metadata={"description": "host:pid of the daemon it belongs to"})
    started_at_iso = iso_of("started_at")
    last_beat_iso = iso_of("last_beat")
    idle_since_iso = iso_of("idle_since")


class DaemonOut(Schema):
    daemon = fields.String(metadata={"description": "host:pid of its manager"})
    host = fields.String()
    pid = fields.Integer()
    started_at = fields.Float()
    last_beat = fields.Float(metadata={"description": "its last heartbeat (every second)"})
    age = fields.Float(metadata={"description": "seconds since its last beat, by the database's clock"})
    alive = fields.Boolean()
    rescued_at = fields.Float(allow_none=True, metadata={"description": "when another daemon failed its "
                                                                        "tasks after it stopped answering"})
    workers = fields.Integer()
    served_queues = fields.List(fields.String())
    started_at_iso = iso_of("started_at")
    last_beat_iso = iso_of("last_beat")


class WorkersOut(Schema):
    running = fields.Boolean()
    pid = fields.Integer(allow_none=True)
    updated_at = fields.Float(allow_none=True)
    workers_desired = fields.Integer()
    workers_actual = fields.Integer()
    workers = fields.List(fields.Nested(WorkerOut))
    last_scaling = fields.Dict(allow_none=True)
    served_queues = fields.List(fields.String())
    daemons = fields.List(fields.Nested(DaemonOut), metadata={"description": "every daemon on this database"})
    updated_at_iso = iso_of("updated_at")


class CheckOut(Schema):
    status = fields.String()
    detail = fields.String()


class HealthOut(Schema):
    status = fields.String()
    checks = fields.Dict(keys=fields.String(), values=fields.Nested(CheckOut))


class ErrorBody(Schema):
    code = fields.Integer()
    message = fields.String()
    field = fields.String(allow_none=True)


class ErrorOut(Schema):
    error = fields.Nested(ErrorBody)


# -- the assistant ------------------------------------------------------------------------

class SessionIn(Strict):
    system_prompt = Text(load_default="", validate=validators.Length(0, 8000))
    provider = Text(validate=validators.OneOf(PROVIDERS))
    metadata = fields.Dict(load_default=dict)
    user_id = Text(validate=validators.Length(1, NAME_MAX))


class SessionOut(Schema):
    id = fields.String()
    user_id = fields.String(allow_none=True)
    system_prompt = fields.String()
    provider = fields.String(allow_none=True)
    metadata = fields.Dict()
    created_at = fields.Float()
    messages = fields.Integer()
    created_at_iso = iso_of("created_at")


class SessionsOut(Schema):
    items = fields.List(fields.Nested(SessionOut))


class SessionListIn(Page):
    user_id = Text(validate=validators.Length(1, NAME_MAX))


class MessageIn(Strict):
    content = Text(required=True, validate=validators.Length(1, 32_000))
    use_search = Flag(load_default=False)
    plan = Flag(load_default=False, metadata={
        "description": "answer with agents: a planner splits the request, an agent takes each part, "
                       "and the answer is written from theirs (GET .../messages/<id>/plan)"})


class WaitIn(Strict):
    wait = fields.Float(load_default=0.0, validate=validators.Range(0, 60),
                        metadata={"description": "seconds to wait for it to finish before answering (at most 60)"})


class MessageOut(Schema):
    id = fields.Integer()
    session_id = fields.String()
    role = fields.String()
    content = fields.String()
    created_at = fields.Float()
    reply_to = fields.Integer(allow_none=True)
    provider = fields.String(allow_none=True)
    task_id = fields.Integer(allow_none=True)
    reply_status = fields.String()
    reply_error = fields.String(allow_none=True)
    reply_id = fields.Integer(allow_none=True)
    step_of = fields.Integer(allow_none=True, metadata={"description": "a step of the reply to this message"})
    tool_calls = fields.List(fields.Dict(), allow_none=True, metadata={"description": "the tools a step asked for"})
    tool_call_id = fields.String(allow_none=True, metadata={"description": "the call a tool result answers"})
    plan = fields.Boolean(metadata={"description": "agents answer this message (GET .../messages/<id>/plan)"})
    created_at_iso = iso_of("created_at")


class PostedOut(Schema):
    message_id = fields.Integer()
    task_id = fields.Integer()
    reply = fields.Nested(MessageOut, allow_none=True)


class MessagesIn(Strict):
    after = fields.Integer(load_default=0, validate=validators.Range(0, 2**62))
    limit = fields.Integer(load_default=100, validate=validators.Range(1, MAX_PAGE))


class MessagesOut(Schema):
    items = fields.List(fields.Nested(MessageOut))


class StreamIn(Strict):
    after = fields.Integer(validate=validators.Range(0, 2**62), metadata={
        "description": "resume after this event id (what the Last-Event-ID header says, for clients that "
                       "cannot send it)"})


class PlanStepOut(Schema):
    position = fields.Integer()
    role = fields.String()
    instruction = fields.String()
    session_id = fields.String(metadata={"description": "the agent's own session"})
    task_id = fields.Integer(allow_none=True)
    attempts = fields.Integer(allow_none=True)
    state = fields.String(metadata={"description": "done, or its task's state"})
    error = fields.String(allow_none=True)
    reply = fields.String(allow_none=True)
    provider = fields.String(allow_none=True)


class PlanOut(Schema):
    message_id = fields.Integer()
    planner = fields.String(metadata={"description": "model or rules"})
    state = fields.String(metadata={"description": "running, joining, done or failed"})
    join_task = fields.Integer(allow_none=True)
    join_error = fields.String(allow_none=True)
    reply_id = fields.Integer(allow_none=True)
    created_at = fields.Float()
    steps = fields.List(fields.Nested(PlanStepOut))


class MemoryIn(Strict):
    type = Text(required=True, validate=validators.OneOf(MEMORY_TYPES))
    content = Text(required=True, validate=validators.Length(1, MEMORY_CONTENT_MAX))
    session_id = Text(validate=validators.Length(1, 64))
    user_id = Text(validate=validators.Length(1, NAME_MAX))
    ttl_seconds = Number(validate=validators.Range(0, 10**9, min_inclusive=False), metadata={"exclusiveMinimum": 0})

    @validates_schema
    def scoped(self, data, **kwargs):
        if not (data.get("session_id") or data.get("user_id")):
            raise ValidationError("give a session_id or a user_id", "session_id")


class MemoryPatchIn(Strict):
    type = Text(validate=validators.OneOf(MEMORY_TYPES))
    content = Text(validate=validators.Length(1, MEMORY_CONTENT_MAX))
    ttl_seconds = Number(validate=validators.Range(0, 10**9, min_inclusive=False), metadata={"exclusiveMinimum": 0})


class MemoryOut(Schema):
    id = fields.Integer()
    type = fields.String()
    session_id = fields.String(allow_none=True)
    user_id = fields.String(allow_none=True)
    content = fields.String()
    created_at = fields.Float()
    updated_at = fields.Float()
    expires_at = fields.Float(allow_none=True)
    score = fields.Float()
    created_at_iso = iso_of("created_at")
    updated_at_iso = iso_of("updated_at")
    expires_at_iso = iso_of("expires_at")


class MemoriesOut(Schema):
    items = fields.List(fields.Nested(MemoryOut))


class MemoryListIn(Page):
    session_id = Text(validate=validators.Length(1, 64))
    user_id = Text(validate=validators.Length(1, NAME_MAX))
    type = Text(validate=validators.OneOf(MEMORY_TYPES))


class MemorySearchIn(Strict):
    q = Text(required=True, validate=validators.Length(1, 1000))
    session_id = Text(validate=validators.Length(1, 64))
    user_id = Text(validate=validators.Length(1, NAME_MAX))
    limit = fields.Integer(load_default=5, validate=validators.Range(1, 100))


class ProviderOut(Schema):
    name = fields.String()
    model = fields.String()
    remote = fields.Boolean()
    breaker = fields.String()
    calls = fields.Integer()
    errors = fields.Integer()
    last_error = fields.String(allow_none=True)
    latency_ms = fields.Float(allow_none=True)


class ProvidersOut(Schema):
    items = fields.List(fields.Nested(ProviderOut))



class TaskQueryIn(Strict):
    queue = Text(validate=validators.Length(1, 100))
    state = Text(validate=validators.OneOf(STATES))
    task = Text(validate=validators.Length(1, NAME_MAX), metadata={"description": "the task's name"})
    since = Moment(allow_nan=False, metadata={"description": "created at or after (epoch seconds or ISO 8601)"})
    until = Moment(allow_nan=False, metadata={"description": "created before (epoch seconds or ISO 8601)"})
    text = Text(validate=validators.Length(1, 200), metadata={"description": "the payload contains it"})
    before = fields.Integer(validate=validators.Range(1, MAX_ID), metadata={
        "description": "the `next` cursor of the previous page"})
    limit = fields.Integer(load_default=50, validate=validators.Range(1, MAX_PAGE))


class TaskPageOut(Schema):
    items = fields.List(fields.Nested(TaskOut))
    next = fields.Integer(allow_none=True, metadata={"description": "pass as `before` for the next page"})


class WhyOut(Schema):
    task = fields.Integer()
    state = fields.String()
    blockers = fields.List(fields.Dict(), metadata={"description": "each with `reason` and `detail`; "
                                                                  "empty for a task that is next"})


class OutcomeOut(Schema):
    """What an action on a task did, and the task after it."""
    outcome = fields.String(metadata={"description": "cancelled, cancelling (it was running), or due now"})
    task = fields.Nested(TaskOut)


class StepIn(TaskIn):
    """A task (TaskIn's fields but its keys: a step runs when the steps before it end) on a
    queue of its own, after other steps (helpers/workflow.py's STEP_FIELDS)."""

    class Meta:
        exclude = ("idempotency_key", "unique_key", "unique_for")

    queue = Text(validate=validators.Length(1, 100))
    after = fields.List(Whole(), metadata={"description": "indexes of the steps it runs after"})


class WorkflowIn(Strict):
    steps = fields.List(fields.Nested(StepIn), required=True, validate=validators.Length(1, MAX_BATCH))


class WorkflowCreatedOut(Schema):
    workflow = fields.Integer()
    ids = fields.List(fields.Integer())


class WorkflowStepOut(TaskOut):
    after = fields.List(fields.Integer())


class WorkflowOut(Schema):
    workflow = fields.Integer()
    state = fields.String()
    counts = fields.Dict(keys=fields.String(), values=fields.Integer())
    steps = fields.List(fields.Nested(WorkflowStepOut))


class ScheduleOut(Schema):
    name = fields.String()
    task = fields.String()
    queue = fields.String()
    cron = fields.String(allow_none=True)
    every = fields.Float(allow_none=True)
    tz = fields.String(allow_none=True)
    schedule = fields.String(metadata={"description": "as people read it: a cron line and zone, or every N s"})
    declared = fields.Boolean(metadata={"description": "false: registered by a daemon whose task modules this "
                                                       "API process has not loaded"})
    missed = fields.String()
    next_runs = fields.List(fields.Float())
    last_slot = fields.Float(allow_none=True)
    last_task = fields.Integer(allow_none=True)


class SchedulesOut(Schema):
    schedules = fields.List(fields.Nested(ScheduleOut))


class TaskMetricsIn(Strict):
    hours = fields.Float(load_default=1.0, validate=validators.Range(0.01, 168),
                         metadata={"description": "the window: the last HOURS (at most a week)"})


class TaskMetricOut(Schema):
    task = fields.String()
    queue = fields.String()
    runs = fields.Integer()
    failures = fields.Integer(metadata={"description": "runs whose handler raised or timed out"})
    run_mean = fields.Float(allow_none=True, metadata={"description": "seconds; so are the percentiles"})
    run_p50 = fields.Float(allow_none=True)
    run_p95 = fields.Float(allow_none=True)
    run_p99 = fields.Float(allow_none=True)
    wait_mean = fields.Float(allow_none=True, metadata={"description": "from when the task was due to its start"})
    wait_p50 = fields.Float(allow_none=True)
    wait_p95 = fields.Float(allow_none=True)


class TaskMetricsOut(Schema):
    items = fields.List(fields.Nested(TaskMetricOut))


class LimitsIn(Strict):
    concurrency = Whole(required=True, allow_none=True, validate=validators.Range(*CONCURRENCY_RANGE),
                                 metadata={"description": "running tasks of the queue at once; null: no limit"})


class LimitsOut(Schema):
    queue = fields.String()
    concurrency = fields.Integer(allow_none=True)


class RateLimitIn(Strict):
    rate = Text(required=True, allow_none=True, validate=validators.Length(1, 100), metadata={
        "description": "N/s, N/min or N/h for every worker together; null: no limit", "pattern": RATE_PATTERN})


class RateLimitsOut(Schema):
    rate_limits = fields.Dict(keys=fields.String(), values=fields.String())
