-- Version 13 (PostgreSQL): per task name, per minute, what each worker saw; see the SQLite
-- migration of the same number.

CREATE TABLE task_minutes (
    minute        double precision NOT NULL,
    queue         text    NOT NULL,
    name          text    NOT NULL,
    worker        text    NOT NULL,
    runs          bigint  NOT NULL,
    failures      bigint  NOT NULL,
    run_seconds   double precision NOT NULL,
    wait_seconds  double precision NOT NULL,
    run_buckets   text    NOT NULL,
    wait_buckets  text    NOT NULL,
    PRIMARY KEY (minute, queue, name, worker)
);
