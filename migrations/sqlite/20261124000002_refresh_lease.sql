-- A refresh lease: the process that holds it (owner, until a deadline in
-- unix milliseconds) is the only one that may spend the session's refresh
-- token. Taken and released with compare-and-set updates, so two processes
-- sharing this file never send the same refresh token twice.
ALTER TABLE sessions ADD COLUMN refresh_lease_owner TEXT;
ALTER TABLE sessions ADD COLUMN refresh_lease_until INTEGER;
