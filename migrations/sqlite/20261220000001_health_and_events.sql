-- Sessions' health (issue 13). `last_error` is the class of the last
-- failed refresh (a short fixed string such as `token_endpoint_timeout`,
-- never a token or the endpoint's answer) and `next_retry_at` when it is
-- retried (unix seconds); both are cleared by a successful refresh.
-- `last_used_at` (unix seconds) is written in batches, at most once per
-- session per `store.use_flush_interval`: it is not a change (no version
-- bump, no change-log entry).
ALTER TABLE sessions ADD COLUMN last_error TEXT;
ALTER TABLE sessions ADD COLUMN next_retry_at INTEGER;
ALTER TABLE sessions ADD COLUMN last_used_at INTEGER;

-- Idle refresh (`refresh_idle_after`) finds the sessions of a provider
-- neither used nor refreshed since a cutoff, oldest first, through this
-- index: the expression and the WHERE must stay exactly as the query
-- writes them (SqliteStore::idle_sessions). PostgreSQL's index is the same
-- with GREATEST.
CREATE INDEX sessions_idle ON sessions (
    provider,
    MAX(COALESCE(last_used_at, 0), COALESCE(last_refresh_at, 0), created_at),
    id
) WHERE status <> 'reauthorization_required' AND refresh_token IS NOT NULL;

-- The outbox of events about sessions (`[notify]`). A row is written in
-- the same transaction as the change it describes, so a crash loses none;
-- the delivery task leases due rows (`lease_owner` until `lease_until_ms`),
-- POSTs them and marks them delivered, retried or given up. `detail` is
-- JSON text and never holds a token, key or secret.
CREATE TABLE events (
    seq                INTEGER PRIMARY KEY AUTOINCREMENT, -- insertion order
    id                 TEXT NOT NULL UNIQUE,              -- evt_...
    kind               TEXT NOT NULL,                     -- session.connected, ...
    session_id         TEXT NOT NULL,
    provider           TEXT NOT NULL,
    at                 INTEGER NOT NULL,                  -- unix seconds of the change
    detail             TEXT NOT NULL,
    attempts           INTEGER NOT NULL DEFAULT 0,
    next_attempt_at_ms INTEGER NOT NULL,                  -- unix milliseconds
    lease_owner        TEXT,
    lease_until_ms     INTEGER,                           -- unix milliseconds
    last_error         TEXT,                              -- class of the last failed attempt
    delivered_at       INTEGER,                           -- unix seconds
    gave_up_at         INTEGER                            -- unix seconds
);
-- Due events are claimed oldest first; `events list` shows the
-- undelivered ones (pending and given up); delivered ones are pruned.
CREATE INDEX events_pending ON events (at, seq)
    WHERE delivered_at IS NULL AND gave_up_at IS NULL;
CREATE INDEX events_undelivered ON events (at, seq)
    WHERE delivered_at IS NULL;
CREATE INDEX events_delivered ON events (delivered_at)
    WHERE delivered_at IS NOT NULL;
