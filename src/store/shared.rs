//! What both stores run the same way, written once over the sqlx
//! [`Database`](sqlx::Database): each statement with its binds beside it,
//! in `?` placeholders that [`Dialect`] numbers for PostgreSQL. What
//! differs stays in each store (SQLite's single writer and group commit,
//! PostgreSQL's row locks, leases and `NOTIFY`).

use sqlx::{Database, Executor, Pool, Row};

use super::sql::{self, pg_sql, SESSION_COLUMNS as COLUMNS};
use super::{
    EventRow, NewSession, OAuthOutcome, OAuthState, SealedRow, SessionCount, SessionRecord,
    StoreError,
};
use crate::audit::{AuditAppend, AuditFilter, AuditRow};
use crate::secrets::session::{KeyHash, Status};

/// How a database writes a shared statement's placeholders, and reads
/// what a write did.
pub(crate) trait Dialect: Database {
    /// Placeholders `$1, $2, ...` (PostgreSQL) rather than `?` (SQLite).
    const NUMBERED: bool;

    /// The rows a statement wrote.
    fn rows_affected(done: &Self::QueryResult) -> u64;
}

impl Dialect for sqlx::Sqlite {
    const NUMBERED: bool = false;
    fn rows_affected(done: &Self::QueryResult) -> u64 {
        done.rows_affected()
    }
}

impl Dialect for sqlx::Postgres {
    const NUMBERED: bool = true;
    fn rows_affected(done: &Self::QueryResult) -> u64 {
        done.rows_affected()
    }
}

/// A shared statement (`?` placeholders; a `&'static str`, or a `String`
/// made once) as `DB` runs it: numbered by [`pg_sql!`] where `DB` wants.
macro_rules! dialect_sql {
    ($db:ty, $text:expr) => {
        if <$db as Dialect>::NUMBERED {
            pg_sql!($text)
        } else {
            static TEXT: std::sync::LazyLock<String> =
                std::sync::LazyLock::new(|| String::from($text));
            TEXT.as_str()
        }
    };
}

/// A store's pool (or, for PostgreSQL's session reads, its request-path
/// pool), and the statements both stores run alike on it, named as the
/// [`Store`](super::Store) methods that delegate to them. Every statement
/// runs alone: what needs a transaction, the single writer or row locks
/// stays in each store.
pub(crate) struct Shared<'p, DB: Database>(pub &'p Pool<DB>);

impl<'p, DB> Shared<'p, DB>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> &'q [u8]: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<Vec<u8>>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<i64>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'a> &'a str: sqlx::ColumnIndex<DB::Row>,
    usize: sqlx::ColumnIndex<DB::Row>,
    for<'r> String: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
    for<'r> i64: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
    for<'r> Vec<u8>: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
{
    // Sessions: reads that are the same on both stores.

    pub(crate) async fn session_by_key(
        &self,
        hash: &KeyHash,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let row = sqlx::query(dialect_sql!(
            DB,
            format!("SELECT {COLUMNS} FROM sessions WHERE key_hash = ?")
        ))
        .bind(&hash.0[..])
        .fetch_optional(self.0)
        .await?;
        row.as_ref().map(sql::record).transpose()
    }

    pub(crate) async fn session_by_id(
        &self,
        id: &str,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let row = sqlx::query(dialect_sql!(
            DB,
            format!("SELECT {COLUMNS} FROM sessions WHERE id = ?")
        ))
        .bind(id)
        .fetch_optional(self.0)
        .await?;
        row.as_ref().map(sql::record).transpose()
    }

    /// Sessions by provider and status.
    pub(crate) async fn count_sessions(&self) -> Result<Vec<SessionCount>, StoreError> {
        let rows = sqlx::query(dialect_sql!(
            DB,
            "SELECT provider, status, COUNT(*) AS n FROM sessions GROUP BY provider, status ORDER BY provider, status"
        ))
        .fetch_all(self.0)
        .await?;
        rows.iter()
            .map(|r| {
                let status: String = r.try_get("status")?;
                Ok(SessionCount {
                    provider: r.try_get("provider")?,
                    status: Status::parse(&status)
                        .ok_or_else(|| StoreError::Corrupt(status.clone()))?,
                    count: r.try_get("n")?,
                })
            })
            .collect()
    }

    /// A page of [`sql::SEALED_NOT_UNDER`].
    pub(crate) async fn sealed_not_under(
        &self,
        header: &[u8],
        after: &str,
        limit: u32,
    ) -> Result<Vec<SealedRow>, StoreError> {
        let rows = sqlx::query(dialect_sql!(DB, sql::SEALED_NOT_UNDER))
            .bind(after)
            .bind(header)
            .bind(header)
            .bind(i64::from(limit))
            .fetch_all(self.0)
            .await?;
        rows.iter().map(sql::sealed_row).collect()
    }

    // The audit chain, the event outbox and the change log's cursor.

    /// The newest audit rows matching `filter`, oldest first.
    pub(crate) async fn list_audit(
        &self,
        filter: &AuditFilter,
    ) -> Result<Vec<AuditRow>, StoreError> {
        let rows = sqlx::query(dialect_sql!(DB, sql::list_audit_sql()))
            .bind(filter.session_id.as_deref())
            .bind(filter.session_id.as_deref())
            .bind(filter.since_ms)
            .bind(filter.since_ms)
            .bind(i64::from(filter.limit))
            .fetch_all(self.0)
            .await?;
        let mut rows = rows
            .iter()
            .map(sql::audit_row)
            .collect::<Result<Vec<_>, _>>()?;
        rows.reverse();
        Ok(rows)
    }

    /// A page of the audit chain in order.
    pub(crate) async fn audit_page(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StoreError> {
        let rows = sqlx::query(dialect_sql!(DB, sql::audit_page_sql()))
            .bind(after_seq)
            .bind(i64::from(limit))
            .fetch_all(self.0)
            .await?;
        rows.iter().map(sql::audit_row).collect()
    }

    /// Audit rows chained under each key id.
    pub(crate) async fn count_audit_by_key(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(sql::COUNT_AUDIT_BY_KEY)
            .fetch_all(self.0)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("key_id")?, r.try_get("n")?)))
            .collect()
    }

    /// Undelivered events, oldest first.
    pub(crate) async fn list_events(&self, limit: u32) -> Result<Vec<EventRow>, StoreError> {
        let rows = sqlx::query(dialect_sql!(DB, sql::list_events_sql()))
            .bind(i64::from(limit))
            .fetch_all(self.0)
            .await?;
        rows.iter().map(sql::event_row).collect()
    }

    /// Events given up on, oldest first.
    pub(crate) async fn list_given_up_events(
        &self,
        limit: u32,
    ) -> Result<Vec<EventRow>, StoreError> {
        let rows = sqlx::query(dialect_sql!(DB, sql::list_given_up_events_sql()))
            .bind(i64::from(limit))
            .fetch_all(self.0)
            .await?;
        rows.iter().map(sql::event_row).collect()
    }

    /// The change log's newest sequence number (0 when empty).
    pub(crate) async fn change_cursor(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT MAX(seq) FROM session_changes")
            .fetch_one(self.0)
            .await?;
        let seq: Option<i64> = row.try_get(0)?;
        Ok(seq.unwrap_or(0))
    }

    // The OAuth `state` table.

    pub(crate) async fn insert_oauth_state(
        &self,
        state_hash: &[u8; 32],
        state: &OAuthState,
    ) -> Result<(), StoreError> {
        sqlx::query(dialect_sql!(
            DB,
            "INSERT INTO oauth_states (state_hash, provider, session_id, key_hash, created_at) VALUES (?, ?, ?, ?, ?)"
        ))
        .bind(&state_hash[..])
        .bind(state.provider.as_str())
        .bind(state.session_id.as_deref())
        .bind(state.key_hash.as_ref().map(|h| h.0.to_vec()))
        .bind(state.created_at)
        .execute(self.0)
        .await?;
        Ok(())
    }

    pub(crate) async fn peek_oauth_state(
        &self,
        state_hash: &[u8; 32],
        not_before: i64,
    ) -> Result<Option<OAuthState>, StoreError> {
        let row = sqlx::query(dialect_sql!(
            DB,
            "SELECT provider, session_id, key_hash, created_at FROM oauth_states
             WHERE state_hash = ? AND used_at IS NULL AND created_at >= ?"
        ))
        .bind(&state_hash[..])
        .bind(not_before)
        .fetch_optional(self.0)
        .await?;
        row.as_ref().map(oauth_state).transpose()
    }

    pub(crate) async fn insert_browser_oauth_state(
        &self,
        state_hash: &[u8; 32],
        state: &OAuthState,
        browser_hash: &[u8; 32],
        not_before: i64,
        max_pending: u64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(dialect_sql!(
            DB,
            "INSERT INTO oauth_states (state_hash, provider, session_id, key_hash, created_at, browser_hash)
             SELECT ?, ?, ?, ?, ?, ?
             WHERE (SELECT COUNT(*) FROM oauth_states WHERE used_at IS NULL AND created_at >= ?) < ?"
        ))
        .bind(&state_hash[..])
        .bind(state.provider.as_str())
        .bind(state.session_id.as_deref())
        .bind(state.key_hash.as_ref().map(|h| h.0.to_vec()))
        .bind(state.created_at)
        .bind(&browser_hash[..])
        .bind(not_before)
        .bind(i64::try_from(max_pending).unwrap_or(i64::MAX))
        .execute(self.0)
        .await?;
        Ok(DB::rows_affected(&done) > 0)
    }

    pub(crate) async fn count_pending_oauth_states(
        &self,
        not_before: i64,
    ) -> Result<u64, StoreError> {
        let row = sqlx::query(dialect_sql!(
            DB,
            "SELECT COUNT(*) FROM oauth_states WHERE used_at IS NULL AND created_at >= ?"
        ))
        .bind(not_before)
        .fetch_one(self.0)
        .await?;
        let n: i64 = row.try_get(0)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub(crate) async fn take_oauth_state_from_browser(
        &self,
        state_hash: &[u8; 32],
        provider: &str,
        browser_hash: Option<&[u8; 32]>,
        now: i64,
        not_before: i64,
    ) -> Result<Option<OAuthState>, StoreError> {
        // With no browser, `browser_hash = NULL` is never true: only an
        // unbound state is taken.
        let row = sqlx::query(dialect_sql!(
            DB,
            "UPDATE oauth_states SET used_at = ?
             WHERE state_hash = ? AND provider = ? AND used_at IS NULL AND created_at >= ?
               AND (browser_hash IS NULL OR browser_hash = ?)
             RETURNING provider, session_id, key_hash, created_at"
        ))
        .bind(now)
        .bind(&state_hash[..])
        .bind(provider)
        .bind(not_before)
        .bind(browser_hash.map(|h| h.to_vec()))
        .fetch_optional(self.0)
        .await?;
        row.as_ref().map(oauth_state).transpose()
    }

    pub(crate) async fn finish_oauth_state(
        &self,
        state_hash: &[u8; 32],
        outcome: &OAuthOutcome,
    ) -> Result<(), StoreError> {
        let (session, failure) = outcome.columns();
        sqlx::query(dialect_sql!(
            DB,
            "UPDATE oauth_states SET result_session_id = ?, failure = ? WHERE state_hash = ?"
        ))
        .bind(session)
        .bind(failure)
        .bind(&state_hash[..])
        .execute(self.0)
        .await?;
        Ok(())
    }

    pub(crate) async fn oauth_outcome(
        &self,
        state_hash: &[u8; 32],
    ) -> Result<OAuthOutcome, StoreError> {
        let row = sqlx::query(dialect_sql!(
            DB,
            "SELECT result_session_id, failure FROM oauth_states WHERE state_hash = ?"
        ))
        .bind(&state_hash[..])
        .fetch_optional(self.0)
        .await?;
        let Some(row) = row else {
            return Ok(OAuthOutcome::Unknown);
        };
        Ok(OAuthOutcome::from_columns(
            row.try_get("result_session_id")?,
            row.try_get("failure")?,
        ))
    }

    pub(crate) async fn prune_oauth_states(&self, before: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(dialect_sql!(
            DB,
            "DELETE FROM oauth_states WHERE created_at < ? AND (used_at IS NULL OR used_at < ?)"
        ))
        .bind(before)
        .bind(before)
        .execute(self.0)
        .await?;
        Ok(DB::rows_affected(&done))
    }
}

/// Appends `audit` to the chain inside a store's transaction: reads the
/// last row and inserts the next. The caller holds the chain's lock
/// (SQLite: the write transaction; PostgreSQL: the advisory lock).
pub(crate) async fn chain_audit<DB>(
    tx: &mut DB::Connection,
    audit: &AuditAppend,
) -> Result<i64, StoreError>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'q [u8]: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'a> &'a str: sqlx::ColumnIndex<DB::Row>,
    for<'r> i64: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
    for<'r> Vec<u8>: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
{
    let last = sqlx::query(sql::LAST_AUDIT)
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(sql::last_audit)
        .transpose()?;
    let row = audit.chain(last);
    sql::bind_audit(sqlx::query(dialect_sql!(DB, sql::INSERT_AUDIT)), &row)
        .execute(tx)
        .await?;
    Ok(row.seq)
}

/// Inserts new sessions inside a store's transaction, [`sql::BULK_ROWS`]
/// to a statement; the rows inserted, or [`StoreError::DuplicateKey`].
pub(crate) async fn insert_session_rows<DB>(
    tx: &mut DB::Connection,
    batch: &[NewSession],
) -> Result<u64, StoreError>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'q [u8]: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<&'q [u8]>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<i64>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let mut inserted = 0;
    for chunk in batch.chunks(sql::BULK_ROWS) {
        let text = sql::insert_sessions_sql(chunk.len());
        let text = if DB::NUMBERED {
            sql::numbered(&text)
        } else {
            text
        };
        let mut q = sqlx::query(&text);
        for s in chunk {
            q = sql::bind_new_session(q, s);
        }
        match q.execute(&mut *tx).await {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(StoreError::DuplicateKey)
            }
            other => inserted += DB::rows_affected(&other?),
        }
    }
    Ok(inserted)
}

/// An OAuth state row: `provider, session_id, key_hash, created_at`.
fn oauth_state<R>(row: &R) -> Result<OAuthState, StoreError>
where
    R: Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let key_hash: Option<Vec<u8>> = row.try_get("key_hash")?;
    let key_hash = key_hash
        .map(|h| {
            h.try_into()
                .map(KeyHash)
                .map_err(|_| StoreError::Corrupt("oauth state".into()))
        })
        .transpose()?;
    Ok(OAuthState {
        provider: row.try_get("provider")?,
        session_id: row.try_get("session_id")?,
        key_hash,
        created_at: row.try_get("created_at")?,
    })
}
