"""The engine seam: what every database engine provides, and which one is configured.

An engine is one class with the calls of ``Database`` below and a ``capabilities`` record:
``helpers/database_config.py`` (SQLite, one file) and ``helpers/postgres.py`` (PostgreSQL, a
server several hosts share). A third engine is a third module, a line in ``ENGINES``, and a
folder of migrations in ``helpers/sql/<engine>/`` with the same numbers as the others.

Code above the engines never asks which engine it runs on. Where behaviour differs it asks a
capability by name (``db.capabilities.local_file``); where only the SQL differs, the
statement lives in its owner's per-engine block (``helpers/queue_sql.py``'s ``ENGINES``).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from helpers.config import Config, load_config


class Capabilities(NamedTuple):
    """What an engine is, for the few places where that changes what OOS does."""

    local_file: bool     # one file on this host: OOS backs it up, checks and vacuums it, watches its disk
    server_clock: bool   # statements can read a clock every host shares (leases, run_at)
    notifies: bool       # a commit can wake waiters on other hosts (LISTEN/NOTIFY); else they poll
    single_writer: bool  # one writer at a time for the whole database: one slow writer stops the rest


class Database(Protocol):
    """The calls every engine answers, all a caller may use."""

    engine: str
    capabilities: Capabilities

    def execute(self, sql: str, params: Any = (), synced: bool = True) -> list:
        """One statement, committed; every row it returned (``row["col"]``, ``row[0]``)."""

    def transaction(self, synced: bool = True) -> contextlib.AbstractContextManager:
        """A connection whose statements commit together at the end of the block, or not at all."""

    def group(self, work: Callable[[Any], Any], one_statement: bool = False) -> Any:
        """``work(conn)`` in a transaction, possibly committed together with other threads' work."""

    def hint(self, queue: str, conn: Any = None) -> None:
        """Tell waiting workers that ``queue`` has new work (at the commit, when ``conn`` is given)."""

    def data_version(self) -> int:
        """A number that changes when another connection commits; for ``wait_for_change``."""

    def wait_for_change(self, version: int, deadline: float, interval: float = 0.001) -> bool:
        """Sleep until a change (or a hint) after ``version``, or ``deadline`` (monotonic)."""

    def hints(self, queue: str) -> int:
        """A number that changes when ``queue`` may have new work, as of the last
        ``data_version()``: its own hints where the engine tells queues apart, else
        ``data_version()`` itself (any commit)."""

    def checkpoint(self) -> dict:
        """Housekeeping of the engine's log (SQLite's WAL); what it did."""

    def close(self) -> None:
        """Close every connection of this process."""

    def confirm_written(self) -> None:
        """Raise if what was just committed went where nobody will read it (a removed file)."""

    def adopt(self, connection: Any) -> Any:
        """The caller's own open DB-API connection to this database, as a connection the
        queue's statements run on inside the caller's transaction (never committed here)."""


# name -> (module, class); imported only when that engine is configured, so a host without
# psycopg runs SQLite.
ENGINES = {"sqlite": ("helpers.database_config", "DatabaseManager"),
           "postgresql": ("helpers.postgres", "PostgresDatabase")}


def engine_name(config: Config) -> str:
    return "postgresql" if config.database_url else "sqlite"


def engine_class(name: str) -> type:
    module, cls = ENGINES[name]
    return getattr(importlib.import_module(module), cls)


def capabilities(config: Config) -> Capabilities:
    """The configured engine's capabilities, without opening it."""
    return engine_class(engine_name(config)).capabilities


def open_database(config: Config, max_lock_wait: float = 60.0) -> Database:
    """A new database object for the configuration, of the configured engine (its schema
    brought to the newest version)."""
    return engine_class(engine_name(config)).from_config(config, max_lock_wait)


_databases: dict[tuple[int, str], Database] = {}
_databases_lock = threading.Lock()


def get_database(config: Config | None = None) -> Database:
    """The process's shared database for the configuration: the SQLite file, or the
    PostgreSQL server when ``database.url`` is set (one per process and database; a forked
    child opens its own)."""
    config = config or load_config()
    key = (os.getpid(), config.database_url or str(config.db_path))
    with _databases_lock:
        if key not in _databases:
            _databases[key] = open_database(config)
        return _databases[key]


def describe(config: Config) -> str:
    """The configured database for messages: the file's path, or the URL without password."""
    return engine_class(engine_name(config)).describe(config)


def driver_connection(connection: Any) -> Any:
    """The DB-API connection under a SQLAlchemy ``Connection`` or ``Session`` (the Session's
    transaction begins if it has not), or ``connection`` itself."""
    if not type(connection).__module__.startswith("sqlalchemy"):
        return connection
    from sqlalchemy.orm import Session
    if isinstance(connection, Session):
        connection = connection.connection()
    return connection.connection.driver_connection


def _database_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [sqlite3.Error]
    with contextlib.suppress(ImportError):
        import psycopg
        errors.append(psycopg.Error)
    return tuple(errors)


# What any engine present raises when the database fails a call (a full disk, a lock, a lost server).
DATABASE_ERRORS = _database_errors()


def disk_full(error: BaseException) -> bool:
    """Whether a database error says the disk (or the server's) is full."""
    return "full" in str(error).lower() or type(error).__name__ == "DiskFull"


class Unsupported(Exception):
    """What the configured engine cannot do (file backups on PostgreSQL): the message says
    what to use instead."""


def require_local_file(config: Config, what: str) -> None:
    if not capabilities(config).local_file:
        raise Unsupported(f"{what} works on the SQLite file only; this daemon uses PostgreSQL "
                          f"({describe(config)}): use pg_dump / pg_restore or the server's own backups")
