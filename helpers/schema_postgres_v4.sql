-- Version 4 (PostgreSQL): the same table as schema_v4.sql.

CREATE TABLE worker_requests (
    worker       text PRIMARY KEY,
    action       text NOT NULL,
    requested_at double precision NOT NULL
);
