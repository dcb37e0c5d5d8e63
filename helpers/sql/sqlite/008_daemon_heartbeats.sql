-- Version 8 (SQLite): a row per daemon, as on PostgreSQL, so several daemons on one file (each
-- serving its own queues) are all seen, and a daemon that stops beating is noticed. The old
-- single row was a status cache each daemon rewrites every second: nothing is lost.
-- daemon: host:pid of its manager; updated_at: its last beat (every second); workers: JSON, the
-- ids its workers hold leases under, whose running tasks survivors fail when it stops beating;
-- rescued_at: when a survivor did (NULL while it beats).

DROP TABLE daemon_status;
CREATE TABLE daemon_status (
    daemon      TEXT    PRIMARY KEY,
    host        TEXT    NOT NULL,
    pid         INTEGER NOT NULL,
    started_at  REAL    NOT NULL,
    updated_at  REAL    NOT NULL,
    workers     TEXT    NOT NULL DEFAULT '[]',
    rescued_at  REAL,
    status      TEXT    NOT NULL   -- JSON
) WITHOUT ROWID;
