-- Version 2 (SQLite): the job features. Progress and cancellation of running tasks, workflows
-- (dependencies between tasks), unique tasks, limits, periodic schedules.
-- States added: waiting (for its dependencies), blocked (a dependency is dead).

ALTER TABLE tasks ADD COLUMN progress REAL;                 -- 0..1, set by the handler's context
ALTER TABLE tasks ADD COLUMN progress_message TEXT;
ALTER TABLE tasks ADD COLUMN cancel_requested REAL;         -- when a cancel of the running task was asked
ALTER TABLE tasks ADD COLUMN workflow INTEGER;              -- the workflow's first task; NULL outside one
ALTER TABLE tasks ADD COLUMN waiting_on INTEGER NOT NULL DEFAULT 0;  -- dependencies not yet succeeded
ALTER TABLE tasks ADD COLUMN unique_key TEXT;               -- no second task with it queued or running...
ALTER TABLE tasks ADD COLUMN unique_until REAL;             -- ...until then
ALTER TABLE tasks ADD COLUMN watched INTEGER NOT NULL DEFAULT 0;  -- someone waits for its result
CREATE INDEX tasks_unique ON tasks (unique_key) WHERE unique_key IS NOT NULL;
CREATE INDEX tasks_workflow ON tasks (workflow) WHERE workflow IS NOT NULL;
-- Browsing one queue newest first (helpers/queue_sql.py, browse): without it SQLite sorts
-- every task of the queue. Neither column ever changes, so only an enqueue writes it.
CREATE INDEX tasks_browse ON tasks (queue, id);

-- task_id runs after depends_on has succeeded; position orders the results it receives.
CREATE TABLE task_deps (
    depends_on INTEGER NOT NULL,
    task_id    INTEGER NOT NULL,
    position   INTEGER NOT NULL,
    PRIMARY KEY (depends_on, task_id)
) WITHOUT ROWID;
CREATE INDEX task_deps_task ON task_deps (task_id, position);

-- A workflow moves on by these triggers, whichever statement changed a step (completion, the
-- dead letter, an expired lease, a cancel, a replay), in the same transaction.
-- A step succeeded: its dependents wait for one fewer; those waiting for none are queued (also
-- one still shown blocked: two replays committing side by side can each leave it so, and
-- waiting_on = 0 means every step before it succeeded).
CREATE TRIGGER tasks_step_succeeded AFTER UPDATE OF state ON tasks
WHEN new.workflow IS NOT NULL AND new.state = 'succeeded' AND old.state <> 'succeeded'
BEGIN
    UPDATE tasks SET waiting_on = waiting_on - 1,
        state = CASE WHEN waiting_on = 1 AND state IN ('waiting', 'blocked') THEN 'queued' ELSE state END,
        run_at = CASE WHEN waiting_on = 1 THEN max(run_at, new.finished_at) ELSE run_at END
    WHERE id IN (SELECT task_id FROM task_deps WHERE depends_on = new.id);
END;
-- A step is dead (or blocked): the steps after it are blocked, until it is replayed.
CREATE TRIGGER tasks_step_dead AFTER UPDATE OF state ON tasks
WHEN new.workflow IS NOT NULL AND new.state IN ('dead', 'blocked') AND old.state NOT IN ('dead', 'blocked')
BEGIN
    UPDATE tasks SET state = 'blocked', finished_at = new.finished_at
    WHERE id IN (SELECT task_id FROM task_deps WHERE depends_on = new.id) AND state = 'waiting';
END;
-- A step was cancelled: so are the steps after it.
CREATE TRIGGER tasks_step_cancelled AFTER UPDATE OF state ON tasks
WHEN new.workflow IS NOT NULL AND new.state = 'cancelled' AND old.state <> 'cancelled'
BEGIN
    UPDATE tasks SET state = 'cancelled', finished_at = new.finished_at
    WHERE id IN (SELECT task_id FROM task_deps WHERE depends_on = new.id) AND state IN ('waiting', 'blocked');
END;
-- A dead step was replayed: the steps it blocked wait again (unless another of theirs is dead).
CREATE TRIGGER tasks_step_replayed AFTER UPDATE OF state ON tasks
WHEN new.workflow IS NOT NULL AND old.state IN ('dead', 'blocked') AND new.state IN ('queued', 'waiting')
BEGIN
    UPDATE tasks SET state = 'waiting', finished_at = NULL
    WHERE id IN (SELECT task_id FROM task_deps WHERE depends_on = new.id) AND state = 'blocked'
      AND NOT EXISTS (SELECT 1 FROM task_deps d JOIN tasks t ON t.id = d.depends_on
                      WHERE d.task_id = tasks.id AND t.state IN ('dead', 'blocked', 'cancelled'));
END;

-- At most this many running tasks of the queue at once, across every worker (NULL: no limit).
ALTER TABLE queues ADD COLUMN concurrency INTEGER;

-- At most ``rate`` runs of the task name (e.g. 10/s), a token bucket shared by every worker.
CREATE TABLE task_rate_limits (
    name        TEXT PRIMARY KEY,
    rate        TEXT NOT NULL,               -- as given: "10/s", "100/min"
    per_second  REAL NOT NULL,
    burst       REAL NOT NULL,
    tokens      REAL NOT NULL,
    updated_at  REAL NOT NULL
) WITHOUT ROWID;

-- Periodic tasks: the definitions are code and config; this keeps the last slot enqueued, so
-- a slot runs once across restarts and daemons.
CREATE TABLE schedules (
    name       TEXT PRIMARY KEY,
    task       TEXT NOT NULL,
    queue      TEXT NOT NULL,
    spec       TEXT NOT NULL,                -- "cron 0 3 * * * Europe/Paris" or "every 300s"
    missed     TEXT NOT NULL,                -- once | skip
    last_slot  REAL NOT NULL,                -- the newest slot handled (enqueued or skipped)
    last_task  INTEGER,
    next_at    REAL,
    updated_at REAL NOT NULL
) WITHOUT ROWID;
