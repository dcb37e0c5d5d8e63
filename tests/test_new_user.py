"""What a new user and real clients found (issue 27), each as a regression test."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers.queue_manager import QueueManager
from tests.daemon import ROOT, Daemon, wait_for


@pytest.mark.slow
@pytest.mark.both_engines
def test_two_daemons_serving_different_queues_of_one_database_are_both_shown(data_dir, tmp_path, database_url,
                                                                            subprocess_env, db, config):
    """The README's dedicated workers: one daemon serves ``default``, another ``echo``, on the
    same data directory. ``oos status`` and ``oos workers`` list both (never one, then the
    other), and both queues are served."""
    env = {"OOS_DATABASE_URL": database_url} if database_url else {}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = Daemon(data_dir, tmp_path / "a", env={**env, "OOS_WORKERS_QUEUES": "default", "OOS_WORKERS_MIN": "1",
                                                  "OOS_WORKERS_MAX": "1"})
    second = Daemon(data_dir, tmp_path / "b", env={**env, "OOS_WORKERS_QUEUES": "echo", "OOS_WORKERS_MIN": "2",
                                                   "OOS_WORKERS_MAX": "2"})
    try:
        first.start()
        second.start()
        QueueManager("echo", db, config).enqueue("echo", {"x": 1})
        QueueManager("default", db, config).enqueue("noop")

        def oos(*args):
            done = subprocess.run([sys.executable, "-m", "oos_cli", "--json", *args], env=subprocess_env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)

        wait_for(lambda: len(oos("workers")["workers"]) == 3, 30, what="both daemons' workers reported")
        for _ in range(5):  # polled again and again: the same two, never one then the other
            status = oos("status")
            alive = sorted(d["pid"] for d in status["daemon"]["daemons"] if d["alive"])
            assert alive == sorted([first.proc.pid, second.proc.pid])
            served = {q["queue"]: q["served"] for q in status["queues"]}
            assert served["default"] is True and served["echo"] is True
            assert status["daemon"]["workers_actual"] == 3
        workers = oos("workers")
        assert sorted(w["daemon"].rsplit(":", 1)[1] for w in workers["workers"]) == \
            sorted([str(first.proc.pid)] + [str(second.proc.pid)] * 2)
        assert first.stop() == 0
        wait_for(lambda: [d["alive"] for d in oos("status")["daemon"]["daemons"]
                          if d["pid"] == first.proc.pid] == [False], 30, what="the stopped daemon shown stopped")
        assert {q["queue"]: q["served"] for q in oos("status")["queues"]}["default"] is False
    finally:
        first.cleanup()
        second.cleanup()
