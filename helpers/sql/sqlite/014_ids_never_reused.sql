-- Version 14 (SQLite): ids are never used twice. A table whose id is a plain INTEGER PRIMARY
-- KEY gives a new row the highest id + 1, so deleting the newest row (a purged dead task, a
-- deleted session's last message) handed its id to the next one: a client that kept the id
-- read another task, a reply deduplicated on "reply:<id>" found the old one. AUTOINCREMENT
-- keeps the highest id ever given in sqlite_sequence. SQLite cannot add it to a table, so
-- each table is rebuilt (SQLite's documented procedure: new table, copy, drop, rename, then
-- its indexes and triggers again), with the same ids, in the migration's one transaction.
-- The rows that reference assistant_messages (ON DELETE CASCADE) are kept aside while it is
-- dropped, then put back. PostgreSQL's identity columns never reuse an id (its 014 is empty).

-- tasks
CREATE TABLE tasks_new (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    queue           TEXT    NOT NULL,
    name            TEXT    NOT NULL,
    payload         TEXT    NOT NULL,
    state           TEXT    NOT NULL DEFAULT 'queued',
    priority        INTEGER NOT NULL DEFAULT 0,
    run_at          REAL    NOT NULL,             -- not claimable before this
    attempts        INTEGER NOT NULL DEFAULT 0,   -- claims so far, including the running one
    max_attempts    INTEGER NOT NULL,
    timeout         REAL    NOT NULL,             -- lease length (and run-time limit) in seconds
    lease_until     REAL,                         -- set while running
    worker          TEXT,                         -- holder of the lease while running
    idempotency_key TEXT,
    result          TEXT,                         -- JSON, kept until result_expires
    result_expires  REAL,
    errors          TEXT    NOT NULL DEFAULT '[]',  -- JSON list of {attempt, error, at, worker}
    last_error      TEXT,
    created_at      REAL    NOT NULL,
    started_at      REAL,
    finished_at     REAL
, progress REAL, progress_message TEXT, cancel_requested REAL, workflow INTEGER, waiting_on INTEGER NOT NULL DEFAULT 0, unique_key TEXT, unique_until REAL, watched INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0);
INSERT INTO tasks_new SELECT * FROM tasks;
DROP TABLE tasks;
ALTER TABLE tasks_new RENAME TO tasks;
CREATE INDEX tasks_ready ON tasks (queue, state, priority DESC, run_at, id);
CREATE INDEX tasks_leases ON tasks (lease_until) WHERE state = 'running';
CREATE INDEX tasks_finished ON tasks (state, finished_at) WHERE finished_at IS NOT NULL;
CREATE UNIQUE INDEX tasks_idempotency ON tasks (queue, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX tasks_unique ON tasks (unique_key) WHERE unique_key IS NOT NULL;
CREATE INDEX tasks_workflow ON tasks (workflow) WHERE workflow IS NOT NULL;
CREATE INDEX tasks_browse ON tasks (queue, id);
CREATE TRIGGER tasks_step_succeeded AFTER UPDATE OF state ON tasks
WHEN new.workflow IS NOT NULL AND new.state = 'succeeded' AND old.state <> 'succeeded'
BEGIN
    UPDATE tasks SET waiting_on = waiting_on - 1,
        state = CASE WHEN waiting_on = 1 AND state IN ('waiting', 'blocked') THEN 'queued' ELSE state END,
        run_at = CASE WHEN waiting_on = 1 THEN max(run_at, new.finished_at) ELSE run_at END
    WHERE id IN (SELECT task_id FROM task_deps WHERE depends_on = new.id);
END;
CREATE TRIGGER tasks_step_dead AFTER UPDATE OF state ON tasks
WHEN new.workflow IS NOT NULL AND new.state IN ('dead', 'blocked') AND old.state NOT IN ('dead', 'blocked')
BEGIN
    UPDATE tasks SET state = 'blocked', finished_at = new.finished_at
    WHERE id IN (SELECT task_id FROM task_deps WHERE depends_on = new.id) AND state = 'waiting';
END;
CREATE TRIGGER tasks_step_cancelled AFTER UPDATE OF state ON tasks
WHEN new.workflow IS NOT NULL AND new.state = 'cancelled' AND old.state <> 'cancelled'
BEGIN
    UPDATE tasks SET state = 'cancelled', finished_at = new.finished_at
    WHERE id IN (SELECT task_id FROM task_deps WHERE depends_on = new.id) AND state IN ('waiting', 'blocked');
END;
CREATE TRIGGER tasks_step_replayed AFTER UPDATE OF state ON tasks
WHEN new.workflow IS NOT NULL AND old.state IN ('dead', 'blocked') AND new.state IN ('queued', 'waiting')
BEGIN
    UPDATE tasks SET state = 'waiting', finished_at = NULL
    WHERE id IN (SELECT task_id FROM task_deps WHERE depends_on = new.id) AND state = 'blocked'
      AND NOT EXISTS (SELECT 1 FROM task_deps d JOIN tasks t ON t.id = d.depends_on
                      WHERE d.task_id = tasks.id AND t.state IN ('dead', 'blocked', 'cancelled'));
END;
CREATE TRIGGER tasks_count_insert AFTER INSERT ON tasks BEGIN
    INSERT INTO task_counts (queue, state, shard, n)
    VALUES (new.queue, CASE WHEN new.state IN ('queued', 'running') THEN 'queued_or_running' ELSE new.state END, 0, 1)
    ON CONFLICT (queue, state, shard) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER tasks_count_update AFTER UPDATE OF state ON tasks
WHEN old.state <> new.state AND NOT (old.state IN ('queued', 'running') AND new.state IN ('queued', 'running'))
     AND NOT (old.state = 'running' AND new.state = 'succeeded')
BEGIN
    UPDATE task_counts SET n = n - 1 WHERE queue = old.queue AND shard = 0
        AND state = CASE WHEN old.state IN ('queued', 'running') THEN 'queued_or_running' ELSE old.state END;
    INSERT INTO task_counts (queue, state, shard, n)
    VALUES (new.queue, CASE WHEN new.state IN ('queued', 'running') THEN 'queued_or_running' ELSE new.state END, 0, 1)
    ON CONFLICT (queue, state, shard) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER tasks_count_delete AFTER DELETE ON tasks BEGIN
    UPDATE task_counts SET n = n - 1 WHERE queue = old.queue AND shard = 0
        AND state = CASE WHEN old.state IN ('queued', 'running') THEN 'queued_or_running' ELSE old.state END;
END;

-- memories (its full-text index keeps the same rowids: the ids do not change)
CREATE TABLE memories_new (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    type        TEXT NOT NULL,               -- fact, preference, episode, instruction
    session_id  TEXT,
    user_id     TEXT,
    content     TEXT NOT NULL,
    embedding   BLOB,                        -- float32 vector when embeddings are installed
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    expires_at  REAL
);
INSERT INTO memories_new SELECT * FROM memories;
DROP TABLE memories;
ALTER TABLE memories_new RENAME TO memories;
CREATE INDEX memories_scope ON memories (session_id, user_id);
CREATE TRIGGER memories_ai AFTER INSERT ON memories BEGIN
    INSERT INTO memories_fts (rowid, content) VALUES (new.id, new.content);
END;
CREATE TRIGGER memories_ad AFTER DELETE ON memories BEGIN
    INSERT INTO memories_fts (memories_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;
CREATE TRIGGER memories_au AFTER UPDATE OF content ON memories BEGIN
    INSERT INTO memories_fts (memories_fts, rowid, content) VALUES ('delete', old.id, old.content);
    INSERT INTO memories_fts (rowid, content) VALUES (new.id, new.content);
END;

-- assistant_messages, and the rows that reference it
CREATE TEMP TABLE kept_reply_events AS SELECT * FROM reply_events;
CREATE TEMP TABLE kept_plans AS SELECT * FROM assistant_plans;
CREATE TEMP TABLE kept_plan_steps AS SELECT * FROM assistant_plan_steps;
CREATE TABLE assistant_messages_new (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id    TEXT NOT NULL REFERENCES assistant_sessions (id) ON DELETE CASCADE,
    role          TEXT NOT NULL,             -- user, assistant
    content       TEXT NOT NULL,
    reply_to      INTEGER UNIQUE,            -- an assistant message answers one user message, once
    task_id       INTEGER,                   -- the assistant.reply task of a user message
    provider      TEXT,
    summarized    INTEGER NOT NULL DEFAULT 0,  -- folded into an episode memory
    created_at    REAL NOT NULL
, step_of INTEGER, tool_calls TEXT, tool_call_id TEXT, workflow INTEGER);
INSERT INTO assistant_messages_new SELECT * FROM assistant_messages;
DROP TABLE assistant_messages;
ALTER TABLE assistant_messages_new RENAME TO assistant_messages;
CREATE INDEX assistant_messages_session ON assistant_messages (session_id, id);
CREATE UNIQUE INDEX assistant_messages_tool_result ON assistant_messages (step_of, tool_call_id);
INSERT INTO assistant_plans SELECT * FROM kept_plans;
INSERT INTO assistant_plan_steps SELECT * FROM kept_plan_steps;
INSERT INTO reply_events SELECT * FROM kept_reply_events;
DROP TABLE kept_reply_events;
DROP TABLE kept_plans;
DROP TABLE kept_plan_steps;
