"""HTTP enqueue benchmark with a compiled load generator (Debian's ``wrk``).

    .venv/bin/python scripts/bench_http.py [--quick]

The real daemon's API (waitress, ``api.threads`` threads, synchronous=FULL) takes single-task
POSTs and 100-task POSTs from 8 connections; beside it, in the same run, a bare Flask app under
the same server and threads answers the same POST without touching a database: the ceiling for
this stack. A third app is that bare app plus one durable write: the group commit of a one-row
INSERT at FULL (no auth, no validation, no counters), the floor of any durable enqueue on this
stack. Prints requests/s, p50/p99/max latency and the ratio to the bare app. Asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.config import Config  # noqa: E402
from scripts.bench_daemon import free_port, start_daemon, stop_daemon, wait_answering  # noqa: E402
from scripts.bench_queue import bare_inserts  # noqa: E402

CONNECTIONS, THREADS = 8, 2  # wrk's connections and its own threads
LUA = """wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"
"""


def bare_app(port: int, threads: int, db_path: str | None = None) -> None:
    """A Flask app that answers the enqueue POST like OOS does, minus the database; with
    ``db_path``, plus the group commit of a bare one-row INSERT into it (``bare_inserts``)."""
    from flask import Flask, request
    from waitress import serve

    app = Flask("bare")
    insert = bare_inserts(Path(db_path), "FULL")[1] if db_path else None

    @app.post("/api/v1/queue/<name>/tasks")
    def enqueue(name):
        body = request.get_json()
        task_id = insert(json.dumps(body)) if insert else 1
        return {"id": task_id, "queue": name, "task": body.get("task")}, 201

    serve(app, host="127.0.0.1", port=port, threads=threads, ident="bare", _quiet=True)


def wrk(url: str, body: dict, token: str, seconds: int, directory: Path) -> dict:
    """Run wrk against ``url``; returns requests/s and latency percentiles in ms."""
    script = directory / "post.lua"
    script.write_text(LUA.format(body=json.dumps(json.dumps(body)), token=token))
    out = subprocess.run(["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency", "-s", str(script),
                          url], capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"errors from {url}:\n{out}")

    def ms(pattern: str) -> float:  # a wrk duration (``812.00us``, ``3.02ms``, ``1.10s``) in ms
        value, unit = re.search(pattern + r"([\d.]+)(us|ms|s)", out, re.M).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": ms(r"^\s*50%\s+"),
            "p99": ms(r"^\s*99%\s+"), "max": ms(r"Latency\s+\S+\s+\S+\s+")}


def show(label: str, r: dict, peer: dict | None = None) -> None:
    ratio = f"  {r['rps'] / peer['rps']:.2f}x the bare app" if peer else ""
    print(f"  {label:38} {r['rps']:>8,.0f} req/s  p50 {r['p50']:6.2f} ms  p99 {r['p99']:7.2f} ms  "
          f"max {r['max']:7.1f} ms{ratio}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench_http: wrk is not installed (`make bench` installs Debian's wrk); skipped")
        return
    seconds = 3 if args.quick else 10
    base_dir = Path(tempfile.mkdtemp(prefix="bench-http-", dir=ROOT / "data"))
    peers = []
    try:
        port, bare_port, floor_port = free_port(), free_port(), free_port()
        threads = Config().api_threads  # the daemon's API runs with its default
        for peer_port, db in ((bare_port, ""), (floor_port, str(base_dir / "floor.db"))):
            peers.append(subprocess.Popen([sys.executable, __file__, "--bare", str(peer_port), str(threads), db],
                                          stderr=subprocess.DEVNULL, start_new_session=True))
        proc = start_daemon(base_dir / "data", port, workers=2, sync="FULL")
        try:
            token = (base_dir / "data" / "api_token").read_text().strip()
            for peer_port in (bare_port, floor_port):
                wait_answering(f"http://127.0.0.1:{peer_port}/api/v1/queue/q/tasks", body={"task": "t"})
            single = {"task": "bench.noop", "payload": 1}
            batch = {"tasks": [{"task": "bench.noop", "payload": i} for i in range(100)]}
            print(f"HTTP enqueue, wrk {CONNECTIONS} connections, {seconds} s each, {threads} server threads, "
                  f"SQLite FULL (the daemon's 2 workers idle: no handler serves the queue posted to):")
            peer = wrk(f"http://127.0.0.1:{bare_port}/api/v1/queue/http/tasks", single, token, seconds, base_dir)
            show("bare Flask + waitress (no database)", peer)
            show("bare + one group-committed INSERT", wrk(f"http://127.0.0.1:{floor_port}/api/v1/queue/http/tasks",
                                                         single, token, seconds, base_dir), peer)
            show("OOS single-task POST", wrk(f"http://127.0.0.1:{port}/api/v1/queue/http/tasks", single, token,
                                             seconds, base_dir), peer)
            many = wrk(f"http://127.0.0.1:{port}/api/v1/queue/http/tasks", batch, token, seconds, base_dir)
            show("OOS 100-task POST", many)
            print(f"  {'':38} = {many['rps'] * 100:,.0f} tasks/s")
        finally:
            stop_daemon(proc)
    finally:
        for peer_proc in peers:
            peer_proc.terminate()
            peer_proc.wait(10)
        shutil.rmtree(base_dir, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bare"]:
        os.environ.pop("NOTIFY_SOCKET", None)
        bare_app(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
    else:
        main()
