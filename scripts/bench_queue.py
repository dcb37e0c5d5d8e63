"""Queue benchmark: OOS next to raw sqlite3 on the same disk, in one run.

    make bench              # or: .venv/bin/python scripts/bench_queue.py [--quick] [--dir DIR]

Prints jobs/s for enqueue (one call per job, and batched), drain (claim + complete of no-op
jobs) with 1 and 4 processes, and enqueue-to-claim latency at a steady rate; each line names
its durability setting and the raw-sqlite3 figure for the same work; two lines also print a
floor, what their technique alone reaches here: for 8 threads, group commit of a bare INSERT,
for ``dequeue`` + ``complete_task``, raw sqlite3 with its claim not fsynced. Then the one-call and
8-thread lines again as on a disk whose fsync takes longer (``--fsync-delay-ms``, default 1:
an LD_PRELOAD shim, scripts/fsync_delay.c, adds that to each fsync; 0 skips them): what one
fsync per task and group commit save grows with the disk's flush time. Asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers.config import load_config  # noqa: E402
from helpers.database_config import DatabaseManager, connect  # noqa: E402
from helpers.engine import get_database  # noqa: E402
from helpers.queue_manager import QueueManager, browse  # noqa: E402
from scripts.bench_daemon import percentile  # noqa: E402


def fresh_queue(directory: Path, sync: str, name: str = "bench") -> QueueManager:
    data = directory / f"oos-{sync}-{time.monotonic_ns()}"
    config = load_config(env={"OOS_DATA_DIR": str(data)}, database_synchronous=sync)
    return QueueManager(name, get_database(config), config)


def raw_db(directory: Path, sync: str) -> sqlite3.Connection:
    path = directory / f"raw-{sync}-{time.monotonic_ns()}.db"
    conn = connect(path, sync)
    conn.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, payload TEXT, state TEXT, worker TEXT)")
    return conn


def raw_jobs(directory: Path, sync: str, n: int) -> sqlite3.Connection:
    """A raw jobs table holding ``n`` queued jobs, indexed for a claim of the oldest."""
    raw = raw_db(directory, sync)
    raw.executemany("INSERT INTO jobs (payload, state) VALUES (?, 'queued')", [(str(i),) for i in range(n)])
    raw.execute("CREATE INDEX jobs_state ON jobs (state, id)")
    return raw


def bare_inserts(path: Path, sync: str) -> tuple[DatabaseManager, Callable[[str], int]]:
    """A floor: OOS's group commit (``DatabaseManager.group``) of a bare one-row INSERT into
    a table with no index, no checks and no counters. Returns the database and ``insert``
    (a payload's JSON -> its row id, durable at ``sync``)."""
    db = DatabaseManager(path, sync, 30_000)
    db.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, payload TEXT)")
    return db, lambda payload: db.group(lambda conn: conn.execute("INSERT INTO jobs (payload) VALUES (?)",
                                                                  (payload,)).lastrowid)


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:>10,.0f} jobs/s"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_enqueue(directory: Path, sync: str, n_single: int, n_batch: int) -> None:
    queue = fresh_queue(directory, sync)
    oos_single = timed(lambda: [queue.enqueue("noop", {"i": i}) for i in range(n_single)])
    batches = [[{"task": "noop", "payload": {"i": i}} for i in range(b, b + 100)]
               for b in range(0, n_batch, 100)]
    oos_batch = timed(lambda: [queue.enqueue_many(batch) for batch in batches])

    raw = raw_db(directory, sync)

    def raw_single():
        for i in range(n_single):
            raw.execute("BEGIN IMMEDIATE")
            raw.execute("INSERT INTO jobs (payload, state) VALUES (?, 'queued')", (json.dumps({"i": i}),))
            raw.execute("COMMIT")

    def raw_batched():
        for b in range(0, n_batch, 100):
            raw.execute("BEGIN IMMEDIATE")
            raw.executemany("INSERT INTO jobs (payload, state) VALUES (?, 'queued')",
                            [(json.dumps({"i": i}),) for i in range(b, b + 100)])
            raw.execute("COMMIT")

    raw_s, raw_b = timed(raw_single), timed(raw_batched)
    print(f"enqueue, one call per job   [{sync:6}] OOS {rate(n_single, oos_single)}   raw sqlite3 "
          f"{rate(n_single, raw_s)}   ratio {raw_s / oos_single:.2f}")
    print(f"enqueue, batches of 100     [{sync:6}] OOS {rate(n_batch, oos_batch)}   raw sqlite3 "
          f"{rate(n_batch, raw_b)}   ratio {raw_b / oos_batch:.2f}")


def bench_concurrent_enqueue(directory: Path, sync: str, callers: int, per_caller: int) -> None:
    """``callers`` threads of one process each enqueue one task per call: OOS shares commits
    among them (group commit); raw sqlite3 gives each thread its connection and its own
    BEGIN IMMEDIATE / INSERT / COMMIT, SQLite's busy handler arbitrating. Also a call's p99
    and max: the busy handler sleeps in steps of up to 100 ms. And the floor (``bare_inserts``):
    what group commit alone reaches here."""
    queue = fresh_queue(directory, sync)
    raw_path = directory / f"raw-{sync}-{time.monotonic_ns()}.db"
    connect(raw_path, sync).execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, payload TEXT, state TEXT)")
    bare, insert = bare_inserts(directory / f"floor-{sync}-{time.monotonic_ns()}.db", sync)
    calls: list[float] = []  # each call's seconds (list.append is atomic)

    def oos(k: int) -> None:
        for i in range(per_caller):
            t = time.perf_counter()
            queue.enqueue("noop", {"i": i, "k": k})
            calls.append(time.perf_counter() - t)

    def floor(k: int) -> None:
        for i in range(per_caller):
            t = time.perf_counter()
            insert(json.dumps({"i": i, "k": k}))
            calls.append(time.perf_counter() - t)

    def raw(k: int) -> None:
        conn = connect(raw_path, sync)
        for i in range(per_caller):
            t = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO jobs (payload, state) VALUES (?, 'queued')", (json.dumps({"i": i, "k": k}),))
            conn.execute("COMMIT")
            calls.append(time.perf_counter() - t)
        conn.close()

    def run(fn) -> tuple[float, str]:
        calls.clear()
        threads = [threading.Thread(target=fn, args=(k,)) for k in range(callers)]
        seconds = timed(lambda: ([t.start() for t in threads], [t.join() for t in threads]))
        return seconds, f"p99 {percentile(calls, 0.99) * 1000:.1f} ms, max {max(calls) * 1000:.0f} ms"

    (oos_t, oos_calls), (raw_t, raw_calls), (floor_t, _) = run(oos), run(raw), run(floor)
    bare.close()
    n = callers * per_caller
    print(f"enqueue, {callers} threads, one each [{sync:6}] OOS {rate(n, oos_t)}   raw sqlite3 "
          f"{rate(n, raw_t)}   ratio {raw_t / oos_t:.2f}   a call: OOS {oos_calls}; raw {raw_calls}\n"
          f"  floor: group commit of a bare INSERT {rate(n, floor_t)}, ratio {raw_t / floor_t:.2f}")


def bench_one_call(directory: Path, sync: str, n: int) -> None:
    """The one-call API, one task at a time: ``dequeue`` then ``complete_task``, beside raw
    sqlite3 doing the same claim (UPDATE ... RETURNING) and ack, each its own durable commit.
    And the floor: raw sqlite3 with OOS's trick, its claim not fsynced (one fsync per task)."""
    queue = fresh_queue(directory, sync)
    queue.enqueue_many([{"task": "noop", "payload": i} for i in range(n)])

    def oos() -> None:
        while (task := queue.dequeue("w")) is not None:
            queue.complete_task(task.id, "w", None)

    raw, floor = raw_jobs(directory, sync, n), raw_jobs(directory, sync, n)
    oos_t, raw_t = timed(oos), timed(lambda: raw_claim_ack(raw, sync, "w", True))
    floor_t = timed(lambda: raw_claim_ack(floor, sync, "w", False))
    print(f"dequeue + complete_task      [{sync:6}] OOS {rate(n, oos_t)}   raw sqlite3 {rate(n, raw_t)}   "
          f"ratio {raw_t / oos_t:.2f}\n  floor: raw sqlite3, its claim not fsynced {rate(n, floor_t)}, "
          f"ratio {raw_t / floor_t:.2f}")


def raw_claim_ack(raw: sqlite3.Connection, sync: str, worker: str, claim_synced: bool) -> int:
    """Raw sqlite3's one-at-a-time drain until no job is left: claim (UPDATE ... RETURNING),
    then ack, each its own commit; ``claim_synced=False``: the claim not fsynced (OOS's trick).
    Returns the jobs it took."""
    done = 0
    while True:
        if not claim_synced:
            raw.execute("PRAGMA synchronous = NORMAL")
        row = raw.execute("UPDATE jobs SET state = 'running', worker = ? WHERE id = (SELECT id FROM jobs "
                          "WHERE state = 'queued' ORDER BY id LIMIT 1) RETURNING id", (worker,)).fetchone()
        if not claim_synced:
            raw.execute(f"PRAGMA synchronous = {sync}")
        if row is None:
            return done
        raw.execute("UPDATE jobs SET state = 'done' WHERE id = ? AND worker = ?", (row[0], worker))
        done += 1


def _raw_one_call_child(path: str, sync: str, worker: str, start, out) -> None:
    """Raw sqlite3's claim (not fsynced) + ack from one of several processes, waiting for the
    lock in SQLite's own busy handler, as a program using sqlite3 by hand would."""
    raw = connect(path, sync)
    start.wait()
    out.put(raw_claim_ack(raw, sync, worker, claim_synced=False))


def one_at_a_time(queue: QueueManager, worker: str, start, out) -> None:
    """After ``start``: ``dequeue`` + ``complete_task`` until the queue is empty; puts how many."""
    start.wait()
    done = 0
    while (task := queue.dequeue(worker)) is not None:
        queue.complete_task(task.id, worker, None, attempt=task.attempts)
        done += 1
    out.put(done)


def _one_call_child(db_dir: str, sync: str, worker: str, start, out) -> None:
    config = load_config(env={"OOS_DATA_DIR": db_dir}, database_synchronous=sync)
    one_at_a_time(QueueManager("bench", get_database(config), config), worker, start, out)


def _huey_child(path: str, sync: str, worker: str, start, out) -> None:
    """huey's own consumer step without the consumer: take one message (its dequeue, one
    durable write: at most once), until none is left."""
    from huey import SqliteHuey
    storage = SqliteHuey("bench", filename=path, fsync=sync != "NORMAL").storage
    start.wait()
    done = 0
    while storage.dequeue() is not None:
        done += 1
    out.put(done)


def bench_one_call_processes(directory: Path, sync: str, n: int) -> None:
    """The one-call API drained by 1 and 4 processes at once (``dequeue`` + ``complete_task``,
    at least once: the claim and the completion are two writes), beside huey's storage drained
    the same way (one write per task, at most once)."""
    try:
        from huey import SqliteHuey
    except ImportError:
        SqliteHuey = None
    for procs in (1, 4):
        queue = fresh_queue(directory, sync)
        for b in range(0, n, 1000):
            queue.enqueue_many([{"task": "noop", "payload": i} for i in range(b, min(n, b + 1000))])
        done, oos_t = _run_children(_one_call_child, (str(queue.config.data_dir), sync), procs)
        assert done == n, (done, n)
        raw = raw_jobs(directory, sync, n)
        raw_path = raw.execute("PRAGMA database_list").fetchone()[2]
        raw.close()
        raw_done, raw_t = _run_children(_raw_one_call_child, (raw_path, sync), procs)
        floor = f"   raw sqlite3 (claim not fsynced) {rate(raw_done, raw_t)}   OOS / raw {raw_t / oos_t * n / raw_done:.2f}"
        peer = ""
        if SqliteHuey is not None:
            path = directory / f"huey-{sync}-{procs}-{time.monotonic_ns()}.db"
            store = SqliteHuey("bench", filename=str(path), fsync=sync != "NORMAL").storage
            for i in range(n):
                store.enqueue(str(i).encode(), 0)
            huey_done, huey_t = _run_children(_huey_child, (str(path), sync), procs)
            peer = f"   huey's dequeue {rate(huey_done, huey_t)}   OOS / huey {huey_t / oos_t * n / huey_done:.2f}"
        print(f"dequeue + complete, {procs} process{'es' if procs > 1 else '  '} [{sync:6}] OOS {rate(n, oos_t)}{floor}{peer}")


def _drain_child(db_dir: str, sync: str, worker: str, batch: int, start, out) -> None:
    config = load_config(env={"OOS_DATA_DIR": db_dir}, database_synchronous=sync)
    queue = QueueManager("bench", get_database(config), config)
    start.wait()
    done = 0
    while tasks := queue.dequeue_batch(worker, batch):
        queue.complete_many([(t.id, None) for t in tasks], worker)
        done += len(tasks)
    out.put(done)


def _raw_drain_child(path: str, sync: str, worker: str, batch: int, start, out) -> None:
    conn = connect(path, sync)
    start.wait()
    done = 0
    while True:
        conn.execute("BEGIN IMMEDIATE")
        ids = [r[0] for r in conn.execute(
            "UPDATE jobs SET state = 'running', worker = ? WHERE id IN "
            "(SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT ?) RETURNING id",
            (worker, batch))]
        conn.execute("COMMIT")
        if not ids:
            break
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("UPDATE jobs SET state = 'done' WHERE id = ?", [(i,) for i in ids])
        conn.execute("COMMIT")
        done += len(ids)
    out.put(done)


def _run_children(target, args, procs: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    children = [ctx.Process(target=target, args=(*args[:2], f"w{i}", *args[2:], start, out))
                for i in range(procs)]
    for c in children:
        c.start()
    time.sleep(1.0)  # let every child import and connect before the clock starts
    t0 = time.perf_counter()
    start.set()
    total = sum(out.get(timeout=600) for _ in children)
    elapsed = time.perf_counter() - t0
    for c in children:
        c.join()
    return total, elapsed


def bench_drain(directory: Path, sync: str, n: int, procs: int, batch: int = 100) -> None:
    queue = fresh_queue(directory, sync)
    for b in range(0, n, 1000):
        queue.enqueue_many([{"task": "noop", "payload": i} for i in range(b, min(n, b + 1000))])
    done, oos_t = _run_children(_drain_child, (str(queue.config.data_dir), sync, batch), procs)
    assert done == n, (done, n)

    raw = raw_db(directory, sync)
    raw.execute("BEGIN")
    raw.executemany("INSERT INTO jobs (payload, state) VALUES (?, 'queued')", [(str(i),) for i in range(n)])
    raw.execute("COMMIT")
    raw.execute("CREATE INDEX jobs_state ON jobs (state, id)")
    path = raw.execute("PRAGMA database_list").fetchone()[2]
    raw_done, raw_t = _run_children(_raw_drain_child, (path, sync, batch), procs)
    print(f"drain, {procs} process{'es' if procs > 1 else '  '}, claim {batch:<3} [{sync:6}] OOS "
          f"{rate(n, oos_t)}   raw sqlite3 {rate(raw_done, raw_t)}   ratio {raw_t / oos_t:.2f}")


def _latency_consumer(db_dir: str, sync: str, ready, stop, out) -> None:
    config = load_config(env={"OOS_DATA_DIR": db_dir}, database_synchronous=sync)
    queue = QueueManager("latency", get_database(config), config)
    waits = []
    ready.set()
    while not stop.is_set():
        tasks = queue.dequeue_batch("lat", 10, wait=0.2)
        claimed = time.time()
        if tasks:
            # (claimed in the UPDATE, claim committed and fsynced)
            waits += [(t.started_at - t.created_at, claimed - t.created_at) for t in tasks]
            queue.complete_many([(t.id, None) for t in tasks], "lat")
    out.put(waits)


def bench_latency(directory: Path, sync: str, per_second: int, seconds: float) -> None:
    queue = fresh_queue(directory, sync, "latency")
    ctx = multiprocessing.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    consumer = ctx.Process(target=_latency_consumer,
                           args=(str(queue.config.data_dir), sync, ready, stop, out))
    consumer.start()
    ready.wait(60)
    n = int(per_second * seconds)
    t0 = time.perf_counter()
    for i in range(n):
        target = t0 + i / per_second
        while (delay := target - time.perf_counter()) > 0:
            time.sleep(delay)
        queue.enqueue("noop", i)
    time.sleep(0.5)
    stop.set()
    pairs = out.get(timeout=60)
    consumer.join()
    for label, waits in (("claimed", sorted(p[0] for p in pairs)), ("claim durable", sorted(p[1] for p in pairs))):
        p50 = statistics.median(waits) * 1000
        p99 = percentile(waits, 0.99) * 1000
        print(f"enqueue-to-{label:13} at {per_second}/s [{sync:6}] p50 {p50:.2f} ms  p99 {p99:.2f} ms  "
              f"({len(waits)} of {n} jobs, 1 consumer process)")


def fill_tasks(db, rows: int) -> int:
    """``rows`` tasks over 4 queues (97 % succeeded, 1 % each dead, queued, cancelled); returns a
    dead task's id."""
    now = time.time()
    states = ["succeeded"] * 97 + ["dead", "queued", "cancelled"]
    with db.transaction() as conn:
        for q in range(4):
            conn.execute("INSERT INTO queues (name) VALUES (?) ON CONFLICT DO NOTHING", (f"q{q}",))
        conn.executemany(
            "INSERT INTO tasks (queue, name, payload, state, run_at, max_attempts, timeout, created_at, finished_at, "
            "last_error, errors) VALUES (?, ?, ?, ?, ?, 5, 60, ?, ?, ?, ?)",
            ((f"q{i % 4}", f"task.{i % 10}", f'{{"n": {i}, "user": "u{i % 1000}"}}', states[i % 100],
              now - rows + i, now - rows + i, None if states[i % 100] == "queued" else now - rows + i + 1,
              "boom" if states[i % 100] == "dead" else None,
              '[{"attempt": 1, "at": 0, "worker": "w", "error": "boom"}]' if states[i % 100] == "dead" else "[]")
             for i in range(rows)))
    return db.execute("SELECT max(id) FROM tasks WHERE state = 'dead'")[0][0]



def bench_browse(directory: Path, rows: int) -> None:
    """Browsing a table of ``rows`` finished tasks (plus some queued and dead): p50/p99 of each
    filter the API and `oos tasks` offer, first page and a deep keyset page."""
    db = fresh_queue(directory, "NORMAL", "browse").db
    now = time.time()
    fill_tasks(db, rows)
    queries = {
        "newest": {}, "one queue": dict(queue="q1"), "dead in a queue": dict(queue="q1", state="dead"),
        "done in a queue": dict(queue="q1", state="succeeded"),
        "queued": dict(state="queued"), "by name": dict(name="task.3"),
        "last hour": dict(since=now - 3600), "payload text": dict(text='"u999"'),
        "deep page": dict(before=rows // 2),
    }
    print(f"browse tasks, {rows:,} rows, 50 a page:")
    for label, filters in queries.items():
        times = []
        for _ in range(20):
            t = time.perf_counter()
            browse(db, limit=50, **filters)
            times.append((time.perf_counter() - t) * 1000)
        times.sort()
        print(f"  {label:16} p50 {times[len(times) // 2]:7.2f} ms  p99 {times[-1]:7.2f} ms")


def fsync_rate(directory: Path, seconds: float = 1.0) -> float:
    path = directory / "fsync.probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    count, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        os.write(fd, b"x")
        os.fsync(fd)
        count += 1
    os.close(fd)
    return count / seconds


def build_fsync_delay(directory: Path) -> Path | None:
    """scripts/fsync_delay.c built into ``directory``; None (and says why) without a C compiler."""
    out = directory / "fsync_delay.so"
    source = Path(__file__).resolve().parent / "fsync_delay.c"
    try:
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(out), str(source), "-ldl"],
                       check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"(lines with a slower fsync skipped: cannot build {source.name}: "
              f"{getattr(e, 'stderr', '') or e})".strip())
        return None
    return out


def bench_slower_fsync(directory: Path, scale: float) -> None:
    """The lines whose aims depend on the cost of an fsync, under the shim (see main)."""
    print(f"disk fsync rate with the shim: {fsync_rate(directory):,.0f}/s")
    bench_concurrent_enqueue(directory, "FULL", 8, int(1000 * scale))
    bench_one_call(directory, "FULL", int(2000 * scale))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where to put the databases (default: a temp dir in ./data)")
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke test)")
    parser.add_argument("--fsync-delay-ms", type=float, default=1.0,
                        help="also run the fsync-bound lines with each fsync this much slower (0: not)")
    parser.add_argument("--slower-fsync-only", action="store_true", help=argparse.SUPPRESS)  # the shim's run
    args = parser.parse_args(argv)
    base = Path(args.dir) if args.dir else Path(__file__).resolve().parent.parent / "data"
    base.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="bench-", dir=base))
    scale = 0.1 if args.quick else 1.0
    try:
        if args.slower_fsync_only:
            bench_slower_fsync(directory, scale)
            return
        print(f"OOS queue benchmark: SQLite {sqlite3.sqlite_version}, {os.cpu_count()} cores, "
              f"disk {directory}")
        print(f"disk fsync rate: {fsync_rate(directory):,.0f}/s (write 1 byte + fsync, 1 s)")
        for sync in ("FULL", "NORMAL"):
            bench_enqueue(directory, sync, int(2000 * scale), int(100_000 * scale))
            bench_concurrent_enqueue(directory, sync, 8, int(2000 * scale))  # long enough to be steady
            bench_one_call(directory, sync, int(2000 * scale))
        for sync in ("FULL", "NORMAL"):
            bench_one_call_processes(directory, sync, int(5000 * scale))
        for sync in ("FULL", "NORMAL"):
            for procs in (1, 4, 8):
                bench_drain(directory, sync, int(40_000 * scale), procs)
        bench_latency(directory, "FULL", 500, 4.0 * scale + 1)
        bench_browse(directory, int(1_000_000 * scale))
        if args.fsync_delay_ms > 0 and (shim := build_fsync_delay(directory)):
            print(f"As on a disk whose fsync takes {args.fsync_delay_ms:g} ms longer than this one's "
                  f"(each fsync and fdatasync delayed by {shim.name}):")
            preload = " ".join(filter(None, (str(shim), os.environ.get("LD_PRELOAD"))))
            env = dict(os.environ, LD_PRELOAD=preload, OOS_FSYNC_DELAY_US=str(round(args.fsync_delay_ms * 1000)))
            sys.stdout.flush()  # the child writes to the same stdout: ours first
            subprocess.run([sys.executable, __file__, "--slower-fsync-only", "--dir", str(directory)]
                           + (["--quick"] if args.quick else []), env=env, check=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
