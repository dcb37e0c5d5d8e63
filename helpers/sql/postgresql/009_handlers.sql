-- Version 9 (PostgreSQL): the same table as sqlite/009_handlers.sql.

CREATE TABLE handlers (
    name          text PRIMARY KEY,
    queue         text NOT NULL,
    max_attempts  integer,
    timeout       double precision,
    updated_at    double precision NOT NULL
);
