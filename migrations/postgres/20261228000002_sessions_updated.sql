-- The start-up check opens the most recently written session
-- (`newest_session`, ORDER BY updated_at DESC, seq DESC): an index, so that
-- is one read, not a scan and a sort of every row.
CREATE INDEX sessions_updated ON sessions (updated_at, seq);
