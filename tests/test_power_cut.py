"""A power cut, simulated: every OOS process runs with an LD_PRELOAD shim that copies a data file
aside at each fsync (tests/powercut/durable_shim.c); then all of them are SIGKILLed at once and
each file is replaced by its last fsynced copy, which is what a disk that kept nothing unsynced
would hold. No acknowledged task may be missing after that, at synchronous = FULL."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

import pytest
import requests

from helpers.config import load_config
from helpers.database_config import DatabaseManager
from tests.daemon import ROOT, Daemon, build_shim, free_port, wait_for

pytestmark = pytest.mark.slow
TOKEN = "p" * 32


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    return build_shim(ROOT / "tests" / "powercut" / "durable_shim.c", tmp_path_factory.mktemp("shim"))


def cut_power(daemon: Daemon, data_dir) -> None:
    """SIGKILL every process at once, then keep only what was fsynced."""
    os.killpg(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(10)
    for name in ("oos.db", "oos.db-wal"):
        path, durable = data_dir / name, data_dir / f"{name}.durable"
        if durable.exists():
            os.replace(durable, path)
        elif path.exists():
            os.truncate(path, 0)  # created, never synced
    (data_dir / "oos.db-shm").unlink(missing_ok=True)
    for leftover in data_dir.glob("*.durable*"):
        leftover.unlink()


# The one-call API in a process of its own: claim a task, complete it, and print its id once
# complete_task has returned (the completion is acknowledged).
ONE_CALL = """
import time
from helpers.config import load_config
from helpers.engine import get_database
from helpers.queue_manager import QueueManager
config = load_config()
queue = QueueManager("onecall", get_database(config), config)
while True:
    task = queue.dequeue("client")
    if task is None:
        time.sleep(0.001)
    elif queue.complete_task(task.id, "client", {"done": task.id}):
        print(task.id, flush=True)
"""


@dataclass
class Outcome:
    enqueued: list[int]      # acknowledged by the API (201)
    lost: list[int]          # of those, missing after the cut
    completed: list[int]     # acknowledged by complete_task
    undone: list[int]        # of those, not succeeded after the cut
    integrity: bool          # the file passed integrity_check after the cut


def accept_then_cut(shim, data_dir, tmp_path, synchronous: str, after: int = 1500) -> Outcome:
    """A power cut taken once ``after`` tasks were acknowledged, while the API accepts tasks,
    the daemon's workers run them, and a one-call client claims and completes others."""
    port = free_port()
    env = {"OOS_API_ENABLED": "true", "OOS_API_PORT": str(port), "OOS_API_TOKEN": TOKEN,
           "OOS_DATABASE_SYNCHRONOUS": synchronous, "LD_PRELOAD": str(shim), "OOS_POWERCUT_DIR": str(data_dir)}
    daemon = Daemon(data_dir, tmp_path, env=env).start()
    # Checkpoints are the daemon's job, as for its own workers (a client that checkpointed at
    # each commit would fsync, and the shim copy, the whole file every time).
    client_env = dict(os.environ, OOS_DATA_DIR=str(data_dir), PYTHONPATH=str(ROOT), OOS_DATABASE_WAL_AUTOCHECKPOINT="0",
                      **env)
    client_env.pop("NOTIFY_SOCKET", None)
    one_call = subprocess.Popen([sys.executable, "-c", ONE_CALL], env=client_env, stdout=subprocess.PIPE, text=True,
                                stderr=(tmp_path / "one_call.err").open("w"))
    acknowledged: list[int] = []
    completed: list[int] = []
    stop = threading.Event()

    def client():
        base, headers = f"http://127.0.0.1:{port}/api/v1/queue", {"Authorization": f"Bearer {TOKEN}"}
        with requests.Session() as http:
            for i in range(100_000):
                if stop.is_set():
                    return
                body = {"task": "noop", "payload": {"n": i}} if i % 5 else \
                    {"tasks": [{"task": "noop", "payload": {"n": f"{i}.{j}"}} for j in range(20)]}
                try:
                    answer = http.post(f"{base}/{'onecall' if i % 3 == 0 else 'default'}/tasks", json=body,
                                       headers=headers, timeout=10)
                except requests.RequestException:
                    return  # the power went out mid-request: not acknowledged
                if answer.status_code == 201:
                    acknowledged.extend(answer.json()["ids"])

    def completions():
        for line in one_call.stdout:
            completed.append(int(line))

    try:
        threads = [threading.Thread(target=client), threading.Thread(target=completions)]
        for t in threads:
            t.start()
        wait_for(lambda: len(acknowledged) >= after and len(completed) >= 50, 120,
                 what=f"{after} acknowledged tasks and 50 completions")
        so_far = len(completed)  # cut while completions stream in, not after a burst of them
        wait_for(lambda: len(completed) >= so_far + 20, 60, what="20 more completions")
        one_call.kill()  # the power goes out for everyone at once
        cut_power(daemon, data_dir)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        one_call.kill()
        one_call.wait(10)
        daemon.cleanup()
    db = DatabaseManager.from_config(load_config(env={"OOS_DATA_DIR": str(data_dir)}))
    try:
        states = {r[0]: r[1] for r in db.execute("SELECT id, state FROM tasks")}
        integrity = bool(db.check_integrity())
    finally:
        db.close()
    return Outcome(acknowledged, sorted(set(acknowledged) - set(states)), completed,
                   sorted(i for i in completed if states.get(i) != "succeeded"), integrity)


def test_no_acknowledged_task_or_completion_is_lost_in_power_cuts(shim, data_dir, tmp_path):
    """Three cuts at seeded random moments, the same data directory each time: every enqueue
    and every completion acknowledged before a cut is there after it (claims are not fsynced:
    the completions' fsyncs carry them), and the file passes integrity_check."""
    moments = random.Random(14).sample(range(200, 1500), 3)
    for k, after in enumerate(moments):
        (tmp_path / f"run{k}").mkdir()
        outcome = accept_then_cut(shim, data_dir, tmp_path / f"run{k}", "FULL", after=after)
        assert outcome.integrity
        assert outcome.lost == [], f"cut {k}: {len(outcome.lost)} of {len(outcome.enqueued)} enqueues lost"
        assert outcome.undone == [], f"cut {k}: {len(outcome.undone)} of {len(outcome.completed)} completions undone"
    (tmp_path / "after").mkdir()
    after = Daemon(data_dir, tmp_path / "after", env={"OOS_API_ENABLED": "false"}).start()
    try:
        db = DatabaseManager.from_config(load_config(env={"OOS_DATA_DIR": str(data_dir)}))
        wait_for(lambda: db.execute("SELECT count(*) FROM tasks WHERE state != 'succeeded' AND queue = 'default'")[0][0]
                 == 0, 120, what="every task to run after the power came back")
        db.close()
    finally:
        after.cleanup()


def test_the_simulated_cut_does_lose_what_was_never_synced(shim, data_dir, tmp_path):
    """The control: NORMAL does not fsync each commit, so the same cut loses acknowledged
    enqueues and completions (what the README says NORMAL trades away). A shim that kept
    everything, or a test blind to lost completions, would fail here."""
    outcome = accept_then_cut(shim, data_dir, tmp_path, "NORMAL")
    assert outcome.lost, "at NORMAL a power cut loses the enqueues made since the last sync"
    assert outcome.undone, "at NORMAL a power cut loses the completions made since the last sync"
