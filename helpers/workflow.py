"""Workflows: tasks that run after other tasks, stored as dependencies in the database.

```python
from helpers.workflow import chain, group, chord, step, submit

submit(db, chain(step("fetch", {"url": u}), step("parse"), step("store")))    # one after another
submit(db, group(step("resize", 1), step("resize", 2)))                       # side by side
submit(db, chord([step("count", p) for p in parts], step("total")))           # all, then one
```
A step runs once every step before it succeeded. Its handler gets their results: as its
payload when the step was given none (one step before it: that result; several: the list, in
order), and always as ``context.results``. Everything is written in one transaction: the
workflow exists whole or not at all, and survives restarts like any task.

When a step is dead, the steps after it are ``blocked`` (shown so); replaying the dead step
(``oos dlq retry``) moves the workflow on again. Cancelling a step cancels the steps after it.
The moves are the triggers in helpers/sql/*/002_jobs_workflows_limits_schedules.sql, in the transaction that changed the step.
"""
from __future__ import annotations

import graphlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from helpers.config import Config
from helpers.queue_manager import (
    SPEC_FIELDS,
    QueueManager,
    Task,
    get_task,
    published_defaults,
    statement_time,
)
from helpers.queue_sql import statements
from helpers.registry import handler_for
from helpers.validation import InvalidField, existing_id, queue_name

# A step is a task (less its keys and a fixed time: it runs when the steps before it end), on
# a queue of its own, after other steps.
STEP_FIELDS = SPEC_FIELDS - {"run_at", "idempotency_key", "unique_key", "unique_for"} | {"queue", "after"}
MAX_STEPS = 1000


@dataclass
class Step:
    task: str
    payload: Any = None
    queue: str | None = None  # default: the handler's queue, else "default"
    options: dict = field(default_factory=dict)  # priority, delay, max_attempts, timeout


@dataclass
class Chain:
    parts: list


@dataclass
class Group:
    parts: list


def step(task: str, payload: Any = None, queue: str | None = None, **options) -> Step:
    return Step(task, payload, queue, options)


def chain(*parts) -> Chain:
    """Each part after the one before it (a part: a step, a group or a chain)."""
    return Chain(list(parts))


def group(*parts) -> Group:
    """The parts side by side; what follows a group runs after all of them."""
    return Group(list(parts[0]) if len(parts) == 1 and isinstance(parts[0], list) else list(parts))


def chord(header, callback) -> Chain:
    """A group, then ``callback`` with the list of its results."""
    return Chain([header if isinstance(header, Group) else group(*header), callback])


def steps_of(flow) -> list[dict]:
    """The flow as the list of step specs the REST API takes: each with ``after``, the
    indexes of the steps it runs after."""
    out: list[dict] = []

    def add(node, after: list[int]) -> list[int]:
        if isinstance(node, Step):
            out.append(dict(node.options, task=node.task, payload=node.payload, after=after,
                            **({"queue": node.queue} if node.queue else {})))
            return [len(out) - 1]
        if isinstance(node, Chain):
            for part in node.parts:
                after = add(part, after)
            return after
        if isinstance(node, Group):
            return [end for part in node.parts for end in add(part, after)] or after  # an empty group
        raise InvalidField("steps", f"expected a step, chain or group, got {type(node).__name__}")

    add(flow, [])
    return out


def submit(db, flow, config: Config | None = None, now: float | None = None, conn=None) -> dict:
    """Store a workflow: a flow (chain/group/chord/step) or a list of step specs (``task``,
    ``payload``, ``queue``, ``after``: indexes of earlier or later steps; ``priority``,
    ``delay``, ``max_attempts``, ``timeout``). Returns ``{"workflow": id, "ids": [...]}``, the
    ids in the order of the steps. Bad input (an unknown index, a cycle) raises InvalidField
    naming the step, and nothing is written. With ``conn`` (inside the caller's
    ``db.transaction()``) the workflow commits with the caller's own writes; the caller then
    wakes the workers after its commit (``db.hint(queue)``)."""
    specs = flow if isinstance(flow, list) else steps_of(flow)
    config = config or Config()
    order, rows = _validate(db, specs, config, statement_time(db, now))
    if conn is not None:
        return _store(db, conn, specs, order, rows)
    with db.transaction() as conn:
        submitted = _store(db, conn, specs, order, rows)
    for queue in {row["queue"] for row in rows}:
        db.hint(queue)
    return submitted


def _store(db, conn, specs, order, rows) -> dict:
    sql = statements(db)
    ids: dict[int, int] = {}
    published_defaults(conn, sql, rows)  # the handlers' attempts and timeout, as an enqueue takes them
    for queue in {row["queue"] for row in rows}:
        conn.execute(sql.ENSURE_QUEUE, dict(queue=queue))
    for index in order:
        after = specs[index].get("after") or []
        row = dict(rows[index], state="waiting" if after else "queued", waiting_on=len(after),
                   workflow=ids[order[0]] if ids else None)
        ids[index] = conn.execute(sql.INSERT_ONE, row).fetchone()[0]
        for position, before in enumerate(after):
            conn.execute(sql.DEPENDS, dict(depends_on=ids[before], task_id=ids[index], position=position))
    first = ids[order[0]]
    conn.execute(sql.SET_WORKFLOW, dict(workflow=first, id=first))
    for queue, n in Counter(row["queue"] for row in rows).items():
        conn.execute(sql.COUNT, dict(queue=queue, enqueued=n, succeeded=0, failed=0, dead=0))
    return {"workflow": first, "ids": [ids[i] for i in range(len(specs))]}


def _validate(db, specs, config: Config, now) -> tuple[list[int], list[dict]]:
    if not isinstance(specs, list) or not specs:
        raise InvalidField("steps", "expected a non-empty list of steps")
    if len(specs) > MAX_STEPS:
        raise InvalidField("steps", f"at most {MAX_STEPS} steps, got {len(specs)}")
    graph: dict[int, list[int]] = {}
    rows = []
    for i, spec in enumerate(specs):
        where = f"steps[{i}]."
        if not isinstance(spec, dict):
            raise InvalidField(f"steps[{i}]", "expected an object")
        if not spec.keys() <= STEP_FIELDS:
            raise InvalidField(f"{where}{sorted(spec.keys() - STEP_FIELDS)[0]}", "unknown field (or not "
                               "supported in a workflow step)")
        after = spec.get("after") or []
        if not isinstance(after, list) or any(isinstance(a, bool) or not isinstance(a, int) for a in after):
            raise InvalidField(f"{where}after", "expected a list of step indexes")
        for a in after:
            if not 0 <= a < len(specs) or a == i:
                raise InvalidField(f"{where}after", f"no step {a} to run after (steps 0..{len(specs) - 1}, "
                                   "not itself)")
        if len(set(after)) != len(after):
            raise InvalidField(f"{where}after", "a step is named twice")
        graph[i] = after
        handler = handler_for(spec["task"]) if isinstance(spec.get("task"), str) else None
        queue = spec.get("queue") or (handler.queue if handler else "default")
        try:
            queue_name(queue)
        except InvalidField as e:
            raise InvalidField(f"{where}queue", e.problem) from None
        task_spec = {k: v for k, v in spec.items() if k not in ("queue", "after")}
        rows.append(QueueManager(queue, db, config)._row(task_spec, now, where))
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        cycle = " -> ".join(str(n) for n in reversed(e.args[1]))
        raise InvalidField(f"steps[{e.args[1][0]}].after", f"a cycle: steps {cycle}") from None
    return order, rows


def results_for(db, task: Task) -> list:
    """The results of the steps ``task`` runs after, in order (empty outside a workflow)."""
    if task.workflow is None:
        return []
    rows = db.execute(statements(db).DEPENDENCIES, dict(id=task.id))
    return [None if r["result"] is None else json.loads(r["result"]) for r in rows]


def status(db, workflow: int) -> dict | None:
    """The workflow's steps (each with ``after``: the ids it runs after) and its state:
    succeeded, running, blocked (a step is dead), cancelled, or waiting."""
    if not existing_id(workflow):
        return None
    sql = statements(db)
    steps = [Task.from_row(r).to_dict() for r in db.execute(sql.WORKFLOW_STEPS, dict(workflow=workflow))]
    if not steps:
        first = get_task(db, workflow)
        return None if first is None or first.workflow is None else status(db, first.workflow)
    after: dict[int, list[int]] = {}
    for edge in db.execute(sql.WORKFLOW_EDGES, dict(workflow=workflow)):
        after.setdefault(edge["task_id"], []).append(edge["depends_on"])
    states = Counter(s["state"] for s in steps)
    for s in steps:
        s["after"] = after.get(s["id"], [])
    # A dead step blocks the workflow until someone replays it, or cancels the steps after it.
    state = ("succeeded" if states["succeeded"] == len(steps) else
             "blocked" if states["blocked"] or (states["dead"] and not states["cancelled"]) else
             "cancelled" if states["cancelled"] else
             "running" if states["running"] or states["succeeded"] else "waiting")
    return {"workflow": workflow, "state": state, "counts": dict(states), "steps": steps}
