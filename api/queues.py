"""``/api/v1``: queues, tasks, the dead letter, breakers, workers. Every route needs the token."""
from __future__ import annotations

from apiflask import APIBlueprint, abort
from apiflask.schema_adapters.marshmallow import parser
from flask import jsonify

from api import current
from api.auth import auth
from api.schemas import (
    BreakerOut,
    CountOut,
    DeadPageOut,
    EnqueuedOut,
    EnqueueIn,
    FilterIn,
    LimitsIn,
    LimitsOut,
    PageIn,
    PausedOut,
    QueuesOut,
    QueueStatsOut,
    TaskOut,
    WorkersOut,
)
from helpers import breaker as breakers
from helpers import limits, reports
from helpers import queue_manager as queues
from helpers.validation import MAX_BATCH, NAME_MAX, existing_id, queue_name

bp = APIBlueprint("queues", __name__, url_prefix="/api/v1", tag="Queues")
PLAIN_FIELDS = {"task", "payload"}


def plain_task(body) -> bool:
    """Just a task name of an allowed length and a payload: all EnqueueIn would check, so the
    hottest request skips the schema (a sixth of its time); the queue checks the name itself."""
    return (body.__class__ is dict and body.keys() <= PLAIN_FIELDS and body.get("task").__class__ is str
            and 0 < len(body["task"]) <= NAME_MAX)


def plain_specs(body) -> list | None:
    """The tasks of a body of plain tasks only (see plain_task): one, ``{"tasks": [...]}`` or
    a bare list, of an allowed count. None when EnqueueIn has something to say (for a batch of
    100 the schema took two thirds of the request's time)."""
    if plain_task(body):
        return [body]
    items = body["tasks"] if body.__class__ is dict and body.keys() == {"tasks"} else body
    if items.__class__ is list and 0 < len(items) <= MAX_BATCH and all(map(plain_task, items)):
        return items
    return None


def queue_named(name: str, known: bool = False):
    """The queue ``name`` (InvalidField, a 400 naming ``queue``, for a bad name). ``known``: a
    404 unless something uses it (a control action on a misspelt queue must not make it)."""
    queue_name(name)
    if known:
        try:
            queues.known_queue(current.db(), name, current.config())
        except queues.UnknownQueue as e:
            abort(404, str(e))
    return reports.queue(current.db(), current.config(), name)


@bp.get("/queue/status")
@bp.auth_required(auth)
@bp.output(QueuesOut)
def status():
    """Every queue: counts by state, oldest ready age, alerts."""
    return {"queues": reports.all_queues(current.db(), current.config())}


@bp.get("/queue/<name>/stats")
@bp.auth_required(auth)
@bp.output(QueueStatsOut)
def stats(name):
    queue_named(name)
    return reports.queue_stats(current.db(), current.config(), name)


@bp.post("/queue/<name>/tasks")
@bp.auth_required(auth)
# Checked in the view: EnqueueIn only where it has something to say (see plain_specs).
@bp.input(EnqueueIn, location="json", arg_name="body", validation=False)
@bp.output(EnqueuedOut, status_code=201, description="created; 200 when every task already existed "
                                                     "(a repeated idempotency key)")
def enqueue(name, body):
    """Enqueue one task, or a list (``{"tasks": [...]}`` or a bare JSON list) in one transaction."""
    batch = body.__class__ is not dict or "tasks" in body  # else one task's fields
    specs = plain_specs(body)
    if specs is None:
        body = parser.parse(EnqueueIn, location="json")  # 422 naming the field, as every route
        specs = body["tasks"] if "tasks" in body else [body]
    results = queue_named(name).enqueue_many(specs, batch=batch)
    created = [r.created for r in results]
    # The hottest route: its answer is built as EnqueuedOut says, without the schema's dump.
    response = jsonify(ids=[r.id for r in results], created=created)
    response.status_code = 201 if any(created) else 200
    return response


@bp.get("/queue/<name>/dead-letter")
@bp.auth_required(auth)
@bp.input(PageIn, location="query", arg_name="page")
@bp.output(DeadPageOut)
def dead_letter(name, page):
    """Dead tasks, newest first, with their error history."""
    queue = queue_named(name)
    items = queue.dead_letters(page["limit"], page["offset"], page.get("task"))
    return {"items": [t.to_dict() for t in items], "total": queue.count_dead(page.get("task")),
            "limit": page["limit"], "offset": page["offset"]}


@bp.post("/queue/<name>/dead-letter/<int:task_id>/retry")
@bp.auth_required(auth)
@bp.output(TaskOut, description="the task, queued again with fresh attempts")
def retry_dead(name, task_id):
    queue = queue_named(name)
    if not existing_id(task_id) or queue.retry_dead(task_id=task_id) != 1:
        abort(404, f"no dead task {task_id} in queue {name!r}")
    return queues.get_task(current.db(), task_id).to_dict()


@bp.post("/queue/<name>/dead-letter/retry-all")
@bp.auth_required(auth)
@bp.input(FilterIn, location="query", arg_name="filters")
@bp.output(CountOut)
def retry_all(name, filters):
    """Replay every dead task of the queue (optionally only those named ``task``)."""
    return {"count": queue_named(name).retry_dead(task_name=filters.get("task"))}


@bp.post("/queue/<name>/dead-letter/purge")
@bp.auth_required(auth)
@bp.input(FilterIn, location="query", arg_name="filters")
@bp.output(CountOut)
def purge(name, filters):
    """Delete dead tasks (optionally only by name, or dead for ``older_than`` seconds)."""
    return {"count": queue_named(name).purge_dead(older_than=filters["older_than"], task_name=filters.get("task"))}


@bp.get("/queue/<name>/circuit-breaker")
@bp.auth_required(auth)
@bp.output(BreakerOut)
def breaker(name):
    queue_named(name)
    return breakers.status(current.db(), name)


@bp.post("/queue/<name>/circuit-breaker/reset")
@bp.auth_required(auth)
@bp.output(BreakerOut)
def reset_breaker(name):
    queue_named(name, known=True)
    breakers.reset(current.db(), name)
    return breakers.status(current.db(), name)


def set_paused(name: str, paused: bool) -> dict:
    queue = queue_named(name, known=True)
    queue.pause() if paused else queue.resume()
    return {"queue": name, "paused": paused}


@bp.post("/queue/<name>/pause")
@bp.auth_required(auth)
@bp.output(PausedOut)
def pause(name):
    """Stop handing out the queue's tasks; running ones finish."""
    return set_paused(name, True)


@bp.post("/queue/<name>/resume")
@bp.auth_required(auth)
@bp.output(PausedOut)
def resume(name):
    return set_paused(name, False)


@bp.post("/queue/<name>/purge")
@bp.auth_required(auth)
@bp.output(CountOut, description="how many tasks were cancelled")
def purge_queue(name):
    """Cancel every task of the queue that has not started (queued, or a workflow step waiting
    or blocked); running tasks finish."""
    return {"count": queue_named(name).purge()}


@bp.get("/queue/<name>/limits")
@bp.auth_required(auth)
@bp.output(LimitsOut)
def get_limits(name):
    queue_named(name)
    return {"queue": name, "concurrency": limits.concurrency(current.db(), name)}


@bp.put("/queue/<name>/limits")
@bp.auth_required(auth)
@bp.input(LimitsIn, location="json", arg_name="body")
@bp.output(LimitsOut)
def set_limits(name, body):
    """At most ``concurrency`` running tasks of the queue at once, across every worker and host."""
    queue_named(name, known=True)
    limits.set_concurrency(current.db(), name, body["concurrency"])
    return {"queue": name, "concurrency": limits.concurrency(current.db(), name)}


@bp.get("/workers")
@bp.auth_required(auth)
@bp.output(WorkersOut)
def workers():
    """Desired and actual workers, each worker's pid, task and RSS, the last scaling decision."""
    return reports.daemon_status(current.db(), current.config())
