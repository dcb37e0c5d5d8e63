-- Version 3 (SQLite): the dashboard. What was done in it, and each queue's history per minute.

CREATE TABLE audit_log (
    id      INTEGER PRIMARY KEY,
    at      REAL NOT NULL,
    role    TEXT NOT NULL,               -- operator, viewer
    action  TEXT NOT NULL,               -- pause, resume, purge, retry, cancel, ...
    target  TEXT NOT NULL,               -- the queue or the task acted on
    detail  TEXT NOT NULL DEFAULT '',
    remote  TEXT                         -- the client's address
);

-- One row per queue per minute (written by the daemon's housekeeping, kept 7 days): the
-- lifetime counters then (rates are differences of neighbours) and the depth.
CREATE TABLE metrics_history (
    minute     REAL    NOT NULL,
    queue      TEXT    NOT NULL,
    enqueued   INTEGER NOT NULL,
    succeeded  INTEGER NOT NULL,
    failed     INTEGER NOT NULL,
    dead       INTEGER NOT NULL,
    queued     INTEGER NOT NULL,
    running    INTEGER NOT NULL,
    oldest_age REAL    NOT NULL,
    PRIMARY KEY (minute, queue)
) WITHOUT ROWID;
