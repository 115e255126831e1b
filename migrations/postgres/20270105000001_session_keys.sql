-- Several keys per session (issue 25): see migrations/sqlite for the
-- columns. Every existing session's key becomes its first key, unlimited.
CREATE TABLE session_keys (
    key_id        TEXT PRIMARY KEY,
    session_id    TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    key_hash      BYTEA NOT NULL UNIQUE,
    label         TEXT,
    methods       TEXT,
    paths         TEXT,
    rate_requests BIGINT,
    rate_per_ms   BIGINT,
    expires_at    BIGINT,
    created_at    BIGINT NOT NULL,
    last_used_at  BIGINT
);
CREATE INDEX session_keys_session ON session_keys (session_id);

INSERT INTO session_keys (key_id, session_id, key_hash, created_at)
    SELECT 'k_' || substr(id, 3), id, key_hash, created_at FROM sessions;
