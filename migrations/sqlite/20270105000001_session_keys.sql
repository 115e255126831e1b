-- Several keys per session (issue 25): one per application, each revocable
-- on its own and each limited to what it needs. A key is stored only as
-- its SHA-256 hash, like the session's first key. `methods` is NULL (any)
-- or a comma-separated list of methods; `paths` is NULL (any) or a JSON
-- array of patterns on the path after the provider's prefix; `rate_*` is
-- the key's own budget (`rate_requests` per `rate_per_ms` milliseconds),
-- NULL when it has none; `expires_at` (unix seconds) NULL when it never
-- expires. Deleting a session deletes its keys.
CREATE TABLE session_keys (
    key_id        TEXT PRIMARY KEY NOT NULL,
    session_id    TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    key_hash      BLOB NOT NULL UNIQUE,
    label         TEXT,
    methods       TEXT,
    paths         TEXT,
    rate_requests INTEGER,
    rate_per_ms   INTEGER,
    expires_at    INTEGER,
    created_at    INTEGER NOT NULL,
    last_used_at  INTEGER
);
CREATE INDEX session_keys_session ON session_keys (session_id);

-- Every existing session's key becomes its first key, unlimited: its
-- users change nothing. The key id is the session id's, `k_` for `s_`.
INSERT INTO session_keys (key_id, session_id, key_hash, created_at)
    SELECT 'k_' || substr(id, 3), id, key_hash, created_at FROM sessions;
