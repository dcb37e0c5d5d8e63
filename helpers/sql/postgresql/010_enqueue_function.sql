-- Version 10 (PostgreSQL): enqueue from SQL, inside the caller's own transaction, from any
-- language: SELECT oos_enqueue(queue => 'emails', task => 'send_receipt', payload => '{"order": 42}').
-- It makes the same task as QueueManager.enqueue: the same checks (an error names the field,
-- in its COLUMN too, and writes nothing), the handler's attempts and timeout when none are
-- given (the handlers table), then the config's defaults (5, 300 s), idempotency and unique
-- keys, the queue's counters, and a NOTIFY hint that PostgreSQL delivers at COMMIT: a rolled
-- back task is never seen, a committed one wakes a worker at once. tests/test_transactional.py
-- holds it to the Python enqueue's rules. Times are the server's.

CREATE FUNCTION oos_enqueue(queue text, task text, payload jsonb DEFAULT 'null'::jsonb,
                            delay double precision DEFAULT 0, priority integer DEFAULT 0,
                            idempotency_key text DEFAULT NULL, max_attempts integer DEFAULT NULL,
                            timeout double precision DEFAULT NULL, unique_key text DEFAULT NULL,
                            unique_for double precision DEFAULT NULL, run_at double precision DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    now_ double precision := extract(epoch FROM statement_timestamp());
    body text := coalesce(payload, 'null'::jsonb)::text;
    found bigint;
BEGIN
    IF queue IS NULL OR queue !~ '^[A-Za-z0-9_.:-]{1,100}$' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'queue',
            MESSAGE = 'queue: expected 1-100 characters of letters, digits, ''_'', ''.'', '':'' or ''-''';
    END IF;
    IF task IS NULL OR length(task) NOT BETWEEN 1 AND 200 OR btrim(task) = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'task',
            MESSAGE = 'task: expected a non-empty name of at most 200 characters';
    END IF;
    IF octet_length(body) > 1048576 THEN
        RAISE EXCEPTION USING ERRCODE = 'program_limit_exceeded', COLUMN = 'payload',
            MESSAGE = format('payload: %s bytes is over the limit of 1048576 bytes', octet_length(body));
    END IF;
    IF priority IS NULL OR priority NOT BETWEEN -1000000 AND 1000000 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'priority',
            MESSAGE = 'priority: must be between -1000000 and 1000000';
    END IF;
    IF delay IS NULL OR delay = 'NaN' OR delay NOT BETWEEN 0 AND 315360000 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'delay',
            MESSAGE = 'delay: must be a number between 0 and 315360000 seconds';
    END IF;
    IF run_at IS NOT NULL AND (run_at = 'NaN' OR run_at IN ('Infinity', '-Infinity')) THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'run_at',
            MESSAGE = 'run_at: must be a finite number';
    END IF;
    IF run_at IS NOT NULL AND delay <> 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'delay',
            MESSAGE = 'delay: give delay or run_at, not both';
    END IF;
    IF max_attempts IS NOT NULL AND max_attempts NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'max_attempts',
            MESSAGE = 'max_attempts: must be between 1 and 1000';
    END IF;
    IF timeout IS NOT NULL AND (timeout = 'NaN' OR timeout NOT BETWEEN 0.001 AND 604800) THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'timeout',
            MESSAGE = 'timeout: must be between 0.001 and 604800 seconds';
    END IF;
    IF idempotency_key IS NOT NULL AND length(idempotency_key) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'idempotency_key',
            MESSAGE = 'idempotency_key: expected 1-200 characters';
    END IF;
    IF unique_key IS NOT NULL AND length(unique_key) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'unique_key',
            MESSAGE = 'unique_key: expected 1-200 characters';
    END IF;
    IF unique_for IS NOT NULL AND unique_key IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'unique_for',
            MESSAGE = 'unique_for: needs unique_key';
    END IF;
    IF unique_for IS NOT NULL AND (unique_for = 'NaN' OR unique_for <= 0 OR unique_for > 31536000) THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'unique_for',
            MESSAGE = 'unique_for: must be above 0 and at most 31536000 seconds';
    END IF;

    IF unique_key IS NOT NULL THEN  -- enqueues of one key take turns, on every host
        PERFORM pg_advisory_xact_lock(hashtext(oos_enqueue.unique_key));
        SELECT t.id INTO found FROM tasks t WHERE t.unique_key = oos_enqueue.unique_key
            AND t.state IN ('queued', 'waiting', 'running') AND t.unique_until > now_ ORDER BY t.id DESC LIMIT 1;
        IF found IS NOT NULL THEN
            RETURN found;
        END IF;
    END IF;
    -- (Inside statements a bare name is a column: the parameters are written oos_enqueue.name.)
    INSERT INTO queues (name) VALUES (oos_enqueue.queue) ON CONFLICT DO NOTHING;
    INSERT INTO tasks AS t (queue, name, payload, priority, run_at, max_attempts, timeout, idempotency_key,
                            created_at, unique_key, unique_until, state, waiting_on)
    VALUES (oos_enqueue.queue, oos_enqueue.task, body, oos_enqueue.priority,
            coalesce(oos_enqueue.run_at, now_ + oos_enqueue.delay),
            coalesce(oos_enqueue.max_attempts, (SELECT h.max_attempts FROM handlers h WHERE h.name = oos_enqueue.task), 5),
            coalesce(oos_enqueue.timeout, (SELECT h.timeout FROM handlers h WHERE h.name = oos_enqueue.task), 300),
            oos_enqueue.idempotency_key, now_, oos_enqueue.unique_key,
            CASE WHEN oos_enqueue.unique_key IS NOT NULL THEN now_ + coalesce(oos_enqueue.unique_for, 3600) END,
            'queued', 0)
    ON CONFLICT (queue, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING t.id INTO found;
    IF found IS NULL THEN  -- the key names a task already stored: that one, nothing new
        SELECT t.id INTO found FROM tasks t WHERE t.queue = oos_enqueue.queue
            AND t.idempotency_key = oos_enqueue.idempotency_key;
        RETURN found;
    END IF;
    INSERT INTO queue_counts AS c (queue, shard, enqueued) VALUES (oos_enqueue.queue, mod(pg_backend_pid(), 16), 1)
        ON CONFLICT (queue, shard) DO UPDATE SET enqueued = c.enqueued + 1;
    PERFORM pg_notify('oos_ready', queue);  -- delivered at COMMIT, never for a rollback
    RETURN found;
END
$$;

-- Many tasks of one queue: tasks is a JSON array of objects with the same fields as
-- oos_enqueue's (task, payload, delay, priority, ...). Returns their ids in order; an error
-- names the task's index (tasks[2].priority) and writes nothing.
CREATE FUNCTION oos_enqueue_many(queue text, tasks jsonb) RETURNS SETOF bigint LANGUAGE plpgsql AS $$
DECLARE
    item jsonb;
    i integer := 0;
    message text;
    field text;
    state text;
BEGIN
    IF tasks IS NULL OR jsonb_typeof(tasks) <> 'array' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'tasks',
            MESSAGE = 'tasks: expected a JSON array of tasks';
    END IF;
    FOR item IN SELECT value FROM jsonb_array_elements(tasks) LOOP
        BEGIN
            IF jsonb_typeof(item) <> 'object' THEN
                RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = '',
                    MESSAGE = 'expected an object';
            END IF;
            RETURN NEXT oos_enqueue(queue => queue, task => item->>'task',
                payload => coalesce(item->'payload', 'null'::jsonb),
                delay => coalesce((item->>'delay')::double precision, 0),
                priority => coalesce((item->>'priority')::integer, 0),
                idempotency_key => item->>'idempotency_key', max_attempts => (item->>'max_attempts')::integer,
                timeout => (item->>'timeout')::double precision, unique_key => item->>'unique_key',
                unique_for => (item->>'unique_for')::double precision,
                run_at => (item->>'run_at')::double precision);
        EXCEPTION WHEN invalid_parameter_value OR program_limit_exceeded OR invalid_text_representation
                       OR numeric_value_out_of_range THEN
            GET STACKED DIAGNOSTICS message = MESSAGE_TEXT, field = COLUMN_NAME, state = RETURNED_SQLSTATE;
            RAISE EXCEPTION USING ERRCODE = state, COLUMN = format('tasks[%s]%s', i, CASE WHEN field <> '' THEN '.' || field ELSE '' END),
                MESSAGE = format('tasks[%s]%s', i, CASE WHEN field <> '' THEN '.' || message ELSE ': ' || message END);
        END;
        i := i + 1;
    END LOOP;
END
$$;
