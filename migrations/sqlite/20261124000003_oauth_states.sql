-- One-time `state` values of the OAuth connect flow, stored as SHA-256
-- hashes. Kept in the store (not in memory) so that several instances
-- sharing it accept each other's callbacks, and so that `credproxy connect`
-- can wait for the callback from another process.
CREATE TABLE oauth_states (
    state_hash   BLOB PRIMARY KEY NOT NULL,
    provider     TEXT NOT NULL,
    session_id   TEXT,             -- reconnect: the session whose tokens are replaced
    key_hash     BLOB,             -- a key chosen by `credproxy connect` for the new session
    created_at   INTEGER NOT NULL, -- unix seconds; valid for 10 minutes
    used_at      INTEGER,          -- set when a callback consumed it
    result_session_id TEXT,        -- the session the callback stored
    failure      TEXT              -- why the callback failed (no secrets)
);
CREATE INDEX oauth_states_created ON oauth_states (created_at);
