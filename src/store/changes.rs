//! The change log (`session_changes`): every change to a session appends to
//! it in its transaction, and other processes sharing the store read it
//! to keep their caches coherent.

use async_trait::async_trait;
use sqlx::Row;

use super::shared::{dialect_sql, over_sql, Backend};
use super::sql;
use super::{Changes, StoreError};

#[async_trait]
pub trait ChangeFeed: Send + Sync {
    /// The newest change-log position.
    async fn change_cursor(&self) -> Result<i64, StoreError>;

    /// The change log after `cursor`: ids of sessions changed, the key
    /// hashes of sessions inserted (so negative caches forget them), and
    /// the new cursor.
    async fn changes(&self, cursor: i64) -> Result<Changes, StoreError>;

    /// Ids of sessions changed after `cursor`, and the new cursor.
    async fn changes_since(&self, cursor: i64) -> Result<(i64, Vec<String>), StoreError> {
        let c = self.changes(cursor).await?;
        Ok((c.cursor, c.ids))
    }

    /// Forgets change-log entries older than `before` (unix seconds).
    async fn prune_changes(&self, before: i64) -> Result<(), StoreError>;

    /// Returns when another process may have changed a session, or after
    /// `max`, with the ids it knows changed (they are dropped from the cache
    /// at once; the change-log poll that follows catches the rest). Polling
    /// stores just wait; PostgreSQL wakes on NOTIFY.
    async fn wait_for_change(&self, max: std::time::Duration) -> Vec<String>;
}

over_sql! {
#[async_trait]
impl [<DB, B: Backend<DB = DB>> ChangeFeed for B] {
    async fn change_cursor(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT MAX(seq) FROM session_changes")
            .fetch_one(self.pool())
            .await?;
        let seq: Option<i64> = row.try_get(0)?;
        Ok(seq.unwrap_or(0))
    }

    async fn changes(&self, cursor: i64) -> Result<Changes, StoreError> {
        let rows = DB::changes(cursor).fetch_all(self.pool()).await?;
        let mut changes = sql::changes(&rows, cursor)?;
        if DB::REREADS {
            // Dropping a cached session twice (or forgetting an absent key
            // twice) is harmless, but once is enough.
            changes.ids.sort_unstable();
            changes.ids.dedup();
            changes.added_keys.sort_unstable_by_key(|h| h.0);
            changes.added_keys.dedup();
        }
        Ok(changes)
    }

    async fn prune_changes(&self, before: i64) -> Result<(), StoreError> {
        sqlx::query(dialect_sql!(
            DB,
            "DELETE FROM session_changes WHERE at < ? AND seq < (SELECT MAX(seq) FROM session_changes)"
        ))
        .bind(before)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn wait_for_change(&self, max: std::time::Duration) -> Vec<String> {
        self.notified(max).await
    }
}
}
