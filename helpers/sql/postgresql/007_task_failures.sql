-- Version 7 (PostgreSQL): the same column as sqlite/007_task_failures.sql.

ALTER TABLE tasks ADD COLUMN failures integer NOT NULL DEFAULT 0;
