"""What each running daemon last said about itself (workers, scaling, integrity), for the API
and the CLI.

A SQLite file has one daemon: its report is row ``id = 1``. On PostgreSQL every daemon on every
host has a row of its own, keyed ``host:pid``, and a host reads its own daemon's: the one whose
pid is in the lock file of its data directory.
"""
from __future__ import annotations

import json
import os
import time

from helpers.process import local_daemon, worker_id

UPSERT = """INSERT INTO daemon_status ({key}, pid, updated_at, status) VALUES (?, ?, ?, ?)
ON CONFLICT ({key}) DO UPDATE SET pid = excluded.pid, updated_at = excluded.updated_at, status = excluded.status"""
READ = "SELECT pid, updated_at, status FROM daemon_status WHERE {key} = ?"


def _key(db, daemon: str | None) -> tuple[str, object]:
    return ("id", 1) if db.capabilities.local_file else ("daemon", daemon or "")


def write(db, status: dict) -> None:
    """This daemon's report (call from the daemon's manager)."""
    key, value = _key(db, worker_id())
    db.execute(UPSERT.format(key=key), (value, os.getpid(), time.time(), json.dumps(status)))


def read(db, config) -> tuple[float, dict] | None:
    """(updated_at, report) of this host's daemon, or None if it never reported."""
    key, value = _key(db, local_daemon(config))
    rows = db.execute(READ.format(key=key), (value,))
    return (rows[0]["updated_at"], json.loads(rows[0]["status"])) if rows else None


def live(db, within: float = 30.0) -> list[dict]:
    """The reports of every daemon that reported in the last ``within`` seconds and runs."""
    rows = db.execute("SELECT updated_at, status FROM daemon_status WHERE updated_at >= ?", (time.time() - within,))
    return [status for status in (json.loads(r["status"]) for r in rows) if status.get("running")]


def forget_gone(db, seconds: float = 86_400.0) -> None:
    """Drop the rows of daemons silent for ``seconds`` (each start of a daemon on PostgreSQL
    leaves one); the SQLite file's single row stays."""
    if not db.capabilities.local_file:
        db.execute("DELETE FROM daemon_status WHERE updated_at < ?", (time.time() - seconds,))
