"""Facts about OOS's own processes that the manager, workers and API share."""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import sys
from pathlib import Path

import psutil

PR_SET_PDEATHSIG = 1


def worker_id(pid: int | None = None) -> str:
    """The id a worker process holds leases under in the tasks table: ``<host>:<pid>``."""
    return f"{os.uname().nodename}:{os.getpid() if pid is None else pid}"


def pid_of(holder: str) -> int | None:
    """The pid in a ``worker_id`` of this host, or None for another host's or a foreign id."""
    host, _, pid = (holder or "").rpartition(":")
    return int(pid) if host == os.uname().nodename and pid.isdigit() else None


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``signum`` to this process when its parent dies (Linux), so a
    child of a SIGKILLed manager (or test) does not live on."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    except OSError:
        pass


def leave(code: int) -> None:
    """End this process now with ``code``: ``os._exit``, so no atexit handler or
    multiprocessing finalizer runs, but only after writing out what is left in stdout's
    buffer (a handler's last ``print(..., end="")``), which ``os._exit`` would drop."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream: nothing to save
            stream.flush()
    os._exit(code)


def is_worker_alive(pid: int) -> bool:
    """True if ``pid`` is a running OOS worker (a multiprocessing child, not a reused pid)."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and "multiprocessing" in " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


class DaemonRunning(RuntimeError):
    """Daemons hold the database (``pids``): a restore must wait for them to stop. Also raised
    to a daemon that starts while a restore holds the file."""

    def __init__(self, pids: list[int], db_path: Path, what: str = "an OOS daemon"):
        named = f"pid {', '.join(map(str, pids))}" if pids else "pid ?"
        super().__init__(f"{what} ({named}) is running on {db_path}")
        self.pid = pids[0] if pids else None
        self.pids = pids


def locks_on(path) -> list[list[str]]:
    """The locks held on the file at ``path`` (Linux /proc/locks), each line's fields:
    ``["1:", "FLOCK", "ADVISORY", "READ", pid, "maj:min:inode", start, end]``; waiters left out."""
    try:
        inode = f":{os.stat(path).st_ino}"
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split()
        if "->" not in fields and len(fields) >= 8 and fields[5].endswith(inode):  # "1: -> POSIX": a waiter
            found.append(fields)
    return found


def _lock_path(config) -> Path:
    return config.db_path.with_name(config.db_path.name + ".lock")


def lock_holders(config) -> list[int]:
    """The pids holding the database's lock now: its running daemons (or a restore)."""
    return sorted({int(fields[4]) for fields in locks_on(_lock_path(config)) if fields[1] == "FLOCK"})


def local_daemon(config) -> str | None:
    """The ``worker_id`` of the daemon that holds this host's data directory (from the pid in
    its lock file), or None when there is none."""
    try:
        text = _lock_path(config).read_text().strip()
    except OSError:
        return None
    return worker_id(int(text)) if text.isdigit() else None


def hold_database(config, exclusive: bool = False):
    """Take the database's lock and write our pid into its file: shared for a daemon (several
    daemons may serve different queues of one file), exclusive for a restore, which must have
    the file to itself. The kernel drops the lock when the process dies, however it dies.
    Returns the open file: keep it open while holding. Raises DaemonRunning if taken."""
    path = _lock_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        text = f.read().strip()
        f.close()
        what = "an OOS daemon" if exclusive else "a restore"
        # The file names the last process to take the lock; the kernel knows every holder
        # (several daemons may share the lock, and the last to start may have stopped).
        holders = lock_holders(config)
        raise DaemonRunning(holders or ([int(text)] if text.isdigit() else []), config.db_path, what) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f
