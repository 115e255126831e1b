-- The change-log entry of an inserted session carries its key hash, so a
-- server's cache of unknown keys forgets a key added by another process
-- (the CLI, another instance) as soon as it reads the log.
ALTER TABLE session_changes ADD COLUMN key_hash BLOB;
