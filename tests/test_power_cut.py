"""A power cut, simulated: every OOS process runs with an LD_PRELOAD shim that copies a data file
aside at each fsync (tests/powercut/durable_shim.c); then all of them are SIGKILLed at once and
each file is replaced by its last fsynced copy, which is what a disk that kept nothing unsynced
would hold. No acknowledged task may be missing after that, at synchronous = FULL."""
from __future__ import annotations

import os
import signal
import subprocess
import threading

import pytest
import requests

from helpers.config import load_config
from helpers.database_config import DatabaseManager
from tests.daemon import ROOT, Daemon, free_port, wait_for

pytestmark = pytest.mark.slow
TOKEN = "p" * 32


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    out = tmp_path_factory.mktemp("shim") / "durable_shim.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(out), str(ROOT / "tests" / "powercut" / "durable_shim.c"),
                    "-ldl"], check=True, timeout=120)
    return out


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


def accept_then_cut(shim, data_dir, tmp_path, synchronous: str) -> tuple[list[int], list[int]]:
    """Acknowledged ids, and those missing after a power cut taken while the API accepts tasks
    and the workers run them."""
    port = free_port()
    env = {"OOS_API_ENABLED": "true", "OOS_API_PORT": str(port), "OOS_API_TOKEN": TOKEN,
           "OOS_DATABASE_SYNCHRONOUS": synchronous, "LD_PRELOAD": str(shim), "OOS_POWERCUT_DIR": str(data_dir)}
    daemon = Daemon(data_dir, tmp_path, env=env).start()
    acknowledged: list[int] = []
    stop = threading.Event()

    def client():
        url, headers = f"http://127.0.0.1:{port}/api/v1/queue/default/tasks", {"Authorization": f"Bearer {TOKEN}"}
        with requests.Session() as http:
            for i in range(100_000):
                if stop.is_set():
                    return
                body = {"task": "noop", "payload": {"n": i}} if i % 5 else \
                    {"tasks": [{"task": "noop", "payload": {"n": f"{i}.{j}"}} for j in range(20)]}
                try:
                    answer = http.post(url, json=body, headers=headers, timeout=10)
                except requests.RequestException:
                    return  # the power went out mid-request: not acknowledged
                if answer.status_code == 201:
                    acknowledged.extend(answer.json()["ids"])

    try:
        writer = threading.Thread(target=client)
        writer.start()
        wait_for(lambda: len(acknowledged) >= 1500, 120, what="1500 acknowledged tasks")
        cut_power(daemon, data_dir)  # while tasks are being accepted and run
        stop.set()
        writer.join(30)
    finally:
        daemon.cleanup()
    db = DatabaseManager.from_config(load_config(env={"OOS_DATA_DIR": str(data_dir)}))
    present = {r[0] for r in db.execute("SELECT id FROM tasks")}
    db.close()
    return acknowledged, sorted(set(acknowledged) - present)


def test_no_acknowledged_task_is_lost_in_a_power_cut(shim, data_dir, tmp_path):
    acknowledged, missing = accept_then_cut(shim, data_dir, tmp_path, "FULL")
    assert missing == [], f"{len(missing)} of {len(acknowledged)} acknowledged tasks lost, e.g. {missing[:5]}"
    (tmp_path / "after").mkdir()
    after = Daemon(data_dir, tmp_path / "after", env={"OOS_API_ENABLED": "false"}).start()
    try:
        db = DatabaseManager.from_config(load_config(env={"OOS_DATA_DIR": str(data_dir)}))
        wait_for(lambda: db.execute("SELECT count(*) FROM tasks WHERE state != 'succeeded'")[0][0] == 0, 120,
                 what="every task to run after the power came back")
        db.close()
    finally:
        after.cleanup()


def test_the_simulated_cut_does_lose_what_was_never_synced(shim, data_dir, tmp_path):
    """The control: NORMAL does not fsync each commit, so the same cut loses acknowledged tasks
    (what the README says NORMAL trades away). A shim that kept everything would fail here."""
    acknowledged, missing = accept_then_cut(shim, data_dir, tmp_path, "NORMAL")
    assert missing, "at NORMAL a power cut loses the commits made since the last sync"
