-- Sessions: one row per session key. Tokens are sealed (AEAD) by the
-- application before they reach this table; the key is stored only as its
-- SHA-256 hash.
CREATE TABLE sessions (
    id              TEXT PRIMARY KEY NOT NULL,
    provider        TEXT NOT NULL,
    label           TEXT,
    key_hash        BLOB NOT NULL UNIQUE,
    access_token    BLOB NOT NULL,
    refresh_token   BLOB,
    expires_at      INTEGER,            -- unix seconds; NULL when the provider gave no lifetime
    status          TEXT NOT NULL DEFAULT 'active',
    version         INTEGER NOT NULL DEFAULT 1,  -- bumped on every token change (compare-and-swap)
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    last_refresh_at INTEGER
);

-- Every change to a session (tokens replaced, status, revoke) appends a row
-- here in the same transaction, so other processes sharing the store can
-- drop their cached copy: servers poll `seq > cursor`.
CREATE TABLE session_changes (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL,
    at         INTEGER NOT NULL
);
CREATE INDEX session_changes_at ON session_changes (at);
