//! The audit chain (`crate::audit`): appended in the transaction of the
//! change it records, or alone, under the lock that orders every appender.

use async_trait::async_trait;
use sqlx::Row;

use super::shared::{dialect_sql, over_sql, Backend, Sql};
use super::sql;
use super::StoreError;
use crate::audit::{AuditAppend, AuditFilter, AuditRow};

#[async_trait]
pub trait AuditLog: Send + Sync {
    /// Appends a row to the audit chain in a transaction of its own, under
    /// the lock that serializes every appender (see `crate::audit`);
    /// returns its `seq`. The methods above that take an `audit` append it
    /// the same way, in the change's transaction, when the change happened.
    async fn append_audit(&self, audit: &AuditAppend) -> Result<i64, StoreError>;

    /// The newest `filter.limit` rows matching `filter`, oldest first.
    async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRow>, StoreError>;

    /// Rows with `seq > after_seq`, in `seq` order, at most `limit`.
    async fn audit_page(&self, after_seq: i64, limit: u32) -> Result<Vec<AuditRow>, StoreError>;

    /// How many audit rows each key id chained (`key retire` keeps the
    /// audit key of a key with rows).
    async fn count_audit_by_key(&self) -> Result<Vec<(String, i64)>, StoreError>;
}

over_sql! {
#[async_trait]
impl [<DB, B: Backend<DB = DB>> AuditLog for B] {
    async fn append_audit(&self, audit: &AuditAppend) -> Result<i64, StoreError> {
        self.writable()?;
        let mut tx = self.pool().begin_with(DB::BEGIN_AUDIT).await?;
        let seq = Sql::<DB>::append_audit(&mut tx, Some(audit)).await?;
        tx.commit().await?;
        seq.ok_or(StoreError::Closed)
    }

    async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRow>, StoreError> {
        let rows = sqlx::query(dialect_sql!(DB, sql::list_audit_sql()))
            .bind(filter.session_id.as_deref())
            .bind(filter.session_id.as_deref())
            .bind(filter.since_ms)
            .bind(filter.since_ms)
            .bind(i64::from(filter.limit))
            .fetch_all(self.pool())
            .await?;
        let mut rows = rows
            .iter()
            .map(sql::audit_row)
            .collect::<Result<Vec<_>, _>>()?;
        rows.reverse();
        Ok(rows)
    }

    async fn audit_page(&self, after_seq: i64, limit: u32) -> Result<Vec<AuditRow>, StoreError> {
        let rows = sqlx::query(dialect_sql!(DB, sql::audit_page_sql()))
            .bind(after_seq)
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(sql::audit_row).collect()
    }

    async fn count_audit_by_key(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(sql::COUNT_AUDIT_BY_KEY)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("key_id")?, r.try_get("n")?)))
            .collect()
    }
}
}
