"""Enqueue inside the application's own transaction (issue 29): with its psycopg or sqlite3
connection, through SQLAlchemy, and on PostgreSQL with the SQL function any client can call.
A rollback leaves no task and no counter; a commit makes the task real and wakes a worker."""
from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import psycopg
import pytest
import sqlalchemy
from sqlalchemy.orm import DeclarativeBase, Session

import tests.tasks.sample  # noqa: F401 - the daemon's handlers (noop)
from helpers.queue_manager import QueueManager
from helpers.validation import InvalidField
from scripts.pg_server import bindir
from tests.daemon import Daemon, wait_for

postgres_only = pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
ORDERS = "CREATE TABLE IF NOT EXISTS orders (id integer PRIMARY KEY, total integer NOT NULL)"


@contextlib.contextmanager
def app_connection(config, database_url):
    """The application's own connection to OOS's database, in a transaction it controls."""
    if database_url:
        conn = psycopg.connect(database_url)  # not autocommit: a transaction begins at once
    else:
        conn = sqlite3.connect(config.db_path, timeout=30)  # implicit BEGIN before a write
    try:
        conn.execute(ORDERS)
        conn.commit()
        yield conn
    finally:
        conn.close()


def enqueued_total(queue: QueueManager) -> int:
    return queue.stats()["totals"]["enqueued"]


def tasks_named(db, name: str) -> list:
    return db.execute("SELECT id, payload FROM tasks WHERE name = ?", (name,))


@pytest.mark.both_engines
def test_a_rollback_leaves_no_task_and_no_counter_and_a_commit_keeps_both(db, config, database_url):
    queue = QueueManager("emails", db, config)
    queue.enqueue("warm_up")  # the queue's row and counters exist
    before = enqueued_total(queue)
    with app_connection(config, database_url) as conn:
        conn.execute("INSERT INTO orders (id, total) VALUES (41, 100)")
        queue.enqueue("send_receipt", {"order": 41}, connection=conn)
        queue.enqueue_many([{"task": "send_receipt", "payload": {"order": 41, "copy": True}}], connection=conn)
        assert tasks_named(db, "send_receipt") == [], "nothing is seen before the commit"
        conn.rollback()
        assert tasks_named(db, "send_receipt") == [] and enqueued_total(queue) == before
        assert db.execute("SELECT count(*) FROM orders")[0][0] == 0
        conn.execute("INSERT INTO orders (id, total) VALUES (42, 100)")
        task_id = queue.enqueue("send_receipt", {"order": 42}, connection=conn)
        conn.commit()
    assert [(r["id"], r["payload"]) for r in tasks_named(db, "send_receipt")] == [(task_id, '{"order":42}')]
    assert enqueued_total(queue) == before + 1


@pytest.mark.both_engines
def test_a_connection_that_would_commit_each_statement_or_another_database_is_refused(db, config, database_url,
                                                                                      tmp_path):
    queue = QueueManager("emails", db, config)
    if database_url:
        conn = psycopg.connect(database_url, autocommit=True)
    else:
        conn = sqlite3.connect(config.db_path, isolation_level=None)
    with conn, pytest.raises(InvalidField, match="autocommit") as refused:
        queue.enqueue("send_receipt", connection=conn)
    assert refused.value.field == "connection"
    elsewhere = sqlite3.connect(tmp_path / "app.db")
    with pytest.raises(InvalidField, match="connection"):
        queue.enqueue("send_receipt", connection=elsewhere)
    elsewhere.close()
    assert tasks_named(db, "send_receipt") == []


CLIENT = r"""
import sqlite3, sys, psycopg
from helpers.config import load_config
from helpers.engine import get_database
from helpers.queue_manager import QueueManager
config = load_config()
queue = QueueManager("emails", get_database(config), config)
conn = psycopg.connect(config.database_url) if config.database_url else sqlite3.connect(config.db_path)
conn.execute("INSERT INTO orders (id, total) VALUES (7, 1)")
queue.enqueue("send_receipt", {"order": 7}, connection=conn)
print("enqueued, not committed", flush=True)
sys.stdin.readline()  # killed here
conn.commit()
"""


@pytest.mark.both_engines
def test_a_client_killed_between_its_enqueue_and_its_commit_leaves_no_task(db, config, database_url, subprocess_env):
    with app_connection(config, database_url):
        pass  # the orders table
    client = subprocess.Popen([sys.executable, "-c", CLIENT], env=subprocess_env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "enqueued, not committed", client.stderr.read()
        os.kill(client.pid, signal.SIGKILL)
        client.wait(10)
    finally:
        client.kill()
    wait_for(lambda: db.execute("SELECT count(*) FROM orders")[0][0] == 0, 10, what="the server to end the session")
    assert tasks_named(db, "send_receipt") == []


@pytest.mark.slow
@pytest.mark.both_engines
def test_a_committed_enqueue_is_run_by_the_running_daemon(data_dir, tmp_path, database_url, db, config):
    env = {"OOS_DATABASE_URL": database_url} if database_url else {}
    d = Daemon(data_dir, tmp_path, env=env).start()
    try:
        queue = QueueManager("default", db, config)
        with app_connection(config, database_url) as conn:
            conn.execute("INSERT INTO orders (id, total) VALUES (1, 5)")
            task_id = queue.enqueue("noop", {"order": 1}, connection=conn)
            time.sleep(0.3)
            assert queue.get_task(task_id) is None, "not before the commit"
            conn.commit()
            committed = time.monotonic()
        wait_for(lambda: queue.get_task(task_id).state == "succeeded", 30, interval=0.01, what="the daemon to run it")
        print(f"run {time.monotonic() - committed:.3f} s after the commit")
        assert d.stop() == 0
    finally:
        d.cleanup()


@pytest.mark.both_engines
def test_an_orm_session_adds_a_row_and_enqueues_in_one_transaction(db, config, database_url):
    class Base(DeclarativeBase):
        pass

    class Order(Base):
        __tablename__ = "orders"
        id = sqlalchemy.Column(sqlalchemy.Integer, primary_key=True)
        total = sqlalchemy.Column(sqlalchemy.Integer, nullable=False)

    url = database_url.replace("postgresql://", "postgresql+psycopg://", 1) if database_url else \
        f"sqlite:///{config.db_path}"
    engine = sqlalchemy.create_engine(url)
    Base.metadata.create_all(engine)
    queue = QueueManager("emails", db, config)
    try:
        with Session(engine) as session:
            session.add(Order(id=1, total=10))
            queue.enqueue("send_receipt", {"order": 1}, connection=session)
            session.rollback()
        assert tasks_named(db, "send_receipt") == [] and db.execute("SELECT count(*) FROM orders")[0][0] == 0
        with Session(engine) as session:
            session.add(Order(id=2, total=20))
            session.flush()
            task_id = queue.enqueue("send_receipt", {"order": 2}, connection=session)
            session.commit()
        assert [r["id"] for r in tasks_named(db, "send_receipt")] == [task_id]
        with engine.begin() as connection:  # a Core Connection too
            queue.enqueue("send_receipt", {"order": 3}, connection=connection)
        assert len(tasks_named(db, "send_receipt")) == 2
    finally:
        engine.dispose()


# -- PostgreSQL: the SQL function -----------------------------------------------------------

PLAIN_CLIENT = r"""
import sys, psycopg
url = sys.argv[1]
with psycopg.connect(url) as conn:  # this process never imports OOS
    conn.execute("CREATE TABLE IF NOT EXISTS orders (id integer PRIMARY KEY, total integer NOT NULL)")
    conn.execute("INSERT INTO orders VALUES (9, 1)")
    task_id = conn.execute("SELECT oos_enqueue(queue => 'emails', task => 'send_receipt', "
                           "payload => %s::jsonb, idempotency_key => 'order-9')", ('{"order": 9}',)).fetchone()[0]
    again = conn.execute("SELECT oos_enqueue(queue => 'emails', task => 'send_receipt', "
                         "idempotency_key => 'order-9')").fetchone()[0]
    many = [r[0] for r in conn.execute("SELECT oos_enqueue_many('emails', %s::jsonb)",
                                       ('[{"task": "a"}, {"task": "b", "priority": 5}]',))]
print(task_id, again, *many)
"""


@postgres_only
def test_the_sql_function_from_a_plain_psycopg_client_and_from_psql(db, config, database_url, tmp_path):
    done = subprocess.run([sys.executable, "-c", PLAIN_CLIENT, database_url], capture_output=True, text=True,
                          timeout=60, env={"PATH": os.environ["PATH"]})
    assert done.returncode == 0, done.stderr
    task_id, again, a, b = map(int, done.stdout.split())
    assert again == task_id, "the idempotency key names the task already stored"
    queue = QueueManager("emails", db, config)
    stored = queue.get_task(task_id)
    assert (stored.name, stored.payload, stored.state, stored.max_attempts, stored.timeout) == \
        ("send_receipt", {"order": 9}, "queued", 5, 300.0)
    assert queue.get_task(b).priority == 5 and queue.stats()["totals"]["enqueued"] == 3
    psql = subprocess.run([str(bindir() / "psql"), database_url, "-v", "ON_ERROR_STOP=1", "-At", "-c",
                           "BEGIN; SELECT oos_enqueue(queue => 'emails', task => 'from_psql', delay => 60); COMMIT;"],
                          capture_output=True, text=True, timeout=60)
    assert psql.returncode == 0, psql.stderr
    from_psql = queue.get_task(int(psql.stdout.split()[1]))
    assert from_psql.name == "from_psql" and from_psql.run_at - from_psql.created_at == pytest.approx(60)


@postgres_only
@pytest.mark.parametrize("arguments, field", [
    ("queue => 'no spaces', task => 't'", "queue"), ("queue => 'q', task => ''", "task"),
    ("queue => 'q', task => 't', priority => 2000000", "priority"), ("queue => 'q', task => 't', delay => -1", "delay"),
    ("queue => 'q', task => 't', delay => 'NaN'", "delay"), ("queue => 'q', task => 't', max_attempts => 0", "max_attempts"),
    ("queue => 'q', task => 't', timeout => 0", "timeout"), ("queue => 'q', task => 't', unique_for => 5", "unique_for"),
    ("queue => 'q', task => 't', run_at => 1, delay => 2", "delay"),
])
def test_bad_arguments_to_the_sql_function_name_the_field_and_write_nothing(db, config, database_url, arguments,
                                                                          field):
    with psycopg.connect(database_url) as conn, pytest.raises(psycopg.errors.InvalidParameterValue) as refused:
        conn.execute(f"SELECT oos_enqueue({arguments})")
    assert refused.value.diag.column_name == field and refused.value.diag.message_primary.startswith(f"{field}:")
    assert db.execute("SELECT count(*) FROM tasks")[0][0] == 0
    # The Python enqueue refuses the same values, naming the same field.
    values = dict(part.split(" => ") for part in arguments.split(", "))
    spec = {"task": eval(values.pop("task", "'t'"))}  # noqa: S307 - the literals above
    for name, literal in values.items():
        if name != "queue":
            spec[name] = float("nan") if literal == "'NaN'" else eval(literal)  # noqa: S307
    with pytest.raises(InvalidField) as python_refused:
        QueueManager(eval(values.get("queue", "'q'")), db, config).enqueue_many([spec], batch=False)  # noqa: S307
    assert python_refused.value.field == field


@postgres_only
def test_the_sql_function_and_the_python_enqueue_make_the_same_task(db, config, database_url):
    """One definition of an enqueue: the same row and counters whichever way it arrives."""
    from helpers import registry
    from helpers.tasks import task

    @task("transactional.declared", queue="emails", max_attempts=3, timeout=7)
    def declared(payload):
        return payload

    registry.publish(db)  # as the daemon does at start
    queue = QueueManager("emails", db, config)
    python_ids = [queue.enqueue("transactional.plain", {"n": 1}, priority=3, delay=5),
                  queue.enqueue("transactional.declared", None), queue.enqueue("transactional.keyed", unique_key="k1")]
    with psycopg.connect(database_url) as conn:
        sql_ids = [conn.execute(statement).fetchone()[0] for statement in (
            "SELECT oos_enqueue(queue => 'emails', task => 'transactional.plain', payload => '{\"n\": 1}', "
            "priority => 3, delay => 5)",
            "SELECT oos_enqueue(queue => 'emails', task => 'transactional.declared')",
            "SELECT oos_enqueue(queue => 'emails', task => 'transactional.keyed', unique_key => 'k2')")]
        held = conn.execute("SELECT oos_enqueue(queue => 'emails', task => 'transactional.keyed', "
                            "unique_key => 'k1')").fetchone()[0]
    assert held == python_ids[2], "a unique key held by a Python enqueue holds for SQL too"
    fields = ("queue", "name", "payload", "state", "priority", "max_attempts", "timeout", "attempts", "failures")
    for python_id, sql_id in zip(python_ids, sql_ids):
        a, b = queue.get_task(python_id).to_dict(), queue.get_task(sql_id).to_dict()
        assert {f: a[f] for f in fields} == {f: b[f] for f in fields}
        assert (a["run_at"] - a["created_at"]) == pytest.approx(b["run_at"] - b["created_at"], abs=0.01)
        assert (a["unique_until"] is None) == (b["unique_until"] is None)
    assert queue.get_task(sql_ids[1]).timeout == 7.0 and queue.stats()["totals"]["enqueued"] == 6


@postgres_only
def test_a_worker_sleeping_on_listen_wakes_at_the_callers_commit_not_before(db, config, database_url):
    queue = QueueManager("emails", db, config)
    queue.enqueue("warm_up")
    assert queue.dequeue("w") is not None
    got: list = []
    woke = threading.Event()

    def claim():
        got.extend(queue.dequeue_batch("waiter", 1, wait=30))
        woke.set()

    with psycopg.connect(database_url) as conn:
        waiter = threading.Thread(target=claim)
        waiter.start()
        time.sleep(0.3)  # it sleeps on LISTEN
        conn.execute("SELECT oos_enqueue(queue => 'emails', task => 'send_receipt')")
        assert not woke.wait(1.5), "no worker sees a task its transaction has not committed"
        conn.commit()
        committed = time.monotonic()
    assert woke.wait(10) and [t.name for t in got] == ["send_receipt"]
    waiter.join(10)
    assert time.monotonic() - committed < 5, "woken by the hint sent at COMMIT, not by a poll"
