"""The queue's semantics, as SQL: one block per engine, the same statements by name.

States: queued -> running (a lease held by one worker) -> succeeded | queued again (retry after
backoff) | dead (the dead letter); queued -> cancelled; running -> cancelled (a cancel was
asked: it is never retried). A workflow step is ``waiting`` for its dependencies, then queued;
``blocked`` while one of them is dead (the triggers of sql/*/002_jobs_workflows_limits_schedules.sql move the steps on). Every statement a worker makes about a
task it claimed is fenced by ``state = 'running' AND worker = <its id> AND attempts = <the
attempt it claimed>``: a worker whose lease ran out changes nothing, even when the task has
since been claimed again by someone else, or by that same worker (the river#1302 lesson).

``:now`` is the caller's clock. On PostgreSQL a caller may pass None instead, and the server's
clock is used: daemons on hosts with skewed clocks then agree on when a lease runs out.
"""
from __future__ import annotations

from types import SimpleNamespace

# -- statements that read the same on both engines ----------------------------------------


# A claimed task given back unstarted: the attempt is not counted.
_GIVE_BACK = """state = CASE WHEN cancel_requested IS NOT NULL THEN 'cancelled' ELSE 'queued' END,
    finished_at = cancel_requested, attempts = attempts - 1, lease_until = NULL, worker = NULL, started_at = NULL"""


def _timed(now: str, least: str, lock: str) -> dict:
    """The statements that read the clock; ``now``: the engine's time expression, ``least``:
    its two-argument minimum, ``lock``: how a read locks its row for the transaction."""
    return dict(
        # One task with every column: an idempotency key (nothing if the key is taken), a
        # unique key, a workflow step.
        INSERT_ONE=f"""
INSERT INTO tasks (queue, name, payload, priority, run_at, max_attempts, timeout, idempotency_key, created_at,
                   unique_key, unique_until, state, workflow, waiting_on)
VALUES (:queue, :name, :payload, :priority, coalesce(:run_at, {now} + :delay), :max_attempts, :timeout,
        :idempotency_key, {now}, :unique_key, {now} + :unique_for, :state, :workflow, :waiting_on)
ON CONFLICT (queue, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id""",
        # The task that holds a unique key: queued, waiting or running, and within its TTL.
        UNIQUE_HOLDER=f"""SELECT id FROM tasks WHERE unique_key = :unique_key
AND state IN ('queued', 'waiting', 'running') AND unique_until > {now} ORDER BY id DESC LIMIT 1""",
        # A task name's bucket: refilled at per_second up to burst; the tokens in it now.
        TOKENS=f"""SELECT rate, per_second, {least}(burst, tokens + ({now} - updated_at) * per_second) AS tokens
FROM task_rate_limits WHERE name = :name {lock}""",
        # Tokens taken (in the transaction that read TOKENS): what is left, as of now.
        SPEND_TOKENS=f"UPDATE task_rate_limits SET tokens = :left, updated_at = {now} WHERE name = :name",
        SET_RATE_LIMIT=f"""INSERT INTO task_rate_limits (name, rate, per_second, burst, tokens, updated_at)
VALUES (:name, :rate, :per_second, :burst, :burst, {now})
ON CONFLICT (name) DO UPDATE SET rate = excluded.rate, per_second = excluded.per_second, burst = excluded.burst,
    tokens = {least}(task_rate_limits.tokens, excluded.burst)""",
        # Has the queue a task to claim now? A read: an idle worker asks before it claims, as
        # a claim takes SQLite's write lock even when it finds nothing.
        ANY_READY=f"""SELECT EXISTS (SELECT 1 FROM tasks WHERE queue = :queue AND state = 'queued' AND run_at <= {now})
  AND NOT EXISTS (SELECT 1 FROM queues WHERE name = :queue AND paused <> 0)""",
        # A task waiting for its delay or backoff is due now (the dashboard's "Run now").
        RUN_NOW=f"""UPDATE tasks SET run_at = {now} WHERE id = :id AND state = 'queued' AND run_at > {now}
RETURNING queue""",
        # A claimed task given back to wait for its rate limit: the attempt is not counted.
        SNOOZE=f"""UPDATE tasks SET {_GIVE_BACK}, run_at = {now} + :seconds
WHERE id = :id AND state = 'running' AND worker = :worker AND attempts = :attempt""",
    )


PORTABLE = dict(
    FIND_KEY="SELECT id FROM tasks WHERE queue = :queue AND idempotency_key = :idempotency_key",
    # A worker was stopped by the daemon's shutdown, or a claimed task is handed back: the
    # task goes back untouched and the attempt is not counted.
    # (One asked to cancel meanwhile is cancelled instead: it never runs again.)
    RELEASE=f"""UPDATE tasks SET {_GIVE_BACK}
WHERE id = :id AND state = 'running' AND worker = :worker AND (:attempt IS NULL OR attempts = :attempt)""",
    RELEASE_WORKER=f"""UPDATE tasks SET {_GIVE_BACK}
WHERE state = 'running' AND worker = :worker""",
    CANCEL="""UPDATE tasks SET state = 'cancelled', finished_at = :now
WHERE id = :id AND state IN ('queued', 'waiting', 'blocked')""",
    # A running task is cancelled by its worker (the handler's context says so; after a grace
    # the worker interrupts it, or the manager replaces the worker); see the fail statements.
    REQUEST_CANCEL="""UPDATE tasks SET cancel_requested = :now
WHERE id = :id AND state = 'running' AND cancel_requested IS NULL""",
    CANCEL_OVERDUE="SELECT id, worker FROM tasks WHERE state = 'running' AND cancel_requested < :before",
    CANCEL_REQUESTED="SELECT cancel_requested FROM tasks WHERE id = :id AND state = 'running'",
    # Every task of the queue that has not started: cancelled (steps after them too).
    PURGE_QUEUE="""UPDATE tasks SET state = 'cancelled', finished_at = :now
WHERE queue = :queue AND state IN ('queued', 'waiting', 'blocked')""",
    PROGRESS="""UPDATE tasks SET progress = :progress, progress_message = :message
WHERE id = :id AND state = 'running' AND worker = :worker AND attempts = :attempt""",
    WATCH="UPDATE tasks SET watched = 1 WHERE id = :id RETURNING state",
    SET_CONCURRENCY="""INSERT INTO queues (name, concurrency) VALUES (:queue, :concurrency)
ON CONFLICT (name) DO UPDATE SET concurrency = excluded.concurrency""",
    CONCURRENCY="SELECT concurrency FROM queues WHERE name = :queue",
    RUNNING_IN_QUEUE="SELECT count(*) FROM tasks WHERE queue = :queue AND state = 'running'",
    DROP_RATE_LIMIT="DELETE FROM task_rate_limits WHERE name = :name",
    RATE_LIMITS="SELECT name, rate, per_second, burst FROM task_rate_limits ORDER BY name",
    # Claim order, for "N tasks ahead of it".
    AHEAD="""SELECT count(*) FROM tasks WHERE queue = :queue AND state = 'queued' AND run_at <= :now
AND (priority > :priority OR (priority = :priority AND (run_at < :run_at OR (run_at = :run_at AND id < :id))))""",
    # Workflows: a step's dependencies, and the results it receives (in order).
    DEPENDS="INSERT INTO task_deps (depends_on, task_id, position) VALUES (:depends_on, :task_id, :position)",
    SET_WORKFLOW="UPDATE tasks SET workflow = :workflow WHERE id = :id",
    DEPENDENCIES="""SELECT t.id, t.name, t.state, t.result FROM task_deps d JOIN tasks t ON t.id = d.depends_on
WHERE d.task_id = :id ORDER BY d.position""",
    WORKFLOW_STEPS="SELECT * FROM tasks WHERE workflow = :workflow ORDER BY id",
    WORKFLOW_EDGES="""SELECT d.depends_on, d.task_id FROM task_deps d JOIN tasks t ON t.id = d.task_id
WHERE t.workflow = :workflow ORDER BY d.task_id, d.position""",
    ENSURE_QUEUE="INSERT INTO queues (name) VALUES (:queue) ON CONFLICT DO NOTHING",
    SET_PAUSED="""INSERT INTO queues (name, paused) VALUES (:queue, :paused)
ON CONFLICT (name) DO UPDATE SET paused = excluded.paused""",
    # Finished work past its retention, in bounded batches (each its own short transaction).
    PRUNE=(
        """DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE state IN ('dead', 'blocked')
                                         AND finished_at < :dead_before LIMIT :batch)""",
        """DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE state IN ('succeeded', 'cancelled')
                                         AND finished_at < :finished_before LIMIT :batch)""",
        """DELETE FROM task_deps WHERE (depends_on, task_id) IN (SELECT depends_on, task_id FROM task_deps d
           WHERE NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = d.task_id) LIMIT :batch)""",
        """UPDATE tasks SET result = NULL WHERE id IN (SELECT id FROM tasks WHERE state = 'succeeded'
           AND finished_at < :result_before AND result IS NOT NULL LIMIT :batch)""",
    ),
    # The wall clock stepped by :step (SQLite: the times stored are this host's): leases, and
    # due times not yet reached by the clock before the step (:then), move with it.
    REBASE=("UPDATE tasks SET lease_until = lease_until + :step WHERE state = 'running' AND lease_until IS NOT NULL",
            "UPDATE tasks SET run_at = run_at + :step WHERE state = 'queued' AND run_at > :then"),
    GET="SELECT * FROM tasks WHERE id = :id",
    STATE="SELECT state FROM tasks WHERE id = :id",
    # A queue's tasks by state, from the counters the writes keep (sql/*/012_task_counts.sql),
    # and its running tasks counted from the index (one statement: one snapshot of both).
    COUNTS="""SELECT state, CAST(sum(n) AS BIGINT) AS n FROM task_counts WHERE queue = :queue GROUP BY state
UNION ALL SELECT 'running', count(*) FROM tasks WHERE queue = :queue AND state = 'running'""",
    # Its queued tasks not yet due, and the earliest due time: one short index range per
    # priority level (a skip scan written out), so millions of ready tasks are never read.
    DUE="""WITH RECURSIVE levels(priority) AS (
    SELECT max(priority) FROM tasks WHERE queue = :queue AND state = 'queued'
    UNION ALL
    SELECT (SELECT max(priority) FROM tasks WHERE queue = :queue AND state = 'queued' AND priority < levels.priority)
    FROM levels WHERE levels.priority IS NOT NULL)
SELECT CAST(coalesce(sum((SELECT count(*) FROM tasks WHERE queue = :queue AND state = 'queued'
                          AND priority = levels.priority AND run_at > :now)), 0) AS BIGINT) AS delayed,
       min((SELECT min(run_at) FROM tasks WHERE queue = :queue AND state = 'queued'
            AND priority = levels.priority)) AS first_due
FROM levels WHERE priority IS NOT NULL""",
    RECENT="SELECT count(*) FROM tasks WHERE state = 'succeeded' AND finished_at >= :since AND queue = :queue",
    QUEUE_NAMES="SELECT name FROM queues ORDER BY name",
    HANDLER_DEFAULT="SELECT name, max_attempts, timeout FROM handlers WHERE name = :name",
    # A queue something uses: its row (made by an enqueue, or on purpose), a handler or a schedule.
    KNOWN_QUEUE="""SELECT EXISTS (SELECT 1 FROM queues WHERE name = :queue)
    OR EXISTS (SELECT 1 FROM handlers WHERE queue = :queue) OR EXISTS (SELECT 1 FROM schedules WHERE queue = :queue)""",
    RUNNING_WORKERS="SELECT DISTINCT worker FROM tasks WHERE state = 'running'",
)

# Dead letter: list, replay (attempts start again; the error history stays), purge.
# (finished_at IS NOT NULL: always true of a dead task; it lets SQLite read its partial index
# on (state, finished_at), newest first, instead of scanning every task.)
DEAD_FILTER = """state = 'dead' AND finished_at IS NOT NULL AND (:queue IS NULL OR queue = :queue) AND (:id IS NULL OR id = :id)
    AND (:name IS NULL OR name = :name)"""
PORTABLE.update(
    LIST_DEAD=f"""SELECT * FROM tasks WHERE {DEAD_FILTER}
ORDER BY finished_at DESC, id DESC LIMIT :limit OFFSET :offset""",
    COUNT_DEAD=f"SELECT count(*) FROM tasks WHERE {DEAD_FILTER}",
    PURGE_DEAD=f"DELETE FROM tasks WHERE {DEAD_FILTER} AND finished_at <= :before",
)



def _replay_dead(replayed: str) -> str:
    """Dead tasks queued again with fresh attempts; ``replayed``: the engine's expression for
    their error history with a line saying so appended (the next failure is "attempt 1" again:
    the line shows where the new attempts start)."""
    return f"""UPDATE tasks SET state = 'queued', attempts = 0, run_at = :now, finished_at = NULL, errors = {replayed}
WHERE {DEAD_FILTER}"""


# A breaker's half-open trial takes a task its handler never failed when there is one, newest
# first: a retry of a poison task, or the next of the tasks whose failures opened the breaker,
# would only reopen it, and healthy work would starve behind them.
TRIAL_ORDER = "failures, priority DESC, id DESC"

# A claim given :breaker (a breaker's name, or NULL for none) takes nothing unless that breaker
# is closed: a worker's claim reads it in the same statement, not in a round trip before each.

# -- SQLite --------------------------------------------------------------------------------

_SQLITE_CLAIM = """
UPDATE tasks SET state = 'running', worker = :worker, attempts = attempts + 1,
                 lease_until = :now + timeout + :grace, started_at = :now
WHERE id IN (SELECT id FROM tasks
             WHERE queue = :queue AND state = 'queued' AND run_at <= :now
             ORDER BY {order} LIMIT {limit})
  AND NOT EXISTS (SELECT 1 FROM queues WHERE name = :queue AND paused)
  AND NOT EXISTS (SELECT 1 FROM breakers WHERE name = :breaker AND state <> 'closed')
RETURNING *"""
# A queue with a concurrency limit: no more than the room left under it. Exact, since SQLite
# writers take turns.
_ROOM = """max(0, min(:limit, coalesce((SELECT concurrency FROM queues WHERE name = :queue)
    - (SELECT count(*) FROM tasks WHERE queue = :queue AND state = 'running'), :limit)))"""

# A failed attempt, shared by fail_task and by expired leases: retry after the backoff for
# this attempt, or dead-letter after the last one (or at once when :final).
_SQLITE_FAIL_SET = """
    state = CASE WHEN cancel_requested IS NOT NULL THEN 'cancelled'
                 WHEN attempts >= max_attempts OR :final THEN 'dead' ELSE 'queued' END,
    run_at = CASE WHEN cancel_requested IS NOT NULL OR attempts >= max_attempts OR :final THEN run_at
                  ELSE :now + json_extract(:delays, '$[' || (min(attempts, :steps) - 1) || ']') END,
    finished_at = CASE WHEN cancel_requested IS NOT NULL OR attempts >= max_attempts OR :final THEN :now END,
    errors = json_insert(errors, '$[#]', json_object(
        'attempt', attempts, 'at', :now, 'worker', worker,
        'error', coalesce(:error, 'lease expired: worker ' || worker || ' stopped responding'))),
    last_error = coalesce(:error, 'lease expired: worker ' || worker || ' stopped responding'),
    failures = failures + :handler, lease_until = NULL, worker = NULL"""

SQLITE = SimpleNamespace(
    **PORTABLE,
    REPLAY_DEAD=_replay_dead("json_insert(errors, '$[#]', json_object('replayed', json('true'), 'at', :now))"),
    NOW_OR_GIVEN=":now",  # the time a statement was given (one host: its clock)
    PAYLOAD_CONTAINS="instr(payload, :text) > 0",
    # What the daemons published of these handlers (:names, a JSON list).
    HANDLER_DEFAULTS="SELECT name, max_attempts, timeout FROM handlers WHERE name IN (SELECT value FROM json_each(:names))",
    LOCK_UNIQUE_KEY=None,  # the transaction holds the file's one write lock already
    **_timed(":now", "min", ""),  # SQLite: the transaction holds the write lock already
    # Lifetime counters, bumped once per transaction by whatever changed the tasks.
    # Also makes the queue's row when it has none (an enqueue needs no statement of its own for that).
    COUNT="""INSERT INTO queues (name, enqueued, succeeded, failed, dead) VALUES (:queue, :enqueued, :succeeded,
    :failed, :dead) ON CONFLICT (name) DO UPDATE SET enqueued = enqueued + excluded.enqueued,
    succeeded = succeeded + excluded.succeeded, failed = failed + excluded.failed, dead = dead + excluded.dead""",
    QUEUE_ROW="SELECT * FROM queues WHERE name = :queue",
    COUNTS_IN_STATEMENT=False,  # INSERT and COMPLETE leave the counters to COUNT
    INSERT="""
INSERT INTO tasks (queue, name, payload, priority, run_at, max_attempts, timeout, idempotency_key, created_at)
VALUES (:queue, :name, :payload, :priority, coalesce(:run_at, :now + :delay), :max_attempts, :timeout,
        :idempotency_key, :now)""",
    # One task on its own: the defaults its handler published, read inside the INSERT (a
    # statement fewer per call; a batch reads them once for all its rows instead).
    INSERT_DEFAULTED="""
INSERT INTO tasks (queue, name, payload, priority, run_at, max_attempts, timeout, idempotency_key, created_at)
VALUES (:queue, :name, :payload, :priority, coalesce(:run_at, :now + :delay),
        coalesce(:max_attempts, (SELECT max_attempts FROM handlers WHERE name = :name), :default_attempts),
        coalesce(:timeout, (SELECT timeout FROM handlers WHERE name = :name), :default_timeout),
        :idempotency_key, :now)""",
    CLAIM=_SQLITE_CLAIM.format(order="priority DESC, run_at, id", limit=":limit"),
    CLAIM_LIMITED=_SQLITE_CLAIM.format(order="priority DESC, run_at, id", limit=_ROOM),
    CLAIM_TRIAL_LIMITED=_SQLITE_CLAIM.format(order=TRIAL_ORDER, limit=_ROOM),
    LOCK_QUEUE=None,
    CLAIM_TRIAL=_SQLITE_CLAIM.format(order=TRIAL_ORDER, limit=":limit"),
    # :done is a JSON list of {"id", "result"}; returns the ids that were still held (and their
    # queues, for COUNT_SUCCEEDED).
    COMPLETE="""
UPDATE tasks SET state = 'succeeded', result = done.result, lease_until = NULL, finished_at = :now
FROM (SELECT json_extract(value, '$.id') AS id, json_extract(value, '$.result') AS result,
             json_extract(value, '$.attempt') AS attempt FROM json_each(:done)) AS done
WHERE tasks.id = done.id AND tasks.state = 'running' AND tasks.worker = :worker
  AND (done.attempt IS NULL OR tasks.attempts = done.attempt)
RETURNING id, queue""",
    # Completed tasks move from queued_or_running to succeeded in task_counts (in COMPLETE's
    # transaction: sql/sqlite/012_task_counts.sql leaves this one change to its owner).
    COUNT_SUCCEEDED="""INSERT INTO task_counts (queue, state, shard, n)
VALUES (:queue, 'queued_or_running', 0, -:n), (:queue, 'succeeded', 0, :n)
ON CONFLICT (queue, state, shard) DO UPDATE SET n = n + excluded.n""",
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
      AND NOT EXISTS (SELECT 1 FROM breakers WHERE name = %(breaker)s AND state <> 'closed')
    ORDER BY {{order}} LIMIT {{limit}}
    FOR UPDATE SKIP LOCKED)
UPDATE tasks t SET state = 'running', worker = %(worker)s, attempts = t.attempts + 1,
                   lease_until = {NOW} + t.timeout + %(grace)s, started_at = {NOW}
FROM picked WHERE t.id = picked.id
RETURNING t.*"""

_PG_ROOM = """greatest(0, least(%(limit)s, coalesce((SELECT concurrency FROM queues WHERE name = %(queue)s)
    - (SELECT count(*) FROM tasks WHERE queue = %(queue)s AND state = 'running'), %(limit)s)))"""

_PG_FAIL_SET = f"""
    state = CASE WHEN cancel_requested IS NOT NULL THEN 'cancelled'
                 WHEN attempts >= max_attempts OR %(final)s = 1 THEN 'dead' ELSE 'queued' END,
    run_at = CASE WHEN cancel_requested IS NOT NULL OR attempts >= max_attempts OR %(final)s = 1 THEN run_at
                  ELSE {NOW} + (%(delays)s::jsonb ->> (least(attempts, %(steps)s) - 1))::float8 END,
    finished_at = CASE WHEN cancel_requested IS NOT NULL OR attempts >= max_attempts OR %(final)s = 1
                       THEN {NOW} END,
    errors = (errors::jsonb || jsonb_build_array(jsonb_build_object(
        'attempt', attempts, 'at', {NOW}, 'worker', worker,
        'error', coalesce(%(error)s, 'lease expired: worker ' || worker || ' stopped responding'))))::text,
    last_error = coalesce(%(error)s, 'lease expired: worker ' || worker || ' stopped responding'),
    failures = failures + %(handler)s, lease_until = NULL, worker = NULL"""

# Which row of a counter a transaction adds to: drawn from its id, so concurrent writers seldom
# share one (each waits for the other's commit then); readers sum the rows.
_PG_SHARD = "mod(txid_current(), 64)"


def _pg_counted(statement: str, column: str) -> str:
    """``statement`` (``... RETURNING id, queue``: tasks that became ``column``) as one statement
    that also bumps ``column`` of the queue's lifetime counters and moves the tasks from
    ``queued_or_running`` to ``column`` in task_counts (see sql/postgresql/012_task_counts.sql):
    one round trip, atomic without BEGIN/COMMIT."""
    return f"""WITH changed AS ({statement}),
counted AS (INSERT INTO queue_counts AS c (queue, shard, {column})
            SELECT %(queue)s, {_PG_SHARD}, count(*) FROM changed HAVING count(*) > 0
            ON CONFLICT (queue, shard) DO UPDATE SET {column} = c.{column} + excluded.{column}),
moved AS (INSERT INTO task_counts AS m (queue, state, shard, n)
          SELECT changed.queue, s.state, {_PG_SHARD}, s.sign * count(*)
          FROM changed CROSS JOIN (VALUES ('queued_or_running', -1), ('{column}', 1)) AS s(state, sign)
          GROUP BY changed.queue, s.state, s.sign ORDER BY 1, 2
          ON CONFLICT (queue, state, shard) DO UPDATE SET n = m.n + excluded.n)
SELECT id FROM changed"""


POSTGRES = SimpleNamespace(
    **PORTABLE,
    REPLAY_DEAD=_replay_dead("(errors::jsonb || jsonb_build_array(jsonb_build_object('replayed', true, 'at', :now)))::text"),
    NOW_OR_GIVEN=f"coalesce(:now, {SERVER_NOW})",  # the server's clock unless a time is given
    PAYLOAD_CONTAINS="strpos(payload, :text) > 0",
    HANDLER_DEFAULTS="""SELECT name, max_attempts, timeout FROM handlers
WHERE name IN (SELECT jsonb_array_elements_text(%(names)s::jsonb))""",
    # Enqueues of one unique key take turns on every host (taken in sorted order: no deadlock).
    LOCK_UNIQUE_KEY="SELECT pg_advisory_xact_lock(hashtext(?))",
    **_timed(f"coalesce(:now, {SERVER_NOW})", "least", "FOR UPDATE"),
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
    SELECT r.queue, r.name, r.payload, r.priority, coalesce(r.run_at, {NOW} + r.delay),
           coalesce(r.max_attempts, h.max_attempts, %(default_attempts)s),
           coalesce(r.timeout, h.timeout, %(default_timeout)s), r.idempotency_key, {NOW}
    FROM jsonb_to_recordset(%(rows)s::jsonb) AS r(ord integer, queue text, name text, payload text,
         priority integer, run_at float8, delay float8, max_attempts integer, timeout float8,
         idempotency_key text)
    LEFT JOIN handlers h ON h.name = r.name
    ORDER BY r.ord
    RETURNING id),
counted AS (INSERT INTO queue_counts AS c (queue, shard, enqueued)
            SELECT %(queue)s, {_PG_SHARD}, count(*) FROM inserted
            ON CONFLICT (queue, shard) DO UPDATE SET enqueued = c.enqueued + excluded.enqueued)
SELECT id FROM inserted""",
    CLAIM=_PG_CLAIM.format(order="priority DESC, run_at, id", limit="%(limit)s"),
    CLAIM_TRIAL=_PG_CLAIM.format(order=TRIAL_ORDER, limit="%(limit)s"),
    # A queue with a concurrency limit: claims of it take turns on its queues row (LOCK_QUEUE,
    # in the same transaction, before the claim), so each counts the running tasks after the
    # previous one committed, on every host.
    LOCK_QUEUE="SELECT 1 FROM queues WHERE name = %(queue)s FOR UPDATE",
    CLAIM_LIMITED=_PG_CLAIM.format(order="priority DESC, run_at, id", limit=_PG_ROOM),
    CLAIM_TRIAL_LIMITED=_PG_CLAIM.format(order=TRIAL_ORDER, limit=_PG_ROOM),
    COMPLETE=_pg_counted(f"""
UPDATE tasks t SET state = 'succeeded', result = done.result, lease_until = NULL, finished_at = {NOW}
FROM jsonb_to_recordset(%(done)s::jsonb) AS done(id bigint, result text, attempt integer)
WHERE t.id = done.id AND t.state = 'running' AND t.worker = %(worker)s
  AND (done.attempt IS NULL OR t.attempts = done.attempt)
RETURNING t.id, t.queue""", "succeeded"),
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

# Browsing: only the filters given enter the statement (each a fixed fragment, its value a
# parameter), so the engine can pick the index that fits; newest first, keyset paging on id.
BROWSE_FILTERS = {
    "queue": "queue = :queue", "state": "state = :state", "name": "name = :name",
    "since": "created_at >= :since", "until": "created_at < :until", "before": "id < :before",
}


def browse(db, filters: dict, count: bool = False) -> str:
    """The statement listing tasks that match every filter in ``filters`` (keys of
    BROWSE_FILTERS, plus ``text``: the payload contains it), or counting them."""
    where = [BROWSE_FILTERS[k] for k in BROWSE_FILTERS if filters.get(k) is not None]
    if filters.get("text") is not None:
        where.append(statements(db).PAYLOAD_CONTAINS)
    where = " AND ".join(where) or "true"
    if count:
        return f"SELECT count(*) FROM tasks WHERE {where}"
    return f"SELECT * FROM tasks WHERE {where} ORDER BY id DESC LIMIT :limit"


def statements(db) -> SimpleNamespace:
    """The block of statements for ``db``'s engine."""
    return ENGINES[db.engine]
