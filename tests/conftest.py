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
from helpers.engine import open_database  # noqa: E402
from helpers.queue_manager import QueueManager  # noqa: E402
from tests.fake_remotes import FakeRemotes  # noqa: E402


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


def pytest_generate_tests(metafunc):
    marked = metafunc.definition.get_closest_marker("both_engines")
    if marked and "engine" in metafunc.fixturenames and not metafunc.definition.get_closest_marker("sqlite_only"):
        metafunc.parametrize("engine", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture(scope="session")
def pg_server():
    """One real PostgreSQL server for the session (the pinned pgserver's binaries, run as an
    unprivileged user); each test gets a schema of its own in it."""
    from scripts.pg_server import PostgresServer, bindir
    if bindir() is None:
        pytest.skip("no PostgreSQL binaries (requirements-dev.txt installs pgserver)")
    server = PostgresServer(fsync=False)  # its own directory under /tmp: nobody can reach it
    server.start()
    yield server
    server.stop()


@pytest.fixture
def engine(request):
    """"sqlite", or "postgresql" for tests marked both_engines (their second run)."""
    return getattr(request, "param", "sqlite")


@pytest.fixture
def database_url(engine, request):
    """"" on SQLite; on PostgreSQL the URL of a fresh, empty schema in the session's server."""
    if engine == "sqlite":
        return ""
    return request.getfixturevalue("pg_server").schema_url()


@pytest.fixture
def config(data_dir, database_url):
    env = {"OOS_DATA_DIR": str(data_dir)}
    if database_url:
        env["OOS_DATABASE_URL"] = database_url
    return load_config(env=env)


@pytest.fixture
def db(config):
    database = open_database(config)
    yield database
    database.close()


@pytest.fixture
def queue(db, config, clock):
    return QueueManager("jobs", db, config, clock=clock, rng=random.Random(7))


@pytest.fixture
def subprocess_env(data_dir, database_url):
    """Environment for a child process that uses the same database and this checkout."""
    env = dict(os.environ, OOS_DATA_DIR=str(data_dir), PYTHONPATH=str(ROOT))
    if database_url:
        env["OOS_DATABASE_URL"] = database_url
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    return env


@pytest.fixture
def remotes():
    """A real HTTP server on 127.0.0.1 speaking the remotes' wire formats (tests/fake_remotes.py)."""
    server = FakeRemotes()
    yield server
    server.close()
