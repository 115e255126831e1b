//! A session's keys (`session_keys`): each hashed at rest, with its label
//! and scope, added and revoked on its own. A session's first key is
//! written with the session (`insert_session_rows`); adding or revoking a
//! key appends to the change log in its transaction, so every process
//! drops its cached copies (and, for an added key, its absence).

use async_trait::async_trait;

use super::shared::{dialect_sql, over_sql, unique, Backend, Sql};
use super::sql::{self, SESSION_COLUMNS};
use super::{KeyRate, KeyRecord, SessionRecord, StoreError};
use crate::audit::AuditAppend;
use crate::secrets::session::KeyHash;

/// The columns [`key_record`] reads, from `session_keys k`.
const KEY_COLUMNS: &str = "k.key_id AS k_key_id, k.session_id AS k_session_id, k.key_hash AS k_key_hash, \
    k.label AS k_label, k.methods AS k_methods, k.paths AS k_paths, k.rate_requests AS k_rate_requests, \
    k.rate_per_ms AS k_rate_per_ms, k.expires_at AS k_expires_at, k.created_at AS k_created_at, \
    k.last_used_at AS k_last_used_at";

/// Inserts a key for a session that exists (none is inserted otherwise).
const INSERT_KEY: &str =
    "INSERT INTO session_keys (key_id, session_id, key_hash, label, methods, paths,
         rate_requests, rate_per_ms, expires_at, created_at)
     SELECT ?, id, ?, ?, ?, ?, ?, ?, ?, ? FROM sessions WHERE id = ?";

/// A key's last use, only ever moved forward.
const NOTE_KEY_USE: &str = "UPDATE session_keys SET last_used_at = ?
     WHERE key_id = ? AND (last_used_at IS NULL OR last_used_at < ?)";

#[async_trait]
pub trait SessionKeys: Send + Sync {
    /// Adds `key` to its session, with the change-log entry (carrying the
    /// key's hash) and `audit` in the same transaction; `false` when the
    /// session does not exist, [`StoreError::DuplicateKey`] when the hash
    /// names a key already.
    async fn insert_key(
        &self,
        key: &KeyRecord,
        now: i64,
        audit: Option<&AuditAppend>,
    ) -> Result<bool, StoreError>;

    /// Session `session_id`'s keys, oldest first.
    async fn list_keys(&self, session_id: &str) -> Result<Vec<KeyRecord>, StoreError>;

    /// Deletes key `key_id` of session `session_id`, with a change-log
    /// entry and `audit`; `false` when there was none.
    async fn delete_key(
        &self,
        session_id: &str,
        key_id: &str,
        now: i64,
        audit: Option<&AuditAppend>,
    ) -> Result<bool, StoreError>;

    /// The session a key hash names and that key: one indexed read on the
    /// request path's pool.
    async fn session_for_key(
        &self,
        hash: &KeyHash,
    ) -> Result<Option<(SessionRecord, KeyRecord)>, StoreError>;

    /// Records when keys were last used: `(key id, unix seconds)`. Not a
    /// change (no change-log entry); returns how many rows moved.
    async fn note_key_uses(&self, uses: &[(String, i64)]) -> Result<u64, StoreError>;
}

over_sql! {
#[async_trait]
impl [<DB, B: Backend<DB = DB>> SessionKeys for B] {
    async fn insert_key(
        &self,
        key: &KeyRecord,
        now: i64,
        audit: Option<&AuditAppend>,
    ) -> Result<bool, StoreError> {
        self.writable()?;
        let mut tx = self.pool().begin().await?;
        let (requests, per_ms) = key.rate.map(|r| (r.requests, r.per_ms)).unzip();
        let done = unique(
            sqlx::query(dialect_sql!(DB, INSERT_KEY))
                .bind(key.key_id.as_str())
                .bind(&key.key_hash.0[..])
                .bind(key.label.as_deref())
                .bind(key.methods.as_deref())
                .bind(key.paths.as_deref())
                .bind(requests)
                .bind(per_ms)
                .bind(key.expires_at)
                .bind(key.created_at)
                .bind(key.session_id.as_str())
                .execute(&mut *tx)
                .await,
        )?;
        if DB::rows_affected(&done) == 0 {
            return Ok(false);
        }
        Sql::<DB>::log_key_added(&mut tx, &key.session_id, &key.key_hash, now).await?;
        Sql::<DB>::append_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn list_keys(&self, session_id: &str) -> Result<Vec<KeyRecord>, StoreError> {
        let rows = sqlx::query(dialect_sql!(
            DB,
            format!("SELECT {KEY_COLUMNS} FROM session_keys k WHERE k.session_id = ? ORDER BY k.created_at, k.key_id")
        ))
        .bind(session_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(key_record).collect()
    }

    async fn delete_key(
        &self,
        session_id: &str,
        key_id: &str,
        now: i64,
        audit: Option<&AuditAppend>,
    ) -> Result<bool, StoreError> {
        self.writable()?;
        let mut tx = self.pool().begin().await?;
        let done = sqlx::query(dialect_sql!(
            DB,
            "DELETE FROM session_keys WHERE session_id = ? AND key_id = ?"
        ))
        .bind(session_id)
        .bind(key_id)
        .execute(&mut *tx)
        .await?;
        let deleted = DB::rows_affected(&done) > 0;
        if deleted {
            Sql::<DB>::log_change(&mut tx, session_id, now).await?;
            Sql::<DB>::append_audit(&mut tx, audit).await?;
        }
        tx.commit().await?;
        Ok(deleted)
    }

    async fn session_for_key(
        &self,
        hash: &KeyHash,
    ) -> Result<Option<(SessionRecord, KeyRecord)>, StoreError> {
        let row = sqlx::query(dialect_sql!(
            DB,
            format!(
                "SELECT {}, {KEY_COLUMNS} FROM session_keys k JOIN sessions s ON s.id = k.session_id
                 WHERE k.key_hash = ?",
                qualified(SESSION_COLUMNS, "s")
            )
        ))
        .bind(&hash.0[..])
        .fetch_optional(self.hot())
        .await?;
        match row {
            Some(row) => Ok(Some((sql::record(&row)?, key_record(&row)?))),
            None => Ok(None),
        }
    }

    async fn note_key_uses(&self, uses: &[(String, i64)]) -> Result<u64, StoreError> {
        if uses.is_empty() {
            return Ok(0);
        }
        self.writable()?;
        let mut tx = self.pool().begin().await?;
        let mut moved = 0;
        for (key_id, at) in uses {
            let done = sqlx::query(dialect_sql!(DB, NOTE_KEY_USE))
                .bind(*at)
                .bind(key_id.as_str())
                .bind(*at)
                .execute(&mut *tx)
                .await?;
            moved += DB::rows_affected(&done);
        }
        tx.commit().await?;
        Ok(moved)
    }
}
}

/// `a, b, c` as `t.a, t.b, t.c`.
fn qualified(columns: &str, table: &str) -> String {
    columns
        .split(", ")
        .map(|c| format!("{table}.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A key row from `SELECT {KEY_COLUMNS}`.
fn key_record<R>(row: &R) -> Result<KeyRecord, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let key_id: String = row.try_get("k_key_id")?;
    let hash: Vec<u8> = row.try_get("k_key_hash")?;
    let key_hash = KeyHash(
        hash.try_into()
            .map_err(|_| StoreError::Corrupt(key_id.clone()))?,
    );
    let requests: Option<i64> = row.try_get("k_rate_requests")?;
    let per_ms: Option<i64> = row.try_get("k_rate_per_ms")?;
    Ok(KeyRecord {
        session_id: row.try_get("k_session_id")?,
        key_hash,
        label: row.try_get("k_label")?,
        methods: row.try_get("k_methods")?,
        paths: row.try_get("k_paths")?,
        rate: requests
            .zip(per_ms)
            .map(|(requests, per_ms)| KeyRate { requests, per_ms }),
        expires_at: row.try_get("k_expires_at")?,
        created_at: row.try_get("k_created_at")?,
        last_used_at: row.try_get("k_last_used_at")?,
        key_id,
    })
}
