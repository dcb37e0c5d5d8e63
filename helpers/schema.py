"""The schema and its versions, on either engine.

``migrate(db)`` brings a database to the newest version and records each step in
``schema_version``; it runs whenever a database is opened and from ``oos migrate``. Two
processes migrating at once do not race: SQLite's ``BEGIN IMMEDIATE`` and PostgreSQL's
transaction-scoped advisory lock let one apply the steps while the other waits, then finds
nothing left to do. A step that fails leaves the database at the previous version.

The steps are the files ``sql/<engine>/NNN_<what>.sql``, applied in the order of their
numbers; a new version is a new file with the next number in each engine's folder (never an
edit of a shipped one). Both folders hold the same numbers: a test keeps them in step.
"""
from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

SQL = Path(__file__).parent / "sql"
STEP_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


def steps(engine: str) -> list[Path]:
    """An engine's migration files, in the order they apply (001, 002, ...)."""
    found = sorted((int(m.group(1)), path) for path in (SQL / engine).iterdir()
                   if (m := STEP_NAME.match(path.name)))
    if [number for number, _ in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{SQL / engine}: migrations must be numbered 001, 002, ... without gaps")
    return [path for _, path in found]


# The lock two PostgreSQL daemons starting at once take before they look at the version.
MIGRATION_LOCK = 7_340_391
VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version    integer PRIMARY KEY,
    applied_at double precision NOT NULL
)"""


def latest(engine: str) -> int:
    return len(steps(engine))


def version(db) -> int:
    """The version the database is at (0: no schema yet)."""
    rows = db.execute("SELECT max(version) FROM schema_version") if _has_versions(db) else []
    return (rows[0][0] or 0) if rows else 0


def _has_versions(db) -> bool:
    sql = ("SELECT 1 FROM sqlite_master WHERE name = 'schema_version'" if db.engine == "sqlite"
           else "SELECT 1 FROM pg_tables WHERE tablename = 'schema_version' AND schemaname = current_schema()")
    return bool(db.execute(sql))


def migrate(db) -> tuple[int, int]:
    """Apply the missing steps. Returns (version before, version after)."""
    files = steps(db.engine)
    if version(db) == len(files):  # the common case: one read, no lock
        return len(files), len(files)
    with db.transaction() as conn:  # SQLite: BEGIN IMMEDIATE, the write lock up front
        if db.engine == "postgresql":
            conn.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        conn.execute(VERSION_TABLE)
        before = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
        for number, path in enumerate(files[before:], start=before + 1):
            for statement in statements(path.read_text(), db.engine):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (number, time.time()))
    return before, len(files)


def statements(script: str, engine: str = "sqlite") -> list[str]:
    """A script split into its statements: SQLite's own rule (a trigger's body stays whole);
    on PostgreSQL, a line ending in ``;`` outside a ``$$`` function body."""
    out, buffer = [], ""
    for line in script.splitlines(keepends=True):
        if not buffer and (not line.strip() or line.lstrip().startswith("--")):
            continue
        buffer += line
        if engine == "postgresql":
            complete = buffer.count("$$") % 2 == 0 and line.rstrip().endswith(";")
        else:
            complete = sqlite3.complete_statement(buffer)
        if complete:
            out.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        out.append(buffer.strip())
    return out
