"""``/api/v1``: tasks (browse, wait for a result, why it does not run, cancel), workflows,
periodic schedules and rate limits. Every route needs the token."""
from __future__ import annotations

import time

from apiflask import APIBlueprint, abort

from api import current
from api.auth import auth
from api.errors import or_404
from api.schemas import (
    OutcomeOut,
    RateLimitIn,
    RateLimitsOut,
    SchedulesOut,
    TaskMetricsIn,
    TaskMetricsOut,
    TaskOut,
    TaskPageOut,
    TaskQueryIn,
    WaitIn,
    WhyOut,
    WorkflowCreatedOut,
    WorkflowIn,
    WorkflowOut,
)
from helpers import blockers, limits, periodic, workflow
from helpers import queue_manager as queues
from helpers import task_metrics as metrics

bp = APIBlueprint("tasks", __name__, url_prefix="/api/v1", tag="Tasks")


def task_or_404(task_id: int) -> dict:
    return or_404(queues.get_task(current.db(), task_id), f"task {task_id}").to_dict()


@bp.get("/tasks")
@bp.auth_required(auth)
@bp.input(TaskQueryIn, location="query", arg_name="query")
@bp.output(TaskPageOut)
def browse(query):
    """Tasks matching every filter given, newest first; page on with ``before=<next>``."""
    query = dict(query)
    limit = query.pop("limit")
    items, cursor = queues.browse(current.db(), name=query.pop("task", None), limit=limit, **query)
    return {"items": [t.to_dict() for t in items], "next": cursor}


@bp.get("/tasks/<int:task_id>")
@bp.auth_required(auth)
@bp.input(WaitIn, location="query", arg_name="query")
@bp.output(TaskOut, description="the task; with `wait`, once it finished or the wait ran out (then as it is)")
def get_task(task_id, query):
    """A task with its result, errors and progress. ``?wait=SECONDS`` (at most 60) answers as
    soon as the task is finished. Each wait holds one of the server's threads, so at most half
    of them wait at once; past that, the task is answered as it is."""
    if query["wait"] and current.waiters().acquire(blocking=False):
        try:
            return queues.wait(current.db(), task_id, query["wait"]).to_dict()
        except TimeoutError:
            pass
        except LookupError:
            abort(404, f"no task {task_id}")
        finally:
            current.waiters().release()
    return task_or_404(task_id)


@bp.get("/tasks/<int:task_id>/why")
@bp.auth_required(auth)
@bp.output(WhyOut)
def why(task_id):
    """What holds the task back: paused queue, open breaker, not due yet, waiting for workflow
    steps, a limit, no daemon or handler for it, tasks ahead of it."""
    return or_404(blockers.why(current.db(), current.config(), task_id), f"task {task_id}")


@bp.delete("/tasks/<int:task_id>")
@bp.auth_required(auth)
@bp.output(OutcomeOut, description="cancelled (it had not started)")
@bp.doc(responses={202: "cancelling: it runs; its worker stops it (cooperatively, then by force after "
                        "workers.cancel_grace)", 409: "the task is finished"})
def cancel_task(task_id):
    """Cancel a task. One not started ends cancelled at once (and the workflow steps after
    it); a running one is stopped by its worker and ends cancelled. Never retried."""
    state = task_or_404(task_id)["state"]
    outcome = queues.cancel_task(current.db(), task_id)
    if outcome is None:
        abort(409, f"task {task_id} is {state}; only unfinished tasks can be cancelled")
    return {"outcome": outcome, "task": task_or_404(task_id)}, 202 if outcome == "cancelling" else 200


@bp.post("/tasks/<int:task_id>/run-now")
@bp.auth_required(auth)
@bp.output(OutcomeOut, description="due now")
@bp.doc(responses={409: "the task is not waiting for a delay or a backoff"})
def run_now(task_id):
    """Run a task now that waits for its delay or its retry's backoff (it becomes due at once)."""
    state = task_or_404(task_id)["state"]
    if not queues.run_now(current.db(), task_id):
        abort(409, f"task {task_id} is {state} and not waiting for a delay or a backoff")
    return {"outcome": "due now", "task": task_or_404(task_id)}


@bp.post("/workflows")
@bp.auth_required(auth)
@bp.input(WorkflowIn, location="json", arg_name="body")
@bp.output(WorkflowCreatedOut, status_code=201)
def submit_workflow(body):
    """Store a workflow: steps, each with ``after`` (indexes of the steps it runs after).
    A chain: ``after: [i - 1]``; a chord's callback: ``after`` every step of the group."""
    return workflow.submit(current.db(), body["steps"], current.config())


@bp.get("/workflows/<int:workflow_id>")
@bp.auth_required(auth)
@bp.output(WorkflowOut)
def get_workflow(workflow_id):
    """The workflow (by any of its tasks' ids): each step's state and what it runs after."""
    return or_404(workflow.status(current.db(), workflow_id), f"workflow {workflow_id}")


@bp.get("/schedules")
@bp.auth_required(auth)
@bp.output(SchedulesOut)
def schedules():
    """The periodic tasks, with their next runs and the last slot enqueued."""
    return {"schedules": periodic.listing(current.db(), periodic.configured(current.config()))}


@bp.get("/task-metrics")
@bp.auth_required(auth)
@bp.input(TaskMetricsIn, location="query", arg_name="window")
@bp.output(TaskMetricsOut)
def task_metrics(window):
    """Per task name over the last ``hours``: runs, failures, run time and queue wait (mean and percentiles)."""
    return {"items": metrics.summary(current.db(), time.time() - window["hours"] * 3600)}


@bp.get("/rate-limits")
@bp.auth_required(auth)
@bp.output(RateLimitsOut)
def rate_limits():
    return {"rate_limits": limits.rate_limits(current.db())}


@bp.put("/rate-limits/<task>")
@bp.auth_required(auth)
@bp.input(RateLimitIn, location="json", arg_name="body")
@bp.output(RateLimitsOut)
def set_rate_limit(task, body):
    """At most ``rate`` runs of tasks called ``task``, every worker and host together."""
    limits.set_rate_limit(current.db(), task, body["rate"])
    return {"rate_limits": limits.rate_limits(current.db())}
