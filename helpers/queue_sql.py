"""The queue's semantics, as SQL: one block per engine, the same statements by name.

States: queued -> running (a lease held by one worker) -> succeeded | queued again (retry after
backoff) | dead (the dead letter); queued -> cancelled. Every statement a worker makes about a
task it claimed is fenced by ``state = 'running' AND worker = <its id> AND attempts = <the
attempt it claimed>``: a worker whose lease ran out changes nothing, even when the task has
since been claimed again by someone else, or by that same worker (the river#1302 lesson).

``:now`` is the caller's clock. On PostgreSQL a caller may pass None instead, and the server's
clock is used: daemons on hosts with skewed clocks then agree on when a lease runs out.
"""
from __future__ import annotations

from types import SimpleNamespace

# -- statements that read the same on both engines ----------------------------------------


def _insert_keyed(now: str) -> str:
    """One task with an idempotency key (nothing if the key is taken); ``now``: the engine's
    time expression."""
    return f"""
INSERT INTO tasks (queue, name, payload, priority, run_at, max_attempts, timeout, idempotency_key, created_at)
VALUES (:queue, :name, :payload, :priority, coalesce(:run_at, {now} + :delay), :max_attempts, :timeout,
        :idempotency_key, {now})
ON CONFLICT (queue, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id"""


PORTABLE = dict(
    FIND_KEY="SELECT id FROM tasks WHERE queue = :queue AND idempotency_key = :idempotency_key",
    # A worker was stopped by the daemon's shutdown, or a claimed task is handed back: the
    # task goes back untouched and the attempt is not counted.
    RELEASE="""UPDATE tasks SET state = 'queued', attempts = attempts - 1, lease_until = NULL, worker = NULL,
                 started_at = NULL
WHERE id = :id AND state = 'running' AND worker = :worker AND (:attempt IS NULL OR attempts = :attempt)""",
    RELEASE_WORKER="""UPDATE tasks SET state = 'queued', attempts = attempts - 1, lease_until = NULL,
    worker = NULL, started_at = NULL
WHERE state = 'running' AND worker = :worker""",
    CANCEL="UPDATE tasks SET state = 'cancelled', finished_at = :now WHERE id = :id AND state = 'queued'",
    ENSURE_QUEUE="INSERT INTO queues (name) VALUES (:queue) ON CONFLICT DO NOTHING",
    SET_PAUSED="""INSERT INTO queues (name, paused) VALUES (:queue, :paused)
ON CONFLICT (name) DO UPDATE SET paused = excluded.paused""",
    # Finished work past its retention, in bounded batches (each its own short transaction).
    PRUNE=(
        """DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE state = 'dead' AND finished_at < :dead_before
                                         LIMIT :batch)""",
        """DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE state IN ('succeeded', 'cancelled')
                                         AND finished_at < :finished_before LIMIT :batch)""",
        """UPDATE tasks SET result = NULL WHERE id IN (SELECT id FROM tasks WHERE state = 'succeeded'
           AND finished_at < :result_before AND result IS NOT NULL LIMIT :batch)""",
    ),
    GET="SELECT * FROM tasks WHERE id = :id",
    COUNT_BY_STATE="SELECT state, count(*) AS n FROM tasks WHERE queue = :queue GROUP BY state",
    READY="""SELECT count(*) AS n, min(run_at) AS oldest FROM tasks
WHERE queue = :queue AND state = 'queued' AND run_at <= :now""",
    RECENT="SELECT count(*) FROM tasks WHERE state = 'succeeded' AND finished_at >= :since AND queue = :queue",
    QUEUE_NAMES="SELECT name FROM queues ORDER BY name",
    RUNNING_WORKERS="SELECT DISTINCT worker FROM tasks WHERE state = 'running'",
)

# Dead letter: list, replay (attempts start again; the error history stays), purge.
DEAD_FILTER = """state = 'dead' AND (:queue IS NULL OR queue = :queue) AND (:id IS NULL OR id = :id)
    AND (:name IS NULL OR name = :name)"""
PORTABLE.update(
    LIST_DEAD=f"""SELECT * FROM tasks WHERE {DEAD_FILTER}
ORDER BY finished_at DESC, id DESC LIMIT :limit OFFSET :offset""",
    COUNT_DEAD=f"SELECT count(*) FROM tasks WHERE {DEAD_FILTER}",
    REPLAY_DEAD=f"""UPDATE tasks SET state = 'queued', attempts = 0, run_at = :now, finished_at = NULL
WHERE {DEAD_FILTER}""",
    PURGE_DEAD=f"DELETE FROM tasks WHERE {DEAD_FILTER} AND finished_at <= :before",
)

# -- SQLite --------------------------------------------------------------------------------

_SQLITE_CLAIM = """
UPDATE tasks SET state = 'running', worker = :worker, attempts = attempts + 1,
                 lease_until = :now + timeout + :grace, started_at = :now
WHERE id IN (SELECT id FROM tasks
             WHERE queue = :queue AND state = 'queued' AND run_at <= :now
             ORDER BY {order} LIMIT :limit)
  AND NOT EXISTS (SELECT 1 FROM queues WHERE name = :queue AND paused)
RETURNING *"""

# A failed attempt, shared by fail_task and by expired leases: retry after the backoff for
# this attempt, or dead-letter after the last one (or at once when :final).
_SQLITE_FAIL_SET = """
    state = CASE WHEN attempts >= max_attempts OR :final THEN 'dead' ELSE 'queued' END,
    run_at = CASE WHEN attempts >= max_attempts OR :final THEN run_at
                  ELSE :now + json_extract(:delays, '$[' || (min(attempts, :steps) - 1) || ']') END,
    finished_at = CASE WHEN attempts >= max_attempts OR :final THEN :now END,
    errors = json_insert(errors, '$[#]', json_object(
        'attempt', attempts, 'at', :now, 'worker', worker,
        'error', coalesce(:error, 'lease expired: worker ' || worker || ' stopped responding'))),
    last_error = coalesce(:error, 'lease expired: worker ' || worker || ' stopped responding'),
    lease_until = NULL, worker = NULL"""

SQLITE = SimpleNamespace(
    **PORTABLE,
    INSERT_KEYED=_insert_keyed(":now"),
    # Lifetime counters, bumped once per transaction by whatever changed the tasks.
    COUNT="""UPDATE queues SET enqueued = enqueued + :enqueued, succeeded = succeeded + :succeeded,
    failed = failed + :failed, dead = dead + :dead WHERE name = :queue""",
    QUEUE_ROW="SELECT * FROM queues WHERE name = :queue",
    COUNTS_IN_STATEMENT=False,  # INSERT and COMPLETE leave the counters to COUNT
    INSERT="""
INSERT INTO tasks (queue, name, payload, priority, run_at, max_attempts, timeout, idempotency_key, created_at)
VALUES (:queue, :name, :payload, :priority, coalesce(:run_at, :now + :delay), :max_attempts, :timeout,
        :idempotency_key, :now)""",
    CLAIM=_SQLITE_CLAIM.format(order="priority DESC, run_at, id"),
    # A breaker's half-open trial takes a task that never failed when there is one: a retry of
    # a poison task would only reopen the breaker, and healthy work would starve behind it.
    CLAIM_TRIAL=_SQLITE_CLAIM.format(order="attempts, priority DESC, run_at, id"),
    # :done is a JSON list of {"id", "result"}; returns the ids that were still held.
    COMPLETE="""
UPDATE tasks SET state = 'succeeded', result = done.result, lease_until = NULL, finished_at = :now
FROM (SELECT json_extract(value, '$.id') AS id, json_extract(value, '$.result') AS result,
             json_extract(value, '$.attempt') AS attempt FROM json_each(:done)) AS done
WHERE tasks.id = done.id AND tasks.state = 'running' AND tasks.worker = :worker
  AND (done.attempt IS NULL OR tasks.attempts = done.attempt)
RETURNING id""",
    FAIL=f"""UPDATE tasks SET {_SQLITE_FAIL_SET}
WHERE id = :id AND state = 'running' AND worker = :worker AND (:attempt IS NULL OR attempts = :attempt) RETURNING id, queue, state""",
    REQUEUE_EXPIRED=f"""UPDATE tasks SET {_SQLITE_FAIL_SET}
WHERE id IN (SELECT id FROM tasks WHERE state = 'running' AND lease_until < :now LIMIT :batch)
RETURNING id, queue, state""",
    # A worker process died: each task it held is a failed attempt, now rather than at lease end.
    FAIL_WORKER=f"""UPDATE tasks SET {_SQLITE_FAIL_SET}
WHERE state = 'running' AND worker = :worker RETURNING id, queue, state""",
    EXTEND="""UPDATE tasks SET lease_until = :now + coalesce(:seconds, timeout)
WHERE id = :id AND state = 'running' AND worker = :worker AND (:attempt IS NULL OR attempts = :attempt)""",
)

# -- PostgreSQL ----------------------------------------------------------------------------

SERVER_NOW = "extract(epoch FROM statement_timestamp())::float8"
NOW = f"coalesce(%(now)s, {SERVER_NOW})"

# One statement, one round trip: lock up to :limit ready rows other claimers have not locked
# (SKIP LOCKED: concurrent claims never wait on each other nor take the same row), then lease
# them. MATERIALIZED keeps the planner from re-running the subquery per updated row, which
# could update more rows than LIMIT.
_PG_CLAIM = f"""
WITH picked AS MATERIALIZED (
    SELECT id FROM tasks
    WHERE queue = %(queue)s AND state = 'queued' AND run_at <= {NOW}
      AND NOT EXISTS (SELECT 1 FROM queues WHERE name = %(queue)s AND paused <> 0)
    ORDER BY {{order}} LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED)
UPDATE tasks t SET state = 'running', worker = %(worker)s, attempts = t.attempts + 1,
                   lease_until = {NOW} + t.timeout + %(grace)s, started_at = {NOW}
FROM picked WHERE t.id = picked.id
RETURNING t.*"""

_PG_FAIL_SET = f"""
    state = CASE WHEN attempts >= max_attempts OR %(final)s = 1 THEN 'dead' ELSE 'queued' END,
    run_at = CASE WHEN attempts >= max_attempts OR %(final)s = 1 THEN run_at
                  ELSE {NOW} + (%(delays)s::jsonb ->> (least(attempts, %(steps)s) - 1))::float8 END,
    finished_at = CASE WHEN attempts >= max_attempts OR %(final)s = 1 THEN {NOW} END,
    errors = (errors::jsonb || jsonb_build_array(jsonb_build_object(
        'attempt', attempts, 'at', {NOW}, 'worker', worker,
        'error', coalesce(%(error)s, 'lease expired: worker ' || worker || ' stopped responding'))))::text,
    last_error = coalesce(%(error)s, 'lease expired: worker ' || worker || ' stopped responding'),
    lease_until = NULL, worker = NULL"""

_PG_SHARD = "mod(pg_backend_pid(), 16)"


def _pg_counted(statement: str, column: str) -> str:
    """``statement`` (``... RETURNING id``) as one statement that also bumps ``column`` of the
    queue's counters: one round trip, atomic without BEGIN/COMMIT."""
    return f"""WITH changed AS ({statement}),
counted AS (INSERT INTO queue_counts AS c (queue, shard, {column})
            SELECT %(queue)s, {_PG_SHARD}, count(*) FROM changed HAVING count(*) > 0
            ON CONFLICT (queue, shard) DO UPDATE SET {column} = c.{column} + excluded.{column})
SELECT id FROM changed"""


POSTGRES = SimpleNamespace(
    **PORTABLE,
    INSERT_KEYED=_insert_keyed(f"coalesce(:now, {SERVER_NOW})"),
    COUNT=f"""INSERT INTO queue_counts AS c (queue, shard, enqueued, succeeded, failed, dead)
VALUES (:queue, {_PG_SHARD}, :enqueued, :succeeded, :failed, :dead)
ON CONFLICT (queue, shard) DO UPDATE SET enqueued = c.enqueued + excluded.enqueued,
    succeeded = c.succeeded + excluded.succeeded, failed = c.failed + excluded.failed, dead = c.dead + excluded.dead""",
    QUEUE_ROW="""SELECT q.name, q.paused, coalesce(sum(c.enqueued), 0)::bigint AS enqueued,
    coalesce(sum(c.succeeded), 0)::bigint AS succeeded, coalesce(sum(c.failed), 0)::bigint AS failed,
    coalesce(sum(c.dead), 0)::bigint AS dead
FROM queues q LEFT JOIN queue_counts c ON c.queue = q.name WHERE q.name = :queue GROUP BY q.name, q.paused""",
    COUNTS_IN_STATEMENT=True,
    # Many rows in one statement that also makes sure the queue exists and counts them; ids
    # come from the identity in row order (sorted by the caller).
    INSERT=f"""WITH ensured AS (INSERT INTO queues (name) VALUES (%(queue)s) ON CONFLICT DO NOTHING),
inserted AS (
    INSERT INTO tasks (queue, name, payload, priority, run_at, max_attempts, timeout, idempotency_key, created_at)
    SELECT r.queue, r.name, r.payload, r.priority, coalesce(r.run_at, {NOW} + r.delay), r.max_attempts, r.timeout,
           r.idempotency_key, {NOW}
    FROM jsonb_to_recordset(%(rows)s::jsonb) AS r(ord integer, queue text, name text, payload text,
         priority integer, run_at float8, delay float8, max_attempts integer, timeout float8,
         idempotency_key text)
    ORDER BY r.ord
    RETURNING id),
counted AS (INSERT INTO queue_counts AS c (queue, shard, enqueued)
            SELECT %(queue)s, {_PG_SHARD}, count(*) FROM inserted
            ON CONFLICT (queue, shard) DO UPDATE SET enqueued = c.enqueued + excluded.enqueued)
SELECT id FROM inserted""",
    CLAIM=_PG_CLAIM.format(order="priority DESC, run_at, id"),
    CLAIM_TRIAL=_PG_CLAIM.format(order="attempts, priority DESC, run_at, id"),
    COMPLETE=_pg_counted(f"""
UPDATE tasks t SET state = 'succeeded', result = done.result, lease_until = NULL, finished_at = {NOW}
FROM jsonb_to_recordset(%(done)s::jsonb) AS done(id bigint, result text, attempt integer)
WHERE t.id = done.id AND t.state = 'running' AND t.worker = %(worker)s
  AND (done.attempt IS NULL OR t.attempts = done.attempt)
RETURNING t.id""", "succeeded"),
    FAIL=f"""UPDATE tasks SET {_PG_FAIL_SET}
WHERE id = %(id)s AND state = 'running' AND worker = %(worker)s
  AND (%(attempt)s::integer IS NULL OR attempts = %(attempt)s) RETURNING id, queue, state""",
    # Any daemon rescues expired leases, a bounded batch at a time; SKIP LOCKED lets two
    # daemons doing it at once split the work instead of queueing behind each other.
    REQUEUE_EXPIRED=f"""
WITH expired AS MATERIALIZED (
    SELECT id FROM tasks WHERE state = 'running' AND lease_until < {NOW}
    ORDER BY lease_until LIMIT %(batch)s FOR UPDATE SKIP LOCKED)
UPDATE tasks SET {_PG_FAIL_SET}
FROM expired WHERE tasks.id = expired.id AND tasks.state = 'running'
RETURNING tasks.id, tasks.queue, tasks.state""",
    FAIL_WORKER=f"""UPDATE tasks SET {_PG_FAIL_SET}
WHERE state = 'running' AND worker = %(worker)s RETURNING id, queue, state""",
    EXTEND=f"""UPDATE tasks SET lease_until = {NOW} + coalesce(%(seconds)s, timeout)
WHERE id = %(id)s AND state = 'running' AND worker = %(worker)s
  AND (%(attempt)s::integer IS NULL OR attempts = %(attempt)s)""",
)

ENGINES = {"sqlite": SQLITE, "postgresql": POSTGRES}


def statements(db) -> SimpleNamespace:
    """The block of statements for ``db``'s engine."""
    return ENGINES[db.engine]
