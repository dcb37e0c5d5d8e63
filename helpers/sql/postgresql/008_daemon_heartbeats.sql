-- Version 8 (PostgreSQL): the same columns as sqlite/008_daemon_heartbeats.sql.

ALTER TABLE daemon_status ADD COLUMN host text NOT NULL DEFAULT '',
    ADD COLUMN started_at double precision NOT NULL DEFAULT 0,
    ADD COLUMN workers text NOT NULL DEFAULT '[]',
    ADD COLUMN rescued_at double precision;
