-- Version 4 (PostgreSQL): the same table as sqlite/004_worker_requests.sql.

CREATE TABLE worker_requests (
    worker       text PRIMARY KEY,
    action       text NOT NULL,
    requested_at double precision NOT NULL
);
