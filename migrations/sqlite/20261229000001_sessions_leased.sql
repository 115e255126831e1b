-- At start-up, a server on SQLite (the only store whose other processes
-- all run on this machine) gives back the refresh leases of processes that
-- are gone (`refresh_lease_owners`): a partial index holds only the rows
-- under a lease, so that is a read of a handful of rows, not a scan.
CREATE INDEX sessions_leased ON sessions (refresh_lease_owner)
    WHERE refresh_lease_owner IS NOT NULL;
