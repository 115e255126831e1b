-- credproxy's PostgreSQL schema: the same tables as the SQLite store
-- (see migrations/sqlite), in one step. Tokens are sealed (AEAD) by the
-- application before they reach this database; session keys are stored
-- only as SHA-256 hashes.

CREATE TABLE sessions (
    id                  TEXT PRIMARY KEY,
    seq                 BIGSERIAL NOT NULL,          -- insertion order, for listings
    provider            TEXT NOT NULL,
    label               TEXT,
    key_hash            BYTEA NOT NULL UNIQUE,
    access_token        BYTEA NOT NULL,
    refresh_token       BYTEA,
    expires_at          BIGINT,                      -- unix seconds; NULL when unknown
    status              TEXT NOT NULL DEFAULT 'active',
    version             BIGINT NOT NULL DEFAULT 1,   -- bumped on every token change (compare-and-swap)
    created_at          BIGINT NOT NULL,
    updated_at          BIGINT NOT NULL,
    last_refresh_at     BIGINT,
    refresh_lease_owner TEXT,                        -- the instance allowed to spend the refresh token
    refresh_lease_until BIGINT                       -- until then (unix milliseconds)
);

-- Every change to a session appends here in the same transaction; other
-- instances poll it, and the trigger below wakes them at once (NOTIFY is
-- delivered at commit).
CREATE TABLE session_changes (
    seq        BIGSERIAL PRIMARY KEY,
    session_id TEXT NOT NULL,
    at         BIGINT NOT NULL
);
CREATE INDEX session_changes_at ON session_changes (at);

CREATE FUNCTION credproxy_notify_session_change() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('credproxy_session_changes', NEW.session_id);
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER session_changes_notify AFTER INSERT ON session_changes
    FOR EACH ROW EXECUTE FUNCTION credproxy_notify_session_change();

CREATE TABLE oauth_states (
    state_hash        BYTEA PRIMARY KEY,
    provider          TEXT NOT NULL,
    session_id        TEXT,
    key_hash          BYTEA,
    created_at        BIGINT NOT NULL,
    used_at           BIGINT,
    result_session_id TEXT,
    failure           TEXT
);
CREATE INDEX oauth_states_created ON oauth_states (created_at);
