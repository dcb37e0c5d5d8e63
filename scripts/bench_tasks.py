"""Task handlers for the daemon benchmark."""
from helpers.tasks import task


@task("bench.noop", queue="bench")
def noop(payload):
    return None
