-- Version 11 (SQLite): the dashboard's logins, kept on the server so logging out ends one for
-- good (a copied cookie opens nothing after), and a changed token ends every login made with
-- the old one (token_hash: a SHA-256 of the token it was made with, never the token).

CREATE TABLE dashboard_logins (
    id          TEXT PRIMARY KEY,   -- the random id the login cookie carries
    role        TEXT NOT NULL,      -- operator | viewer
    token_hash  TEXT NOT NULL,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL
) WITHOUT ROWID;
