-- A state made by `/connect` in a browser is bound to that browser: the
-- SHA-256 of a random value kept in a cookie (HttpOnly, Path=/callback).
-- A callback whose cookie does not hash to it is refused (login CSRF).
-- NULL for the one-time links of `credproxy connect` and reconnects, which
-- are meant to be opened elsewhere.
ALTER TABLE oauth_states ADD COLUMN browser_hash BLOB;
