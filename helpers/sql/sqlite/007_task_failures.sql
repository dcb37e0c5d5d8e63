-- Version 7 (SQLite): how many of a task's attempts its own handler failed (raised, or ran out
-- of time), apart from attempts lost to a dead worker or host. A breaker counts only a task's
-- first such failure, and its trial prefers tasks with none (helpers/breaker.py).

ALTER TABLE tasks ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
