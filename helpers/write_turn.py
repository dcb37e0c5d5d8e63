"""Processes writing one SQLite file take turns, waiting in the kernel instead of polling.

SQLite has one write lock per file and no queue in front of it: a process that finds it taken
gets SQLITE_BUSY and polls (``database_config._retrying``). With several processes each
committing back to back, the pollers burnt the cores the holder needed, and four processes
drained the one-call API at half the rate of one (828 against 1,773 per s).

A turn is an exclusive ``flock`` on ``<database>-turn``, taken around each write transaction.
A waiter blocks on an inotify watch of that file, and the holder reads a byte of it when it
lets go (an ACCESS event: a read, so no write to the disk), so the next one starts at once and
the waiting costs no CPU.

What a caller may rely on:
- A turn is only a queue in front of SQLite's own lock, never a replacement for it: a writer
  that does not take turns (another program, ``sqlite3`` by hand) is still excluded by SQLite,
  and the turn holder still handles SQLITE_BUSY as before.
- ``turn(seconds)`` never waits longer than ``seconds``: after that it goes on without the turn
  (so a holder frozen outside its transaction slows the others, never stops them).
- A process that dies holding a turn gives it up (the kernel drops a dead process's flock).
- Each thread has its own open file, so the threads of one process take turns too; a forked
  child opens its own and never shares its parent's.
- Where the file cannot be made (a read-only directory), ``turn`` takes no turn and the writers
  poll SQLite's lock as before; a thread that cannot have an inotify watch (the user's
  ``fs.inotify.max_user_instances`` reached) waits for its turn by trying every millisecond.
  A thread makes its watch the first time it has to wait.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import math
import os
import select
import threading
import time
from pathlib import Path

from inotify_simple import INotify
from inotify_simple import flags as inotify_flags

LOOK_EVERY = 0.005  # seconds: the longest a waiter sleeps between tries (a lost wake-up costs this)
NO_WATCH_LOOK = 0.001  # seconds between a waiter's tries where it has no inotify watch


def inotify_watch(path: Path, mask: int, nonblocking: bool = False) -> INotify | None:
    """An inotify watch of ``path`` for the events in ``mask``, or None where inotify is not to
    be had (the user's ``fs.inotify.max_user_instances`` reached, a path it cannot watch): the
    caller then polls."""
    try:
        watcher = INotify(nonblocking=nonblocking)
    except OSError:
        return None
    try:
        watcher.add_watch(path, mask)
    except OSError:
        watcher.close()
        return None
    return watcher


class WriteTurns:
    """The turns of one database file, for every thread of this process."""

    def __init__(self, database: Path):
        self.path = Path(f"{database}-turn")
        self._local = threading.local()

    def _file(self) -> io.FileIO | None:
        """This thread's open turn file (made once per thread and process, and closed with the
        thread's other locals when it ends), or None where it cannot be had."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.pid, local.file, local.watch, local.held = os.getpid(), None, None, False
            try:
                file = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600), "r+b", buffering=0)
                if os.fstat(file.fileno()).st_size == 0:
                    os.pwrite(file.fileno(), b"\0", 0)  # a read of nothing raises no event
            except OSError:
                return None
            local.file = file
        return local.file

    def _watch(self) -> INotify | None:
        """This thread's watch of the turn file, made the first time it has to wait (a writer
        that never waits holds no inotify instance), or None where inotify is not to be had."""
        local = self._local
        if local.watch is None:
            local.watch = inotify_watch(self.path, inotify_flags.ACCESS, nonblocking=True) or False  # (False: tried)
        return local.watch or None

    @contextlib.contextmanager
    def turn(self, seconds: float):
        """Hold this file's write turn meanwhile, waiting up to ``seconds`` for it (then going
        on without it). Yields whether the turn is held. A thread that holds it already (a
        write inside its own write) just goes on."""
        file = self._file()
        if file is None or self._local.held:
            yield file is not None
            return
        if not self._take(file.fileno(), seconds):
            yield False
            return
        self._local.held = True
        try:
            yield True
        finally:
            self._local.held = False
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)
            os.pread(file.fileno(), 1, 0)  # wakes the waiters (an inotify ACCESS event; a read changes nothing)

    def _take(self, fd: int, seconds: float) -> bool:
        if _try(fd):
            return True
        deadline = time.monotonic() + seconds
        watcher = self._watch()
        waiting = select.poll()
        if watcher is not None:
            waiting.register(watcher.fileno(), select.POLLIN)
        while True:
            # Wake-ups from before the next try say nothing about it. (Read raw and dropped: with
            # several waiters every release wakes them all, and parsing each event into objects
            # took a quarter of four processes' CPU.)
            if watcher is not None:
                with contextlib.suppress(BlockingIOError):
                    os.read(watcher.fileno(), 4096)
            if _try(fd):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # A release after the try above has already queued its event: no wake-up is lost.
            # Without a watch, a look every NO_WATCH_LOOK.
            step = LOOK_EVERY if watcher is not None else NO_WATCH_LOOK
            waiting.poll(math.ceil(min(left, step) * 1000))


def _try(fd: int) -> bool:
    """Take the turn if it is free, without waiting."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
