-- Sessions' health and the event outbox (issue 13): the same as
-- migrations/sqlite/20261220000001_health_and_events.sql, which says what
-- each column means.
ALTER TABLE sessions ADD COLUMN last_error TEXT;
ALTER TABLE sessions ADD COLUMN next_retry_at BIGINT;
ALTER TABLE sessions ADD COLUMN last_used_at BIGINT;

-- Idle refresh's candidates (PgStore::idle_sessions writes the same
-- expression and WHERE). GREATEST ignores NULLs, as SQLite's
-- MAX(COALESCE(..., 0), ...) does for these non-negative times.
CREATE INDEX sessions_idle ON sessions (
    provider,
    GREATEST(last_used_at, last_refresh_at, created_at),
    id
) WHERE status <> 'reauthorization_required' AND refresh_token IS NOT NULL;

CREATE TABLE events (
    seq                BIGSERIAL PRIMARY KEY,
    id                 TEXT NOT NULL UNIQUE,
    kind               TEXT NOT NULL,
    session_id         TEXT NOT NULL,
    provider           TEXT NOT NULL,
    at                 BIGINT NOT NULL,
    detail             TEXT NOT NULL,
    attempts           BIGINT NOT NULL DEFAULT 0,
    next_attempt_at_ms BIGINT NOT NULL,
    lease_owner        TEXT,
    lease_until_ms     BIGINT,          -- by this database's clock
    last_error         TEXT,
    delivered_at       BIGINT,
    gave_up_at         BIGINT
);
-- Due events are claimed oldest first; `events list` shows the
-- undelivered ones (pending and given up); delivered ones are pruned.
CREATE INDEX events_pending ON events (at, seq)
    WHERE delivered_at IS NULL AND gave_up_at IS NULL;
CREATE INDEX events_undelivered ON events (at, seq)
    WHERE delivered_at IS NULL;
CREATE INDEX events_delivered ON events (delivered_at)
    WHERE delivered_at IS NOT NULL;
