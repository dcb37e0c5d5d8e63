-- Version 4 (SQLite): a worker asked from the dashboard to drain or stop. The worker's own
-- daemon reads the row (once a second), acts on it and deletes it.

CREATE TABLE worker_requests (
    worker       TEXT PRIMARY KEY,       -- host:pid, as the tasks' ``worker`` column
    action       TEXT NOT NULL,          -- drain (finish the task, then exit) or stop (exit now)
    requested_at REAL NOT NULL
);
