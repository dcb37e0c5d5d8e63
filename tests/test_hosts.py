"""Several hosts sharing one PostgreSQL queue, for real: each daemon in a network namespace of its
own (its own address, its own link to the server), PostgreSQL in another. One host is killed
outright, another is cut off from the server past its leases and then comes back.

Where namespaces cannot be made (not root, no ``ip``), the same test runs the daemons on the
loopback and freezes the cut-off host with SIGSTOP instead of taking its link down; the
fallback is printed in the test output (``OOS_TEST_NO_NETNS=1`` takes it on purpose).
"""
from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import time

import psutil
import psycopg
import pytest

from helpers.config import load_config
from helpers.engine import open_database
from helpers.queue_manager import LEASE_GRACE, QueueManager
from scripts.pg_server import PostgresServer, bindir
from tests.daemon import Daemon, wait_for

# The namespaces have fixed names: this module's tests run one after the other, on one of
# make test's workers (pytest-xdist's loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("netns")]

TASKS = 2000
SUBNET = "10.213"


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


def namespaces_work() -> bool:
    if os.environ.get("OOS_TEST_NO_NETNS") == "1":  # run the loopback fallback on purpose
        return False
    if os.geteuid() != 0 or not shutil.which("ip"):
        return False
    probe = f"oosprobe{os.getpid()}"
    try:
        run("ip", "netns", "add", probe)
        run("ip", "netns", "del", probe)
        return True
    except (subprocess.CalledProcessError, OSError):
        return False


def remove_stale_namespaces() -> None:
    """Namespaces of an earlier run that was killed before its teardown (named after its pid)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith("oos") and name[3:-2].isdigit() and not psutil.pid_exists(int(name[3:-2])):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


class Network:
    """Namespaces db, h1..h3; host i reaches the server at SUBNET.i.1 over its own veth pair."""

    def __init__(self, hosts: int):
        self.base = f"oos{os.getpid()}"
        self.db = self.base + "db"
        self.hosts = [f"{self.base}h{i}" for i in range(1, hosts + 1)]

    def up(self) -> None:
        remove_stale_namespaces()
        for ns in (self.db, *self.hosts):
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        for i, ns in enumerate(self.hosts, start=1):
            host_side, db_side = f"{self.base}a{i}", f"{self.base}b{i}"
            run("ip", "link", "add", host_side, "type", "veth", "peer", "name", db_side)
            run("ip", "link", "set", host_side, "netns", ns)
            run("ip", "link", "set", db_side, "netns", self.db)
            run("ip", "-n", ns, "addr", "add", f"{SUBNET}.{i}.2/24", "dev", host_side)
            run("ip", "-n", self.db, "addr", "add", f"{SUBNET}.{i}.1/24", "dev", db_side)
            run("ip", "-n", ns, "link", "set", host_side, "up")
            run("ip", "-n", self.db, "link", "set", db_side, "up")

    def link(self, i: int, state: str) -> None:
        run("ip", "-n", self.hosts[i - 1], "link", "set", f"{self.base}a{i}", state)

    def down(self) -> None:
        for ns in (*self.hosts, self.db):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def cut_off_host(network, host: Daemon, i: int) -> list[psutil.Process]:
    """Host ``i`` loses its link to the server (or, on the loopback, freezes): its processes."""
    frozen = [psutil.Process(host.proc.pid), *host.workers()]
    if network:
        network.link(i, "down")
    else:
        for p in frozen:
            p.send_signal(signal.SIGSTOP)
    return frozen


def reconnect_host(network, frozen: list[psutil.Process], i: int) -> None:
    if network:
        network.link(i, "up")
    else:
        for p in frozen:
            p.send_signal(signal.SIGCONT)


def still_running(db, workers: set[str]) -> set[int]:
    """The tasks that ``workers`` (stopped or cut off just now) hold at the server. A statement
    they sent just before (a completion) may still be in the server's socket buffer, so the
    answer is what is running both now and a moment later: such a task's only attempt
    succeeded, and it is not one the rescue has to fail."""
    def running() -> set[int]:
        return {r[0] for r in db.execute("SELECT id, worker FROM tasks WHERE state = 'running'") if r[1] in workers}
    first = running()
    time.sleep(1.0)  # far below cluster.dead_after (15 s): nothing is rescued yet
    return first & running()


@pytest.fixture
def cluster(tmp_path):
    """(server, network or None, daemon maker); everything stopped and removed afterwards."""
    if bindir() is None:
        pytest.skip("no PostgreSQL binaries (requirements-dev.txt installs pgserver)")
    network = Network(3) if namespaces_work() else None
    made: list[Daemon] = []
    if network:
        network.up()
        server = PostgresServer(host="*", prefix=("ip", "netns", "exec", network.db), fsync=False)
    else:
        print("network namespaces cannot be made here: the hosts share the loopback instead")
        server = PostgresServer(fsync=False)
    try:
        server.start()
        if network:  # trust the hosts' subnet, as initdb -A trust trusts the loopback
            with open(server.dir / "data" / "pg_hba.conf", "a") as f:
                f.write(f"host all all {SUBNET}.0.0/16 trust\n")
            with psycopg.connect(server.url, autocommit=True) as conn:
                conn.execute("SELECT pg_reload_conf()")

        def make(i: int) -> Daemon:
            home = tmp_path / f"host{i}"  # its data directory, log and notify socket
            (home / "data").mkdir(parents=True, exist_ok=True)
            url = server.tcp_url(f"{SUBNET}.{i}.1") if network else server.url
            d = Daemon(home / "data", home, prefix=("ip", "netns", "exec", network.hosts[i - 1]) if network else (),
                       env={"OOS_DATABASE_URL": url, "OOS_WORKERS_MIN": "2", "OOS_WORKERS_MAX": "2",
                            "OOS_WORKERS_BATCH_SIZE": "5", "OOS_DATABASE_POLL_INTERVAL": "0.5",
                            "OOS_TEST_LOG": str(tmp_path / "executions.log")})
            made.append(d)
            return d

        yield server, network, make
    finally:
        for d in made:
            d.cleanup()
        server.stop()
        if network:
            network.down()


def test_hosts_share_a_queue_through_a_killed_host_and_a_cut_link(cluster, tmp_path):
    server, network, make = cluster
    config = load_config(env={"OOS_DATA_DIR": str(tmp_path), "OOS_DATABASE_URL": server.url})
    db = open_database(config)
    queue = QueueManager("default", db, config)
    # Every 50th task takes 1.5 s: the cut-off host is cut while it runs one, so it surely holds
    # a result it will try to record late.
    ids = [e.id for e in queue.enqueue_many([{"task": "sleepy", "payload": {"n": i, "seconds": 1.5 if i % 50 == 0 else 0.01},
                                              "max_attempts": 20, "timeout": 2} for i in range(TASKS)])]
    log = tmp_path / "executions.log"
    hosts = {i: make(i).start() for i in (1, 2, 3)}

    def succeeded() -> int:
        return db.execute("SELECT count(*) FROM tasks WHERE state = 'succeeded'")[0][0]

    # Host 1 dies outright: the manager and its workers, SIGKILL, no goodbye.
    wait_for(lambda: succeeded() >= 300, 120, what="work under way on three hosts")
    doomed = [psutil.Process(hosts[1].proc.pid), *hosts[1].workers()]
    for p in doomed:
        p.send_signal(signal.SIGKILL)
    hosts[1].proc.wait(10)

    # Host 2 loses its link (or, on the loopback, freezes) with tasks in hand.
    cut_off = {f"{os.uname().nodename}:{p.pid}" for p in hosts[2].workers()}
    pids = {str(p.pid) for p in hosts[2].workers()}

    def running_a_slow_one() -> bool:
        lines = [line.split() for line in log.read_text().splitlines()]
        started = {(n, pid) for kind, n, pid in lines if kind == "sleepy-start" and pid in pids and int(n) % 50 == 0}
        return bool(started - {(n, pid) for kind, n, pid in lines if kind == "sleepy-end"})

    wait_for(running_a_slow_one, 120, interval=0.02, what="the host to be cut to be running a slow task")
    frozen = cut_off_host(network, hosts[2], 2)
    held = {r[0] for r in db.execute("SELECT id, worker FROM tasks WHERE state = 'running'") if r[1] in cut_off}

    # Past their leases, host 3 (no leader, just its housekeeping) gives them to the queue again.
    wait_for(lambda: not {r[0] for r in db.execute("SELECT id, worker FROM tasks WHERE state = 'running'")
                          if r[1] in cut_off}, 2 + LEASE_GRACE + 60, interval=0.5,
             what="host 3 to rescue the cut-off host's leases")
    reconnect_host(network, frozen, 2)

    wait_for(lambda: db.execute("SELECT count(*) FROM tasks WHERE state NOT IN ('succeeded', 'dead')")[0][0] == 0,
             240, interval=0.5, what="every task to finish")
    # A late success, a late failure (frozen past its timeout, the run counts as timed out) or
    # a task that waited in its batch: each is refused, and the host says so.
    refused = wait_for(lambda: [e for e in hosts[2].logs() if e.get("event") in (
        "result not recorded: lease lost", "task lease lost", "task skipped: its lease was lost while it waited")], 60,
        what="the cut-off host to be told its late results were not recorded")

    rows = {r["id"]: r for r in db.execute("SELECT id, state, attempts, worker, last_error, errors FROM tasks")}
    assert sorted(rows) == sorted(ids), "no task lost, none made up"
    for row in rows.values():
        assert row["state"] == "succeeded" or (row["state"] == "dead" and row["last_error"])
    runs = collections.Counter(line.split()[1] for line in log.read_text().splitlines()
                               if line.startswith("sleepy-start"))
    attempts_by_n = {n: rows[task_id]["attempts"] for n, task_id in enumerate(ids)}
    for n in range(TASKS):
        assert runs[str(n)] >= 1 or rows[ids[n]]["state"] == "dead", f"task {n} never ran"
        if runs[str(n)] > 1:
            assert attempts_by_n[n] > 1, f"task {n} ran {runs[str(n)]} times on one attempt"
    # The late results were refused: each such task's history shows the cut-off host's attempt
    # expiring, and what is stored is a later attempt's (by another host, or by the same worker
    # once it was back and claimed the task again).
    late = {e["task_id"] for e in refused}
    assert late & held, "the cut-off host tried to record results for tasks rescued from it"
    for task_id in late:
        row = rows[task_id]
        if task_id in held:
            assert row["attempts"] >= 2  # rescued when its host stopped beating, or when its lease ran out
            assert "stopped answering at" in row["errors"] or \
                any(f"lease expired: worker {w} stopped responding" in row["errors"] for w in cut_off)
        else:  # its completion reached the server just before the cut, only the reply was lost:
            # the retry after the cut changed nothing
            assert row["state"] == "succeeded" and row["worker"] in cut_off and row["attempts"] == 1
    # Each host's daemon reported itself in a row of its own (a host reads its own).
    assert len({r[0] for r in db.execute("SELECT daemon FROM daemon_status")}) == 3
    assert all(h.stop() == 0 for i, h in hosts.items() if i != 1)
    db.close()


def test_a_dead_or_silent_hosts_tasks_are_rescued_in_seconds_not_after_their_lease(cluster, tmp_path):
    """Twice 1,500 tasks with the default timeout (300 s: a lease of over five minutes). Host 1 is
    SIGKILLed whole; host 2 is cut off (or frozen) for 40 s. Host 3 notices each within
    ``cluster.dead_after`` (15 s) of its last heartbeat and fails its running tasks as an
    attempt, once: every task succeeds within 30 s of the kill, a task run twice shows a
    second attempt, and the silent host's late results are refused."""
    server, network, make = cluster
    config = load_config(env={"OOS_DATA_DIR": str(tmp_path), "OOS_DATABASE_URL": server.url})
    db = open_database(config)
    queue = QueueManager("default", db, config)
    def batch(first: int) -> list[int]:
        return [e.id for e in queue.enqueue_many([{"task": "sleepy", "payload": {"n": i, "seconds": 0.3 if i % 10 == 0 else 0.02},
                                                   "max_attempts": 20} for i in range(first, first + 1500)])]

    ids = batch(0)
    assert {queue.get_task(i).timeout for i in ids[:3]} == {300.0}
    log = tmp_path / "executions.log"
    hosts = {i: make(i).start() for i in (1, 2, 3)}

    def held_by(host: Daemon) -> set[int]:
        workers = {f"{os.uname().nodename}:{p.pid}" for p in host.workers()}
        return {r[0] for r in db.execute("SELECT id, worker FROM tasks WHERE state = 'running'") if r[1] in workers}

    # Host 1 is frozen first, so what it holds when we look is what it holds when it dies (its
    # quick tasks could otherwise all end between the look and the kill).
    for _ in range(20):
        wait_for(lambda: len(held_by(hosts[1])) >= 2, 120, interval=0.02, what="host 1 to hold tasks")
        doomed = [psutil.Process(hosts[1].proc.pid), *hosts[1].workers()]
        for p in doomed:
            p.send_signal(signal.SIGSTOP)
        killed_workers = {f"{os.uname().nodename}:{p.pid}" for p in doomed[1:]}
        held = still_running(db, killed_workers)
        if held:
            break
        for p in doomed:
            p.send_signal(signal.SIGCONT)
    for p in doomed:
        p.send_signal(signal.SIGKILL)
    hosts[1].proc.wait(10)
    killed_at = time.monotonic()
    assert held, "host 1 died holding tasks"
    wait_for(lambda: all(queue.get_task(i).state != "running" for i in held), 30, interval=0.2,
             what="host 1's tasks to be rescued")
    rescued_after = time.monotonic() - killed_at

    # Host 2 goes silent with tasks in hand, for 40 s (a second batch: hosts 2 and 3 may have
    # run the whole first one while host 1's tasks waited out dead_after).
    ids += batch(1500)
    wait_for(lambda: len(held_by(hosts[2])) >= 1, 60, interval=0.02, what="host 2 to hold tasks")
    silent = {f"{os.uname().nodename}:{p.pid}" for p in hosts[2].workers()}
    frozen = cut_off_host(network, hosts[2], 2)
    cut_at = time.monotonic()
    cut_held = still_running(db, silent)
    wait_for(lambda: all(queue.get_task(i).state != "running" or queue.get_task(i).worker not in silent
                         for i in cut_held), 30, interval=0.2, what="host 2's tasks to be rescued")
    time.sleep(max(0.0, 40 - (time.monotonic() - cut_at)))  # the partition lasts 40 s
    reconnect_host(network, frozen, 2)

    wait_for(lambda: db.execute("SELECT count(*) FROM tasks WHERE state <> 'succeeded'")[0][0] == 0, 120,
             interval=0.5, what="every task to succeed")
    rows = {r["id"]: r for r in db.execute("SELECT id, state, attempts, errors FROM tasks")}
    assert sorted(rows) == sorted(ids), "no task lost, none made up"
    for task_id in held | cut_held:
        assert rows[task_id]["attempts"] >= 2 and "stopped answering at" in rows[task_id]["errors"]
    runs = collections.Counter(line.split()[1] for line in log.read_text().splitlines() if line.startswith("sleepy-start"))
    for n, task_id in enumerate(ids):
        assert runs[str(n)] >= 1, f"task {n} never ran"
        if runs[str(n)] > 1:
            assert rows[task_id]["attempts"] > 1, f"task {n} ran {runs[str(n)]} times on one attempt"
    beats = {r["daemon"]: r for r in db.execute("SELECT daemon, rescued_at FROM daemon_status")}
    assert beats[f"{os.uname().nodename}:{hosts[1].proc.pid}"]["rescued_at"] is not None
    print(f"host 1's {len(held)} tasks rescued {rescued_after:.1f} s after the kill; "
          f"host 2's {len(cut_held)} within 30 s of going silent")
    assert all(h.stop() == 0 for i, h in hosts.items() if i != 1)
    db.close()
