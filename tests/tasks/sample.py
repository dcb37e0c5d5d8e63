"""Task handlers the daemon tests run in real worker processes.

Each handler appends a line to ``$OOS_TEST_LOG`` (when set) so a test can count executions,
including ones whose result was never recorded because the worker was killed.
"""
import os
import time

from helpers.tasks import task


def _note(kind, payload):
    path = os.environ.get("OOS_TEST_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{kind} {payload.get('n') if isinstance(payload, dict) else payload} {os.getpid()}\n")


@task("noop")
def noop(payload):
    _note("noop", payload)
    return {"ok": True}


@task("says")
def says(payload):
    print(payload["line"])  # a whole line
    print(payload["tail"], end="")  # no newline yet: written out when the worker ends
    return None


@task("echo", queue="echo")
def echo(payload):
    return payload


@task("sleepy", max_attempts=3)
def sleepy(payload):
    _note("sleepy-start", payload)
    time.sleep(payload.get("seconds", 1))
    _note("sleepy-end", payload)
    return "slept"


@task("too_slow", timeout=0.5, max_attempts=2)
def too_slow(payload):
    time.sleep(30)


@task("flaky", queue="flaky", max_attempts=100)
def flaky(payload):
    """Fails while the file named in the payload exists."""
    _note("flaky", payload)
    if os.path.exists(payload["fail_while"]):
        raise RuntimeError("downstream is down")
    return "recovered"


@task("boom", max_attempts=2)
def boom(payload):
    raise ValueError("always fails")


@task("poison")  # the queue's default attempts and timeout
def poison(payload):
    raise ValueError("poison: this input always fails")


@task("bad_input", max_attempts=5)
def bad_input(payload):
    from helpers.tasks import PermanentError

    raise PermanentError("payload: missing 'path'")


@task("naps", timeout=0.5)
def naps(payload):
    """Sleeps ``payload["seconds"]``: past its handler's timeout unless the task says longer."""
    time.sleep(payload["seconds"])
    return "rested"


@task("hog", max_attempts=2)
def hog(payload):
    """Holds ``payload["mb"]`` MiB (written, so resident) for ``payload["seconds"]``."""
    held = bytearray(b"\x01") * (payload["mb"] << 20)
    time.sleep(payload["seconds"])
    return len(held)


@task("freeze_in_commit", max_attempts=1)
def freeze_in_commit(payload):
    """Takes the database's write lock and stops this worker process where it stands."""
    import signal
    import sqlite3

    from helpers.config import load_config

    conn = sqlite3.connect(load_config().db_path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    os.kill(os.getpid(), signal.SIGSTOP)
