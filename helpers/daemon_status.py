"""Each daemon's heartbeat and last self-report, on either engine: one row per daemon, keyed by
its manager's ``host:pid``, written every second (``beat``). Several daemons on one SQLite file
(each serving its own queues) or on one PostgreSQL server (one per host) are all seen.

A daemon whose beat is older than ``cluster.dead_after`` stopped answering (SIGKILL, a dead
host, a cut link). Any surviving daemon then fails the tasks its workers held, each as an
attempt with the reason, exactly once (``rescue``: the row is marked in the same transaction);
the lease fence already refuses the late results of a host that comes back. Beats and the
rescue read the database's clock on PostgreSQL, so hosts with skewed clocks agree.
"""
from __future__ import annotations

import json
import os

from helpers import times
from helpers.engine import Database
from helpers.process import local_daemon, worker_id
from helpers.queue_manager import fail_held_tasks, statement_time
from helpers.queue_sql import statements

BEAT = """INSERT INTO daemon_status (daemon, host, pid, started_at, updated_at, workers, status)
VALUES (:daemon, :host, :pid, :started_at, {now}, :workers, :status)
ON CONFLICT (daemon) DO UPDATE SET updated_at = excluded.updated_at, workers = excluded.workers,
    status = excluded.status, rescued_at = NULL"""
# Daemons silent for dead_after that left workers behind, marked as rescued by this caller alone.
DEAD = """UPDATE daemon_status SET rescued_at = {now}
WHERE updated_at < {now} - :dead_after AND rescued_at IS NULL AND workers <> '[]' AND daemon <> :me
RETURNING daemon, host, updated_at, workers"""
ONE = "SELECT * FROM daemon_status WHERE daemon = :daemon"
ALL = "SELECT * FROM daemon_status ORDER BY host, pid"


def beat(db: Database, status: dict, workers: list[str], started_at: float, stopped: bool = False) -> None:
    """This daemon's heartbeat and report (from its manager, every second). ``workers``: the
    ids its workers hold leases under; a daemon stopping cleanly gave their tasks back and
    says none."""
    db.execute(BEAT.format(now=statements(db).NOW_OR_GIVEN),
               dict(daemon=worker_id(), host=os.uname().nodename, pid=os.getpid(), started_at=started_at,
                    now=statement_time(db, None), workers=json.dumps([] if stopped else workers),
                    status=json.dumps(status)))


def rows(db: Database, within: float | None = None) -> list[dict]:
    """Every daemon's row with its report decoded (``status``) and ``age``: seconds since its
    last beat by the database's clock; only those that beat in the last ``within`` seconds."""
    now = db.execute(f"SELECT {statements(db).NOW_OR_GIVEN} AS now", dict(now=statement_time(db, None)))[0]["now"]
    out = []
    for r in db.execute(ALL):
        row = dict(r)
        row["status"], row["workers"], row["age"] = json.loads(r["status"]), json.loads(r["workers"]), now - r["updated_at"]
        if within is None or row["age"] <= within:
            out.append(row)
    return out


def read(db: Database, config) -> tuple[float, dict] | None:
    """(updated_at, report) of this host's daemon (the one holding its data directory), or None."""
    daemon = local_daemon(config)
    found = db.execute(ONE, dict(daemon=daemon or ""))
    return (found[0]["updated_at"], json.loads(found[0]["status"])) if found else None


def live(db: Database, within: float = 30.0) -> list[dict]:
    """The reports of every daemon that beat in the last ``within`` seconds and runs."""
    return [r["status"] for r in rows(db, within) if r["status"].get("running")]


def rescue(db: Database, dead_after: float, now: float | None = None, jitter: float = 0.2) -> list[dict]:
    """Fail the running tasks of every daemon silent for ``dead_after`` seconds, as an attempt
    each; returns those daemons (``daemon``, ``host``, ``updated_at``, ``tasks``: (id, state)
    pairs). Of survivors calling at once, one does it."""
    at = statement_time(db, now)
    found = []
    with db.transaction() as conn:
        dead = conn.execute(DEAD.format(now=statements(db).NOW_OR_GIVEN),
                            dict(now=at, dead_after=dead_after, me=worker_id())).fetchall()
        for row in dead:
            error = f"host {row['host']} stopped answering at {times.local(row['updated_at'])} (daemon {row['daemon']})"
            tasks = fail_held_tasks(conn, db, json.loads(row["workers"]), error, at, jitter=jitter)
            found.append(dict(daemon=row["daemon"], host=row["host"], updated_at=row["updated_at"], tasks=tasks))
    return found


def forget_gone(db: Database, seconds: float = 86_400.0) -> None:
    """Drop the rows of daemons silent for ``seconds`` (each start of a daemon leaves one)."""
    db.execute(f"DELETE FROM daemon_status WHERE updated_at < {statements(db).NOW_OR_GIVEN} - :seconds",
               dict(now=statement_time(db, None), seconds=seconds))
