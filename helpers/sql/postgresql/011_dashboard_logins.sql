-- Version 11 (PostgreSQL): the same table as sqlite/011_dashboard_logins.sql.

CREATE TABLE dashboard_logins (
    id          text PRIMARY KEY,
    role        text NOT NULL,
    token_hash  text NOT NULL,
    created_at  double precision NOT NULL,
    expires_at  double precision NOT NULL
);
