//! The sessions a store keeps: their rows, their refresh leases and the
//! commits of a refresh, each change with its change-log entry, its event
//! and its audit row in one transaction (see the invariants in `mod.rs`).

use async_trait::async_trait;
use sqlx::Row;

use super::keys::SessionKeys;
use super::shared::{dialect_sql, over_sql, unique, Backend, LeaseAsk, Sql, WriteOp};
use super::sql::{self, SESSION_COLUMNS as COLUMNS};
use super::{
    Failure, Health, IdleCursor, IdleSession, Lease, NewEvent, NewSession, Resealed, SealedCount,
    SealedRow, SealedTokens, SessionCount, SessionRecord, StoreError,
};
use crate::audit::AuditAppend;
use crate::secrets::session::{KeyHash, Status};

#[async_trait]
pub trait SessionStore: Send + Sync {
    /// Answers when the store is reachable and can read sessions (`/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Inserts a new session; [`StoreError::DuplicateKey`] when its key
    /// hash exists. `event` (a connect) is appended in the same transaction.
    async fn insert_session(
        &self,
        new: NewSession,
        event: Option<&NewEvent>,
        audit: Option<&AuditAppend>,
    ) -> Result<SessionRecord, StoreError>;

    /// The session any of its keys names (see `SessionKeys::session_for_key`).
    async fn session_by_key(&self, hash: &KeyHash) -> Result<Option<SessionRecord>, StoreError>;

    async fn session_by_id(&self, id: &str) -> Result<Option<SessionRecord>, StoreError>;

    /// All sessions, oldest first.
    async fn list_sessions(&self) -> Result<Vec<SessionRecord>, StoreError>;

    /// The session updated last, if any: the one a start-up check opens to
    /// prove the sealing key fits.
    async fn newest_session(&self) -> Result<Option<SessionRecord>, StoreError>;

    async fn count_sessions(&self) -> Result<Vec<SessionCount>, StoreError>;

    /// Every sealed value (access and refresh tokens) counted by the key id
    /// its header names (see `seal.rs`), by SQL over the stored bytes.
    async fn count_sealed_by_key(&self) -> Result<Vec<SealedCount>, StoreError>;

    /// Up to `limit` sessions, in id order after `after`, holding a sealed
    /// value whose first bytes are not `header` (the version byte and the
    /// primary key's id): the rows `key rewrap` has left to do.
    async fn sealed_not_under(
        &self,
        header: &[u8],
        after: &str,
        limit: u32,
    ) -> Result<Vec<SealedRow>, StoreError>;

    /// Writes re-sealed values, each row only if it still holds the values
    /// it was read with (a compare-and-swap on the sealed bytes, in one
    /// transaction per call). The version and `updated_at` are left alone:
    /// a re-sealed row means what it meant, and a refresh that read the row
    /// before still wins its own compare-and-swap. Returns the ids of the
    /// rows written.
    async fn reseal_rows(&self, rows: &[Resealed]) -> Result<Vec<String>, StoreError>;

    /// Replaces a session's tokens, sets it active (its error cleared) and
    /// bumps its version. With `expected_version`, only if the row still has
    /// that version (compare-and-swap); returns the new record, or `None`
    /// when the session is gone or its version moved on. `event` (a
    /// reconnect) is appended when the row was replaced.
    async fn replace_tokens(
        &self,
        id: &str,
        tokens: SealedTokens,
        expected_version: Option<i64>,
        now: i64,
        event: Option<&NewEvent>,
        audit: Option<&AuditAppend>,
    ) -> Result<Option<SessionRecord>, StoreError>;

    /// Takes the session's refresh lease for `owner` until `until_ms` (unix
    /// milliseconds), unless another owner holds an unexpired one.
    async fn acquire_refresh_lease(
        &self,
        id: &str,
        owner: &str,
        until_ms: i64,
        now_ms: i64,
    ) -> Result<Lease, StoreError>;

    /// Gives the lease back without changing the session.
    async fn release_refresh_lease(&self, id: &str, owner: &str) -> Result<(), StoreError>;

    /// Gives back every lease `owner` still holds (a process shutting down
    /// whose refreshes did not finish in its grace period); returns how many.
    async fn release_refresh_leases(&self, owner: &str) -> Result<u64, StoreError>;

    /// The owners holding a refresh lease now (expired ones too).
    async fn refresh_lease_owners(&self) -> Result<Vec<String>, StoreError>;

    /// Stores refreshed tokens durably and releases the lease, only while
    /// `owner` holds it and the row still has `expected_version`; `health`
    /// says whether the session becomes `active` again (and whether that
    /// was a recovery worth an event).
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
    ) -> Result<Option<SessionRecord>, StoreError>;

    /// Records a transient refresh failure, if the row still has
    /// `expected_version` and does not need reauthorization: `last_error`
    /// and `next_retry_at`, the status `refresh_failing` (the version stays:
    /// the tokens did not change). The lease is released if `owner` holds
    /// it, whatever the version. Returns `true` when the session was
    /// `active` until now (a transition: a change-log entry, and
    /// `failure.event` appended); a failure while already failing updates
    /// the error and the retry time only.
    async fn mark_refresh_failing(
        &self,
        id: &str,
        owner: &str,
        expected_version: i64,
        now: i64,
        failure: Failure<'_>,
    ) -> Result<bool, StoreError>;

    /// Marks the session `reauthorization_required` (its refresh token was
    /// refused: `code`, `invalid_grant` or `invalid_client`, becomes its
    /// `last_error`) and releases the lease, if the row still has
    /// `expected_version`. `event` is appended when it did not need
    /// reauthorization already.
    async fn mark_reauthorization_required(
        &self,
        id: &str,
        expected_version: i64,
        now: i64,
        code: &str,
        event: Option<&NewEvent>,
        audit: Option<&AuditAppend>,
    ) -> Result<bool, StoreError>;

    /// Records when sessions were last used: `(id, unix seconds)`, one entry
    /// per session (of an id given twice, the latest counts; an unknown id
    /// is skipped). `last_used_at` only ever moves forward, and it is not a
    /// change: no version bump, no change-log entry, no event. Written in
    /// few transactions (of up to 250 sessions on SQLite, 1,000 on
    /// PostgreSQL); returns how many rows moved.
    async fn note_uses(&self, uses: &[(String, i64)]) -> Result<u64, StoreError>;

    /// The sessions of `provider` neither used nor refreshed since
    /// `idle_before` (the latest of `last_used_at`, `last_refresh_at` and
    /// `created_at` is older), that can be refreshed (a refresh token, not
    /// `reauthorization_required`, not waiting for a retry after `now`),
    /// in order of `(idle_since, id)` after `after`; at most `limit`.
    /// An indexed range scan (`sessions_idle`), never a pass over every row.
    async fn idle_sessions(
        &self,
        provider: &str,
        idle_before: i64,
        after: &IdleCursor,
        now: i64,
        limit: u32,
    ) -> Result<Vec<IdleSession>, StoreError>;

    /// Deletes a session; `false` when there was none. `event` (a revoke)
    /// is appended when a row was deleted.
    async fn delete_session(
        &self,
        id: &str,
        now: i64,
        event: Option<&NewEvent>,
        audit: Option<&AuditAppend>,
    ) -> Result<bool, StoreError>;

    /// Inserts many new sessions in one transaction (multi-row inserts),
    /// each with its change-log entry, and `audit` (one row for the batch)
    /// last; [`StoreError::DuplicateKey`] (and nothing written) when a key
    /// hash or id exists. For seeding large stores; no events.
    async fn insert_sessions(
        &self,
        batch: &[NewSession],
        audit: Option<&AuditAppend>,
    ) -> Result<u64, StoreError>;
}

over_sql! {
#[async_trait]
impl [<DB, B: Backend<DB = DB>> SessionStore for B] {
    /// An indexed read of `sessions` on the request path's pool: what a
    /// cold lookup needs (a `SELECT 1` answers while `sessions` is locked).
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query(dialect_sql!(DB, "SELECT 1 FROM sessions WHERE key_hash = ?"))
            .bind(&[0u8; 32][..])
            .fetch_optional(self.hot())
            .await?;
        // Answering is not enough: the store must still be the one written to.
        self.unchanged()
    }

    async fn insert_session(
        &self,
        new: NewSession,
        event: Option<&NewEvent>,
        audit: Option<&AuditAppend>,
    ) -> Result<SessionRecord, StoreError> {
        self.writable()?;
        let mut tx = self.pool().begin().await?;
        let text = dialect_sql!(
            DB,
            format!("{} RETURNING {COLUMNS}", sql::insert_sessions_sql(1))
        );
        let row = unique(sql::bind_new_session(sqlx::query(text), &new).fetch_one(&mut *tx).await)?;
        let rec = sql::record(&row)?;
        Sql::<DB>::insert_first_keys(&mut tx, std::slice::from_ref(&new)).await?;
        Sql::<DB>::log_added(&mut tx, std::slice::from_ref(&new)).await?;
        Sql::<DB>::insert_event(&mut tx, event).await?;
        Sql::<DB>::append_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(rec)
    }

    async fn session_by_key(&self, hash: &KeyHash) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self.session_for_key(hash).await?.map(|(session, _)| session))
    }

    async fn session_by_id(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let row = sqlx::query(dialect_sql!(
            DB,
            format!("SELECT {COLUMNS} FROM sessions WHERE id = ?")
        ))
        .bind(id)
        .fetch_optional(self.hot())
        .await?;
        row.as_ref().map(sql::record).transpose()
    }

    async fn list_sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        let text = format!("SELECT {COLUMNS} FROM sessions ORDER BY created_at, {}", DB::INSERT_ORDER);
        let rows = sqlx::query(&text).fetch_all(self.pool()).await?;
        rows.iter().map(sql::record).collect()
    }

    async fn newest_session(&self) -> Result<Option<SessionRecord>, StoreError> {
        let text = format!(
            "SELECT {COLUMNS} FROM sessions ORDER BY updated_at DESC, {} DESC LIMIT 1",
            DB::INSERT_ORDER
        );
        let row = sqlx::query(&text).fetch_optional(self.pool()).await?;
        row.as_ref().map(sql::record).transpose()
    }

    async fn count_sessions(&self) -> Result<Vec<SessionCount>, StoreError> {
        let rows = sqlx::query(
            "SELECT provider, status, COUNT(*) AS n FROM sessions GROUP BY provider, status ORDER BY provider, status",
        )
        .fetch_all(self.pool())
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

    async fn count_sealed_by_key(&self) -> Result<Vec<SealedCount>, StoreError> {
        let rows = sqlx::query(DB::COUNT_SEALED_BY_KEY)
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(sql::sealed_count).collect()
    }

    async fn sealed_not_under(
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
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(sql::sealed_row).collect()
    }

    async fn reseal_rows(&self, rows: &[Resealed]) -> Result<Vec<String>, StoreError> {
        self.reseal(rows).await
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
        self.writable()?;
        let mut tx = self.pool().begin().await?;
        let row = sqlx::query(dialect_sql!(
            DB,
            format!(
                "UPDATE sessions SET access_token = ?, refresh_token = ?, expires_at = ?, status = 'active',
                     last_error = NULL, next_retry_at = NULL, version = version + 1, updated_at = ?
                 WHERE id = ? AND (CAST(? AS BIGINT) IS NULL OR version = ?)
                 RETURNING {COLUMNS}"
            )
        ))
        .bind(tokens.access_token.as_slice())
        .bind(tokens.refresh_token.as_deref())
        .bind(tokens.expires_at)
        .bind(now)
        .bind(id)
        .bind(expected_version)
        .bind(expected_version)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let rec = sql::record(&row)?;
        Sql::<DB>::log_change(&mut tx, id, now).await?;
        Sql::<DB>::insert_event(&mut tx, event).await?;
        Sql::<DB>::append_audit(&mut tx, audit).await?;
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
        let ask = LeaseAsk { id: id.to_owned(), owner: owner.to_owned(), until_ms, now_ms };
        self.write(WriteOp::AcquireLease(ask)).await?.lease()
    }

    async fn release_refresh_lease(&self, id: &str, owner: &str) -> Result<(), StoreError> {
        let op = WriteOp::ReleaseLease { id: id.to_owned(), owner: owner.to_owned() };
        self.write(op).await.map(|_| ())
    }

    async fn release_refresh_leases(&self, owner: &str) -> Result<u64, StoreError> {
        let op = WriteOp::ReleaseLeasesOf { owner: owner.to_owned() };
        self.write(op).await?.count()
    }

    async fn refresh_lease_owners(&self) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(sql::LEASE_OWNERS)
            .fetch_all(self.pool())
            .await?)
    }

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
            Health::Healthy { recovered } => (true, recovered.cloned()),
            Health::Unchanged => (false, None),
        };
        let op = WriteOp::CommitRefresh {
            id: id.to_owned(),
            owner: owner.to_owned(),
            tokens,
            expected_version,
            now,
            healthy,
            recovered,
            audit: audit.cloned(),
        };
        self.write(op).await?.row()
    }

    async fn mark_refresh_failing(
        &self,
        id: &str,
        owner: &str,
        expected_version: i64,
        now: i64,
        failure: Failure<'_>,
    ) -> Result<bool, StoreError> {
        let op = WriteOp::MarkFailing {
            id: id.to_owned(),
            owner: owner.to_owned(),
            expected_version,
            now,
            class: failure.class.to_owned(),
            next_retry_at: failure.next_retry_at,
            event: failure.event.cloned(),
        };
        self.write(op).await?.flag()
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
        let op = WriteOp::MarkReauthorization {
            id: id.to_owned(),
            expected_version,
            now,
            code: code.to_owned(),
            event: event.cloned(),
            audit: audit.cloned(),
        };
        self.write(op).await?.flag()
    }

    async fn note_uses(&self, uses: &[(String, i64)]) -> Result<u64, StoreError> {
        self.write_uses(uses).await
    }

    async fn idle_sessions(
        &self,
        provider: &str,
        idle_before: i64,
        after: &IdleCursor,
        now: i64,
        limit: u32,
    ) -> Result<Vec<IdleSession>, StoreError> {
        let q = sqlx::query(DB::idle_sessions()).bind(provider);
        let rows = DB::bind_idle_cursor(q, after)
            .bind(idle_before)
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(sql::idle_session).collect()
    }

    async fn delete_session(
        &self,
        id: &str,
        now: i64,
        event: Option<&NewEvent>,
        audit: Option<&AuditAppend>,
    ) -> Result<bool, StoreError> {
        self.writable()?;
        let mut tx = self.pool().begin().await?;
        let done = sqlx::query(dialect_sql!(DB, "DELETE FROM sessions WHERE id = ?"))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let deleted = DB::rows_affected(&done) > 0;
        if deleted {
            Sql::<DB>::log_change(&mut tx, id, now).await?;
            Sql::<DB>::insert_event(&mut tx, event).await?;
            Sql::<DB>::append_audit(&mut tx, audit).await?;
        }
        tx.commit().await?;
        Ok(deleted)
    }

    async fn insert_sessions(
        &self,
        batch: &[NewSession],
        audit: Option<&AuditAppend>,
    ) -> Result<u64, StoreError> {
        self.writable()?;
        let mut tx = self.pool().begin().await?;
        let inserted = Sql::<DB>::insert_session_rows(&mut tx, batch).await?;
        Sql::<DB>::log_added(&mut tx, batch).await?;
        Sql::<DB>::append_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(inserted)
    }
}
}
