-- Shares of a provider's request budget ("at most N requests in any window
-- of W"), leased by each instance so that every instance on this database
-- keeps to one budget without a round trip per request (issue 12).
--
-- A row is one lease: its instance may send up to `count` requests between
-- `granted_at_ms` and `ends_at_ms` (unix milliseconds by THIS DATABASE's
-- clock, never an instance's). A lease counts against the budget until
-- `ends_at_ms + W`: after that nothing sent under it can share a window with
-- anything sent from then on, and the next lease for the provider deletes
-- it. Settling a lease lowers `count` to what was used. An instance that
-- dies leaves its row, which stops counting W after the lease ends.
CREATE TABLE budget_leases (
    id            BIGSERIAL PRIMARY KEY,
    provider      TEXT NOT NULL,
    instance      TEXT NOT NULL,   -- who holds it, for operators reading the table
    granted_at_ms BIGINT NOT NULL,
    ends_at_ms    BIGINT NOT NULL,
    count         INT NOT NULL CHECK (count >= 0)
);
CREATE INDEX budget_leases_provider_ends ON budget_leases (provider, ends_at_ms);
