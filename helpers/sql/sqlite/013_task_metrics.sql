-- Version 13 (SQLite): per task name, per minute, what each worker saw (helpers/task_metrics.py):
-- runs, failures, and run time and queue wait as counts per bucket (JSON lists, one count per
-- bound of task_metrics.BOUNDS and one above). A worker rewrites its own rows of the minute;
-- readers add the rows of every worker. Pruned with the queue history.

CREATE TABLE task_minutes (
    minute        REAL    NOT NULL,
    queue         TEXT    NOT NULL,
    name          TEXT    NOT NULL,
    worker        TEXT    NOT NULL,
    runs          INTEGER NOT NULL,
    failures      INTEGER NOT NULL,
    run_seconds   REAL    NOT NULL,
    wait_seconds  REAL    NOT NULL,
    run_buckets   TEXT    NOT NULL,
    wait_buckets  TEXT    NOT NULL,
    PRIMARY KEY (minute, queue, name, worker)
) WITHOUT ROWID;
