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

use super::shared::{Backend, Claim, Dialect, LeaseAsk, Query, Sql, WriteOp, Written};
use super::sql::{self, pg_sql, SESSION_COLUMNS as COLUMNS};
use super::{BudgetAsk, BudgetLease, Budgets, IdleCursor, Resealed, StoreError};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// When a session was last used or refreshed, or made: what idle refresh
/// orders by. Exactly the expression of the index `sessions_idle`.
const IDLE_SINCE: &str = "GREATEST(last_used_at, last_refresh_at, created_at)";

/// The statement of `SessionStore::idle_sessions` (public for the test that
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

impl Dialect for sqlx::Postgres {
    const NUMBERED: bool = true;
    const INSERT_ORDER: &'static str = "seq";
    const PRIOR_STATUS: &'static str = "SELECT status FROM sessions WHERE id = $1 FOR UPDATE";
    /// Held until the transaction ends, so appenders of every instance
    /// take turns.
    const LOCK_AUDIT: Option<&'static str> = Some("SELECT pg_advisory_xact_lock($1)");
    const BEGIN_AUDIT: &'static str = "BEGIN";
    const COUNT_SEALED_BY_KEY: &'static str = "SELECT k, COUNT(*) AS n FROM ( \
         SELECT CASE WHEN substring(access_token FROM 1 FOR 1) = '\\x02'::bytea THEN encode(substring(access_token FROM 2 FOR 4), 'hex') ELSE '' END AS k FROM sessions \
         UNION ALL \
         SELECT CASE WHEN substring(refresh_token FROM 1 FOR 1) = '\\x02'::bytea THEN encode(substring(refresh_token FROM 2 FOR 4), 'hex') ELSE '' END AS k FROM sessions WHERE refresh_token IS NOT NULL \
         ) t GROUP BY k ORDER BY k";
    /// The database's clock, as every entry and lease: instances whose
    /// clocks disagree still agree on the log.
    const CHANGE_AT: &'static str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT / 1000";
    const REREADS: bool = true;

    fn rows_affected(done: &Self::QueryResult) -> u64 {
        done.rows_affected()
    }

    fn bind_change_at(q: Query<'_, Self>, _now: i64) -> Query<'_, Self> {
        q
    }

    /// A sequence number is taken at insert but becomes visible at commit,
    /// so a smaller one can appear after a larger one was read: the last
    /// few seconds are read again too.
    fn changes(cursor: i64) -> Query<'static, Self> {
        sqlx::query(pg_sql!(format!(
            "SELECT seq, session_id, key_hash FROM session_changes
             WHERE seq > ? OR at >= {DB_NOW_MS} / 1000 - ? ORDER BY seq LIMIT ?"
        )))
        .bind(cursor)
        .bind(LOOKBACK_SECS)
        .bind(super::CHANGES_PAGE as i64)
    }

    /// The deadline is the database's clock plus our hold, not our clock.
    fn acquire_lease(ask: &LeaseAsk) -> Query<'_, Self> {
        sqlx::query(pg_sql!(format!(
            "UPDATE sessions SET refresh_lease_owner = $1, refresh_lease_until = {DB_NOW_MS} + $2
             WHERE id = $3 AND (refresh_lease_until IS NULL OR refresh_lease_until < {DB_NOW_MS} OR refresh_lease_owner = $1)
             RETURNING {COLUMNS}"
        )))
        .bind(ask.owner.as_str())
        .bind(ask.until_ms - ask.now_ms)
        .bind(ask.id.as_str())
    }

    /// Reported in the caller's clock, for its wait.
    fn lease_held(ask: &LeaseAsk) -> Query<'_, Self> {
        sqlx::query(pg_sql!(format!(
            "SELECT ? + COALESCE(refresh_lease_until - {DB_NOW_MS}, 0) AS until_ms, version
             FROM sessions WHERE id = ?"
        )))
        .bind(ask.now_ms)
        .bind(ask.id.as_str())
    }

    /// The due rows are locked `FOR UPDATE SKIP LOCKED` (a concurrent
    /// claimer skips them, and re-checks the lease of any it waited for),
    /// and leased by the database's clock, in one statement.
    fn claim_events(claim: &Claim) -> Query<'_, Self> {
        sqlx::query(pg_sql!(format!(
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
        .bind(claim.now_ms)
        .bind(i64::from(claim.limit))
        .bind(claim.owner.as_str())
        .bind(claim.lease_ms.clamp(0, MAX_SPAN_MS))
    }

    fn idle_sessions() -> &'static str {
        pg_sql!(idle_sessions_sql())
    }

    /// A row value: PostgreSQL starts the index range at it.
    fn bind_idle_cursor<'q>(q: Query<'q, Self>, after: &'q IdleCursor) -> Query<'q, Self> {
        q.bind(after.0).bind(after.1.as_str())
    }
}

#[async_trait]
impl Backend for PgStore {
    type DB = sqlx::Postgres;

    fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn hot(&self) -> &PgPool {
        &self.hot
    }

    /// A refresh's commit in a transaction of its own (the prior status's
    /// row lock held to its end); the rest one statement at a time.
    async fn write(&self, op: WriteOp) -> Result<Written, StoreError> {
        if op.is_commit() {
            let mut tx = self.pool.begin().await?;
            let written = Sql::<sqlx::Postgres>::apply(&mut tx, &op).await?;
            tx.commit().await?;
            Ok(written)
        } else {
            let mut conn = self.pool.acquire().await?;
            Sql::<sqlx::Postgres>::apply(&mut conn, &op).await
        }
    }

    /// One transaction per 1,000 sessions: their rows are locked in id
    /// order first (two instances flushing at once never deadlock), then
    /// moved by one `UPDATE ... FROM UNNEST`.
    async fn write_uses(&self, uses: &[(String, i64)]) -> Result<u64, StoreError> {
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

    /// The rows are locked in id order first (like `note_uses`, so the two
    /// never deadlock), then compared and written by one `UPDATE ... FROM
    /// UNNEST`.
    async fn reseal(&self, rows: &[Resealed]) -> Result<Vec<String>, StoreError> {
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

    /// Waits for a NOTIFY from another instance's change, or `max`; returns
    /// the id notified, to be dropped from the cache at once.
    async fn notified(&self, max: Duration) -> Vec<String> {
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

#[async_trait]
impl Budgets for PgStore {
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
}
