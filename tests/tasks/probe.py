"""A task that reports, from inside the installed service, who it runs as and where it may write."""
import os

from helpers.tasks import task


@task("probe.write", queue="probe")
def probe_write(payload):
    results = {}
    for path in payload["paths"]:
        try:
            with open(os.path.join(path, ".oos-probe"), "w") as f:
                f.write("x")
            os.unlink(os.path.join(path, ".oos-probe"))
            results[path] = "ok"
        except OSError as e:
            results[path] = type(e).__name__
    return {"uid": os.getuid(), "euid": os.geteuid(), "writes": results}
