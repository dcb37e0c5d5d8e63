"""The audit log: what was done from the dashboard (and its logins), by which role, from where."""
from __future__ import annotations

import time

from helpers.engine import Database

RECORD = """INSERT INTO audit_log (at, role, action, target, detail, remote)
VALUES (:at, :role, :action, :target, :detail, :remote)"""
LATEST = "SELECT * FROM audit_log ORDER BY id DESC LIMIT :limit"


def record(db: Database, role: str, action: str, target: str, detail: str = "", remote: str | None = None) -> None:
    db.execute(RECORD, dict(at=time.time(), role=role, action=action, target=target, detail=detail, remote=remote))


def latest(db: Database, limit: int = 200) -> list:
    """The newest entries first."""
    return db.execute(LATEST, dict(limit=limit))
