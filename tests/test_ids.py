"""Ids are never given twice, on either engine: a task, an assistant message or a memory deleted
as the newest row does not hand its id to the next one (a client that kept it would read
another's); and a SQLite database made before migration 14 keeps every row, id, counter,
trigger and reference through it."""
from __future__ import annotations

import sqlite3
import time

import pytest

from helpers import schema
from helpers.engine import open_database
from helpers.queue_manager import QueueManager, purge_dead
from lib.assistant import Assistant
from lib.memory import Memories


@pytest.mark.both_engines
def test_deleting_the_newest_rows_never_gives_their_ids_again(db, config):
    queue = QueueManager("jobs", db, config)
    ids = [int(queue.enqueue("t", max_attempts=1)) for _ in range(3)]
    for _ in ids:
        queue.fail_task(queue.dequeue("w").id, "w", "boom", retry=False)
    assert purge_dead(db, "jobs", ids[-1], None, 0.0, time.time()) == 1  # the newest task, gone
    assert int(queue.enqueue("t")) > ids[-1]

    chat = Assistant(config, db)
    session = chat.create_session()["id"]
    posted = chat.post_message(session, "hello")
    chat.delete_session(session)  # its messages (the newest) go with it
    again = chat.create_session()["id"]
    assert chat.post_message(again, "hello again")["message_id"] > posted["message_id"]

    memories = Memories(db)
    newest = memories.add("fact", "the newest", user_id="u")["id"]
    assert memories.delete(newest)
    assert memories.add("fact", "the next", user_id="u")["id"] > newest


def test_a_database_made_before_migration_14_keeps_everything_through_it(tmp_path, config):
    path = config.db_path
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(schema.VERSION_TABLE)
    for number, step in enumerate(schema.steps("sqlite")[:13], start=1):
        for statement in schema.statements(step.read_text()):
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (number, time.time()))
    now = time.time()
    for i in range(1, 6):
        conn.execute("INSERT INTO tasks (queue, name, payload, run_at, max_attempts, timeout, created_at, state) "
                     "VALUES ('jobs', 't', '{}', ?, 3, 30, ?, ?)", (now, now, "dead" if i == 5 else "queued"))
    conn.execute("DELETE FROM tasks WHERE id = 5")  # before 14: id 5 would be given again
    for session in ("s", "agent"):
        conn.execute("INSERT INTO assistant_sessions (id, system_prompt, metadata, created_at) VALUES (?, '', '{}', ?)",
                     (session, now))
    conn.execute("INSERT INTO assistant_messages (id, session_id, role, content, created_at) VALUES (7, 's', 'user', 'hi', ?)",
                 (now,))
    conn.execute("INSERT INTO reply_events (message_id, kind, data, created_at) VALUES (7, 'token', '{}', ?)", (now,))
    conn.execute("INSERT INTO assistant_plans (message_id, planner, created_at) VALUES (7, 'rules', ?)", (now,))
    conn.execute("INSERT INTO assistant_plan_steps (message_id, position, role, instruction, session_id, agent_message_id) "
                 "VALUES (7, 0, 'a', 'b', 'agent', 7)")
    conn.execute("INSERT INTO memories (id, type, user_id, content, created_at, updated_at) "
                 "VALUES (3, 'fact', 'u', 'cats purr', ?, ?)", (now, now))
    conn.commit()
    counts_before = conn.execute("SELECT * FROM task_counts ORDER BY queue, state").fetchall()
    conn.close()

    db = open_database(config)  # migrates to the latest
    try:
        assert schema.version(db) == schema.latest("sqlite")
        assert [r[0] for r in db.execute("SELECT id FROM tasks ORDER BY id")] == [1, 2, 3, 4]
        assert [tuple(r) for r in db.execute("SELECT * FROM task_counts ORDER BY queue, state")] == \
            [tuple(r) for r in counts_before]
        # The references kept, and the rows that cascade from a message came back.
        assert db.execute("SELECT count(*) FROM reply_events")[0][0] == 1
        assert db.execute("SELECT count(*) FROM assistant_plan_steps")[0][0] == 1
        assert db.execute("PRAGMA foreign_key_check") == [] and db.execute("PRAGMA integrity_check")[0][0] == "ok"
        # The triggers are back: counts follow an enqueue, the full-text index a memory.
        queue = QueueManager("jobs", db, config)
        assert int(queue.enqueue("t")) == 5  # the highest id it ever saw was 4: from here on, never again
        assert queue.stats()["counts"]["queued"] == 5
        assert [m["content"] for m in Memories(db).search("cats", user_id="u")] == ["cats purr"]
        Assistant(config, db).delete_session("s")  # a cascade through the rebuilt table
        assert db.execute("SELECT count(*) FROM reply_events")[0][0] == 0
    finally:
        db.close()
