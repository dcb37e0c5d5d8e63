-- Version 12 (PostgreSQL): the same table as sqlite/012_task_counts.sql, kept the same way
-- (read its notes), with two differences: writers add to the row of a shard drawn from
-- their transaction's id (of 64), so concurrent transactions seldom wait on one counter row
-- (a shard by backend made two colliding backends wait on each other at every commit), and
-- readers sum the shards; and an INSERT or DELETE statement counts its rows once, from
-- its transition table, not once per row.

CREATE TABLE task_counts (
    queue  text    NOT NULL,
    state  text    NOT NULL,
    shard  integer NOT NULL DEFAULT 0,
    n      bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, state, shard)
);

CREATE FUNCTION oos_counted_state(state text) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN state IN ('queued', 'running') THEN 'queued_or_running' ELSE state END;

INSERT INTO task_counts (queue, state, shard, n)
SELECT queue, oos_counted_state(state), 0, count(*) FROM tasks GROUP BY 1, 2;

CREATE FUNCTION oos_count_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO task_counts AS c (queue, state, shard, n)
        SELECT queue, oos_counted_state(state), mod(txid_current(), 64), count(*) FROM added GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (queue, state, shard) DO UPDATE SET n = c.n + excluded.n;
    ELSE
        INSERT INTO task_counts AS c (queue, state, shard, n)
        SELECT queue, oos_counted_state(state), mod(txid_current(), 64), -count(*) FROM removed GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (queue, state, shard) DO UPDATE SET n = c.n + excluded.n;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER tasks_count_insert AFTER INSERT ON tasks REFERENCING NEW TABLE AS added
FOR EACH STATEMENT EXECUTE FUNCTION oos_count_rows();
CREATE TRIGGER tasks_count_delete AFTER DELETE ON tasks REFERENCING OLD TABLE AS removed
FOR EACH STATEMENT EXECUTE FUNCTION oos_count_rows();

CREATE FUNCTION oos_count_moved() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO task_counts AS c (queue, state, shard, n)
    SELECT q, s, mod(txid_current(), 64), d
    FROM (VALUES (OLD.queue, oos_counted_state(OLD.state), -1), (NEW.queue, oos_counted_state(NEW.state), 1)) AS m(q, s, d)
    ORDER BY q, s
    ON CONFLICT (queue, state, shard) DO UPDATE SET n = c.n + excluded.n;
    RETURN NULL;
END $$;
CREATE TRIGGER tasks_count_update AFTER UPDATE OF state ON tasks FOR EACH ROW
WHEN (OLD.state <> NEW.state AND NOT (OLD.state IN ('queued', 'running') AND NEW.state IN ('queued', 'running'))
      AND NOT (OLD.state = 'running' AND NEW.state = 'succeeded'))
EXECUTE FUNCTION oos_count_moved();
