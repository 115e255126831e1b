//! The shared store: PostgreSQL, for several credproxy instances behind a
//! load balancer.
//!
//! sqlx (already the SQLite store's driver) with its built-in pool and
//! migrations: one dependency, one query style, and `PgListener` for
//! LISTEN/NOTIFY. Row-level compare-and-set updates do the coordinating:
//! the refresh lease (`UPDATE ... WHERE lease expired RETURNING`) admits
//! one instance at a time to spend a refresh token, and commits check the
//! version and the lease owner. Request budgets shared by every instance are
//! leased in shares (`budget_leases`), one transaction per lease under a
//! per-provider advisory lock. PostgreSQL's MVCC needs none of the SQLite
//! store's write ordering: writers to different rows do not block each other.

use std::time::Duration;

use async_trait::async_trait;
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::Row;

use super::shared::{chain_audit, insert_session_rows, Shared};
use super::sql::{self, bind_event, pg_sql, record, INSERT_EVENT, SESSION_COLUMNS as COLUMNS};
use super::{
    BudgetAsk, BudgetLease, Changes, EventRow, Failure, Health, IdleCursor, IdleSession, Lease,
    NewEvent, NewSession, OAuthOutcome, OAuthState, Resealed, SealedCount, SealedRow, SealedTokens,
    SessionCount, SessionRecord, Store, StoreError,
};
use crate::audit::{AuditAppend, AuditFilter, AuditRow};
use crate::secrets::session::{KeyHash, Status};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// When a session was last used or refreshed, or made: what idle refresh
/// orders by. Exactly the expression of the index `sessions_idle`.
const IDLE_SINCE: &str = "GREATEST(last_used_at, last_refresh_at, created_at)";

/// The statement of [`Store::idle_sessions`] (public for the test that
/// checks its plan uses the index). The expression and the first two
/// conditions are those of the partial index `sessions_idle`.
pub fn idle_sessions_sql() -> String {
    sql::numbered(&format!(
        "SELECT id, version, {IDLE_SINCE} AS idle_since FROM sessions
         WHERE provider = ? AND status <> 'reauthorization_required' AND refresh_token IS NOT NULL
           AND ({IDLE_SINCE}, id) > (?, ?) AND {IDLE_SINCE} < ?
           AND (next_retry_at IS NULL OR next_retry_at <= ?)
         ORDER BY {IDLE_SINCE}, id LIMIT ?"
    ))
}

/// The NOTIFY channel the `session_changes` trigger signals.
const CHANNEL: &str = "credproxy_session_changes";

/// Changes whose sequence number was taken before a later one's but that
/// committed after it are caught by re-reading this many seconds of the log
/// (NOTIFY, delivered at commit, normally gets there first).
const LOOKBACK_SECS: i64 = 10;

/// The database's clock in unix milliseconds: leases and the change log are
/// timed by it, so instances whose clocks disagree still agree on them.
const DB_NOW_MS: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

/// The advisory-lock name space of the request budgets: a provider's lock
/// key is a hash of this and its name (see `lease_budget` below).
const BUDGET_LOCK_PREFIX: &str = "credproxy.budget_leases:";

/// The longest window or lease taken as asked (about 35,000 years): the
/// database's `now ± ms` cannot overflow.
const MAX_SPAN_MS: i64 = 1 << 50;

/// Every statement on the main pool ends within this, whatever holds it
/// (a lock taken by hand, a runaway query): a backstop far above any
/// statement credproxy makes, so a stalled database never holds a
/// connection, or a background task, for good. Migrations run on a
/// connection of their own, without it.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The request path's pool (cold session lookups, budget leases,
/// readiness): its own connections, so a slow background write cannot
/// starve it; a statement there ends on the server after
/// [`super::HOT_TIMEOUT`] (the caller has given up by then, and the
/// connection comes back), and waiting for a connection gives up after
/// half of that, so the cause (refused, unreachable) is what is reported.
const HOT_CONNECTIONS: u32 = 8;

pub struct PgStore {
    pool: PgPool,
    /// The request path's connections (see [`HOT_CONNECTIONS`]).
    hot: PgPool,
    /// LISTEN connection for change notifications; (re)made on demand.
    listener: tokio::sync::Mutex<Option<PgListener>>,
}

/// Sets `statement_timeout` on each new connection. A `SET` after connecting
/// rather than a startup option: a connection pooler such as PgBouncer
/// refuses unknown startup parameters but passes a `SET` on.
fn with_statement_timeout(options: PgPoolOptions, timeout: Duration) -> PgPoolOptions {
    let sql = format!("SET statement_timeout = {}", timeout.as_millis());
    options.after_connect(move |conn, _meta| {
        let sql = sql.clone();
        Box::pin(async move {
            sqlx::Executor::execute(conn, sql.as_str()).await?;
            Ok(())
        })
    })
}

impl PgStore {
    /// Connects and migrates. Errors never quote the URL's credentials:
    /// the URL is checked first (sqlx would log an unknown parameter's
    /// value), and sqlx's own messages are scrubbed of it.
    pub async fn open(url: &str) -> Result<PgStore, StoreError> {
        use sqlx::Connection;
        super::check_postgres_url(url)?;
        let scrubbed = |e: sqlx::Error| StoreError::Open(super::scrub(&e.to_string(), url));
        let options = PgConnectOptions::from_str(url).map_err(scrubbed)?;
        // Takes an advisory lock: instances starting together migrate once.
        // On a connection of its own: a migration may take longer than the
        // pools' statement timeouts.
        let mut conn = sqlx::PgConnection::connect_with(&options)
            .await
            .map_err(scrubbed)?;
        MIGRATOR.run(&mut conn).await?;
        let _ = conn.close().await;
        let pool = with_statement_timeout(PgPoolOptions::new(), STATEMENT_TIMEOUT)
            .max_connections(16)
            // Fail fast while the database is down: requests for cached
            // sessions go on; others get a clear 503.
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(options.clone())
            .await
            .map_err(scrubbed)?;
        let hot = with_statement_timeout(PgPoolOptions::new(), super::HOT_TIMEOUT)
            .max_connections(HOT_CONNECTIONS)
            .acquire_timeout(super::HOT_TIMEOUT / 2)
            .connect_lazy_with(options);
        Ok(PgStore {
            pool,
            hot,
            listener: tokio::sync::Mutex::new(None),
        })
    }
}

/// The session's status, its row locked until the transaction ends.
async fn prior_status(tx: &mut sqlx::PgConnection, id: &str) -> Result<Option<String>, StoreError> {
    Ok(
        sqlx::query_scalar(pg_sql!(format!("{} FOR UPDATE", sql::PRIOR_STATUS)))
            .bind(id)
            .fetch_optional(tx)
            .await?,
    )
}

async fn insert_event(
    tx: &mut sqlx::PgConnection,
    event: Option<&NewEvent>,
) -> Result<(), StoreError> {
    if let Some(e) = event {
        bind_event(sqlx::query(pg_sql!(INSERT_EVENT)), e)
            .execute(tx)
            .await?;
    }
    Ok(())
}

/// Appends `audit` to the chain, last in the transaction: under the
/// chain's advisory lock (held until the transaction ends, so appenders of
/// every instance take turns), reads the last row and inserts the next.
async fn append_audit_tx(
    tx: &mut sqlx::PgConnection,
    audit: Option<&AuditAppend>,
) -> Result<Option<i64>, StoreError> {
    let Some(audit) = audit else { return Ok(None) };
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(sql::AUDIT_LOCK)
        .execute(&mut *tx)
        .await?;
    Ok(Some(chain_audit::<sqlx::Postgres>(tx, audit).await?))
}

async fn log_change(tx: &mut sqlx::PgConnection, id: &str, _now: i64) -> Result<(), StoreError> {
    sqlx::query(&format!(
        "INSERT INTO session_changes (session_id, at) VALUES ($1, {DB_NOW_MS} / 1000)"
    ))
    .bind(id)
    .execute(tx)
    .await?;
    Ok(())
}

/// Change-log entries of inserted sessions, with their key hashes (timed
/// by the database's clock, as every entry).
async fn log_added(tx: &mut sqlx::PgConnection, new: &[NewSession]) -> Result<(), StoreError> {
    for chunk in new.chunks(sql::BULK_ROWS) {
        let text = sql::numbered(&sql::insert_added_changes_sql(
            chunk.len(),
            &format!("{DB_NOW_MS} / 1000"),
        ));
        let mut q = sqlx::query(&text);
        for s in chunk {
            q = q.bind(s.id.as_str()).bind(&s.key_hash.0[..]);
        }
        q.execute(&mut *tx).await?;
    }
    Ok(())
}

#[async_trait]
impl Store for PgStore {
    /// An indexed read of `sessions` on the request path's pool: what a
    /// cold lookup needs (a `SELECT 1` answers while `sessions` is locked).
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1 FROM sessions WHERE key_hash = $1")
            .bind(&[0u8; 32][..])
            .fetch_optional(&self.hot)
            .await?;
        Ok(())
    }

    async fn insert_session(
        &self,
        new: NewSession,
        event: Option<&NewEvent>,
        audit: Option<&AuditAppend>,
    ) -> Result<SessionRecord, StoreError> {
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "INSERT INTO sessions (id, provider, label, key_hash, access_token, refresh_token, expires_at, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)
             RETURNING {COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(&new.id)
            .bind(&new.provider)
            .bind(&new.label)
            .bind(&new.key_hash.0[..])
            .bind(&new.tokens.access_token)
            .bind(&new.tokens.refresh_token)
            .bind(new.tokens.expires_at)
            .bind(new.now)
            .fetch_one(&mut *tx)
            .await;
        let row = match row {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(StoreError::DuplicateKey)
            }
            other => other?,
        };
        let rec = record(&row)?;
        log_added(&mut tx, std::slice::from_ref(&new)).await?;
        insert_event(&mut tx, event).await?;
        append_audit_tx(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(rec)
    }

    async fn session_by_key(&self, hash: &KeyHash) -> Result<Option<SessionRecord>, StoreError> {
        Shared(&self.hot).session_by_key(hash).await
    }

    async fn session_by_id(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        Shared(&self.hot).session_by_id(id).await
    }

    async fn list_sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM sessions ORDER BY created_at, seq");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(record).collect()
    }

    async fn newest_session(&self) -> Result<Option<SessionRecord>, StoreError> {
        let sql =
            format!("SELECT {COLUMNS} FROM sessions ORDER BY updated_at DESC, seq DESC LIMIT 1");
        let row = sqlx::query(&sql).fetch_optional(&self.pool).await?;
        row.as_ref().map(record).transpose()
    }

    async fn count_sessions(&self) -> Result<Vec<SessionCount>, StoreError> {
        Shared(&self.pool).count_sessions().await
    }

    async fn count_sealed_by_key(&self) -> Result<Vec<SealedCount>, StoreError> {
        let rows = sqlx::query(
            "SELECT k, COUNT(*) AS n FROM ( \
             SELECT CASE WHEN substring(access_token FROM 1 FOR 1) = '\\x02'::bytea THEN encode(substring(access_token FROM 2 FOR 4), 'hex') ELSE '' END AS k FROM sessions \
             UNION ALL \
             SELECT CASE WHEN substring(refresh_token FROM 1 FOR 1) = '\\x02'::bytea THEN encode(substring(refresh_token FROM 2 FOR 4), 'hex') ELSE '' END AS k FROM sessions WHERE refresh_token IS NOT NULL \
             ) t GROUP BY k ORDER BY k",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(sql::sealed_count).collect()
    }

    async fn sealed_not_under(
        &self,
        header: &[u8],
        after: &str,
        limit: u32,
    ) -> Result<Vec<SealedRow>, StoreError> {
        Shared(&self.pool)
            .sealed_not_under(header, after, limit)
            .await
    }

    /// The rows are locked in id order first (like `note_uses`, so the two
    /// never deadlock), then compared and written by one `UPDATE ... FROM
    /// UNNEST`.
    async fn reseal_rows(&self, rows: &[Resealed]) -> Result<Vec<String>, StoreError> {
        let mut sorted: Vec<&Resealed> = rows.iter().collect();
        sorted.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        let ids: Vec<&str> = sorted.iter().map(|r| r.id.as_str()).collect();
        let old_a: Vec<&[u8]> = sorted.iter().map(|r| r.old_access.as_slice()).collect();
        let old_r: Vec<Option<&[u8]>> = sorted.iter().map(|r| r.old_refresh.as_deref()).collect();
        let new_a: Vec<&[u8]> = sorted.iter().map(|r| r.access_token.as_slice()).collect();
        let new_r: Vec<Option<&[u8]>> = sorted.iter().map(|r| r.refresh_token.as_deref()).collect();
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT 1 FROM sessions WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        let written: Vec<String> = sqlx::query_scalar(
            "UPDATE sessions s SET access_token = v.a, refresh_token = v.r
             FROM UNNEST($1::TEXT[], $2::BYTEA[], $3::BYTEA[], $4::BYTEA[], $5::BYTEA[])
                  AS v(id, old_a, old_r, a, r)
             WHERE s.id = v.id AND s.access_token = v.old_a
               AND s.refresh_token IS NOT DISTINCT FROM v.old_r
             RETURNING s.id",
        )
        .bind(&ids)
        .bind(&old_a)
        .bind(&old_r)
        .bind(&new_a)
        .bind(&new_r)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(written)
    }

    async fn replace_tokens(
        &self,
        id: &str,
        tokens: SealedTokens,
        expected_version: Option<i64>,
        now: i64,
        event: Option<&NewEvent>,
        audit: Option<&AuditAppend>,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "UPDATE sessions SET access_token = $1, refresh_token = $2, expires_at = $3, status = 'active',
                 last_error = NULL, next_retry_at = NULL, version = version + 1, updated_at = $4
             WHERE id = $5 AND ($6::BIGINT IS NULL OR version = $6)
             RETURNING {COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(&tokens.access_token)
            .bind(&tokens.refresh_token)
            .bind(tokens.expires_at)
            .bind(now)
            .bind(id)
            .bind(expected_version)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let rec = record(&row)?;
        log_change(&mut tx, id, now).await?;
        insert_event(&mut tx, event).await?;
        append_audit_tx(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(Some(rec))
    }

    async fn acquire_refresh_lease(
        &self,
        id: &str,
        owner: &str,
        until_ms: i64,
        now_ms: i64,
    ) -> Result<Lease, StoreError> {
        // The deadline is the database's clock plus our hold, not our clock.
        let sql = format!(
            "UPDATE sessions SET refresh_lease_owner = $1, refresh_lease_until = {DB_NOW_MS} + $2
             WHERE id = $3 AND (refresh_lease_until IS NULL OR refresh_lease_until < {DB_NOW_MS} OR refresh_lease_owner = $1)
             RETURNING {COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(owner)
            .bind(until_ms - now_ms)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = row {
            return Ok(Lease::Acquired(record(&row)?));
        }
        // Reported in our clock, for the caller's wait.
        let held = sqlx::query(&format!(
            "SELECT refresh_lease_until - {DB_NOW_MS} AS left_ms, version FROM sessions WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match held {
            None => Lease::Gone,
            Some(r) => Lease::Held {
                until_ms: now_ms + r.try_get::<Option<i64>, _>("left_ms")?.unwrap_or(0),
                version: r.try_get("version")?,
            },
        })
    }

    async fn refresh_lease_owners(&self) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(sql::LEASE_OWNERS)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn release_refresh_leases(&self, owner: &str) -> Result<u64, StoreError> {
        let done = sqlx::query(pg_sql!(sql::RELEASE_LEASES_OF))
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn release_refresh_lease(&self, id: &str, owner: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE sessions SET refresh_lease_owner = NULL, refresh_lease_until = NULL
             WHERE id = $1 AND refresh_lease_owner = $2",
        )
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // The compare-and-swap's parts, the health and the audit row: one call.
    #[allow(clippy::too_many_arguments)]
    async fn commit_refresh(
        &self,
        id: &str,
        owner: &str,
        tokens: SealedTokens,
        expected_version: i64,
        now: i64,
        health: Health<'_>,
        audit: Option<&AuditAppend>,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let (healthy, recovered) = match health {
            Health::Healthy { recovered } => (true, recovered),
            Health::Unchanged => (false, None),
        };
        let mut tx = self.pool.begin().await?;
        let prior = prior_status(&mut tx, id).await?;
        let row = sqlx::query(pg_sql!(sql::commit_refresh_sql()))
            .bind(&tokens.access_token)
            .bind(&tokens.refresh_token)
            .bind(tokens.expires_at)
            .bind(healthy)
            .bind(healthy)
            .bind(healthy)
            .bind(now)
            .bind(now)
            .bind(id)
            .bind(expected_version)
            .bind(owner)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let rec = record(&row)?;
        log_change(&mut tx, id, now).await?;
        if healthy && sql::transition(prior.as_deref(), Status::Active) {
            insert_event(&mut tx, recovered).await?;
        }
        append_audit_tx(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(Some(rec))
    }

    async fn mark_reauthorization_required(
        &self,
        id: &str,
        expected_version: i64,
        now: i64,
        code: &str,
        event: Option<&NewEvent>,
        audit: Option<&AuditAppend>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let prior = prior_status(&mut tx, id).await?;
        let n = sqlx::query(pg_sql!(sql::MARK_REAUTHORIZATION))
            .bind(code)
            .bind(now)
            .bind(id)
            .bind(expected_version)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n > 0 {
            log_change(&mut tx, id, now).await?;
            if sql::transition(prior.as_deref(), Status::ReauthorizationRequired) {
                insert_event(&mut tx, event).await?;
                append_audit_tx(&mut tx, audit).await?;
            }
        }
        tx.commit().await?;
        Ok(n > 0)
    }

    async fn mark_refresh_failing(
        &self,
        id: &str,
        owner: &str,
        expected_version: i64,
        now: i64,
        failure: Failure<'_>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let prior = prior_status(&mut tx, id).await?;
        let n = sqlx::query(pg_sql!(sql::MARK_REFRESH_FAILING))
            .bind(failure.class)
            .bind(failure.next_retry_at)
            .bind(now)
            .bind(id)
            .bind(expected_version)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query(pg_sql!(sql::RELEASE_LEASE))
            .bind(id)
            .bind(owner)
            .execute(&mut *tx)
            .await?;
        let became = n > 0 && sql::transition(prior.as_deref(), Status::RefreshFailing);
        if became {
            log_change(&mut tx, id, now).await?;
            insert_event(&mut tx, failure.event).await?;
        }
        tx.commit().await?;
        Ok(became)
    }

    /// One transaction per 1,000 sessions: their rows are locked in id
    /// order first (two instances flushing at once never deadlock), then
    /// moved by one `UPDATE ... FROM UNNEST`.
    async fn note_uses(&self, uses: &[(String, i64)]) -> Result<u64, StoreError> {
        let mut sorted: Vec<&(String, i64)> = uses.iter().collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut moved = 0;
        for chunk in sorted.chunks(sql::USES_PER_TRANSACTION) {
            let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
            let ats: Vec<i64> = chunk.iter().map(|(_, at)| *at).collect();
            let mut tx = self.pool.begin().await?;
            sqlx::query("SELECT 1 FROM sessions WHERE id = ANY($1) ORDER BY id FOR UPDATE")
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
            moved += sqlx::query(
                "UPDATE sessions s SET last_used_at = u.at
                 FROM (SELECT id, MAX(at) AS at FROM UNNEST($1::TEXT[], $2::BIGINT[]) AS n(id, at)
                       GROUP BY id) AS u
                 WHERE s.id = u.id AND (s.last_used_at IS NULL OR s.last_used_at < u.at)",
            )
            .bind(&ids)
            .bind(&ats)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
        }
        Ok(moved)
    }

    async fn idle_sessions(
        &self,
        provider: &str,
        idle_before: i64,
        after: &IdleCursor,
        now: i64,
        limit: u32,
    ) -> Result<Vec<IdleSession>, StoreError> {
        let rows = sqlx::query(pg_sql!(idle_sessions_sql()))
            .bind(provider)
            .bind(after.0)
            .bind(&after.1)
            .bind(idle_before)
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(sql::idle_session).collect()
    }

    async fn insert_oauth_state(
        &self,
        state_hash: &[u8; 32],
        state: &OAuthState,
    ) -> Result<(), StoreError> {
        Shared(&self.pool)
            .insert_oauth_state(state_hash, state)
            .await
    }

    async fn peek_oauth_state(
        &self,
        state_hash: &[u8; 32],
        not_before: i64,
    ) -> Result<Option<OAuthState>, StoreError> {
        Shared(&self.pool)
            .peek_oauth_state(state_hash, not_before)
            .await
    }

    async fn insert_browser_oauth_state(
        &self,
        state_hash: &[u8; 32],
        state: &OAuthState,
        browser_hash: &[u8; 32],
        not_before: i64,
        max_pending: u64,
    ) -> Result<bool, StoreError> {
        Shared(&self.pool)
            .insert_browser_oauth_state(state_hash, state, browser_hash, not_before, max_pending)
            .await
    }

    async fn count_pending_oauth_states(&self, not_before: i64) -> Result<u64, StoreError> {
        Shared(&self.pool)
            .count_pending_oauth_states(not_before)
            .await
    }

    async fn take_oauth_state_from_browser(
        &self,
        state_hash: &[u8; 32],
        provider: &str,
        browser_hash: Option<&[u8; 32]>,
        now: i64,
        not_before: i64,
    ) -> Result<Option<OAuthState>, StoreError> {
        Shared(&self.pool)
            .take_oauth_state_from_browser(state_hash, provider, browser_hash, now, not_before)
            .await
    }

    async fn finish_oauth_state(
        &self,
        state_hash: &[u8; 32],
        outcome: &OAuthOutcome,
    ) -> Result<(), StoreError> {
        Shared(&self.pool)
            .finish_oauth_state(state_hash, outcome)
            .await
    }

    async fn oauth_outcome(&self, state_hash: &[u8; 32]) -> Result<OAuthOutcome, StoreError> {
        Shared(&self.pool).oauth_outcome(state_hash).await
    }

    async fn prune_oauth_states(&self, before: i64) -> Result<u64, StoreError> {
        Shared(&self.pool).prune_oauth_states(before).await
    }

    async fn delete_session(
        &self,
        id: &str,
        now: i64,
        event: Option<&NewEvent>,
        audit: Option<&AuditAppend>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query("DELETE FROM sessions WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n > 0 {
            log_change(&mut tx, id, now).await?;
            insert_event(&mut tx, event).await?;
            append_audit_tx(&mut tx, audit).await?;
        }
        tx.commit().await?;
        Ok(n > 0)
    }

    async fn append_audit(&self, audit: &AuditAppend) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let seq = append_audit_tx(&mut tx, Some(audit)).await?;
        tx.commit().await?;
        seq.ok_or(StoreError::Closed)
    }

    async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRow>, StoreError> {
        Shared(&self.pool).list_audit(filter).await
    }

    async fn audit_page(&self, after_seq: i64, limit: u32) -> Result<Vec<AuditRow>, StoreError> {
        Shared(&self.pool).audit_page(after_seq, limit).await
    }

    async fn count_audit_by_key(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Shared(&self.pool).count_audit_by_key().await
    }

    /// The due rows are locked `FOR UPDATE SKIP LOCKED` (a concurrent
    /// claimer skips them, and re-checks the lease of any it waited for),
    /// and leased by the database's clock, in one statement.
    async fn claim_events(
        &self,
        owner: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<EventRow>, StoreError> {
        let rows = sqlx::query(pg_sql!(format!(
            "WITH due AS (
                 SELECT seq FROM events
                 WHERE delivered_at IS NULL AND gave_up_at IS NULL AND next_attempt_at_ms <= ?
                   AND (lease_until_ms IS NULL OR lease_until_ms <= {DB_NOW_MS})
                 ORDER BY at, seq LIMIT ?
                 FOR UPDATE SKIP LOCKED)
             UPDATE events e SET lease_owner = ?, lease_until_ms = {DB_NOW_MS} + ?
             FROM due WHERE e.seq = due.seq
             RETURNING e.seq, e.id, e.kind, e.session_id, e.provider, e.at, e.detail, e.attempts,
                 e.next_attempt_at_ms, e.last_error, e.delivered_at, e.gave_up_at"
        )))
        .bind(now_ms)
        .bind(i64::from(limit))
        .bind(owner)
        .bind(lease_ms.clamp(0, MAX_SPAN_MS))
        .fetch_all(&self.pool)
        .await?;
        sql::oldest_first(&rows)
    }

    async fn event_delivered(&self, id: &str, owner: &str, now: i64) -> Result<(), StoreError> {
        sqlx::query(pg_sql!(sql::EVENT_DELIVERED))
            .bind(now)
            .bind(id)
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn event_retry(
        &self,
        id: &str,
        owner: &str,
        next_attempt_at_ms: i64,
        error: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(pg_sql!(sql::EVENT_RETRY))
            .bind(error)
            .bind(next_attempt_at_ms)
            .bind(id)
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn event_gave_up(
        &self,
        id: &str,
        owner: &str,
        now: i64,
        error: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(pg_sql!(sql::EVENT_GAVE_UP))
            .bind(now)
            .bind(error)
            .bind(id)
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn list_events(&self, limit: u32) -> Result<Vec<EventRow>, StoreError> {
        Shared(&self.pool).list_events(limit).await
    }

    async fn prune_events(
        &self,
        delivered_before: i64,
        given_up_before: i64,
    ) -> Result<u64, StoreError> {
        Ok(sqlx::query(pg_sql!(sql::PRUNE_EVENTS))
            .bind(delivered_before)
            .bind(given_up_before)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    async fn list_given_up_events(&self, limit: u32) -> Result<Vec<EventRow>, StoreError> {
        Shared(&self.pool).list_given_up_events(limit).await
    }

    async fn retry_given_up_events(
        &self,
        ids: Option<&[String]>,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let mut n = 0;
        for chunk in sql::id_chunks(ids) {
            let text = sql::numbered(&sql::retry_given_up_sql(chunk.map(<[String]>::len)));
            let mut q = sqlx::query(&text).bind(now_ms);
            for id in chunk.into_iter().flatten() {
                q = q.bind(id.as_str());
            }
            n += q.execute(&self.pool).await?.rows_affected();
        }
        Ok(n)
    }

    async fn clear_given_up_events(&self, ids: Option<&[String]>) -> Result<u64, StoreError> {
        let mut n = 0;
        for chunk in sql::id_chunks(ids) {
            let text = sql::numbered(&sql::clear_given_up_sql(chunk.map(<[String]>::len)));
            let mut q = sqlx::query(&text);
            for id in chunk.into_iter().flatten() {
                q = q.bind(id.as_str());
            }
            n += q.execute(&self.pool).await?.rows_affected();
        }
        Ok(n)
    }

    async fn change_cursor(&self) -> Result<i64, StoreError> {
        Shared(&self.pool).change_cursor().await
    }

    async fn changes(&self, cursor: i64) -> Result<Changes, StoreError> {
        // A sequence number is taken at insert but becomes visible at commit,
        // so a smaller one can appear after a larger one was read: re-read
        // the last few seconds too. Dropping a cached session twice (or
        // forgetting an absent key twice) is harmless.
        let rows = sqlx::query(&format!(
            "SELECT seq, session_id, key_hash FROM session_changes
             WHERE seq > $1 OR at >= {DB_NOW_MS} / 1000 - $2 ORDER BY seq LIMIT $3"
        ))
        .bind(cursor)
        .bind(LOOKBACK_SECS)
        .bind(super::CHANGES_PAGE as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut changes = sql::changes(&rows, cursor)?;
        changes.ids.sort_unstable();
        changes.ids.dedup();
        changes.added_keys.sort_unstable_by_key(|h| h.0);
        changes.added_keys.dedup();
        Ok(changes)
    }

    async fn insert_sessions(
        &self,
        batch: &[NewSession],
        audit: Option<&AuditAppend>,
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let inserted = insert_session_rows::<sqlx::Postgres>(&mut tx, batch).await?;
        log_added(&mut tx, batch).await?;
        append_audit_tx(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(inserted)
    }

    async fn prune_changes(&self, before: i64) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM session_changes WHERE at < $1 AND seq < (SELECT MAX(seq) FROM session_changes)")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    fn shares_budgets(&self) -> bool {
        true
    }

    /// One transaction per lease, serialised per provider:
    ///
    /// 1. `pg_advisory_xact_lock` on a hash of the provider's name, rather
    ///    than `SELECT ... FOR UPDATE` on a per-provider row: nothing to
    ///    create on first use, no row written (and no WAL) just to lock it,
    ///    and the lock goes with the transaction however it ends (commit,
    ///    rollback, a dropped connection), so a dead instance never holds
    ///    it; it is also safe behind a transaction-pooling PgBouncer. Two
    ///    providers whose keys collide only take turns.
    /// 2. Forget this provider's leases that ended at least a window ago
    ///    (nothing sent under them can share a window with anything sent
    ///    from now on), sum the shares of the rest: what is spent.
    /// 3. Grant `min(want, requests - spent)`; the new lease ends `lease_ms`
    ///    from now. Every request sent under it, at some `s >= now`, can
    ///    share a window only with requests sent after `s - window >= now -
    ///    window`, i.e. under leases ending after that: all summed in 2.
    ///
    /// Every time is the database's clock, read once after the lock.
    async fn lease_budget(&self, ask: &BudgetAsk<'_>) -> Result<BudgetLease, StoreError> {
        let window_ms = ask.window_ms.clamp(0, MAX_SPAN_MS);
        let lease_ms = ask.lease_ms.clamp(0, MAX_SPAN_MS);
        let requests = i64::from(ask.requests);
        // READ COMMITTED whatever the database's default: each statement
        // then sees what the lock's previous holder committed. Under
        // REPEATABLE READ or SERIALIZABLE the snapshot would be taken by the
        // lock statement, before it waits, and miss that lease.
        let mut tx = self
            .hot
            .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
            .await?;
        sqlx::query(&format!(
            "SELECT pg_advisory_xact_lock(hashtextextended('{BUDGET_LOCK_PREFIX}' || $1, 0))"
        ))
        .bind(ask.provider)
        .execute(&mut *tx)
        .await?;
        // The DELETE and the reads see the same snapshot (the rows as they
        // were before it), hence the complementary conditions. `frees_at_ms`:
        // the earliest end from which, once that lease and every lease ending
        // before it stop counting, one request fits again (leases settled to
        // nothing free nothing).
        let row = sqlx::query(&format!(
            "WITH now AS (SELECT {DB_NOW_MS} AS ms),
             gone AS (
                 DELETE FROM budget_leases b USING now
                 WHERE b.provider = $1 AND b.ends_at_ms <= now.ms - $2),
             live AS (
                 SELECT b.ends_at_ms, b.count FROM budget_leases b, now
                 WHERE b.provider = $1 AND b.ends_at_ms > now.ms - $2),
             spent AS (SELECT COALESCE(SUM(count), 0)::BIGINT AS n FROM live),
             freeing AS (
                 SELECT ends_at_ms,
                        SUM(count) OVER (ORDER BY ends_at_ms ROWS UNBOUNDED PRECEDING) AS freed
                 FROM live)
             SELECT now.ms AS now_ms, spent.n AS spent,
                    (SELECT MIN(ends_at_ms) FROM freeing WHERE spent.n - freed < $3) AS frees_at_ms
             FROM now, spent"
        ))
        .bind(ask.provider)
        .bind(window_ms)
        .bind(requests)
        .fetch_one(&mut *tx)
        .await?;
        let now_ms: i64 = row.try_get("now_ms")?;
        let spent: i64 = row.try_get("spent")?;
        let frees_at_ms: Option<i64> = row.try_get("frees_at_ms")?;
        let remaining = requests.saturating_sub(spent).max(0);
        // `count` is an INT; no budget comes near that.
        let granted = remaining.min(i64::from(ask.want)).min(i64::from(i32::MAX));
        let as_u32 = |n: i64| u32::try_from(n.max(0)).unwrap_or(u32::MAX);
        if granted == 0 {
            let retry_in_ms = if remaining > 0 {
                // Nothing was wanted; there is budget now.
                0
            } else {
                match frees_at_ms {
                    Some(end) => end.saturating_add(window_ms).saturating_sub(now_ms).max(1),
                    // A budget of 0 requests: nothing ever frees.
                    None => window_ms.max(1),
                }
            };
            tx.commit().await?;
            return Ok(BudgetLease {
                id: 0,
                granted: 0,
                retry_in_ms,
                remaining: as_u32(remaining),
            });
        }
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO budget_leases (provider, instance, granted_at_ms, ends_at_ms, count)
             VALUES ($1, $2, $3, $3 + $4, $5) RETURNING id",
        )
        .bind(ask.provider)
        .bind(ask.instance)
        .bind(now_ms)
        .bind(lease_ms)
        .bind(i32::try_from(granted).unwrap_or(i32::MAX))
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(BudgetLease {
            id,
            granted: as_u32(granted),
            retry_in_ms: 0,
            remaining: as_u32(remaining - granted),
        })
    }

    /// Lowers the lease's share to what was used; the used requests keep
    /// counting until the lease has been over for a window. Settling again
    /// only ever lowers it; an unknown (or already forgotten) lease is no error.
    async fn settle_budget(&self, lease_id: i64, used: u32) -> Result<(), StoreError> {
        sqlx::query("UPDATE budget_leases SET count = LEAST(count, $2) WHERE id = $1")
            .bind(lease_id)
            .bind(i32::try_from(used).unwrap_or(i32::MAX))
            .execute(&self.hot)
            .await?;
        Ok(())
    }

    /// Waits for a NOTIFY from another instance's change, or `max`; returns
    /// the id notified, to be dropped from the cache at once.
    async fn wait_for_change(&self, max: Duration) -> Vec<String> {
        let mut guard = self.listener.lock().await;
        if guard.is_none() {
            match PgListener::connect_with(&self.pool).await {
                Ok(mut l) => match l.listen(CHANNEL).await {
                    Ok(()) => *guard = Some(l),
                    Err(e) => tracing::debug!(error = %e, "LISTEN failed; polling only"),
                },
                Err(e) => tracing::debug!(error = %e, "no LISTEN connection; polling only"),
            }
        }
        let Some(listener) = guard.as_mut() else {
            drop(guard);
            tokio::time::sleep(max).await;
            return Vec::new();
        };
        match tokio::time::timeout(max, listener.try_recv()).await {
            Err(_) => Vec::new(),
            Ok(Ok(Some(notification))) => vec![notification.payload().to_owned()],
            // The connection dropped (notifications may be lost meanwhile:
            // the poll that follows catches up); make a new one next time.
            Ok(Ok(None)) | Ok(Err(_)) => {
                *guard = None;
                drop(guard);
                tokio::time::sleep(max).await;
                Vec::new()
            }
        }
    }
}
