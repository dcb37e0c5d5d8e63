-- Every table OOS keeps, in one SQLite file. Applied at every open (idempotent).
-- Times are UNIX seconds (REAL). States: queued, running, succeeded, dead, cancelled.

CREATE TABLE IF NOT EXISTS tasks (
    id              INTEGER PRIMARY KEY,
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
);
-- Claim order: the highest priority, then the longest due, then FIFO.
CREATE INDEX IF NOT EXISTS tasks_ready ON tasks (queue, state, priority DESC, run_at, id);
CREATE INDEX IF NOT EXISTS tasks_leases ON tasks (lease_until) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (state, finished_at) WHERE finished_at IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency ON tasks (queue, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- One row per queue that was ever used: pause flag and lifetime counters. The counters are
-- bumped by the statement that changes the tasks, in the same transaction (see COUNT in
-- helpers/queue_manager.py), once per batch rather than once per row.
CREATE TABLE IF NOT EXISTS queues (
    name       TEXT PRIMARY KEY,
    paused     INTEGER NOT NULL DEFAULT 0,
    enqueued   INTEGER NOT NULL DEFAULT 0,
    succeeded  INTEGER NOT NULL DEFAULT 0,
    failed     INTEGER NOT NULL DEFAULT 0,   -- failed attempts, retried or not
    dead       INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- Circuit breaker state per queue, shared by every worker process and kept across restarts.
CREATE TABLE IF NOT EXISTS breakers (
    name           TEXT PRIMARY KEY,
    state          TEXT    NOT NULL DEFAULT 'closed',   -- closed, open, half-open
    fail_counter   INTEGER NOT NULL DEFAULT 0,
    success_counter INTEGER NOT NULL DEFAULT 0,
    opened_at      REAL
) WITHOUT ROWID;

-- What the running daemon last said about itself (workers, scaling), for the API and the CLI.
CREATE TABLE IF NOT EXISTS daemon_status (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    pid        INTEGER NOT NULL,
    updated_at REAL    NOT NULL,
    status     TEXT    NOT NULL   -- JSON
);

-- The assistant: conversations, their messages, and memories (searched with FTS5/bm25).
CREATE TABLE IF NOT EXISTS assistant_sessions (
    id            TEXT PRIMARY KEY,
    user_id       TEXT,
    system_prompt TEXT NOT NULL DEFAULT '',
    provider      TEXT,                      -- preferred provider, tried first
    metadata      TEXT NOT NULL DEFAULT '{}',
    created_at    REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS assistant_messages (
    id            INTEGER PRIMARY KEY,
    session_id    TEXT NOT NULL REFERENCES assistant_sessions (id) ON DELETE CASCADE,
    role          TEXT NOT NULL,             -- user, assistant
    content       TEXT NOT NULL,
    reply_to      INTEGER UNIQUE,            -- an assistant message answers one user message, once
    task_id       INTEGER,                   -- the assistant.reply task of a user message
    provider      TEXT,
    summarized    INTEGER NOT NULL DEFAULT 0,  -- folded into an episode memory
    created_at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS assistant_messages_session ON assistant_messages (session_id, id);

CREATE TABLE IF NOT EXISTS memories (
    id          INTEGER PRIMARY KEY,
    type        TEXT NOT NULL,               -- fact, preference, episode, instruction
    session_id  TEXT,
    user_id     TEXT,
    content     TEXT NOT NULL,
    embedding   BLOB,                        -- float32 vector when embeddings are installed
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    expires_at  REAL
);
CREATE INDEX IF NOT EXISTS memories_scope ON memories (session_id, user_id);
CREATE VIRTUAL TABLE IF NOT EXISTS memories_fts USING fts5 (content, content = 'memories', content_rowid = 'id');
CREATE TRIGGER IF NOT EXISTS memories_ai AFTER INSERT ON memories BEGIN
    INSERT INTO memories_fts (rowid, content) VALUES (new.id, new.content);
END;
CREATE TRIGGER IF NOT EXISTS memories_ad AFTER DELETE ON memories BEGIN
    INSERT INTO memories_fts (memories_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;
CREATE TRIGGER IF NOT EXISTS memories_au AFTER UPDATE OF content ON memories BEGIN
    INSERT INTO memories_fts (memories_fts, rowid, content) VALUES ('delete', old.id, old.content);
    INSERT INTO memories_fts (rowid, content) VALUES (new.id, new.content);
END;

-- Outbound calls: per-provider health, a token bucket per rate limit, a response cache.
CREATE TABLE IF NOT EXISTS provider_stats (
    name        TEXT PRIMARY KEY,
    calls       INTEGER NOT NULL DEFAULT 0,
    errors      INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    latency_ms  REAL,                        -- moving average of successful calls
    updated_at  REAL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rate_limits (
    name        TEXT PRIMARY KEY,
    tokens      REAL NOT NULL,
    updated_at  REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS http_cache (
    key         TEXT PRIMARY KEY,
    body        TEXT NOT NULL,
    expires_at  REAL NOT NULL
) WITHOUT ROWID;
