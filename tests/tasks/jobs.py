"""Handlers for the job-feature tests in real daemons: a context, workflows, limits, a schedule.
Each notes what it did in ``$OOS_TEST_LOG`` (kind, key, pid, time)."""
import os
import signal
import time

from helpers.periodic import periodic
from helpers.tasks import task


def note(kind, key):
    path = os.environ.get("OOS_TEST_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{kind} {key} {os.getpid()} {time.time():.6f}\n")


@task("jobs.steps", bind=True, timeout=3)
def steps(context, payload):
    """Reports progress and heartbeats past its 3 s timeout; stops when cancelled."""
    for i in range(payload["steps"]):
        if context.cancelled():
            note("cancelled-cooperatively", context.id)
            return "stopped early"
        context.progress((i + 1) / payload["steps"], f"step {i + 1}")
        context.heartbeat()
        time.sleep(payload.get("pause", 0.5))
    return {"steps": payload["steps"], "attempt": context.attempt}


@task("jobs.stubborn", timeout=300)
def stubborn(payload):
    """Ignores a cancel: only the worker's interrupt stops it."""
    note("stubborn-start", payload)
    while True:
        time.sleep(0.05)


@task("jobs.deaf", timeout=300)
def deaf(payload):
    """Deaf to the worker's interrupt too (as a handler stuck in C code is): only the manager,
    replacing its worker, can stop it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGUSR2})
    note("deaf-start", payload)
    while True:
        time.sleep(0.05)


@task("jobs.add", max_attempts=20)
def add(payload, context):
    """A chain step: its payload is the previous step's result (or the first step's own)."""
    note("add", f"{context.id}:{payload}")
    time.sleep(0.01)
    return payload + 1


@task("jobs.sum", max_attempts=20)
def total(payload):
    """A chord's callback: the list of the group's results."""
    return sum(payload)


@task("jobs.mail", rate_limit="5/s")
def mail(payload):
    note("mail", payload)
    return None


@task("jobs.narrow", queue="narrow")
def narrow(payload):
    note("narrow-start", payload)
    time.sleep(0.2)
    note("narrow-end", payload)


@periodic(every=1, name="jobs.tick", queue="ticks", max_attempts=20)
def tick(payload, context):
    note("tick", context.id)


@task("jobs.needs_file", max_attempts=1)
def needs_file(payload):
    """Dies until the file ``payload["path"]`` exists: replaying it after making the file succeeds."""
    if not os.path.exists(payload["path"]):
        raise RuntimeError(f"{payload['path']} is missing")
    return "found"
