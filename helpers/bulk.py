"""Replay or delete every dead task that matches a filter, in the background.

The dashboard's "all matching" buttons call ``request``: it enqueues one ``oos.dead_letter``
task on the ``oos`` queue, and the daemon's workers run it like any other task. It works
through the matching tasks in batches of ``BATCH`` (one short transaction each, so queues keep
flowing), stores its progress after each batch, and stops between batches when cancelled.

Only tasks dead when it was asked are touched (ids up to the newest id then): a task that dies
while it runs waits for the next request. A worker killed half-way leaves the batches it
finished done, and the retry goes on with what is still dead.
"""
from __future__ import annotations

import time

from helpers import queue_manager as queues
from helpers.config import load_config
from helpers.engine import get_database
from helpers.tasks import task
from helpers.validation import InvalidField

TASK, QUEUE, BATCH = "oos.dead_letter", "oos", 500
ACTIONS = {"retry": "replayed", "purge": "deleted"}


def request(db, action: str, queue: str | None = None, name: str | None = None,
            text: str | None = None) -> queues.TaskRef:
    """Enqueue the job; returns its task (whose progress and result say how far it got).
    InvalidField for an unknown action or a bad filter."""
    if action not in ACTIONS:
        raise InvalidField("action", f"expected one of {', '.join(ACTIONS)}, got {action!r}")
    filters = dict(queue=queue or None, name=name or None, text=text or None)
    queues.browse_filters(**filters)
    newest = db.execute("SELECT max(id) FROM tasks")[0][0] or 0
    return queues.QueueManager(QUEUE, db).enqueue(TASK, dict(action=action, up_to=newest, **filters))


@task(TASK, queue=QUEUE, bind=True, max_attempts=5, timeout=600)
def settle_matching(context, payload: dict) -> dict:
    """The job: ``{"action", "done", "total"}`` (and ``"cancelled": true`` if it was)."""
    db = get_database(load_config())
    action, up_to = payload["action"], payload["up_to"]
    filters = dict(state="dead", queue=payload.get("queue"), name=payload.get("name"), text=payload.get("text"))
    total = queues.count_matching(db, up_to=up_to, **filters)
    done, cursor = 0, up_to + 1
    context.progress(0.0, f"0 of {total} {ACTIONS[action]}")
    while total:
        if context.cancelled():
            return dict(action=action, done=done, total=total, cancelled=True)
        batch, cursor = queues.browse(db, before=cursor, limit=BATCH, **filters)
        done += queues.settle_dead(db, action, [t.id for t in batch], time.time())
        context.progress(min(1.0, done / total), f"{done} of {total} {ACTIONS[action]}")
        # Each batch renews the lease (a million tasks may take longer than one timeout); a
        # lease already lost means another worker runs this job now: leave it the rest.
        if not context.heartbeat():
            return dict(action=action, done=done, total=total, lease_lost=True)
        if cursor is None:
            break
    return dict(action=action, done=done, total=total)
