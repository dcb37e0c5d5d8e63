"""The read side at millions of rows: what a queue's counts cost with 5M queued tasks and with
5M finished ones, on SQLite and on PostgreSQL, beside an empty queue (the floor).

    .venv/bin/python scripts/bench_reads.py [--rows N] [--quick]

Times, p50 of 20 in this process (the server's own time, without the network): ``stats()``,
a Prometheus scrape (``GET /metrics``), ``GET /api/v1/queue/status``, what ``oos status``
reads, and the dashboard's Overview (its page and its live part). Each table is built with
one INSERT ... SELECT. Asserts nothing.
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
from helpers import reports  # noqa: E402
from helpers.config import load_config  # noqa: E402
from helpers.engine import open_database  # noqa: E402
from helpers.queue_manager import QueueManager  # noqa: E402
from scripts.pg_server import PostgresServer, bindir  # noqa: E402

# Rows made by the database itself, in one statement: a recursive count on SQLite, a series
# on PostgreSQL. ``finished_at`` is NULL for queued rows.
FILL = {
    "sqlite": """WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < :rows)
INSERT INTO tasks (queue, name, payload, state, run_at, created_at, finished_at, max_attempts, timeout)
SELECT 'big', 'bench.noop', 'null', :state, :at, :at, :finished, 3, 300 FROM s""",
    "postgresql": """INSERT INTO tasks (queue, name, payload, state, run_at, created_at, finished_at, max_attempts, timeout)
SELECT 'big', 'bench.noop', 'null', :state, :at, :at, :finished, 3, 300 FROM generate_series(1, :rows)""",
}


def p50(call, times: int = 20) -> float:
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def measure(engine: str, rows: int, state: str, directory: Path, server: PostgresServer | None) -> dict:
    env = {"OOS_DATA_DIR": str(directory), "OOS_LOG_LEVEL": "warning"}
    if server is not None:
        env["OOS_DATABASE_URL"] = server.schema_url()
    config = load_config(env=env, database_synchronous="NORMAL")
    db = open_database(config)
    try:
        queue = QueueManager("big", db, config)
        queue.pause()  # nothing runs them: the rows stay as built
        if rows:
            started = time.perf_counter()
            with db.transaction() as conn:
                conn.execute(FILL[engine], dict(rows=rows, state=state, at=time.time() - 3600,
                                                finished=None if state == "queued" else time.time() - 3500))
            if server is not None:  # its planner learns the table's new size
                db.execute("VACUUM ANALYZE tasks")
            built = time.perf_counter() - started
        else:
            built = 0.0
        queue.enqueue_many([{"task": "bench.noop", "delay": 600} for _ in range(10)])
        app = create_app(config)
        client = app.test_client()
        token = app.extensions["oos"]["token"]
        page = client.get("/ui/login").get_data(as_text=True)
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        client.post("/ui/login", data={"token": token, "csrf_token": csrf})
        auth = {"Authorization": f"Bearer {token}"}

        def get(path: str, headers=None):
            response = client.get(path, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"{path}: {response.status_code}")
        return {
            "built": built,
            "stats()": p50(queue.stats),
            "GET /metrics": p50(lambda: get("/metrics", auth)),
            "GET /api/v1/queue/status": p50(lambda: get("/api/v1/queue/status", auth)),
            "oos status (its reads)": p50(lambda: (reports.all_queues(db, config), reports.daemon_status(db, config))),
            "dashboard Overview": p50(lambda: get("/ui/")),
            "Overview, live part": p50(lambda: get("/ui/overview/live")),
        }
    finally:
        db.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--quick", action="store_true", help="200,000 rows")
    args = parser.parse_args(argv)
    rows = 200_000 if args.quick else args.rows
    engines = [("sqlite", None)] + ([("postgresql", PostgresServer(fsync=False))] if bindir() else [])
    for engine, server in engines:
        if server:
            server.start()
        directory = Path(tempfile.mkdtemp(prefix="bench-reads-", dir=ROOT / "data"))
        try:
            cases = {"empty": measure(engine, 0, "queued", directory / "empty", server)}
            for state in ("queued", "succeeded"):
                cases[f"{rows:,} {state}"] = measure(engine, rows, state, directory / state, server)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
            if server:
                server.stop()
        labels = list(cases)
        print(f"read side on {engine}, p50 ms of 20 (server time); tables built in "
              + ", ".join(f"{cases[c]['built']:.0f} s" for c in labels[1:]))
        print(f"  {'':28}" + "".join(f"{label:>22}" for label in labels) + "   ratio to empty")
        for what in [k for k in cases["empty"] if k != "built"]:
            worst = max(cases[c][what] for c in labels[1:])
            print(f"  {what:28}" + "".join(f"{cases[c][what]:>19.2f} ms" for c in labels)
                  + f"   {worst / cases['empty'][what]:.2f}x")


if __name__ == "__main__":
    main()
