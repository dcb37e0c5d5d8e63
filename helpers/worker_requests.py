"""Asking one worker to drain or stop, from another process (the dashboard).

The request is a row in ``worker_requests``; the worker's own daemon reads the rows once a
second, acts on the ones for its workers and deletes them, so it works for a worker on any host
that shares the database. A request nobody takes (the worker was gone) is dropped after
``FORGET`` seconds.

- ``drain``: the worker finishes the task it runs, takes no other and exits; the daemon starts a
  new worker if the load still wants one (a graceful restart, e.g. of a worker grown large).
- ``stop``: the worker is killed now; its task is a failed attempt, retried with backoff.
"""
from __future__ import annotations

import time

from helpers.validation import InvalidField

ACTIONS = ("drain", "stop")
FORGET = 60.0
ASK = """INSERT INTO worker_requests (worker, action, requested_at) VALUES (:worker, :action, :at)
ON CONFLICT (worker) DO UPDATE SET action = excluded.action, requested_at = excluded.requested_at"""


def ask(db, worker: str, action: str) -> None:
    """Ask ``worker`` (its ``host:pid`` id) to ``drain`` or ``stop``; InvalidField otherwise."""
    if action not in ACTIONS:
        raise InvalidField("action", f"expected one of {', '.join(ACTIONS)}, got {action!r}")
    db.execute(ASK, dict(worker=worker, action=action, at=time.time()))


def take(db, workers: set[str], now: float | None = None) -> list[tuple[str, str]]:
    """The (worker, action) requests for ``workers``, removed as they are returned; requests
    older than FORGET for any other worker are removed too."""
    now = time.time() if now is None else now
    rows = db.execute("SELECT worker, action, requested_at FROM worker_requests")
    mine = [(r["worker"], r["action"]) for r in rows if r["worker"] in workers]
    stale = [r["worker"] for r in rows if r["worker"] not in workers and now - r["requested_at"] > FORGET]
    for worker in [w for w, _ in mine] + stale:
        db.execute("DELETE FROM worker_requests WHERE worker = :worker", dict(worker=worker))
    return mine
