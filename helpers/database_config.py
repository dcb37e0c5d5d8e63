"""The SQLite file: connections, transactions, backups and integrity checks.

``get_database(config)`` is the process's one ``DatabaseManager`` for the configured file;
``DatabaseManager()`` with no path opens the configured file too (``OOS_DATA_DIR``, the config
file, ``OOS_*``).

Every PRAGMA is set in ``connect()``, the one place a connection is opened. A connection
belongs to one process and one thread: the pool hands each thread its own, and a process
that was forked opens fresh ones instead of using its parent's.
"""
from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inotify_simple import INotify
from inotify_simple import flags as inotify_flags
from tenacity import retry, retry_if_exception, stop_after_delay, wait_random_exponential

from helpers import process, schema
from helpers.config import Config, load_config
from helpers.engine import (
    Capabilities,
    get_database,  # noqa: F401 (earlier releases' examples import it from here)
)
from helpers.validation import InvalidField
from helpers.write_turn import WriteTurns, inotify_watch

BACKUP_NAME = "oos-{stamp}.db"  # a finished, checked backup (its temporary name starts with a dot)
BACKUP_GLOB = BACKUP_NAME.format(stamp="*")

SYNCHRONOUS_LEVELS = ("OFF", "NORMAL", "FULL", "EXTRA")
CONFIRM_EVERY = 0.05  # seconds between confirm_written's looks at the file
TURN_WAIT = 1.0  # seconds a write waits for its turn (at most) before it asks SQLite for the lock anyway


def connect(path: str | os.PathLike, synchronous: str = "FULL", busy_timeout_ms: int = 30_000,
            autocheckpoint: int = 1000) -> sqlite3.Connection:
    """Open a connection with every setting OOS relies on.

    Autocommit mode (``isolation_level=None``): a transaction is only what ``BEGIN`` starts,
    so nothing is held open between calls. ``autocheckpoint=0`` leaves WAL checkpoints to
    someone else (the daemon's manager runs them, off the workers' and API's hot path).
    """
    synchronous = synchronous.upper()
    if synchronous not in SYNCHRONOUS_LEVELS:
        raise ValueError(f"synchronous: expected one of {SYNCHRONOUS_LEVELS}, got {synchronous!r}")
    uri = f"file:{Path(path).resolve()}"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False,
                           timeout=busy_timeout_ms / 1000)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("PRAGMA foreign_keys = ON")
    # A workflow step's triggers change the steps after it, whose triggers go on (sql/*/002_jobs_workflows_limits_schedules.sql).
    conn.execute("PRAGMA recursive_triggers = ON")
    # Keep the WAL from growing without bound under constant writes.
    conn.execute("PRAGMA journal_size_limit = 67108864")
    conn.execute(f"PRAGMA wal_autocheckpoint = {int(autocheckpoint)}")
    return conn


def _is_busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc))


def _retrying(seconds: float):
    """Retry on SQLITE_BUSY for up to ``seconds``, every 0.1-2 ms (random, so waiters spread
    out): a waiter tries again soon after the lock is free, however busy the writer holding it
    (SQLite's own busy handler sleeps up to 100 ms between tries, and under a writer that
    commits back to back it may never find the lock free)."""
    return retry(retry=retry_if_exception(_is_busy), stop=stop_after_delay(seconds),
                 wait=wait_random_exponential(multiplier=0.0001, max=0.002), reraise=True)


_retry_busy = _retrying(60)  # callers that may wait: no "database is locked" for a minute


def write_lock_holder(path: str | os.PathLike) -> int | None:
    """The pid holding the WAL write lock of the database at ``path`` (Linux /proc/locks:
    SQLite's writer locks byte 120 of the -shm file), or None."""
    for fields in process.locks_on(f"{path}-shm"):
        if fields[3] == "WRITE" and fields[6] == "120":
            return int(fields[4])
    return None


class ConnectionPool:
    """One connection per (process, thread), opened on first use and reused after."""

    def __init__(self, path: Path, synchronous: str, busy_timeout_ms: int, autocheckpoint: int = 1000):
        self.path, self.synchronous, self.busy_timeout_ms = path, synchronous, busy_timeout_ms
        self.autocheckpoint = autocheckpoint
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._watches: list[INotify] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def get_connection(self):
        """Yield this thread's connection (autocommit; use ``DatabaseManager.transaction``
        to group writes)."""
        yield self.connection()

    def connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = connect(self.path, self.synchronous, self.busy_timeout_ms, autocheckpoint=self.autocheckpoint)
            self._local.conn, self._local.pid = conn, os.getpid()
            with self._lock:
                self._all = [c for c in self._all if c is not None] + [conn]
        return conn

    def wal_watch(self) -> INotify | None:
        """This thread's inotify watch on the database's directory (a commit writes the WAL
        file there), or None where inotify is not to be had (then a waiter polls)."""
        local = self._local
        if getattr(local, "watch_pid", None) != os.getpid():
            local.watch, local.watch_pid = inotify_watch(self.path.parent, inotify_flags.MODIFY | inotify_flags.CREATE), os.getpid()
            if local.watch is not None:
                with self._lock:
                    self._watches.append(local.watch)
        return local.watch

    def close_all(self) -> None:
        """Close every connection and watch this process opened (call at shutdown, never
        after fork)."""
        with self._lock:
            for conn in self._all:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            for watch in self._watches:
                watch.close()
            self._all, self._watches = [], []
        self._local = threading.local()


@dataclass
class IntegrityReport:
    ok: bool
    problems: list[str]

    def __bool__(self) -> bool:
        return self.ok


GATHER_SECONDS = 0.0005
SETTLE_SECONDS, BLOCK_SECONDS = 0.02, 0.05  # see ``wait_for_change``


class _Work:
    """One caller's part of a group commit."""

    def __init__(self, fn):
        self.fn, self.result, self.error, self.done = fn, None, None, False
        self.led = False  # commits for the others: the first to queue, or handed the lead
        # Released (by the thread that leads) when done, or when handed the lead. A bare lock is
        # the cheapest signal between two threads; an Event is a Condition and two locks.
        self.turn = threading.Lock()
        self.turn.acquire()

    def run(self, conn) -> None:
        self.result, self.error = None, None  # it may be run again (see ``_commit_group``)
        try:
            self.result = self.fn(conn)
        except Exception as e:
            self.error = e


class _RunApart(Exception):
    """A work of a group commit raised: the others' writes, mixed with its own, were rolled back."""


class DatabaseManager:
    """The OOS database file (the SQLite engine). Creates it and its tables on first use.

    ``helpers.postgres.PostgresDatabase`` is the other engine, with the same calls:
    ``execute``, ``transaction``, ``hint``, ``data_version``, ``wait_for_change``, ``close``;
    ``engine`` says which one a caller holds."""

    engine = "sqlite"
    capabilities = Capabilities(local_file=True, server_clock=False, notifies=False, single_writer=True)

    def __init__(self, path: str | os.PathLike | None = None, synchronous: str | None = None,
                 busy_timeout_ms: int | None = None, backup_dir: str | os.PathLike | None = None,
                 autocheckpoint: int | None = None, max_lock_wait: float = 60.0):
        """``max_lock_wait``: seconds a call may wait for the write lock in all before it
        raises "database is locked" (the daemon's manager waits briefly, never minutes)."""
        # Anything not given comes from the configuration (the file the daemon uses).
        config = load_config() if None in (path, synchronous, busy_timeout_ms, autocheckpoint) else Config()
        if path is None:
            path, backup_dir = config.db_path, backup_dir or config.backups_path
        synchronous = config.database_synchronous if synchronous is None else synchronous
        busy_timeout_ms = config.database_busy_timeout_ms if busy_timeout_ms is None else busy_timeout_ms
        autocheckpoint = config.database_wal_autocheckpoint if autocheckpoint is None else autocheckpoint
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():  # SQLite gives the -wal and -shm files the database's mode
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self.backup_dir = Path(backup_dir) if backup_dir else self.path.parent / "backups"
        self.synchronous = synchronous.upper()
        self._syncs_each_commit = self.synchronous in ("FULL", "EXTRA")  # what synced=False relaxes
        busy_timeout_ms = min(busy_timeout_ms, int(max_lock_wait * 1000))
        self._lock_budget = max(0.0, max_lock_wait - busy_timeout_ms / 1000)  # beyond SQLite's own wait
        self._retry_busy = _retrying(self._lock_budget)
        # Group commit (``group``): one thread of this process commits for all the others, who
        # wait on an event, woken the moment their write is durable, instead of each meeting
        # the others in SQLite's busy handler, which sleeps in steps of up to 100 ms (the HTTP
        # API's p99 was 90-580 ms from that alone). The lock is only this process's: against
        # other processes, ``_retrying`` polls for SQLite's lock, so none of them is starved.
        self._writer = threading.RLock()
        self._max_lock_wait = max_lock_wait
        self._pending: list[_Work] = []  # work handed to ``group``, not yet committed
        self._pending_lock = threading.Lock()
        self._arrived = threading.Condition(self._pending_lock)  # notified when work is handed in
        self._gathering = False  # a leader waits on ``_arrived``
        self._leading = False  # a caller of ``group`` is committing others' work
        self._last_batch = 0   # how many callers the last group commit carried
        self.gather_seconds = GATHER_SECONDS
        self.pool = ConnectionPool(self.path, self.synchronous, busy_timeout_ms, autocheckpoint)
        # Against other processes: each write transaction waits for its turn in the kernel
        # (helpers/write_turn.py) before it asks SQLite for the lock (``_turn``).
        self.turns = WriteTurns(self.path)
        self._create_schema()
        self._inode = os.stat(self.path).st_ino
        self._confirmed_at = -math.inf  # when confirm_written last found the file in place

    @classmethod
    def from_config(cls, config, max_lock_wait: float = 60.0) -> DatabaseManager:
        return cls(config.db_path, config.database_synchronous, config.database_busy_timeout_ms,
                   config.backups_path, config.database_wal_autocheckpoint, max_lock_wait)

    @staticmethod
    def describe(config) -> str:
        return str(config.db_path)

    def checkpoint(self) -> dict:
        """Copy the WAL back into the database file without blocking anyone (PASSIVE).
        Returns SQLite's answer: ``busy`` (1: a reader or writer kept it from finishing),
        ``wal_frames`` (frames in the WAL) and ``checkpointed`` (of those, now in the file)."""
        busy, frames, done = self.pool.connection().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return dict(busy=busy, wal_frames=frames, checkpointed=done)

    def _create_schema(self) -> None:
        self._retry_busy(schema.migrate)(self)

    def confirm_written(self) -> None:
        """Raise unless the file written to is still the database at ``path``: a file removed
        or replaced under a running daemon takes commits that nobody will ever read, and an
        enqueue must not be acknowledged into it (the daemon stops with exit code 5). Looks at
        most every CONFIRM_EVERY seconds (a stat per call cost concurrent enqueues a quarter of
        their rate), so a commit within that long of the removal may still be acknowledged."""
        now = time.monotonic()
        if now - self._confirmed_at < CONFIRM_EVERY:
            return
        try:
            same = os.stat(self.path).st_ino == self._inode
        except FileNotFoundError:
            same = False
        if same:
            self._confirmed_at = now
        else:
            raise sqlite3.OperationalError(f"the database file {self.path} was removed or replaced: "
                                           "nothing written now would be kept")

    def adopt(self, connection) -> sqlite3.Connection:
        """The caller's open sqlite3 connection to this database file (its main database, or
        ATTACHed), for statements that join its transaction: they commit or roll back with the
        caller's; nothing here commits. InvalidField for another kind or file, or for a
        connection in autocommit mode with no transaction open."""
        if not isinstance(connection, sqlite3.Connection):
            raise InvalidField("connection", f"expected a sqlite3 connection to {self.path} (or a SQLAlchemy "
                               f"Connection or Session over one), got {type(connection).__name__}")
        files = [Path(row[2]).resolve() for row in connection.execute("PRAGMA database_list") if row[2]]
        if self.path.resolve() not in files:
            raise InvalidField("connection", f"is not a connection to OOS's database {self.path}: keep your tables "
                               "in that file, or ATTACH it")
        if connection.isolation_level is None and not connection.in_transaction:
            raise InvalidField("connection", "is in autocommit mode with no transaction open: BEGIN first, or "
                                             "the task would commit at once")
        return connection

    def hint(self, queue: str, conn=None) -> None:
        """Nothing to send: waiting workers see a commit through ``data_version``."""

    @contextlib.contextmanager
    def writing(self):
        """This process's turn to commit for ``group`` (re-entrant; holding it makes every
        ``group`` call queue behind); "database is locked" after ``max_lock_wait`` seconds."""
        if not self._writer.acquire(timeout=self._max_lock_wait):
            raise sqlite3.OperationalError("database is locked (another thread of this process held it)")
        try:
            yield
        finally:
            self._writer.release()

    @contextlib.contextmanager
    def transaction(self, synced: bool = True):
        """A write transaction: ``BEGIN IMMEDIATE`` takes the write lock up front, so the
        statements inside never hit SQLITE_BUSY half-way; commit on success, roll back on any
        exception. ``synced=False``: see ``execute``."""
        conn = self.pool.connection()
        with self._turn() as deadline, \
                self._relaxed(conn) if not synced and self._syncs_each_commit else contextlib.nullcontext():
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                if not _is_busy(e):
                    raise
                _retrying(deadline - time.monotonic())(conn.execute)("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")

    def group(self, work: Callable[[sqlite3.Connection], Any], one_statement: bool = False) -> Any:
        """Group commit: run ``work(conn)`` in a write transaction shared with whatever other
        threads of this process hand in meanwhile, so they pay one commit and one fsync
        together. Returns ``work``'s result once that commit is durable. An exception from
        ``work`` undoes only its own writes and is raised to its own caller; a failed commit
        is raised to every caller in it. ``work`` may run twice (rolled back in between), so
        it must write only through ``conn``.

        ``one_statement`` (the work is a single statement) changes nothing here; PostgreSQL
        uses it to skip BEGIN/COMMIT.

        How: a caller queues its work. If no other caller is committing, it leads: it takes
        everything queued, commits it in one transaction and wakes each caller whose work it
        carried, then passes the lead to a caller queued meanwhile. The others just wait."""
        if not self._leading and self._last_batch <= 1 and self._writer.acquire(blocking=False):
            try:  # alone, and so were the last: a plain transaction, nothing to share
                with self.transaction() as conn:
                    return work(conn)
            finally:
                self._writer.release()
        mine = _Work(work)
        with self._pending_lock:
            self._pending.append(mine)
            mine.led = not self._leading
            self._leading = True
            if self._gathering and len(self._pending) >= self._last_batch:
                self._arrived.notify()  # the leader gathering callers may go
        if not mine.led:
            mine.turn.acquire()  # committed by a leader, or handed the lead (then ours is first)
        if not mine.done:
            try:
                self._gather()
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                self._last_batch = len(batch)
                self._commit_group(batch)
            finally:
                with self._pending_lock:  # pass the lead on, or put it down, whatever happened
                    if self._pending:
                        self._pending[0].led = True
                        self._pending[0].turn.release()
                    else:
                        self._leading = False
        if mine.error is not None:
            raise mine.error
        return mine.result

    def _gather(self) -> None:
        """Before committing, wait a moment (at most ``gather_seconds``) until as many callers
        have handed in work as the last commit carried. Those callers were just woken, and
        are about to hand in their next work: a commit without them costs each of them an
        fsync of its own (with 8 busy threads, commits alternated 8 callers and 1)."""
        with self._pending_lock:
            self._gathering = True
            self._arrived.wait_for(lambda: len(self._pending) >= self._last_batch, self.gather_seconds)
            self._gathering = False

    def _commit_group(self, batch: list[_Work]) -> None:
        """Commit ``batch``; whatever happens, each of its callers is woken with its outcome.

        The works run one after the other in one transaction. Only when one raises is it all
        rolled back and run again, each work in a savepoint of its own, so that only its own
        writes are undone: a savepoint around every work costs two statements, as many as a
        small enqueue's own, for a failure that is rare (inputs are checked before)."""
        try:
            with self.writing():
                try:
                    with self.transaction() as conn:
                        for item in batch:
                            item.run(conn)
                            if item.error is not None:
                                raise _RunApart
                except _RunApart:  # rolled back
                    if len(batch) > 1:
                        self._commit_apart(batch)
        except Exception as e:  # the commit failed: nobody's writes are kept
            for item in batch:
                item.error = item.error or e
        except BaseException:  # interrupted in this thread (a task's timeout): it is this thread's to raise
            for item in batch:
                item.error = item.error or sqlite3.OperationalError("the group commit was interrupted: "
                                                                     "nothing of this call was written")
            raise
        finally:
            for item in batch:
                item.done = True
                item.turn.release()

    def _commit_apart(self, batch: list[_Work]) -> None:
        """Run each work of ``batch`` in a savepoint of its own, undoing only the writes of
        those that raise, and commit."""
        with self.transaction() as conn:
            for item in batch:
                conn.execute("SAVEPOINT work")
                item.run(conn)
                if item.error is not None:
                    conn.execute("ROLLBACK TO work")
                conn.execute("RELEASE work")

    def execute(self, sql: str, params=(), synced: bool = True) -> list[sqlite3.Row]:
        """Run one statement on its own (autocommit) and return all rows.

        ``synced=False``: the commit is not fsynced (WAL with synchronous=NORMAL for it). It
        is durable once any later commit is fsynced (the WAL is one file, written in order),
        and a power cut before that loses it. Only for writes whose loss costs nothing but a
        retry: a claim (the task is simply queued again; at-least-once holds)."""
        conn = self.pool.connection()
        if not synced:  # a write (a claim): it takes its turn
            with self._turn() as deadline, \
                    self._relaxed(conn) if self._syncs_each_commit else contextlib.nullcontext():
                return self._run(conn, sql, params, deadline)
        return self._run(conn, sql, params)  # every read comes this way: no context manager

    @contextlib.contextmanager
    def _turn(self):
        """This thread's turn to write (helpers/write_turn.py), waited for out of the call's
        ``max_lock_wait``; yields the time.monotonic() by which SQLite's lock must be had."""
        deadline = time.monotonic() + self._lock_budget
        with self.turns.turn(min(TURN_WAIT, self._lock_budget)):
            yield deadline

    def _run(self, conn: sqlite3.Connection, sql: str, params, deadline: float | None = None) -> list[sqlite3.Row]:
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as e:
            if not _is_busy(e):
                raise
        if deadline is None:  # a write not known as one beforehand met the lock: in the queue, then again
            with self._turn() as deadline:
                return self._run(conn, sql, params, deadline)
        return _retrying(deadline - time.monotonic())(lambda: conn.execute(sql, params).fetchall())()

    @contextlib.contextmanager
    def _relaxed(self, conn: sqlite3.Connection):
        """This connection's commits meanwhile are not fsynced (see ``execute``)."""
        conn.execute("PRAGMA synchronous = NORMAL")
        try:
            yield
        finally:
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")

    def data_version(self) -> int:
        """Changes whenever another connection commits: a cheap "anything new?" check."""
        return self.pool.connection().execute("PRAGMA data_version").fetchone()[0]

    def hints(self, queue: str) -> int:
        """Any commit may be new work for any queue here: ``data_version()``."""
        return self.data_version()

    def wait_for_change(self, version: int, deadline: float, interval: float = 0.001) -> bool:
        """Wait until another connection commits (True: ``data_version`` is no longer
        ``version``) or ``time.monotonic()`` passes ``deadline`` (False).

        Sleeps until the WAL file is written (inotify), so an idle waiter wakes 20 times a
        second, not 900 (it polled every ``interval``). A commit writes the WAL, then shows
        itself in the shared index, which raises no event: after a write, it polls every
        ``interval`` until the commit shows, for at most ``SETTLE_SECONDS``; it sleeps at
        most ``BLOCK_SECONDS`` at a time, so a commit whose fsync outlasts that is still
        seen. Where inotify is not to be had, it polls every ``interval``."""
        watch = self.pool.wal_watch()
        # Writes before we read data_version below may belong to a commit not shown yet.
        settle_until = time.monotonic() + SETTLE_SECONDS if watch is not None and self._wal_written(watch, 0) else 0.0
        while (now := time.monotonic()) < deadline:
            if self.data_version() != version:
                return True
            if watch is None or now < settle_until:
                time.sleep(min(interval, deadline - now))
            elif self._wal_written(watch, min(BLOCK_SECONDS, deadline - now)):
                settle_until = time.monotonic() + SETTLE_SECONDS
        return False

    def _wal_written(self, watch: INotify, seconds: float) -> bool:
        """Whether the WAL file was written since the last look, waiting up to ``seconds``."""
        wal = self.path.name + "-wal"
        return any(event.name == wal for event in watch.read(timeout=math.ceil(seconds * 1000)))

    def check_integrity(self, quick: bool = False) -> IntegrityReport:
        """``PRAGMA integrity_check`` (or the faster ``quick_check``) on a fresh connection."""
        return check_file_integrity(self.path, quick=quick)

    def create_backup(self, dest_dir: str | os.PathLike | None = None, time_limit: float = 600.0) -> Path:
        """An online, consistent copy made while others keep writing.

        ``VACUUM INTO`` on a connection of its own reads one WAL snapshot from start to end,
        so commits made meanwhile never restart it (the backup API's page-by-page copy starts
        over after each one, and under steady writes never finishes); past ``time_limit``
        seconds it is interrupted (RuntimeError). Written to a temporary name, fsynced, mode
        0600, checked with ``integrity_check``, then renamed to ``oos-YYYYmmdd-HHMMSS-ffffff.db``;
        a copy that fails the check is removed and raises ``RuntimeError``.
        """
        dest_dir = Path(dest_dir) if dest_dir else self.backup_dir
        dest_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        now = time.time()  # one reading, so names sort in creation order
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + f"-{int(now % 1 * 1_000_000):06d}"
        final = dest_dir / BACKUP_NAME.format(stamp=stamp)
        tmp = dest_dir / f".{final.name}.tmp"
        source = connect(self.path, self.synchronous, busy_timeout_ms=5_000, autocheckpoint=0)
        try:
            tmp.unlink(missing_ok=True)
            # Looked at while the copy runs (a timer's interrupt could land before it starts,
            # and then stop nothing).
            deadline = time.monotonic() + time_limit
            source.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
            try:
                _retry_busy(source.execute)("VACUUM INTO ?", (str(tmp),))
            except sqlite3.OperationalError as e:
                if "interrupt" in str(e):
                    raise RuntimeError(f"backup took longer than {time_limit:g} s; stopped") from None
                raise
            os.chmod(tmp, 0o600)
            copy = sqlite3.connect(tmp)
            try:  # a backup is one self-contained file, never one that wants a -wal beside it
                copy.execute("PRAGMA journal_mode = DELETE")
            finally:
                copy.close()
            report = check_file_integrity(tmp)
            if not report.ok:
                raise RuntimeError(f"backup failed its integrity check: {report.problems[:3]}")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(dest_dir)
        finally:
            source.close()
            for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
                leftover.unlink(missing_ok=True)
        return final

    def close(self) -> None:
        self.pool.close_all()


def check_file_integrity(path: str | os.PathLike, quick: bool = False) -> IntegrityReport:
    """Check any SQLite file; a file that is not a database at all is reported, not raised."""
    pragma = "quick_check" if quick else "integrity_check"
    try:
        conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
        try:
            rows = [r[0] for r in conn.execute(f"PRAGMA {pragma}").fetchall()]
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        return IntegrityReport(False, [str(e)])
    return IntegrityReport(rows == ["ok"], [] if rows == ["ok"] else rows)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
