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
