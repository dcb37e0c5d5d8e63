-- Version 9 (SQLite): the handlers the daemons have loaded, with what their @task declares. An
-- enqueue that gives no max_attempts or timeout takes the handler's from here, so a producer
-- that never imports the handler's module (a web app elsewhere, a script, SQL) gets the same
-- task as one that does; no row: the queue's config defaults.

CREATE TABLE handlers (
    name          TEXT PRIMARY KEY,
    queue         TEXT    NOT NULL,
    max_attempts  INTEGER,            -- NULL: the handler declares none
    timeout       REAL,
    updated_at    REAL    NOT NULL    -- when a daemon last loaded it
) WITHOUT ROWID;
