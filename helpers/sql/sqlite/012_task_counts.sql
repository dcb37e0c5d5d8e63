-- Version 12 (SQLite): how many tasks each queue holds in each state, kept by the writes that
-- change them, so a queue's counts read the same at ten tasks and at ten million
-- (helpers/counts.py reads them).
--
-- 'queued_or_running' counts both: a claim (queued -> running, the hottest write) changes
-- nothing here, and a reader takes off the running tasks, which it counts from the index
-- (at most the workers' batches). A completion (running -> succeeded) is counted by its
-- statement's owner, once per batch (queue_sql COMPLETE; helpers/counts.py); every other
-- change by these triggers. shard: always 0 here (PostgreSQL spreads its writers over 16).

CREATE TABLE task_counts (
    queue  TEXT    NOT NULL,
    state  TEXT    NOT NULL,
    shard  INTEGER NOT NULL DEFAULT 0,
    n      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, state, shard)
) WITHOUT ROWID;

INSERT INTO task_counts (queue, state, shard, n)
SELECT queue, CASE WHEN state IN ('queued', 'running') THEN 'queued_or_running' ELSE state END AS counted, 0, count(*)
FROM tasks GROUP BY queue, counted;

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
