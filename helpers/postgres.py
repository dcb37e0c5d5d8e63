"""The PostgreSQL engine: the same calls as ``DatabaseManager`` (SQLite), on a server that
daemons on several hosts share.

Chosen by ``[database] url = "postgresql://..."`` (or ``OOS_DATABASE_URL``). Each process has
its own ``psycopg_pool`` of autocommit connections (a forked or spawned child opens its own, as
with SQLite), a second one for claims once it claims (their commits do not wait for the WAL
flush), and, when it waits for work, one LISTEN connection for wake-up hints.

What a caller may rely on:
- ``execute(sql, params)`` runs one statement and returns every row; ``transaction()`` yields a
  connection whose statements commit together or not at all. Rows read as ``row["name"]``,
  ``row[0]`` and ``dict(row)``, as SQLite's do.
- SQL written for SQLite's placeholders (``?`` and ``:name``) is accepted and rewritten once;
  SQL already in psycopg's style (``%s``, ``%(name)s``), or given no parameters, is used as
  written.
- ``wait_for_change`` returns when a NOTIFY hint arrives, after ``database.poll_interval`` at
  the latest (a lost hint costs latency, never a task), and at once after the LISTEN
  connection broke (it reconnects and the caller re-polls). ``database.notify = false`` turns
  hints off (PgBouncer in transaction mode cannot LISTEN).
- Leases are timed by the server's clock (see ``helpers/queue_sql.py``), so hosts with skewed
  clocks agree on when a lease ran out.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
import time

import psycopg
from psycopg import ClientCursor
from psycopg_pool import ConnectionPool

from helpers import schema
from helpers.config import Config
from helpers.engine import Capabilities
from helpers.validation import InvalidField

NOTIFY_CHANNEL = "oos_ready"
DONE_CHANNEL = "oos_done"  # a task someone waits for finished (sql/postgresql/002_jobs_workflows_limits_schedules.sql)
NOTIFY_DEBOUNCE = 0.01  # seconds: at most one hint per queue per process in this long
# A host cut off from the server notices within this long instead of the kernel's 15 minutes.
CONNECT_ARGS = {"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
                "keepalives_count": 3, "tcp_user_timeout": 10_000, "application_name": "oos"}


class Row(dict):
    """A row that reads like ``sqlite3.Row``: by column name (a plain dict lookup), by
    position, as a mapping (``dict(row)``), and iterating over its values."""

    __slots__ = ()

    def __missing__(self, key):
        if isinstance(key, int):
            return list(self.values())[key]
        raise KeyError(key)

    def __iter__(self):
        return iter(self.values())


def row_factory(cursor):
    names = [column.name for column in cursor.description or ()]
    return lambda values: Row(zip(names, values))


_SQLITE_PARAM = re.compile(r"'(?:[^']|'')*'|\?|(?<![:\w]):([A-Za-z_]\w*)|%")


@functools.lru_cache(maxsize=1024)
def native(sql: str) -> str:
    """``sql`` in psycopg's placeholder style. SQLite-style ``?`` and ``:name`` become ``%s``
    and ``%(name)s`` (not inside string literals, and never a ``::type`` cast), and a bare
    ``%`` is doubled; SQL already using ``%s`` or ``%(`` is returned as it is."""
    if "%s" in sql or "%(" in sql:
        return sql

    def swap(m: re.Match) -> str:
        token = m.group(0)
        if token.startswith("'"):
            return token.replace("%", "%%")
        if token == "?":
            return "%s"
        if token == "%":
            return "%%"
        return f"%({m.group(1)})s"
    return _SQLITE_PARAM.sub(swap, sql)


def run(conn: psycopg.Connection, sql: str, params) -> psycopg.Cursor:
    """Execute on ``conn``. SQL written for psycopg (the queue's statements) is bound on the
    server, so psycopg prepares it after a few runs and the server stops planning it each
    time; SQL written for SQLite is bound on the client, where a NULL needs no declared type."""
    if params and ("%s" in sql or "%(" in sql):
        return psycopg.Cursor(conn, row_factory=row_factory).execute(sql, params)
    # (The cursor's kind and rows are set here, not taken from the connection: an adopted
    # connection, the caller's own, may have others.)
    return ClientCursor(conn, row_factory=row_factory).execute(native(sql) if params else sql, params or None)


class Cursor:
    """What ``transaction()`` yields: ``execute``/``executemany`` in either placeholder style."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn

    def execute(self, sql: str, params=()) -> psycopg.Cursor:
        return run(self.conn, sql, params)

    def executemany(self, sql: str, rows) -> psycopg.Cursor:
        cursor = self.conn.cursor()
        cursor.executemany(native(sql), list(rows))
        return cursor


class PostgresDatabase:
    """One PostgreSQL database shared by every OOS host. Safe to use from many threads."""

    engine = "postgresql"
    capabilities = Capabilities(local_file=False, server_clock=True, notifies=True, single_writer=False)

    def __init__(self, url: str, pool_size: int = 4, notify: bool = True, poll_interval: float = 1.0,
                 max_lock_wait: float = 60.0):
        """``max_lock_wait``: seconds a statement may wait for a row another transaction holds
        before it fails (``lock_timeout``; the daemon's manager waits briefly, never minutes)."""
        self.url = url
        self.pool_size, self.notify, self.poll_interval = pool_size, notify, poll_interval
        self._pools: dict[bool, ConnectionPool] = {}  # by synced
        self._pid = 0
        self._lock = threading.Lock()
        self._listener: psycopg.Connection | None = None
        self._listener_pid = 0
        self._hints = 0
        self._queue_hints: dict[str, int] = {}  # hints received, by the queue they name
        self._lost = 0  # times hints may have been missed (the LISTEN connection was new or broke)
        self._last_hint: dict[str, float] = {}
        self._lock_timeout_ms = max(1, int(max_lock_wait * 1000))
        schema.migrate(self)

    @classmethod
    def from_config(cls, config: Config, max_lock_wait: float = 60.0) -> PostgresDatabase:
        return cls(config.database_url, config.database_pool_size, config.database_notify,
                   config.database_poll_interval, max_lock_wait)

    @staticmethod
    def describe(config: Config) -> str:
        return redact(config.database_url)

    def __repr__(self) -> str:
        return f"PostgresDatabase({redact(self.url)})"

    # -- connections ----------------------------------------------------------------------

    @property
    def pool(self) -> ConnectionPool:
        return self._pool_of(synced=True)

    def _pool_of(self, synced: bool) -> ConnectionPool:
        """This process's pool of connections that wait for their commits' WAL flush, or
        (``synced=False``) of connections that do not (``synchronous_commit = off`` for the
        session: an unsynced statement is one round trip, not BEGIN/SET LOCAL/.../COMMIT)."""
        if self._pid != os.getpid() or self._pools.get(synced) is None:
            with self._lock:
                if self._pid != os.getpid():
                    # A parent's pools (and their threads) are not ours after a fork: leave them be.
                    self._pools, self._pid = {}, os.getpid()
                if self._pools.get(synced) is None:
                    self._pools[synced] = ConnectionPool(
                        self.url, min_size=1, max_size=self.pool_size, open=True, timeout=30,
                        kwargs=dict(CONNECT_ARGS, autocommit=True, cursor_factory=ClientCursor,
                                    row_factory=row_factory),
                        configure=functools.partial(self._configure, synced=synced),
                        name="oos" if synced else "oos-unsynced")
        return self._pools[synced]

    def _configure(self, conn: psycopg.Connection, synced: bool) -> None:
        conn.execute(f"SET lock_timeout = {self._lock_timeout_ms}")
        if not synced:
            conn.execute("SET synchronous_commit = off")

    def connect(self) -> psycopg.Connection:
        """A connection of its own (the caller closes it), outside the pool."""
        return psycopg.connect(self.url, **CONNECT_ARGS, autocommit=True, cursor_factory=ClientCursor,
                               row_factory=row_factory)

    @contextlib.contextmanager
    def transaction(self, synced: bool = True):
        """Statements that commit together; rolled back on any exception. ``synced=False``:
        see ``execute``."""
        with self._pool_of(synced).connection() as conn, conn.transaction():
            yield Cursor(conn)

    def group(self, work, one_statement: bool = False):
        """Run ``work(cursor)`` in a transaction of its own and return its result (the server
        already shares one WAL flush among concurrent commits). ``one_statement``: ``work``
        runs a single statement, atomic by itself: no BEGIN/COMMIT round trips."""
        if one_statement:
            with self.pool.connection() as conn:  # autocommit
                return work(Cursor(conn))
        with self.transaction() as cursor:
            return work(cursor)

    def execute(self, sql: str, params=(), synced: bool = True) -> list[Row]:
        """One statement on its own (autocommit); every row it returns. ``synced=False``: the
        commit does not wait for its WAL flush (``synchronous_commit = off``); any later
        synchronous commit flushes it too, and a server crash before that loses it. Only
        for claims: a lost claim leaves the task queued (at-least-once holds)."""
        with self._pool_of(synced).connection() as conn:
            cursor = run(conn, sql, params)
            return cursor.fetchall() if cursor.description else []

    # -- wake-ups -------------------------------------------------------------------------

    def confirm_written(self) -> None:
        """A commit the server acknowledged is kept: nothing to confirm."""

    def adopt(self, connection) -> Cursor:
        """The caller's open psycopg 3 connection, for statements that join its transaction
        (they commit or roll back with the caller's; nothing here commits). InvalidField for
        another kind, or for a connection in autocommit outside a transaction block."""
        if not isinstance(connection, psycopg.Connection):
            raise InvalidField("connection", f"expected a psycopg 3 connection (or a SQLAlchemy Connection or "
                                             f"Session over one), got {type(connection).__name__}")
        if connection.autocommit and connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            raise InvalidField("connection", "is in autocommit mode outside a transaction: open one "
                                             "(with conn.transaction(): ...) or the task would commit at once")
        return Cursor(connection)

    def hint(self, queue: str, conn=None) -> None:
        """Tell waiting workers on every host that ``queue`` has new work. Call after the
        commit (a hint before it would wake them to nothing); at most one per queue per
        ``NOTIFY_DEBOUNCE`` from this process, since each NOTIFY serialises commits. With
        ``conn`` (a transaction), the hint goes out when that transaction commits, always."""
        if not self.notify:
            return
        if conn is not None:
            conn.execute("SELECT pg_notify(?, ?)", (NOTIFY_CHANNEL, queue))
            return
        now = time.monotonic()
        if now - self._last_hint.get(queue, -1.0) < NOTIFY_DEBOUNCE:
            return
        self._last_hint[queue] = now
        self.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, queue))

    def data_version(self) -> int:
        """How many hints this process has received so far (read before a claim; see
        ``wait_for_change``)."""
        if self.notify:
            self._drain(0)
        return self._hints

    def hints(self, queue: str) -> int:
        """Hints naming ``queue`` received so far (as of the last ``data_version()``), plus
        every lost-hint event (a reconnect of the LISTEN connection: anything may be new)."""
        return self._queue_hints.get(queue, 0) + self._lost

    def wait_for_change(self, version: int, deadline: float, interval: float | None = None) -> bool:
        """Wait for a hint received after ``data_version()`` returned ``version``, up to
        ``deadline`` (``time.monotonic()``) and at most ``poll_interval``. True when the caller
        should look again (a hint, the poll fallback, a reconnect)."""
        wait = max(0.0, min(deadline - time.monotonic(), self.poll_interval))
        if not self.notify:
            time.sleep(wait)
            return True
        if self._hints != version:
            return True
        self._drain(wait)
        return True

    def _drain(self, timeout: float) -> None:
        try:
            # A forked child never uses its parent's connection.
            if self._listener is None or self._listener.closed or self._listener_pid != os.getpid():
                self._listener, self._listener_pid = self.connect(), os.getpid()
                self._listener.execute(f"LISTEN {NOTIFY_CHANNEL}; LISTEN {DONE_CHANNEL}")
                self._hints += 1  # anything sent while we were not listening: look again
                self._lost += 1
                return
            # A look (timeout 0) takes every hint that is there; a wait, the first one to come.
            for notice in self._listener.notifies(timeout=timeout, stop_after=1 if timeout else None):
                self._hints += 1
                if notice.channel == NOTIFY_CHANNEL:
                    self._queue_hints[notice.payload] = self._queue_hints.get(notice.payload, 0) + 1
        except psycopg.Error:
            with contextlib.suppress(psycopg.Error):
                if self._listener is not None:
                    self._listener.close()
            self._listener = None
            self._hints += 1
            self._lost += 1
            time.sleep(min(timeout, 0.5))

    # -- what only SQLite has -------------------------------------------------------------

    def checkpoint(self) -> None:
        """Nothing to do (returns None): the server checkpoints its own WAL."""

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for pool in self._pools.values():
                    pool.close()
            if self._listener is not None and self._listener_pid == os.getpid():
                with contextlib.suppress(psycopg.Error):
                    self._listener.close()
            self._pools, self._listener = {}, None


def redact(url: str) -> str:
    """``url`` without its password, for logs and status."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)
