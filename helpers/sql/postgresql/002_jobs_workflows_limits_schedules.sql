-- Version 2 (PostgreSQL): the job features; the same tables and columns as sqlite/002_jobs_workflows_limits_schedules.sql.

ALTER TABLE tasks ADD COLUMN progress double precision, ADD COLUMN progress_message text,
    ADD COLUMN cancel_requested double precision, ADD COLUMN workflow bigint,
    ADD COLUMN waiting_on integer NOT NULL DEFAULT 0, ADD COLUMN unique_key text,
    ADD COLUMN unique_until double precision, ADD COLUMN watched integer NOT NULL DEFAULT 0;
CREATE INDEX tasks_unique ON tasks (unique_key) WHERE unique_key IS NOT NULL;
CREATE INDEX tasks_workflow ON tasks (workflow) WHERE workflow IS NOT NULL;
-- Workflow steps not yet queued, by queue (the other states have their partial indexes; none
-- is added for running tasks, which every claim would have to write).
CREATE INDEX tasks_waiting ON tasks (queue, id) WHERE state IN ('waiting', 'blocked');

CREATE TABLE task_deps (
    depends_on bigint  NOT NULL,
    task_id    bigint  NOT NULL,
    position   integer NOT NULL,
    PRIMARY KEY (depends_on, task_id)
);
CREATE INDEX task_deps_task ON task_deps (task_id, position);

-- A workflow moves on by this trigger, whichever statement changed a step; see sqlite/002_jobs_workflows_limits_schedules.sql.
-- Dependents that become ready are announced like an enqueue (oos_ready).
CREATE FUNCTION oos_workflow_step() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ready text;
BEGIN
    IF NEW.state = 'succeeded' THEN
        FOR ready IN
            WITH released AS (
                UPDATE tasks SET waiting_on = waiting_on - 1,
                    state = CASE WHEN waiting_on = 1 AND state IN ('waiting', 'blocked') THEN 'queued' ELSE state END,
                    run_at = CASE WHEN waiting_on = 1 THEN greatest(run_at, NEW.finished_at) ELSE run_at END
                WHERE id IN (SELECT task_id FROM task_deps WHERE depends_on = NEW.id)
                RETURNING queue, state)
            SELECT DISTINCT queue FROM released WHERE state = 'queued'
        LOOP
            PERFORM pg_notify('oos_ready', ready);
        END LOOP;
    ELSIF NEW.state = 'cancelled' THEN
        UPDATE tasks SET state = 'cancelled', finished_at = NEW.finished_at
        WHERE id IN (SELECT task_id FROM task_deps WHERE depends_on = NEW.id) AND state IN ('waiting', 'blocked');
    ELSIF NEW.state IN ('dead', 'blocked') AND OLD.state NOT IN ('dead', 'blocked') THEN
        UPDATE tasks SET state = 'blocked', finished_at = NEW.finished_at
        WHERE id IN (SELECT task_id FROM task_deps WHERE depends_on = NEW.id) AND state = 'waiting';
    ELSIF OLD.state IN ('dead', 'blocked') AND NEW.state IN ('queued', 'waiting') THEN
        UPDATE tasks SET state = 'waiting', finished_at = NULL
        WHERE id IN (SELECT task_id FROM task_deps WHERE depends_on = NEW.id) AND state = 'blocked'
          AND NOT EXISTS (SELECT 1 FROM task_deps d JOIN tasks t ON t.id = d.depends_on
                          WHERE d.task_id = tasks.id AND t.state IN ('dead', 'blocked', 'cancelled'));
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER tasks_workflow AFTER UPDATE OF state ON tasks FOR EACH ROW
WHEN (NEW.workflow IS NOT NULL AND OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION oos_workflow_step();

-- Someone waits for this task's result (queue.wait, ?wait=): tell them when it finishes.
-- SQLite needs no such thing: a waiter there sees any commit through data_version.
CREATE FUNCTION oos_task_done() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('oos_done', NEW.id::text);
    RETURN NULL;
END $$;
CREATE TRIGGER tasks_done AFTER UPDATE OF state ON tasks FOR EACH ROW
WHEN (NEW.watched <> 0 AND NEW.state IN ('succeeded', 'dead', 'cancelled', 'blocked')) EXECUTE FUNCTION oos_task_done();

ALTER TABLE queues ADD COLUMN concurrency integer;

CREATE TABLE task_rate_limits (
    name        text PRIMARY KEY,
    rate        text NOT NULL,
    per_second  double precision NOT NULL,
    burst       double precision NOT NULL,
    tokens      double precision NOT NULL,
    updated_at  double precision NOT NULL
);

CREATE TABLE schedules (
    name       text PRIMARY KEY,
    task       text NOT NULL,
    queue      text NOT NULL,
    spec       text NOT NULL,
    missed     text NOT NULL,
    last_slot  double precision NOT NULL,
    last_task  bigint,
    next_at    double precision,
    updated_at double precision NOT NULL
);
