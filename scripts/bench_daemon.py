"""End-to-end benchmark: the real daemon (manager + worker processes), beside huey's consumer.

    .venv/bin/python scripts/bench_daemon.py [--quick]

Prints no-op tasks/s from enqueue to completed through the real workers (also under a queue
concurrency limit and a task rate limit that do not bind: what the limits cost), enqueue-to-start
latency at a steady rate, the same for the last step of 3-step chains, and huey's consumer
draining the same no-op tasks in the same run (the peer). The HTTP API: scripts/bench_http.py.
Asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers import limits, workflow  # noqa: E402
from helpers.config import load_config  # noqa: E402
from helpers.counts import queue_counts  # noqa: E402
from helpers.engine import get_database  # noqa: E402
from helpers.queue_manager import QueueManager, wait  # noqa: E402
from helpers.workflow import chain, step  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(data: Path, port: int, workers: int, sync: str, **extra_env: str) -> subprocess.Popen:
    env = dict(os.environ, OOS_DATA_DIR=str(data), OOS_TASK_MODULES="scripts.bench_tasks", PYTHONPATH=str(ROOT),
               OOS_API_PORT=str(port), OOS_WORKERS_MIN=str(workers), OOS_WORKERS_MAX=str(workers),
               OOS_DATABASE_SYNCHRONOUS=sync, OOS_LOG_LEVEL="warning", **extra_env)
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "oos_service_manager.py")], env=env,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    wait_answering(f"http://127.0.0.1:{port}/health")
    return proc


def wait_answering(url: str, body: dict | None = None, seconds: float = 60.0) -> None:
    """Poll ``url`` (a GET, or a POST of ``body`` as JSON) until it answers 2xx; RuntimeError after
    ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if requests.request("POST" if body else "GET", url, json=body, timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {seconds:g} s")


def stop_daemon(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def succeeded(db, queue: str = "bench") -> int:
    """Tasks of ``queue`` succeeded so far: from the counters (helpers/counts.py), so polling it
    costs the run nothing (counting the tasks took a core's fifth at 60,000 of them)."""
    return queue_counts(db, queue, time.time())["counts"]["succeeded"]


def bench_throughput(queue: QueueManager, n: int, sync: str, workers: int, label: str = "") -> float:
    db = queue.db
    before = succeeded(db)
    start = time.perf_counter()
    for b in range(0, n, 100):
        queue.enqueue_many([{"task": "bench.noop", "payload": i} for i in range(b, min(n, b + 100))])
    while succeeded(db) < before + n:
        time.sleep(0.01)
    elapsed = time.perf_counter() - start
    print(f"daemon end to end, {workers} workers   [{sync:6}] {n / elapsed:>10,.0f} no-op tasks/s "
          f"(enqueue in batches of 100 -> completed, {n} tasks){label}")
    return n / elapsed


def bench_huey(directory: Path, n: int, workers: int) -> float | None:
    """huey's consumer (``workers`` processes, fsync on) draining ``n`` no-op tasks that were
    enqueued before it started; timed from its first finished task to its last."""
    try:
        import huey  # noqa: F401 - a dev dependency
    except ImportError:
        print("huey is not installed (requirements-dev.txt pins it): no peer figure")
        return None
    db = directory / "huey-bench.db"
    env = dict(os.environ, HUEY_BENCH_DB=str(db), PYTHONPATH=str(ROOT), HUEY_BENCH_FSYNC="0")
    fill = f"from scripts.huey_peer import noop\nfor i in range({n}):\n    noop(i)"
    subprocess.run([sys.executable, "-c", fill], env=env, check=True, timeout=600)
    consumer = subprocess.Popen([str(Path(sys.executable).parent / "huey_consumer"), "scripts.huey_peer.huey",
                                 "-w", str(workers), "-k", "process", "-d", "0.001", "-m", "0.01", "-q", "-n", "-C"],
                                env=dict(env, HUEY_BENCH_FSYNC="1"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        from huey import SqliteHuey
        store = SqliteHuey("bench", filename=str(db)).storage
        first, start = 0, None
        deadline = time.monotonic() + 600
        while (done := store.result_store_size()) < n:
            if start is None and done:
                first, start = done, time.perf_counter()
            if time.monotonic() > deadline:
                raise RuntimeError(f"huey finished {done} of {n} tasks")
            time.sleep(0.01)
        rate = (n - first) / (time.perf_counter() - (start or time.perf_counter()))
        print(f"huey consumer, {workers} processes   [FULL  ] {rate:>10,.0f} no-op tasks/s "
              f"(SqliteHuey, fsync on, {n} tasks queued before it started)")
        return rate
    finally:
        os.killpg(consumer.pid, signal.SIGKILL)
        consumer.wait()


def pss_mb(pid: int) -> float:
    """The process's proportional set size (its private pages, plus its share of the pages it
    shares), from /proc/<pid>/smaps_rollup, in MB; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def tree_pss(pid: int) -> tuple[float, int]:
    """PSS in MB of ``pid`` and every process below it, and how many processes that is."""
    import psutil
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    return sum(pss_mb(p.pid) for p in procs), len(procs)


def bench_memory(base: Path) -> None:
    """An idle daemon's memory: the manager, the API and 2 workers, then with 4 workers (what
    each worker beyond costs); huey's consumer with 2 process workers beside it."""
    sizes = {}
    for workers in (2, 4):
        data = base / f"memory-{workers}"
        proc = start_daemon(data, free_port(), workers=workers, sync="FULL")
        try:
            time.sleep(5.0)  # workers up, first claims done, idle
            sizes[workers] = tree_pss(proc.pid)
        finally:
            stop_daemon(proc)
    total, count = sizes[2]
    print(f"idle daemon (manager, API, 2 workers; {count} processes with the fork server and the resource "
          f"tracker): {total:.0f} MB PSS; each worker beyond: {(sizes[4][0] - total) / 2:.1f} MB PSS")
    try:
        import huey  # noqa: F401 - a dev dependency
    except ImportError:
        return
    env = dict(os.environ, HUEY_BENCH_DB=str(base / "huey-memory.db"), PYTHONPATH=str(ROOT))
    consumer = subprocess.Popen([str(Path(sys.executable).parent / "huey_consumer"), "scripts.huey_peer.huey",
                                 "-w", "2", "-k", "process", "-q"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(5.0)
        peer, count = tree_pss(consumer.pid)
        print(f"huey consumer, 2 process workers, idle ({count} processes): {peer:.0f} MB PSS; OOS / huey "
              f"{total / peer:.2f}x (OOS's count includes its HTTP API and dashboard)")
    finally:
        os.killpg(consumer.pid, signal.SIGKILL)
        consumer.wait()


def bench_limits(queue: QueueManager, n: int, sync: str, workers: int, plain: float) -> None:
    """What the limits cost when they do not bind: the same drain under a concurrency limit on
    the queue, then under a rate limit on the task (each read by the workers within 2 s)."""
    limits.set_concurrency(queue.db, "bench", 1000)
    time.sleep(2.5)
    limited = bench_throughput(queue, n, sync, workers, "  with a concurrency limit (1000)")
    limits.set_concurrency(queue.db, "bench", None)
    limits.set_rate_limit(queue.db, "bench.noop", "1000000/s")
    time.sleep(2.5)
    rated = bench_throughput(queue, n, sync, workers, "  with a rate limit (1000000/s)")
    limits.set_rate_limit(queue.db, "bench.noop", None)
    print(f"limits cost: concurrency limit {limited / plain:.2f}x, rate limit {rated / plain:.2f}x "
          f"the unlimited drain")


def bench_chain(queue: QueueManager, chains: int, per_second: int, sync: str) -> None:
    """3-step chains enqueued at a steady rate: from the enqueue to the start of the last step,
    and each hop (a step finished -> the next one started)."""
    flows = []
    t0 = time.perf_counter()
    for i in range(chains):
        while (delay := t0 + i / per_second - time.perf_counter()) > 0:
            time.sleep(delay)
        flows.append(workflow.submit(queue.db, chain(step("bench.noop", i, queue="bench"),
                                                     step("bench.noop", queue="bench"),
                                                     step("bench.noop", queue="bench")), queue.config))
    total, hops = [], []
    for flow in flows:
        tasks = [wait(queue.db, task_id, 60) for task_id in flow["ids"]]
        total.append((tasks[-1].started_at - tasks[0].created_at) * 1000)
        hops += [(b.started_at - a.finished_at) * 1000 for a, b in zip(tasks, tasks[1:])]
    print(f"daemon 3-step chain at {per_second}/s [{sync:6}] enqueue-to-start of step 3: p50 "
          f"{statistics.median(total):.2f} ms  p99 {percentile(total, 0.99):.2f} ms; each hop p50 "
          f"{statistics.median(hops):.2f} ms  p99 {percentile(hops, 0.99):.2f} ms  ({chains} chains)")


def bench_latency(queue: QueueManager, per_second: int, seconds: float, sync: str) -> None:
    ids = []
    t0 = time.perf_counter()
    for i in range(int(per_second * seconds)):
        while (delay := t0 + i / per_second - time.perf_counter()) > 0:
            time.sleep(delay)
        ids.append(queue.enqueue("bench.noop", i))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and queue.db.execute(
            "SELECT count(*) FROM tasks WHERE id >= ? AND state = 'succeeded'", (ids[0],))[0][0] < len(ids):
        time.sleep(0.05)
    waits = [r[0] * 1000 for r in queue.db.execute(
        "SELECT started_at - created_at FROM tasks WHERE id >= ? AND started_at IS NOT NULL", (ids[0],))]
    print(f"daemon enqueue-to-start at {per_second}/s [{sync:6}] p50 {statistics.median(waits):.2f} ms  "
          f"p99 {percentile(waits, 0.99):.2f} ms  ({len(waits)} tasks)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    scale = 0.1 if args.quick else 1.0
    drained = {}  # tasks/s per synchronous mode
    base_dir = Path(tempfile.mkdtemp(prefix="bench-daemon-", dir=ROOT / "data"))
    try:
        for sync in ("FULL", "NORMAL"):
            data = base_dir / sync
            config = load_config(env={"OOS_DATA_DIR": str(data)}, database_synchronous=sync)
            queue = QueueManager("bench", get_database(config), config)
            port = free_port()
            proc = start_daemon(data, port, workers=2, sync=sync)
            try:
                plain = bench_throughput(queue, int(20_000 * scale), sync, 2)
                drained[sync] = plain
                bench_latency(queue, 500, 10 * scale + 1, sync)
                if sync == "FULL":
                    bench_chain(queue, int(200 * scale) + 10, 50, sync)
                    bench_limits(queue, int(20_000 * scale), sync, 2, plain)
            finally:
                stop_daemon(proc)
        bench_memory(base_dir)
        # The peer runs alone, after OOS's daemon stopped (its idle workers would take CPU).
        peer = bench_huey(base_dir, int(20_000 * scale), 2)
        if peer:
            print(f"OOS / huey consumer: {drained['FULL'] / peer:.2f}x (same run, 2 worker processes each; "
                  f"huey fsyncs every commit, OOS every commit but a claim's, which the completion's fsync carries)")
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
