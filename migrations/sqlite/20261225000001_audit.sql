-- The audit trail (issue 14): an append-only, hash-chained table of
-- control-plane events. `seq` is the chain's order (1, 2, 3... without
-- gaps, set by the appender under the write lock, not by SQLite); `mac` is
-- HMAC-SHA256, under the audit key derived from sealing key `key_id`, over
-- the row's canonical encoding and `prev_mac` (the previous row's `mac`; 32
-- zero bytes for row 1): see src/audit/mod.rs. `at` is unix milliseconds;
-- `detail` is JSON text and never holds a token, key or secret.
CREATE TABLE audit (
    seq        INTEGER PRIMARY KEY,
    at         INTEGER NOT NULL,
    instance   TEXT NOT NULL,
    kind       TEXT NOT NULL,
    session_id TEXT,
    actor      TEXT NOT NULL,
    detail     TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    prev_mac   BLOB NOT NULL,
    mac        BLOB NOT NULL
);
CREATE INDEX audit_session ON audit (session_id, seq) WHERE session_id IS NOT NULL;
CREATE INDEX audit_at ON audit (at);
