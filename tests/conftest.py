"""Shared fixtures: a fresh data directory, config, database and a queue on an injected clock."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.config import load_config  # noqa: E402
from helpers.database_config import DatabaseManager  # noqa: E402
from helpers.queue_manager import QueueManager  # noqa: E402


class FakeClock:
    """A clock tests move by hand: ``clock.advance(30)`` instead of ``sleep(30)``."""

    def __init__(self, start: float = 1_800_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def config(data_dir):
    return load_config(env={"OOS_DATA_DIR": str(data_dir)})


@pytest.fixture
def db(config):
    database = DatabaseManager.from_config(config)
    yield database
    database.close()


@pytest.fixture
def queue(db, config, clock):
    return QueueManager("jobs", db, config, clock=clock, rng=random.Random(7))


@pytest.fixture
def subprocess_env(data_dir):
    """Environment for a child process that uses the same data directory and this checkout."""
    env = dict(os.environ, OOS_DATA_DIR=str(data_dir), PYTHONPATH=str(ROOT))
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    return env
