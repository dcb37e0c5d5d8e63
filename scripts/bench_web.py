"""The dashboard's pages over a database of a million finished tasks: p50/p99 of each page's
request, rendered by the app in this process (Flask's test client: the server's own time,
without the network).

    .venv/bin/python scripts/bench_web.py [--rows N]
"""
from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from api.app import create_app  # noqa: E402
from helpers import history  # noqa: E402
from helpers.config import load_config  # noqa: E402
from helpers.engine import get_database  # noqa: E402
from scripts.bench_queue import fill_tasks  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="100,000 rows")
    args = parser.parse_args(argv)
    rows = 100_000 if args.quick else args.rows
    directory = Path(tempfile.mkdtemp(prefix="bench-web-", dir=ROOT / "data"))
    try:
        config = load_config(env={"OOS_DATA_DIR": str(directory)}, database_synchronous="NORMAL")
        db = get_database(config)
        dead = fill_tasks(db, rows)
        for minute in range(60):
            history.record(db, config, now=time.time() - 3600 + minute * 60)
        app = create_app(config)
        client = app.test_client()
        page = client.get("/ui/login").get_data(as_text=True)
        token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        client.post("/ui/login", data={"token": app.extensions["oos"]["token"], "csrf_token": token})
        page = client.get("/ui/tasks").get_data(as_text=True)  # the session's own CSRF token, after login
        token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        requests = {
            "overview": ("GET", "/ui/", None), "overview live part": ("GET", "/ui/overview/live", None),
            "history (6 h)": ("GET", "/ui/history.json?hours=6", None), "queues": ("GET", "/ui/queues", None),
            "tasks (newest)": ("GET", "/ui/tasks", None),
            "tasks: one queue, dead": ("POST", "/ui/tasks", {"queue": "q1", "state": "dead"}),
            "tasks: payload text": ("POST", "/ui/tasks", {"text": '"u999"'}),
            "task detail": ("GET", f"/ui/tasks/{dead}", None), "dead letter": ("GET", "/ui/dead", None),
            "dead letter: payload text": ("POST", "/ui/dead", {"text": '"u999"'}),
            "workers": ("GET", "/ui/workers", None), "schedules": ("GET", "/ui/schedules", None),
            "database": ("GET", "/ui/database", None), "assistant": ("GET", "/ui/assistant", None),
            "audit log": ("GET", "/ui/audit", None),
        }
        print(f"dashboard pages, {rows:,} tasks (SQLite), 20 requests each, server time:")
        for label, (method, path, form) in requests.items():
            times = []
            for _ in range(20):
                t = time.perf_counter()
                if method == "GET":
                    response = client.get(path)
                else:
                    response = client.post(path, data=dict(form, csrf_token=token))
                times.append((time.perf_counter() - t) * 1000)
                if response.status_code != 200:
                    raise RuntimeError(f"{label}: {response.status_code}")
            times.sort()
            print(f"  {label:24} p50 {statistics.median(times):8.2f} ms  p99 {times[-1]:8.2f} ms")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
